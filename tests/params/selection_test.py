"""Tests for clax.params.selection: HFT, KappaTune and Fisher-importance masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.models import make_model
from clax.params import (
    condition_numbers,
    fisher_importance_mask,
    half_fine_tuning_mask,
    invert_mask,
    kappatune_mask,
    mask_labels,
    path_str,
    tensor_importance,
    train_only,
)


def _transformer(num_blocks=4, d=4):
    """Paths of a small LLaMA-like transformer (values are irrelevant to HFT)."""
    def z(*s):
        return np.zeros(s, np.float32)

    def dense(i, o):
        return {"kernel": z(i, o), "bias": z(o)}

    block = {
        "attn": {name: dense(d, d) for name in ("query", "key", "value", "out")},
        "mlp": {name: dense(d, d) for name in ("gate", "up", "down")},
        "ln1": {"scale": z(d), "bias": z(d)},
        "ln2": {"scale": z(d), "bias": z(d)},
    }
    return {
        "blocks": {i: jax.tree.map(np.copy, block) for i in range(num_blocks)},
        "embed": {"embedding": z(10, d)},
        "head": dense(d, 10),
        "norm": {"scale": z(d), "bias": z(d)},
    }


def _flags(mask):
    return {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                 "bias": rng.normal(size=(4,)).astype(np.float32)},
        "layers": {i: {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                       "bias": rng.normal(size=(5,)).astype(np.float32)} for i in range(3)},
        "head": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                 "bias": rng.normal(size=(3,)).astype(np.float32)},
    }


# --------------------------------------------------------------------------------------
# Masks freeze exactly what they say


def _masks(params):
    fisher = jax.tree.map(lambda p: np.abs(p) + 0.1, params)
    return {
        "hft": half_fine_tuning_mask(params, stage=0, seed=0),
        "kappatune": kappatune_mask(params, num_tensors=2),
        "fisher": fisher_importance_mask(params, fisher, freeze_fraction=0.5),
    }


@pytest.mark.parametrize("selector", ["hft", "kappatune", "fisher"])
@pytest.mark.parametrize("how", ["train_only", "masked_then_freeze"])
def test_a_step_with_the_mask_leaves_frozen_leaves_bit_identical(selector, how):
    params = jax.tree.map(jnp.asarray, _random_params())
    mask = _masks(params)[selector]
    assert all(isinstance(f, bool) for f in jax.tree.leaves(mask))
    assert 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))
    base = optax.adamw(0.1, weight_decay=0.5)  # weight decay would move frozen leaves
    if how == "train_only":
        tx = train_only(base, mask)
    else:
        tx = optax.chain(optax.masked(base, mask), optax.transforms.freeze(invert_mask(mask)))
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    new, state = step(params, state)
    new, state = step(new, state)
    for path, flag in _flags(mask).items():
        old_leaf = np.asarray(_flags(params)[path])
        new_leaf = np.asarray(_flags(new)[path])
        if flag:
            assert np.all(new_leaf != old_leaf), path
        else:
            np.testing.assert_array_equal(new_leaf, old_leaf)  # bit-identical


def test_train_only_keeps_no_optimizer_state_for_frozen_leaves():
    params = _random_params()
    mask = kappatune_mask(params, num_tensors=1)
    state = train_only(optax.adam(1e-3), mask).init(params)
    mu = state.inner_states["trainable"].inner_state[0].mu
    kept = {path_str(p): not isinstance(x, optax.MaskedNode)
            for p, x in jax.tree_util.tree_leaves_with_path(
                mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))}
    assert kept == _flags(mask)


def test_train_only_forwards_extra_args_to_the_trainable_transform():
    def update(updates, state, params=None, *, factor, **extra):
        return jax.tree.map(lambda u: u * factor, updates), state

    scale = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = train_only(scale, {"a": True, "b": False})
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    updates, _ = tx.update(params, tx.init(params), params, factor=3.0, unrelated=1)
    np.testing.assert_array_equal(updates["a"], [3.0, 3.0])
    np.testing.assert_array_equal(updates["b"], [0.0, 0.0])


def test_optax_masked_alone_passes_frozen_gradients_through():
    # The pitfall the module docstring warns about: masked() does not freeze.
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    tx = optax.masked(optax.sgd(1.0), {"a": True, "b": False})
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(updates["b"], params["b"])  # raw gradient, not zero


def test_mask_helpers_check_leaves():
    assert mask_labels({"a": True, "b": False}) == {"a": "trainable", "b": "frozen"}
    assert invert_mask({"a": True, "b": [False]}) == {"a": False, "b": [True]}
    with pytest.raises(TypeError, match=r"bool at every parameter path.*'b'"):
        mask_labels({"a": True, "b": 1})
    with pytest.raises(ValueError, match=r"path 'c' is in params but not in trainable"):
        train_only(optax.sgd(1.0), {"a": True, "b": False}).init(
            {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)})


def _nnx_mlp():
    return make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)


def _mask_forms():
    """The same mask (kernels trainable, biases frozen) as a pure dict, an nnx.State of
    nnx.Param-wrapped bools and a mask builder's output for an nnx.State."""
    state = nnx.state(_nnx_mlp(), nnx.Param)
    return {
        "dict": jax.tree.map(lambda p: p.ndim > 1, nnx.to_pure_dict(state)),
        "param_wrapped": jax.tree.map(lambda p: p.ndim > 1, state),
        "builder": kappatune_mask(state, num_tensors=2),  # the two kernels (κ of a bias: n/a)
    }


