"""Tests for clax.models.peft: LoRA, bottleneck adapters, prompt tokens and their masks.

"Bit-identical" below means equal bytes (``tobytes``), stricter than ``array_equal``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.core import ModelFns, before
from clax.methods.ewc import ewc_update_memory
from clax.methods.gpm import gpm_memory, gpm_update_memory
from clax.models import MLP, TinyCausalLM, TinyViT, capture_layer_inputs
from clax.models.peft import (
    ADAPTER_KEYS,
    BottleneckAdapter,
    LoRALinear,
    PromptTokens,
    add_adapters,
    add_lora,
    add_prompt,
    count_params,
    is_adapter_path,
    merge_lora,
    peft_mask,
    trainable_params,
)
from clax.params import path_str, train_only
from clax.transforms.ewc import ewc_penalty
from clax.transforms.projection import bases_by_path, one_dimensional, subspace_projection
from tests.training.helpers import tiny_scenario

ALL_VIT_LINEARS = r"blocks/\d+/(attn/(query|key|value|out)|fc1|fc2)|head"


def _vit(seed=0):
    return TinyViT((8, 8, 1), num_classes=4, patch_size=4, dim=16, depth=2, num_heads=2,
                   rngs=nnx.Rngs(seed))


def _mlp(seed=0, **kwargs):
    return MLP((4, 4, 1), num_classes=4, widths=(16,), rngs=nnx.Rngs(seed), **kwargs)


def _lm(seed=0):
    return TinyCausalLM((8,), num_classes=16, dim=16, depth=2, num_heads=2, rngs=nnx.Rngs(seed))


def _images(n=6, shape=(8, 8, 1), seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *shape))


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _flat(tree):
    """{path_str: numpy array} of a module's params, an nnx.State or a pure dict."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    pairs = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {path_str(p): np.array(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in pairs}


def _assert_frozen_and_trained(before_params, after_params, mask):
    """Every frozen leaf bit-identical; every adapter leaf changed."""
    flags = _flat(mask)
    assert set(flags) == set(before_params) == set(after_params)
    changed = {k for k in before_params if not _same_bits(before_params[k], after_params[k])}
    frozen_changed = {k for k in changed if not flags[k]}
    assert not frozen_changed, f"frozen parameters moved: {sorted(frozen_changed)}"
    adapters = {k for k in flags if is_adapter_path(tuple(k.split("/")))}
    assert adapters and adapters <= changed, f"unchanged: {sorted(adapters - changed)}"


