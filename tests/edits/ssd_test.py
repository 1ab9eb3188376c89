"""Tests for clax.edits.ssd (selective synaptic dampening) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.edits import ssd_dampen


def np_ssd(theta, full, forget, alpha, lam):
    """SSD's ``modify_weight`` on one tensor, in float32 numpy like the PyTorch original."""
    theta, full, forget = (np.asarray(a, np.float32) for a in (theta, full, forget))
    out = theta.copy()
    locations = forget > np.float32(alpha) * full
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.float32(lam) * full / forget
    update = np.minimum(weight[locations], 1.0)
    out[locations] = theta[locations] * update
    return out, locations


def _random_case(seed):
    rng = np.random.default_rng(seed)
    shapes = {"convs": {0: {"kernel": (3, 3, 1, 4), "bias": (4,)}},
              "norm": {"scale": (4,)}, "head": {"kernel": (4, 3), "bias": (3,)}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))

    def fisher(s):
        f = rng.exponential(size=s) * (rng.uniform(size=s) < 0.8)  # some exact zeros
        return jnp.asarray(f, jnp.float32)

    full = jax.tree.map(fisher, shapes, is_leaf=lambda s: isinstance(s, tuple))
    forget = jax.tree.map(lambda f: jnp.asarray(
        np.asarray(f) * rng.choice([0.5, 20.0, 200.0], size=f.shape), jnp.float32), full)
    # Entries with F_full = 0 and F_forget > 0 (β = 0), and exact ties F_f = α·F_D.
    forget["head"]["bias"] = forget["head"]["bias"].at[0].set(1.0)
    full["head"]["bias"] = full["head"]["bias"].at[0].set(0.0)
    forget["norm"]["scale"] = 10.0 * full["norm"]["scale"]
    return params, full, forget


@pytest.mark.parametrize("alpha,lam", [(10.0, 1.0), (5.0, 0.1), (50.0, 3.0)])
def test_matches_numpy_reference(alpha, lam):
    params, full, forget = _random_case(int(alpha))
    new, report = ssd_dampen(params, full, forget, alpha=alpha, lam=lam)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total_selected = 0
    for (path, p), f, g, q in zip(flat, jax.tree.leaves(full), jax.tree.leaves(forget),
                                  jax.tree.leaves(new), strict=True):
        expected, selected = np_ssd(p, f, g, alpha, lam)
        np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-6, atol=0)
        # Unselected entries are bit-identical.
        np.testing.assert_array_equal(np.asarray(q)[~selected], np.asarray(p)[~selected])
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        assert report.dampened[name] == int(selected.sum())
        assert report.total[name] == p.size
        total_selected += int(selected.sum())
        assert q.dtype == p.dtype
    assert report.num_dampened == total_selected > 0
    # Strict selection: F_f = α·F_D exactly is not selected.
    if alpha == 10.0:
        assert report.dampened["norm/scale"] == 0
    # F_D = 0 < F_f: selected and zeroed (β = 0).
    assert float(new["head"]["bias"][0]) == 0.0
    # Never increases a magnitude.
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        assert np.all(np.abs(np.asarray(q)) <= np.abs(np.asarray(p)))