@pytest.mark.parametrize("form", ["dict", "param_wrapped", "builder"])
@pytest.mark.parametrize("jit", [False, True])
def test_train_only_through_nnx_optimizer(form, jit):
    # nnx.Optimizer initialises optax with an nnx.State of nnx.Param and updates with an
    # nnx.State of arrays: the mask matches both by path, whatever its own container.
    model = _nnx_mlp()
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, train_only(optax.adam(0.1), _mask_forms()[form]),
                              wrt=nnx.Param)
    x, y = jnp.ones((3, 2, 2, 1)), jnp.arange(3)

    def step(model, optimizer):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    step = nnx.jit(step) if jit else step
    step(model, optimizer)
    step(model, optimizer)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree.leaves(after), strict=True):
        moved = bool(np.any(np.asarray(new) != np.asarray(old)))
        assert moved == path_str(path).endswith("kernel"), path_str(path)


def test_masks_of_an_nnx_state_are_states_of_bools():
    state = nnx.state(_nnx_mlp(), nnx.Param)
    mask = _mask_forms()["builder"]
    assert isinstance(mask, nnx.State)
    assert not any(isinstance(v, nnx.Variable) for v in
                   jax.tree.leaves(mask, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    hft = half_fine_tuning_mask(state, stage=0)
    assert isinstance(hft, nnx.State)
    fisher = jax.tree.map(jnp.abs, nnx.to_pure_dict(state))  # a dict Fisher for a State
    frozen = fisher_importance_mask(state, fisher, freeze_fraction=0.5)
    assert sum(not f for f in jax.tree.leaves(frozen)) == 2
    with pytest.raises(ValueError, match="path 'layers/0/bias' is in params but not in "
                                         "trainable"):
        pure = nnx.to_pure_dict(state)
        del pure["layers"][0]["bias"]
        train_only(optax.sgd(1.0), jax.tree.map(lambda _: True, pure)).init(state)


# --------------------------------------------------------------------------------------
# HFT


def _modules(mask):
    """{module path: flag}, checking that a module's leaves share one flag."""
    out = {}
    for path, flag in _flags(mask).items():
        module = path.rsplit("/", 1)[0] if "/" in path else path
        assert out.setdefault(module, flag) == flag, module
    return out


def _category(module):
    last = module.rsplit("/", 1)[-1]
    if last.startswith("ln") or last == "norm":
        return "norm"
    return "attention" if "/attn/" in module else "other"


@pytest.mark.parametrize("seed,stage", [(0, 0), (0, 1), (3, 7)])
def test_hft_trains_half_of_each_category_in_each_block(seed, stage):
    params = _transformer(num_blocks=4)
    modules = _modules(half_fine_tuning_mask(params, stage=stage, seed=seed))
    groups = {}
    for module, flag in modules.items():
        block = int(module.split("/")[1]) if module.startswith("blocks/") else -1
        groups.setdefault((_category(module), block), []).append(flag)
    assert len(groups) == 4 * 3 + 2  # per block: attention, other (mlp), norm; outside: 2
    for (category, block), flags in groups.items():
        n, k = len(flags), sum(flags)
        assert k in (math.floor(n / 2), math.ceil(n / 2)), (category, block, flags)
        if n % 2 == 0:
            assert k == n // 2  # attention: exactly 2 of 4; norms: 1 of 2
    for category in ("attention", "other", "norm"):  # odd groups alternate to reach half
        flags = [f for (c, _), fs in groups.items() if c == category for f in fs]
        assert sum(flags) in (math.floor(len(flags) / 2), math.ceil(len(flags) / 2))
    mlp = [sum(groups[("other", b)]) for b in range(4)]
    assert sorted(mlp) == [1, 1, 2, 2]  # 3 FFN matrices per block: 1, 2, 1, 2 (or 2, 1, ...)
    assert mlp[0] != mlp[1] and mlp[1] != mlp[2]


def test_hft_is_deterministic_per_seed_and_stage_and_redraws_per_stage():
    params = _transformer(num_blocks=4)
    a = half_fine_tuning_mask(params, stage=2, seed=5)
    assert a == half_fine_tuning_mask(params, stage=2, seed=5)
    stages = [half_fine_tuning_mask(params, stage=s, seed=5) for s in range(6)]
    # Fails only if 2+ of 15 pairs collide among ~1e7 equally likely masks (~1e-12).
    assert len({tuple(jax.tree.leaves(m)) for m in stages}) >= 5
    assert half_fine_tuning_mask(params, stage=2, seed=6) != a


def test_hft_fraction_extremes_tensor_units_and_abstract_params():
    params = _transformer(num_blocks=2)
    assert not any(jax.tree.leaves(half_fine_tuning_mask(params, stage=0, fraction=0.0)))
    assert all(jax.tree.leaves(half_fine_tuning_mask(params, stage=0, fraction=1.0)))
    # Leaves one by one: per block 4 of 8 attention, 3 of 6 MLP and 2 of 4 norm leaves;
    # outside, 1 or 2 of (embedding, head kernel, head bias) and 1 of 2 norm leaves.
    tensors = half_fine_tuning_mask(params, stage=0, unit="tensor")
    assert sum(jax.tree.leaves(tensors)) in (2 * 9 + 1 + 1, 2 * 9 + 2 + 1)
    bare = {"layers": [np.zeros((2, 2))] * 4, "head": np.zeros((2, 3))}  # list items: units
    assert sum(jax.tree.leaves(half_fine_tuning_mask(bare, stage=0)["layers"])) == 2
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert half_fine_tuning_mask(abstract, stage=1) == half_fine_tuning_mask(params, stage=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stage": -1}, r"stage must be a non-negative int"),
        ({"stage": 0, "fraction": 1.5}, r"fraction must be a number in \[0, 1\]"),
        ({"stage": 0, "unit": "row"}, r"unit must be one of \['module', 'tensor'\]"),
        ({"stage": 0, "categories": [(r"kernel$", "w")]},
         r"leaves of module 'blocks/0/attn/key' fall in different categories"),
    ],
)
def test_hft_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        half_fine_tuning_mask(_transformer(num_blocks=1), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stage": 1.0}, r"stage must be a non-negative int, got 1.0 \(float\)"),
        ({"stage": 0, "seed": "0"}, r"seed must be a non-negative int, got '0' \(str\)"),
        ({"stage": 0, "fraction": "half"}, r"fraction must be a number in \[0, 1\]"),
        ({"stage": 0, "unit": None}, r"unit must be one of \['module', 'tensor'\], got None"),
    ],
)
def test_hft_rejects_arguments_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        half_fine_tuning_mask(_transformer(num_blocks=1), **kwargs)


