"""Prototype heads (NCM, TEEN, LDA) from streaming statistics against batch formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clax.analytic import prototypes as protos

C, D = 6, 5


def dataset(n=160, seed=0):
    """Features with a class-dependent offset; classes 4 and 5 never appear."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.int32)
    x = (rng.normal(size=(n, D)) + 2.0 * rng.normal(size=(4, D))[labels]).astype(np.float32)
    return x, labels


# ------------------------------------------------------------------ numpy references


def np_means(x, labels):
    return np.stack([x[labels == c].mean(0) if (labels == c).any() else np.zeros(D)
                     for c in range(C)])


def np_normalize(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def np_ncm(x, labels, queries):
    seen = np.bincount(labels, minlength=C) > 0
    logits = np_normalize(queries) @ np_normalize(np_means(x, labels)).T
    return np.where(seen, logits, protos.UNSEEN_LOGIT)


def np_teen(prototypes, base_ids, new_ids, alpha, tau):
    """TEEN's ``soft_calibration`` transcribed (``wangkiw/TEEN``, models/teen/Network.py)."""
    out = np.array(prototypes, np.float64)
    base = np_normalize(out[base_ids])
    cur = np_normalize(out[new_ids])
    w = cur @ base.T * tau
    w = np.exp(w - w.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    delta = np_normalize(w @ base)
    out[new_ids] = (1 - alpha) * cur + alpha * delta
    return out


def np_lda(x, labels, queries, shrinkage=1.0):
    """FSA's ``compute_lda_head``: total unbiased covariance + shrinkage·I, equal priors."""
    x64 = np.asarray(x, np.float64)
    sigma = np.cov(x64, rowvar=False) + shrinkage * np.eye(D)
    means = np_means(x64, labels)
    w = np.linalg.solve(sigma, means.T)
    b = np.sum(means.T * w, 0)
    seen = np.bincount(labels, minlength=C) > 0
    return np.where(seen, queries @ w - 0.5 * b, protos.UNSEEN_LOGIT)


def stream(x, labels, sizes, order, pad=64):
    """Statistics accumulated over the batches of `sizes`, visited in `order`.

    Each batch is padded to `pad` rows with a mask (one compiled shape).
    """
    edges = np.cumsum([0, *sizes])
    stats = protos.init_stats(C, D)
    for i in order:
        rows = np.arange(edges[i], edges[i] + pad) % len(x)
        mask = np.arange(pad) < sizes[i]
        stats = protos.update_stats(stats, x[rows], labels[rows], mask=mask)
    return stats


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_in_any_order_equals_batch_formulas(seed):
    x, labels = dataset(seed=seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), 6, replace=False))
    sizes = np.diff([0, *cuts, len(x)])
    while sizes.max() > 64:  # split big batches (the padded batch holds 64 rows)
        i = int(sizes.argmax())
        sizes = np.insert(sizes, i + 1, sizes[i] // 2)
        sizes[i] -= sizes[i + 1]
    stats = stream(x, labels, sizes, rng.permutation(len(sizes)))
    queries = dataset(20, seed=seed + 10)[0]

    np.testing.assert_array_equal(stats.counts, np.bincount(labels, minlength=C))
    np.testing.assert_allclose(protos.class_means(stats), np_means(x, labels), atol=1e-5)
    np.testing.assert_allclose(protos.total_covariance(stats),
                               np.cov(np.asarray(x, np.float64), rowvar=False),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(protos.ncm_logits(stats, queries), np_ncm(x, labels, queries),
                               atol=1e-5)
    np.testing.assert_allclose(protos.lda_logits(stats, queries), np_lda(x, labels, queries),
                               rtol=1e-4, atol=1e-4)
    assert (np.asarray(protos.ncm_logits(stats, queries))[:, 4:] == protos.UNSEEN_LOGIT).all()


def test_merge_is_associative_and_equals_the_union():
    x, labels = dataset()
    parts = [protos.update_stats(protos.init_stats(C, D), x[i:i + 40], labels[i:i + 40])
             for i in range(0, 160, 40)]
    whole = protos.update_stats(protos.init_stats(C, D), x, labels)
    left = functools.reduce(protos.merge_stats, parts)
    right = protos.merge_stats(parts[3], protos.merge_stats(
        parts[1], protos.merge_stats(parts[2], parts[0])))
    for merged in (left, right):
        np.testing.assert_array_equal(merged.counts, whole.counts)
        np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(merged.second_moment, whole.second_moment, rtol=1e-5,
                                   atol=1e-3)


def test_eight_devices_with_psum_equal_batch_formulas():
    devices = np.array(jax.devices()[:8])
    assert len(devices) == 8
    mesh = Mesh(devices, ("data",))
    x, labels = dataset(n=8 * 24)
    mask = np.arange(len(x)) % 7 != 3  # padding rows spread over the shards

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                       out_specs=P())
    def sharded_stats(x, labels, mask):
        local = protos.update_stats(protos.init_stats(C, D), x, labels, mask=mask)
        return protos.psum_stats(local, "data")

    stats = sharded_stats(x, labels, mask)
    xs, ls = x[mask], labels[mask]
    queries = dataset(16, seed=5)[0]
    np.testing.assert_array_equal(stats.counts, np.bincount(ls, minlength=C))
    np.testing.assert_allclose(protos.class_means(stats), np_means(xs, ls), atol=1e-5)
    np.testing.assert_allclose(protos.ncm_logits(stats, queries), np_ncm(xs, ls, queries),
                               atol=1e-5)
    np.testing.assert_allclose(protos.lda_logits(stats, queries), np_lda(xs, ls, queries),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha,tau", [(0.5, 16.0), (0.1, 4.0)])
def test_teen_calibration_matches_reference(alpha, tau):
    x, labels = dataset()
    stats = protos.update_stats(protos.init_stats(C, D), x, labels)
    means = protos.class_means(stats)
    base = np.array([True, True, False, False, False, False])
    new = np.array([False, False, True, True, False, False])
    got = protos.teen_calibrate(means, jnp.asarray(base), jnp.asarray(new), alpha=alpha,
                                tau=tau)
    want = np_teen(np.asarray(means), [0, 1], [2, 3], alpha, tau)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[[0, 1, 4, 5]], np.asarray(means)[[0, 1, 4, 5]])
    # alpha = 0: the new prototypes only get normalised (same cosine logits).
    same = protos.teen_calibrate(means, jnp.asarray(base), jnp.asarray(new), alpha=0.0)
    np.testing.assert_allclose(same[2:4], np_normalize(np.asarray(means)[2:4]), atol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_classes"):
        protos.init_stats(0, 3)
    with pytest.raises(ValueError, match="dtype"):
        protos.init_stats(2, 3, dtype=jnp.int32)
    stats = protos.init_stats(C, D)
    with pytest.raises(ValueError, match=rf"shape \(n, {D}\)"):
        protos.update_stats(stats, np.zeros((2, D + 1), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        protos.update_stats(stats, np.zeros((2, D), np.float32), np.array([1, 6], np.int32))
    with pytest.raises(ValueError, match="alpha"):
        protos.teen_calibrate(jnp.zeros((C, D)), jnp.ones(C, bool), jnp.ones(C, bool),
                              alpha=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        protos.lda_head(stats, shrinkage=0.0)
    with pytest.raises(TypeError, match=r"num_classes must be a positive int, got 2.0 \(float"):
        protos.init_stats(2.0, 3)
    with pytest.raises(TypeError, match=r"shrinkage must be a finite number > 0, got '1'"):
        protos.lda_head(stats, shrinkage="1")
    with pytest.raises(TypeError, match=r"tau must be a finite number > 0, got None"):
        protos.teen_calibrate(jnp.zeros((C, D)), jnp.ones(C, bool), jnp.ones(C, bool), tau=None)