def _ce(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _lm_loss(model, tokens):
    logits = model(tokens)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def _forward(model, x):
    return model(x)


@nnx.jit
def _train_step(model, optimizer, x, y, extra):
    """One classification step; ``extra`` holds the keyword extra args of the update."""
    loss, grads = nnx.value_and_grad(_ce)(model, x, y)
    optimizer.update(model, grads, **extra)
    return loss


# ------------------------------------------------------------------------------- LoRA


def test_lora_at_init_is_bit_identical_to_the_base():
    model, x = _vit(), _images()
    y_eager, y_jit = model(x), _forward(model, x)
    params = _flat(model)
    query = model.blocks[0].attn.query
    paths = add_lora(model, rank=4, targets=ALL_VIT_LINEARS, rngs=nnx.Rngs(1))
    assert paths == ["blocks/0/attn/key", "blocks/0/attn/out", "blocks/0/attn/query",
                     "blocks/0/attn/value", "blocks/0/fc1", "blocks/0/fc2",
                     "blocks/1/attn/key", "blocks/1/attn/out", "blocks/1/attn/query",
                     "blocks/1/attn/value", "blocks/1/fc1", "blocks/1/fc2", "head"]
    assert isinstance(model.blocks[0].attn.query, LoRALinear)
    assert model.blocks[0].attn.query.base is query  # the original layer, not a copy
    assert _same_bits(model(x), y_eager)
    assert _same_bits(_forward(model, x), y_jit)
    after = _flat(model)
    for name, value in params.items():  # each base parameter moved under .../base/
        head, _, leaf = name.rpartition("/")
        moved = name if name in after else f"{head}/base/{leaf}"
        assert _same_bits(after[moved], value), name


def test_lora_linear_init_scale_and_errors():
    layer = LoRALinear(nnx.Linear(256, 8, rngs=nnx.Rngs(0)), rank=64, alpha=16,
                       rngs=nnx.Rngs(1))
    assert (layer.rank, layer.alpha, layer.scale) == (64, 16.0, 0.25)
    assert layer.in_features == 256 and layer.out_features == 8
    a = np.asarray(layer.lora_a.kernel[...])
    assert a.shape == (256, 64) and layer.lora_b.kernel[...].shape == (64, 8)
    assert not np.any(np.asarray(layer.lora_b.kernel[...]))
    assert not layer.lora_a.use_bias and not layer.lora_b.use_bias
    # peft's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound/sqrt(3)
    bound = 1 / np.sqrt(256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.03)
    assert LoRALinear(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(0)).scale == 1.0

    base = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rank"):
        LoRALinear(base, rank=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(base, rank=2, alpha=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="nnx.Linear"):
        LoRALinear(nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(0))


def test_lora_keeps_the_base_dtype():
    base = nnx.Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 8))
    y = base(x)
    layer = LoRALinear(base, rank=2, rngs=nnx.Rngs(1))
    assert layer.lora_a.kernel[...].dtype == base.kernel[...].dtype == jnp.float32
    assert layer(x).dtype == y.dtype == jnp.bfloat16
    assert _same_bits(layer(x), y)


def _randomise_lora(model, seed=0):
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            key, ka, kb = jax.random.split(key, 3)
            node.lora_a.kernel[...] = jax.random.normal(ka, node.lora_a.kernel[...].shape)
            node.lora_b.kernel[...] = 0.1 * jax.random.normal(kb, node.lora_b.kernel[...].shape)


def test_merge_lora_equals_unmerged():
    model, x = _vit(), _images()
    paths = add_lora(model, rank=4, alpha=8, targets=ALL_VIT_LINEARS, rngs=nnx.Rngs(1))
    _randomise_lora(model)
    y = np.asarray(model(x))
    fc1 = model.blocks[0].fc1
    expected = (np.asarray(fc1.base.kernel[...], np.float64) + fc1.scale
                * np.asarray(fc1.lora_a.kernel[...], np.float64)
                @ np.asarray(fc1.lora_b.kernel[...], np.float64))
    assert merge_lora(model) == paths
    assert merge_lora(model) == []  # nothing left to merge
    assert type(model.blocks[0].fc1) is nnx.Linear and type(model.head) is nnx.Linear
    assert set(_flat(model)) == set(_flat(_vit()))  # the original parameter paths
    # W + s·A·B exactly up to float32 rounding of the sum.
    np.testing.assert_allclose(np.asarray(model.blocks[0].fc1.kernel[...]), expected,
                               rtol=1e-6, atol=1e-6)
    # x(W + sAB) vs xW + s(xA)B: float32 rounding only (measured ~1e-6; bound 1e-5).
    np.testing.assert_allclose(np.asarray(model(x)), y, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, np.asarray(_vit()(x)), atol=1e-3)  # the update is not zero


def test_add_lora_on_list_items_moves_the_parameters():
    model = _mlp()
    assert add_lora(model, rank=3, targets=r"layers/\d+", rngs=nnx.Rngs(1)) == ["layers/0"]
    assert set(_flat(model)) == {
        "layers/0/base/kernel", "layers/0/base/bias", "layers/0/lora_a/kernel",
        "layers/0/lora_b/kernel", "head/kernel", "head/bias"}
    assert _flat(model)["layers/0/lora_a/kernel"].shape == (16, 3)