# --------------------------------------------------------------------------------------
# KappaTune


def _with_singular_values(shape, singular_values, seed):
    """A tensor whose matrix view (prod(shape[:-1]), shape[-1]) has these singular values."""
    rng = np.random.default_rng(seed)
    m, n = int(np.prod(shape[:-1])), shape[-1]
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (u @ np.diag(singular_values) @ v.T).reshape(shape)


def test_condition_numbers_match_numpy_cond_with_conv_reshaped():
    params = _random_params(seed=3)
    params["zero"] = {"kernel": np.zeros((4, 3), np.float32)}
    params["big"] = {"embedding": np.ones((50, 2), np.float32)}
    kappas = condition_numbers(params, max_dim=20)
    assert list(kappas) == ["conv/kernel", "head/kernel", "layers/0/kernel",
                            "layers/1/kernel", "layers/2/kernel", "zero/kernel"]
    for path, leaf in _flags(params).items():
        if path in kappas and path != "zero/kernel":
            ref = np.linalg.cond(leaf.astype(np.float64).reshape(-1, leaf.shape[-1]))
            np.testing.assert_allclose(kappas[path], ref, rtol=1e-10)
    conv = params["conv"]["kernel"].astype(np.float64)
    # The PyTorch layout (out, in*kh*kw) has the same singular values.
    torch_view = conv.transpose(3, 2, 0, 1).reshape(4, -1)
    np.testing.assert_allclose(kappas["conv/kernel"], np.linalg.cond(torch_view), rtol=1e-10)
    assert kappas["zero/kernel"] == math.inf
    assert "big/embedding" in condition_numbers(params)  # only max_dim skipped it