def test_bad_input():
    params, full, forget = _random_case(0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            ssd_dampen(params, full, forget, alpha=bad)
        with pytest.raises(ValueError, match="lam"):
            ssd_dampen(params, full, forget, lam=bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="alpha must be a finite number > 0"):
            ssd_dampen(params, full, forget, alpha=bad)
        with pytest.raises(TypeError, match="lam"):
            ssd_dampen(params, full, forget, lam=bad)
    missing = {k: v for k, v in forget.items() if k != "norm"}
    with pytest.raises(ValueError, match="fisher_forget.*norm/scale"):
        ssd_dampen(params, full, missing)
    negative = {**full, "head": {**full["head"], "kernel": -jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match="fisher_full.*head/kernel.*negative"):
        ssd_dampen(params, negative, forget)
    nan = {**forget, "norm": {"scale": jnp.full((4,), jnp.nan)}}
    with pytest.raises(ValueError, match="fisher_forget.*norm/scale.*non-finite"):
        ssd_dampen(params, full, nan)


def test_under_jit_it_says_it_is_host_side_and_ssd_apply_is_the_jittable_edit():
    # Under jit it used to fail deep inside with a ConcretizationTypeError (int(count)), or
    # with "alpha must be a finite number > 0, got JitTracer" for a traced alpha.
    from clax.edits import ssd_apply

    params, full, forget = _random_case(1)
    with pytest.raises(TypeError, match=r"ssd_dampen got a traced params: it is a one-shot "
                                        r"host-side edit.*outside jax.jit.*ssd_apply"):
        jax.jit(lambda p: ssd_dampen(p, full, forget)[0])(params)
    with pytest.raises(TypeError, match="ssd_dampen got a traced alpha"):
        jax.jit(lambda a: ssd_dampen(params, full, forget, alpha=a)[0])(10.0)
    new, report = ssd_dampen(params, full, forget)
    jitted, counts = jax.jit(ssd_apply)(params, full, forget, 10.0, 1.0)
    jax.tree.map(np.testing.assert_array_equal, jitted, new)
    assert sum(int(c) for c in jax.tree.leaves(counts)) == report.num_dampened


def test_per_example_fisher_bounds_the_selection():
    """With the exact per-example, mean-normalised Fisher over ``D ⊇ D_f``,
    ``F_D >= (|D_f|/|D|)·F_f`` entry-wise, so ``α > |D|/|D_f|`` selects nothing while the
    batch-mean Fisher (SSD's) can still select: why SSD's α = 10 needs the batch Fisher
    when the forget class is a tenth of the data."""
    from clax.core import ModelFns
    from clax.fisher import diagonal_fisher
    from clax.models import make_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 4, size=120).astype(np.int32)
    forget = y == 2
    fns, params, state = ModelFns.split(make_model(
        "mlp", input_shape=(6, 6, 1), num_classes=4, widths=(16,), seed=0))

    def fisher(xs, ys, granularity):
        return diagonal_fisher(fns, params, (xs, ys), model_state=state, labels="empirical",
                               granularity=granularity, normalization="mean", batch_size=8)

    full = fisher(x, y, "example")
    part = fisher(x[forget], y[forget], "example")
    ratio = len(y) / forget.sum()
    _, at_bound = ssd_dampen(params, full, part, alpha=1.001 * ratio, lam=1.0)
    assert at_bound.num_dampened == 0
    _, below = ssd_dampen(params, full, part, alpha=0.5 * ratio, lam=1.0)
    assert below.num_dampened > 0
    _, batch = ssd_dampen(params, fisher(x, y, "batch"), fisher(x[forget], y[forget], "batch"),
                          alpha=1.001 * ratio, lam=1.0)
    assert batch.num_dampened > 0


def _num_changed(params, new):
    return sum(int(np.sum(np.asarray(p) != np.asarray(q)))
               for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True))


def test_search_alpha_stops_at_the_largest_alpha_reaching_the_target():
    from clax.edits import ssd_search_alpha

    params, full, forget = _random_case(3)
    # A stand-in "forget accuracy" that falls as more entries change: reaches 0.5 once
    # at least 12 entries are dampened.
    def accuracy(new):
        return 1.0 if _num_changed(params, new) < 12 else 0.5

    alphas = (2.0, 300.0, 30.0, 100.0, 10.0)  # any order: tried from large to small
    res = ssd_search_alpha(params, full, forget, forget_accuracy=accuracy, target=0.5,
                           alphas=alphas, lam=1.0)
    tried = [a for a, _, _ in res.trace]
    assert tried == sorted(tried, reverse=True) and tried[0] == 300.0
    counts = [n for _, _, n in res.trace]
    assert counts == sorted(counts)  # nested selection: more entries as α falls
    assert res.reached and res.trace[-1][1] <= 0.5 and len(res.trace) >= 3
    assert all(acc > 0.5 for _, acc, _ in res.trace[:-1])
    assert res.alpha == tried[-1]
    expected, report = ssd_dampen(params, full, forget, alpha=res.alpha, lam=1.0)
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert res.report == report

    never = ssd_search_alpha(params, full, forget, forget_accuracy=lambda p: 1.0,
                             target=0.0, alphas=alphas)
    assert not never.reached and never.alpha == 2.0 and len(never.trace) == len(alphas)


def test_search_alpha_bad_input():
    from clax.edits import ssd_search_alpha

    params, full, forget = _random_case(0)
    ok = {"forget_accuracy": lambda p: 0.0}
    for target in (-0.1, 1.5):
        with pytest.raises(ValueError, match="target"):
            ssd_search_alpha(params, full, forget, target=target, **ok)
    for target in (True, "0"):
        with pytest.raises(TypeError, match=r"target \(an accuracy\) must be a number in"):
            ssd_search_alpha(params, full, forget, target=target, **ok)
    with pytest.raises(ValueError, match="alphas must be a non-empty sequence"):
        ssd_search_alpha(params, full, forget, target=0.0, alphas=(), **ok)
    with pytest.raises(ValueError, match=r"alphas\[1\] must be a finite number > 0, got -1.0"):
        ssd_search_alpha(params, full, forget, target=0.0, alphas=(10.0, -1.0), **ok)
    with pytest.raises(TypeError, match=r"alphas must be a non-empty sequence \(list or tuple\)"):
        ssd_search_alpha(params, full, forget, target=0.0, alphas=10.0, **ok)


def test_report_keys_of_an_nnx_state_have_no_value_suffix():
    from flax import nnx

    from clax.models import make_model

    model = make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)
    params = nnx.state(model, nnx.Param)  # nnx.Param leaves: paths end in .value
    full = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3), params)
    forget = jax.tree.map(lambda p: jnp.ones(p.shape), params)
    _, report = ssd_dampen(params, full, forget)
    assert sorted(report.total) == ["head/bias", "head/kernel", "layers/0/bias",
                                    "layers/0/kernel"]
    assert report.num_dampened == report.num_total