def test_add_lora_errors_leave_the_model_unchanged():
    model = _vit()
    before_paths = set(_flat(model))
    cases = [
        ("blocks/9/attn/query", "matches no nnx.Linear.*blocks/0/attn/query"),
        ("query", "matches no nnx.Linear"),  # fullmatch, not search
        ("blocks/0/attn", "matches no nnx.Linear"),  # a container without own params
        ("patch_embed", "'patch_embed', a Conv"),
        (r"blocks/0/attn/query|blocks/0/ln1", "'blocks/0/ln1', a LayerNorm"),
        ("(", "not a valid regex"),
    ]
    for targets, message in cases:
        with pytest.raises(ValueError, match=message):
            add_lora(model, rank=2, targets=targets, rngs=nnx.Rngs(0))
    assert set(_flat(model)) == before_paths  # no partial surgery
    with pytest.raises(TypeError, match="targets"):
        add_lora(model, rank=2, targets=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, rank=0, targets="head", rngs=nnx.Rngs(0))
    add_lora(model, rank=2, targets="head", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already is a LoRALinear"):
        add_lora(model, rank=2, targets="head", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'head', a MultiHeadLinear"):
        add_lora(_mlp(num_tasks=2), rank=2, targets="head", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------ adapters


def test_adapters_start_as_identity_then_train():
    model, x = _vit(), _images()
    y = model(x)
    assert add_adapters(model, bottleneck=8, rngs=nnx.Rngs(1)) == ["blocks/0", "blocks/1"]
    adapter = model.blocks[0].mlp_adapter
    assert isinstance(adapter, BottleneckAdapter) and adapter.scale == 0.1
    assert not np.any(np.asarray(adapter.up.kernel[...]))
    assert not np.any(np.asarray(adapter.up.bias[...]))
    assert not np.any(np.asarray(adapter.down.bias[...]))
    assert np.abs(np.asarray(adapter.down.kernel[...])).max() <= 1 / np.sqrt(16)
    assert _same_bits(model(x), y)  # up is zero: the blocks are unchanged

    before_params, mask = _flat(model), peft_mask(model)
    optimizer = nnx.Optimizer(model, train_only(optax.sgd(0.5), mask), wrt=nnx.Param)
    labels = jnp.arange(6) % 4
    _train_step(model, optimizer, x, labels, {})
    after = _flat(model)
    assert not np.array_equal(after["blocks/0/mlp_adapter/up/kernel"],
                              before_params["blocks/0/mlp_adapter/up/kernel"])
    # down gets no gradient while up is zero: only the up projection moves at step 1.
    assert _same_bits(after["blocks/0/mlp_adapter/down/kernel"],
                      before_params["blocks/0/mlp_adapter/down/kernel"])
    for name, value in before_params.items():
        if "mlp_adapter" not in name:
            assert _same_bits(after[name], value), name
    assert not np.allclose(np.asarray(model(x)), np.asarray(y), atol=1e-6)


def test_add_adapters_targets_language_model_and_errors():
    model = _vit()
    assert add_adapters(model, bottleneck=4, targets="blocks/1", rngs=nnx.Rngs(0)) == ["blocks/1"]
    assert model.blocks[0].mlp_adapter is None
    with pytest.raises(ValueError, match="already has an mlp_adapter"):
        add_adapters(model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matches no block.*blocks/0"):
        add_adapters(_vit(), targets="blocks/7", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MLP has no block with an mlp_adapter hook"):
        add_adapters(_mlp(), rngs=nnx.Rngs(0))

    lm = _lm()
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 16)
    logits = lm(tokens)
    assert add_adapters(lm, bottleneck=4, rngs=nnx.Rngs(0)) == ["blocks/0", "blocks/1"]
    assert _same_bits(lm(tokens), logits)


# ------------------------------------------------------------------------------- prompt


def test_prompt_lengthens_the_sequence_and_trains():
    model, x = _vit(), _images()
    labels = jnp.arange(6) % 4
    _, inputs = capture_layer_inputs(model, x)
    assert inputs[("blocks", 0, "attn", "query")].shape == (6, 5, 16)  # cls + 4 patches
    assert add_prompt(model, length=3, rngs=nnx.Rngs(1)) == ["prompt"]
    assert isinstance(model.prompt, PromptTokens)
    tokens = np.asarray(model.prompt.tokens[...])
    assert tokens.shape == (3, 16) and np.abs(tokens).max() <= 1 and tokens.std() > 0.4
    assert model.prompt(5).shape == (5, 3, 16)
    _, inputs = capture_layer_inputs(model, x)
    assert inputs[("blocks", 0, "attn", "query")].shape == (6, 8, 16)  # + 3 prompt tokens
    assert model(x).shape == (6, 4)

    before_params, mask = _flat(model), peft_mask(model)
    assert [k for k, v in _flat(mask).items() if v] == ["prompt/tokens"]
    optimizer = nnx.Optimizer(model, train_only(optax.adam(0.05), mask), wrt=nnx.Param)
    losses = []
    for _ in range(10):
        losses.append(float(_train_step(model, optimizer, x, labels, {})))
    assert losses[-1] < losses[0]
    after = _flat(model)
    assert not np.array_equal(after["prompt/tokens"], before_params["prompt/tokens"])
    assert all(_same_bits(after[k], v) for k, v in before_params.items() if k != "prompt/tokens")

    with pytest.raises(ValueError, match="already has a prompt"):
        add_prompt(model, length=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MLP has no prompt hook"):
        add_prompt(_mlp(), length=2, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- masks


def _adapted_vit():
    model = _vit()
    add_lora(model, rank=2, targets=r"blocks/\d+/attn/(query|value)", rngs=nnx.Rngs(1))
    add_adapters(model, bottleneck=8, rngs=nnx.Rngs(2))
    add_prompt(model, length=3, rngs=nnx.Rngs(3))
    return model


def test_peft_mask_on_module_state_and_pure_dict():
    model = _adapted_vit()
    _, params, _ = ModelFns.split(model)
    masks = [_flat(peft_mask(model)), _flat(peft_mask(nnx.state(model, nnx.Param))),
             _flat(peft_mask(params))]
    assert masks[0] == masks[1] == masks[2]
    assert all(type(v) is bool for v in jax.tree.leaves(peft_mask(params)))  # static flags
    trainable = {k for k, v in masks[0].items() if v}
    assert trainable == {k for k in masks[0]
                         if any(key in k.split("/") for key in ADAPTER_KEYS)}
    assert "blocks/0/attn/query/lora_a/kernel" in trainable
    assert "blocks/0/attn/query/base/kernel" not in trainable
    assert "blocks/1/mlp_adapter/up/bias" in trainable and "prompt/tokens" in trainable

    # LoRA: 2 blocks x (query, value) x (16x2 + 2x16); adapters: 2 x (16x8 + 8 + 8x16 + 16);
    # prompt: 3x16.
    expected = 4 * 64 + 2 * 280 + 48
    total = sum(v.size for v in _flat(params).values())
    assert count_params(model, peft_mask(model)) == (expected, total)
    assert count_params(params, peft_mask(params, train=("head",))) == (expected + 16 * 4 + 4,
                                                                        total)
    head = _flat(peft_mask(params, train=("head",)))
    assert head["head/kernel"] and head["head/bias"] and not head["norm/scale"]
    selected = _flat(trainable_params(params, peft_mask(params)))
    assert set(selected) == trainable

    with pytest.raises(TypeError, match="sequence of regex"):
        peft_mask(model, train="head")
    with pytest.raises(ValueError, match="matches no parameter path"):
        peft_mask(model, train=("nope",))
    with pytest.raises(ValueError, match="no trainable parameter"):
        peft_mask(_vit())
    assert sum(_flat(peft_mask(_vit(), train=("^head/",))).values()) == 2  # linear probing


# ------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["vit", "lm"])
def test_frozen_base_training_changes_only_adapters(kind):
    """train_only(adam, peft_mask) on a LoRA'd model: base bit-identical, adapters move."""
    key = jax.random.key(0)
    if kind == "vit":
        model, x, y = _vit(), _images(8), jnp.arange(8) % 4
        add_lora(model, rank=4, targets=ALL_VIT_LINEARS, rngs=nnx.Rngs(1))

        def loss_fn(m):
            return _ce(m, x, y)
    else:
        model = _lm()
        tokens = jax.random.randint(key, (8, 8), 0, 16)
        add_lora(model, rank=4, targets=r"blocks/\d+/(attn/(query|key|value|out)|fc1|fc2)|head",
                 rngs=nnx.Rngs(1))

        def loss_fn(m):
            return _lm_loss(m, tokens)

    mask = peft_mask(model)
    before_params = _flat(model)
    optimizer = nnx.Optimizer(model, train_only(optax.adam(1e-2), mask), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    _assert_frozen_and_trained(before_params, _flat(model), mask)


def _batches(task, batch_size=32, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(task.y_train), batch_size, replace=False)
        yield task.x_train[idx], task.y_train[idx]


def test_gpm_bases_are_taken_on_the_adapter_inputs():
    """GPM over the LoRA factors only: bases from the factors' own inputs (x and x·A), the
    next task's updates orthogonal to them, the base untouched."""
    scenario = tiny_scenario("permuted")
    task0, task1 = scenario.tasks
    model = _mlp()
    add_lora(model, rank=4, targets=r"layers/\d+|head", rngs=nnx.Rngs(1))
    mask = peft_mask(model)

    # The factors are ordinary Linear layers: capture sees lora_a get x, lora_b get x·A.
    x = jnp.asarray(task0.x_train[:8])
    _, inputs = capture_layer_inputs(model, x)
    flat_x = x.reshape(8, -1)
    np.testing.assert_array_equal(inputs[("layers", 0, "lora_a")], flat_x)
    np.testing.assert_array_equal(inputs[("layers", 0, "lora_b")],
                                  model.layers[0].lora_a(flat_x))

    bases = gpm_memory(trainable_params(model, mask))  # bases for the adapters only
    names = {"layers/0/lora_a/kernel": 16, "layers/0/lora_b/kernel": 4,
             "head/lora_a/kernel": 16, "head/lora_b/kernel": 4}
    assert {k: v.vectors.shape[0] for k, v in bases_by_path(bases).items()} == names

    tx = train_only(before(subspace_projection(freeze_mask=one_dimensional))(optax.sgd(0.2)),
                    mask)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for xb, yb in _batches(task0):
        _train_step(model, optimizer, xb, yb, {"bases": bases})
    base_before = _flat(model)
    bases = gpm_update_memory(model, bases, task0.x_train, task_index=0, threshold=0.9,
                              key=jax.random.key(0))
    ranks = {k: int(v.rank) for k, v in bases_by_path(bases).items()}
    assert all(ranks.values()), ranks
    assert ranks["layers/0/lora_a/kernel"] < 16  # room left to learn task 1
    # The registered gpm method's memory (every kernel, the frozen bases too) holds the
    # same adapter bases: the restriction only drops the bases nothing would use.
    full = bases_by_path(gpm_update_memory(model, None, task0.x_train, task_index=0,
                                           threshold=0.9, key=jax.random.key(0)))
    assert {"layers/0/base/kernel", "head/base/kernel"} <= set(full)
    for name, basis in bases_by_path(bases).items():
        np.testing.assert_array_equal(full[name].rank, basis.rank)
        np.testing.assert_allclose(full[name].vectors, basis.vectors, atol=1e-6)

    # One step of task 1, update computed by the same transform (SGD: the update is the
    # projected gradient times -lr, so Mᵀ U = 0 up to float32 rounding of the projection).
    xb, yb = next(_batches(task1, seed=1))
    params = nnx.state(model, nnx.Param)
    grads = nnx.grad(_ce)(model, xb, yb)
    updates, _ = tx.update(grads, tx.init(params), params, bases=bases)
    updates = _flat(updates)
    for name, basis in bases_by_path(bases).items():
        u = updates[name]
        v = np.asarray(basis.vectors)[:, : int(basis.rank)]
        residual = np.linalg.norm(v.T @ u)
        assert residual <= 1e-5 * max(np.linalg.norm(u), 1e-12), (name, residual)
    u = updates["layers/0/lora_a/kernel"]
    assert np.linalg.norm(u) > 0  # orthogonal, not zero
    g = _flat(grads)["layers/0/lora_a/kernel"]
    v = np.asarray(bases_by_path(bases)["layers/0/lora_a/kernel"].vectors)
    assert np.linalg.norm(v.T @ g) > 1e-3 * np.linalg.norm(g)  # the raw gradient was not

    optimizer.update(model, grads, bases=bases)
    after = _flat(model)
    for name, value in base_before.items():
        if not _flat(mask)[name]:
            assert _same_bits(after[name], value), name


def test_ewc_restricted_to_adapter_params():
    """EWC memory over the trainable group only: u = g + λ F ⊙ (θ − θ*) on the adapters, the
    base frozen; the full-model memory gives the same update (matched to the trainable
    leaves by path)."""
    scenario = tiny_scenario("permuted")
    task0, task1 = scenario.tasks
    model = _mlp()
    add_lora(model, rank=4, targets=r"layers/\d+", rngs=nnx.Rngs(1))
    mask = peft_mask(model, train=("^head/",))
    warmup = nnx.Optimizer(model, train_only(optax.adam(1e-2), mask), wrt=nnx.Param)
    for xb, yb in _batches(task0):
        _train_step(model, warmup, xb, yb, {})

    memory = ewc_update_memory(model, None, (task0.x_train, task0.y_train),
                               key=jax.random.key(0))
    fisher = trainable_params(memory.fisher, mask)
    anchor = trainable_params(memory.anchor, mask)
    assert set(_flat(fisher)) == {k for k, v in _flat(mask).items() if v}
    assert _flat(fisher)["layers/0/lora_a/kernel"].max() > 0

    lam, lr = 50.0, 0.05
    tx = train_only(before(ewc_penalty(lam=lam))(optax.sgd(lr)), mask)
    # The full-model memory is matched to train_only's trainable subtree by path: the
    # same updates as the restricted memory.
    xb, yb = task1.x_train[:8], task1.y_train[:8]
    grads = nnx.grad(_ce)(model, xb, yb)
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    full_u, _ = tx.update(grads, state, params, fisher=memory.fisher, anchor=memory.anchor)
    part_u, _ = tx.update(grads, state, params, fisher=fisher, anchor=anchor)
    jax.tree.map(np.testing.assert_array_equal, full_u, part_u)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    f, a = _flat(fisher), _flat(anchor)
    base_before = _flat(model)
    penalties = []
    for xb, yb in _batches(task1, steps=3, seed=1):
        theta, g = _flat(model), _flat(nnx.grad(_ce)(model, xb, yb))
        optimizer.update(model, nnx.grad(_ce)(model, xb, yb), fisher=fisher, anchor=anchor)
        new = _flat(model)
        for name in f:
            penalty = lam * f[name] * (theta[name] - a[name])
            np.testing.assert_allclose(new[name], theta[name] - lr * (g[name] + penalty),
                                       rtol=1e-5, atol=1e-6, err_msg=name)
        penalties.append(max(np.abs(lam * f[k] * (theta[k] - a[k])).max() for k in f))
    # θ = θ* at first (up to the rounding of EWC's S_Fθ / S_F anchor), then pulled back.
    assert penalties[0] < 1e-3 * penalties[-1]
    after = _flat(model)
    for name, value in base_before.items():
        if not _flat(mask)[name]:
            assert _same_bits(after[name], value), name