def test_kappatune_trains_the_lowest_condition_numbers():
    spectra = {"a": [3, 1, 1], "b": [1, 1, 1], "c": [100, 10, 1], "d": [2, 2, 1], "e": [5, 4, 1]}
    params = {name: {"kernel": _with_singular_values((2, 3, 3), s, i).astype(np.float32),
                     "bias": np.ones(3, np.float32)}
              for i, (name, s) in enumerate(spectra.items())}
    kappas = condition_numbers(params)
    np.testing.assert_allclose([kappas[f"{n}/kernel"] for n in spectra], [3, 1, 100, 2, 5],
                               rtol=1e-5)
    mask = _flags(kappatune_mask(params, num_tensors=3))
    assert {p for p, f in mask.items() if f} == {"b/kernel", "d/kernel", "a/kernel"}
    assert not any(mask[f"{n}/bias"] for n in spectra)  # 1-D tensors never train
    assert _flags(kappatune_mask(params, fraction=0.4)) == _flags(
        kappatune_mask(params, num_tensors=2))
    every = _flags(kappatune_mask(params, num_tensors=50))
    assert {p for p, f in every.items() if f} == {f"{n}/kernel" for n in spectra}
    # Skipped by max_dim means frozen.
    big = {**params, "wide": {"kernel": _with_singular_values((40, 2), [1, 1], 9)}}
    assert not _flags(kappatune_mask(big, num_tensors=6, max_dim=10))["wide/kernel"]


def test_kappatune_ties_keep_flatten_order():
    params = {n: {"kernel": np.eye(3, dtype=np.float32)} for n in ("x", "a", "m")}
    assert [p for p, f in _flags(kappatune_mask(params, num_tensors=2)).items() if f] == [
        "a/kernel", "m/kernel"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, r"exactly one of num_tensors and fraction"),
        ({"num_tensors": 2, "fraction": 0.5}, r"exactly one of num_tensors and fraction"),
        ({"fraction": 1.5}, r"fraction must be a number in \[0, 1\]"),
        ({"num_tensors": -1}, r"num_tensors must be a non-negative int"),
        ({"num_tensors": 1, "max_dim": 0}, r"max_dim must be None or a positive int"),
    ],
)
def test_kappatune_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kappatune_mask(_random_params(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_tensors": 2.0}, r"num_tensors must be a non-negative int, got 2.0 \(float\)"),
        ({"num_tensors": 1, "max_dim": 8.0}, r"max_dim must be None or a positive int, got 8.0"),
        ({"fraction": True}, r"fraction must be a number in \[0, 1\], got True \(bool\)"),
    ],
)
def test_kappatune_rejects_arguments_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        kappatune_mask(_random_params(), **kwargs)


def test_kappatune_names_a_non_finite_weight():
    params = _random_params()
    params["layers"][1]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'layers/1/kernel' has non-finite entries"):
        kappatune_mask(params, num_tensors=1)


# --------------------------------------------------------------------------------------
# Fisher importance


@pytest.mark.parametrize("freeze_fraction", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_fisher_mask_freezes_the_highest_mean_fisher_tensors(freeze_fraction):
    params = _random_params()
    rng = np.random.default_rng(1)
    fisher = jax.tree.map(lambda p: rng.exponential(size=p.shape) * rng.uniform(0.1, 10),
                          params)
    paths = list(_flags(params))
    means = np.array([_flags(fisher)[p].mean() for p in paths])
    k = math.floor(freeze_fraction * len(paths) + 0.5)
    frozen_ref = {paths[i] for i in np.argsort(-means, kind="stable")[:k]}
    mask = _flags(fisher_importance_mask(params, fisher, freeze_fraction=freeze_fraction))
    assert {p for p, f in mask.items() if not f} == frozen_ref
    importance = tensor_importance(params, fisher)
    np.testing.assert_allclose([importance[p] for p in paths], means, rtol=1e-12)


def test_fisher_mask_uses_the_mean_not_the_sum():
    params = {"big": np.zeros((100, 10)), "small": np.zeros((2,))}
    fisher = {"big": np.full((100, 10), 0.1), "small": np.full((2,), 1.0)}  # big sums higher
    mask = fisher_importance_mask(params, fisher, freeze_fraction=0.5)
    assert mask == {"big": True, "small": False}


@pytest.mark.parametrize(
    "fisher,match",
    [
        ({"a": np.ones((2, 2))}, r"path 'b' is in params but not in fisher"),
        ({"a": np.ones((2, 2)), "b": np.ones(3), "c": np.ones(1)},
         r"path 'c' is in fisher but not in params"),
        ({"a": np.ones((2, 3)), "b": np.ones(3)},
         r"differ at path 'a': shape \(2, 2\) vs \(2, 3\)"),
        ({"a": np.ones((2, 2)), "b": np.array([1.0, -1e-3, 0.0])},
         r"negative entries at 'b'"),
        ({"a": np.array([[1.0, np.nan], [0.0, 0.0]]), "b": np.ones(3)}, r"NaN entries at 'a'"),
    ],
)
def test_fisher_mask_names_the_bad_path(fisher, match):
    params = {"a": np.zeros((2, 2)), "b": np.zeros(3)}
    with pytest.raises(ValueError, match=match):
        fisher_importance_mask(params, fisher, freeze_fraction=0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_fisher_mask_rejects_fraction_outside_unit_interval(bad):
    params = {"a": np.zeros(2)}
    with pytest.raises(ValueError, match=r"freeze_fraction must be a number in \[0, 1\]"):
        fisher_importance_mask(params, {"a": np.ones(2)}, freeze_fraction=bad)


@pytest.mark.parametrize("bad", [True, "half", None])
def test_fisher_mask_rejects_fraction_of_the_wrong_type(bad):
    params = {"a": np.zeros(2)}
    with pytest.raises(TypeError, match=r"freeze_fraction must be a number in \[0, 1\], got"):
        fisher_importance_mask(params, {"a": np.ones(2)}, freeze_fraction=bad)
