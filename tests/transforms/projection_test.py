"""Tests for clax.transforms.projection (GPM's gradient projection as an optax transform)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clax.methods.gpm import gpm_memory
from clax.models import make_model
from clax.params import train_only
from clax.subspace import SubspaceBasis, empty_basis
from clax.transforms import one_dimensional, subspace_projection

ATOL = 1e-5


def random_basis(seed, n, capacity, rank):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, capacity)))
    vectors = np.where(np.arange(capacity)[None, :] < rank, q, 0.0).astype(np.float32)
    return SubspaceBasis(jnp.asarray(vectors), jnp.asarray(rank, jnp.int32))


def tree(seed):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {
        "dense": {"kernel": normal(6, 3), "bias": normal(3)},
        "conv": {"kernel": normal(2, 2, 3, 4)},  # n = 2*2*3 = 12
        "head": {"kernel": normal(2, 3, 5), "bias": jnp.ones((2, 5))},
    }


def reference(g, basis):
    """Numpy ``G − V Vᵀ G`` on the (n, -1) view."""
    v = np.asarray(basis.vectors, np.float64)
    flat = np.asarray(g, np.float64).reshape(v.shape[0], -1)
    return (flat - v @ (v.T @ flat)).reshape(g.shape)


@pytest.fixture(scope="module")
def setup():
    grads = tree(0)
    bases = {"dense": {"kernel": random_basis(1, 6, 6, 2)},
             "conv": {"kernel": random_basis(2, 12, 8, 5)}}
    return grads, bases


def test_projects_kernels_and_passes_other_leaves(setup):
    grads, bases = setup
    tx = subspace_projection()
    out, _ = jax.jit(lambda g, b: tx.update(g, tx.init(g), bases=b))(grads, bases)
    for name in ("dense", "conv"):
        basis = bases[name]["kernel"]
        np.testing.assert_allclose(out[name]["kernel"], reference(grads[name]["kernel"], basis),
                                   atol=ATOL)
        flat = np.asarray(out[name]["kernel"]).reshape(basis.vectors.shape[0], -1)
        assert np.abs(np.asarray(basis.vectors).T @ flat).max() < ATOL  # orthogonal
    for path in (("dense", "bias"), ("head", "kernel"), ("head", "bias")):
        np.testing.assert_array_equal(out[path[0]][path[1]], grads[path[0]][path[1]])
    # Applying it again changes nothing: already orthogonal gradients pass unchanged.
    again, _ = tx.update(out, tx.init(out), bases=bases)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), again, out)


@pytest.mark.parametrize("rank_buckets", [1, 3])
def test_rank_buckets_agree_and_rank_changes_do_not_retrace(rank_buckets):
    g = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(10, 4)), jnp.float32)}
    tx = subspace_projection(rank_buckets=rank_buckets)
    traces = []

    @jax.jit
    def project(g, basis):
        traces.append(1)
        return tx.update(g, tx.init(g), bases={"w": basis})[0]["w"]

    for rank in (0, 1, 4, 7, 10):
        basis = random_basis(4, 10, 10, rank)
        np.testing.assert_allclose(project(g, basis), reference(g["w"], basis), atol=ATOL)
    assert len(traces) == 1


def test_flat_bases_keys_match_nested(setup):
    grads, bases = setup
    tx = subspace_projection()
    nested, _ = tx.update(grads, tx.init(grads), bases=bases)
    flat_str = {"dense/kernel": bases["dense"]["kernel"], "conv/kernel": bases["conv"]["kernel"]}
    flat_tuple = {("dense", "kernel"): bases["dense"]["kernel"],
                  ("conv", "kernel"): bases["conv"]["kernel"]}
    for flat in (flat_str, flat_tuple):
        out, _ = tx.update(grads, tx.init(grads), bases=flat)
        jax.tree.map(np.testing.assert_array_equal, out, nested)


def test_chains_with_sgd_and_update_placement_with_adam(setup):
    grads, bases = setup
    basis = bases["conv"]["kernel"]
    v = np.asarray(basis.vectors)

    def off_span(update):  # largest component of the conv update inside the span
        return np.abs(v.T @ np.asarray(update["conv"]["kernel"]).reshape(12, -1)).max()

    sgd = optax.chain(subspace_projection(), optax.sgd(0.5))
    upd, _ = jax.jit(sgd.update)(grads, sgd.init(grads), grads, bases=bases)
    np.testing.assert_allclose(upd["conv"]["kernel"],
                               -0.5 * reference(grads["conv"]["kernel"], basis), atol=ATOL)
    # Adam after the projection rescales coordinates: the update leaves the complement.
    pre = optax.chain(subspace_projection(), optax.adam(0.1))
    upd, _ = jax.jit(pre.update)(grads, pre.init(grads), grads, bases=bases)
    assert off_span(upd) > 1e-3
    # Projecting the final update instead keeps it exactly orthogonal.
    post = optax.chain(optax.adam(0.1), subspace_projection())
    state, update = post.init(grads), jax.jit(post.update)
    for _ in range(2):
        upd, state = update(grads, state, grads, bases=bases)
        assert off_span(upd) < ATOL


def test_freeze_mask_follows_ranks_or_explicit_flag(setup):
    grads, bases = setup
    tx = subspace_projection(freeze_mask=one_dimensional)
    out, _ = tx.update(grads, tx.init(grads), grads, bases=bases)  # ranks > 0: frozen
    np.testing.assert_array_equal(out["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(out["head"]["bias"], grads["head"]["bias"])  # (T, C): 2-D
    empty = {"dense": {"kernel": empty_basis(6)}}  # before the first task's bases
    out, _ = tx.update(grads, tx.init(grads), grads, bases=empty)
    np.testing.assert_array_equal(out["dense"]["bias"], grads["dense"]["bias"])
    out, _ = tx.update(grads, tx.init(grads), grads, bases=bases, freeze=False)
    np.testing.assert_array_equal(out["dense"]["bias"], grads["dense"]["bias"])
    out = jax.jit(lambda f: tx.update(grads, tx.init(grads), grads, bases=empty,
                                      freeze=f)[0])(True)
    np.testing.assert_array_equal(out["dense"]["bias"], 0.0)


def test_bad_input_errors(setup):
    grads, _ = setup
    tx = subspace_projection()
    with pytest.raises(ValueError, match="needs the bases as a keyword extra arg"):
        tx.update(grads, tx.init(grads))
    wrong = {"conv": {"kernel": empty_basis(10)}}
    with pytest.raises(ValueError, match=r"'conv/kernel'.*\(10, 10\).*\(2, 2, 3, 4\)"):
        tx.update(grads, tx.init(grads), bases=wrong)
    with pytest.raises(ValueError, match="basis for 'nope/kernel', which is not a leaf"):
        tx.update(grads, tx.init(grads), bases={"nope/kernel": empty_basis(6)})
    with pytest.raises(TypeError, match=r"bases\['dense/kernel'\] must be a SubspaceBasis"):
        tx.update(grads, tx.init(grads), bases={"dense": {"kernel": jnp.zeros((6, 6))}})
    with pytest.raises(ValueError, match="rank_buckets must be a positive int"):
        subspace_projection(rank_buckets=0)
    with pytest.raises(TypeError, match=r"rank_buckets must be a positive int, got 2.0 \(float"):
        subspace_projection(rank_buckets=2.0)


@pytest.mark.parametrize("jit", [False, True])
def test_through_nnx_optimizer_with_dict_bases_and_mask(jit):
    # nnx.Optimizer hands nnx.State params/updates to optax; the bases (from gpm_memory on
    # pure dicts) and a static pure-dict freeze mask are matched by path.
    model = make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bases = gpm_memory(params)
    bases["layers"][0]["kernel"] = random_basis(0, 4, 4, 2)
    mask = jax.tree.map(lambda p: p.ndim == 1, params)
    tx = optax.chain(subspace_projection(freeze_mask=mask), optax.sgd(0.5))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.ones((3, 2, 2, 1)), jnp.arange(3)

    def step(model, optimizer, bases):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        optimizer.update(model, nnx.grad(loss)(model), bases=bases)

    (nnx.jit(step) if jit else step)(model, optimizer, bases)
    new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    delta = np.asarray(new["layers"][0]["kernel"]) - np.asarray(params["layers"][0]["kernel"])
    assert np.abs(delta).max() > 1e-4
    v = np.asarray(bases["layers"][0]["kernel"].vectors)[:, :2]
    np.testing.assert_allclose(v.T @ delta, 0.0, atol=ATOL)  # protected directions kept
    np.testing.assert_array_equal(new["layers"][0]["bias"], params["layers"][0]["bias"])


def test_pallas_implementation_equals_xla():
    # The fused kernel (interpret mode on CPU) against the two-matmul path, same buckets.
    import clax

    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.zeros((12, 5)), "bias": jnp.zeros(5)},
              "conv": {"kernel": jnp.zeros((2, 2, 3, 4))}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    bases = {"dense": {"kernel": clax.grow_basis(clax.empty_basis(12),
                                                  jnp.asarray(rng.normal(size=(12, 4))), 0.9)},
             "conv": {"kernel": clax.grow_basis(clax.empty_basis(12),
                                                 jnp.asarray(rng.normal(size=(12, 7))), 0.99)}}
    out = {}
    for impl in ("xla", "pallas"):
        tx = subspace_projection(implementation=impl)
        out[impl] = jax.jit(lambda g, tx=tx: tx.update(g, tx.init(params), params,
                                                       bases=bases)[0])(grads)
    # Both compute in float32 at full precision; they differ only in summation order.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 out["xla"], out["pallas"])
    moved = np.abs(np.asarray(out["pallas"]["dense"]["kernel"] - grads["dense"]["kernel"]))
    assert moved.max() > 1e-2  # the projection did something
    with pytest.raises(ValueError, match="implementation must be one of"):
        subspace_projection(implementation="triton")


@pytest.mark.parametrize("jit", [False, True])
def test_inside_train_only_projects_trainable_kernels_and_ignores_frozen_bases(jit):
    # train_only hands the projection only the trainable leaves (MaskedNode at the frozen
    # ones). The bases cover every kernel, as gpm_memory over the full params builds them:
    # the frozen kernel's basis (here one that would not even fit it) is ignored.
    grads = tree(3)
    bases = {"dense": {"kernel": random_basis(4, 6, 6, 3)},
             "conv": {"kernel": empty_basis(5)}}  # n=5 does not fit (2, 2, 3, 4)
    mask = {"dense": {"kernel": True, "bias": True}, "conv": {"kernel": False},
            "head": {"kernel": True, "bias": False}}
    tx = train_only(subspace_projection(freeze_mask=one_dimensional), mask)

    def update(g, b):
        return tx.update(g, tx.init(g), g, bases=b, freeze=False)[0]

    out = (jax.jit(update) if jit else update)(grads, bases)
    np.testing.assert_allclose(out["dense"]["kernel"],
                               reference(grads["dense"]["kernel"], bases["dense"]["kernel"]),
                               atol=ATOL)
    np.testing.assert_array_equal(out["dense"]["bias"], grads["dense"]["bias"])
    np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
    for frozen in (out["conv"]["kernel"], out["head"]["bias"]):
        assert np.asarray(frozen).tobytes() == np.zeros_like(frozen).tobytes()
    # A basis at a path that is neither updated nor masked out is still an error.
    with pytest.raises(ValueError, match="basis for 'nope/kernel', which is not a leaf"):
        update(grads, {**bases, "nope": {"kernel": empty_basis(6)}})
    # And a basis at a trainable kernel must still fit it.
    with pytest.raises(ValueError, match=r"'dense/kernel'.*\(5, 5\).*\(6, 3\)"):
        update(grads, {"dense": {"kernel": empty_basis(5)}})


@pytest.mark.parametrize("n", [2, 4])  # kh, kh*kw: leading axes of the (2, 2, 3, 4) kernel
def test_basis_matching_a_leading_conv_axis_is_refused(setup, n):
    # A basis must act on the fan-in kh*kw*in = 12; one of length kh or kh*kw used to be
    # accepted and projected along that axis.
    grads, _ = setup
    tx = subspace_projection()
    with pytest.raises(ValueError, match=rf"'conv/kernel'.*basis dimension n={n}.*"
                                         r"\(2, 2, 3, 4\); n must equal the fan-in 12"):
        tx.update(grads, tx.init(grads), bases={"conv": {"kernel": random_basis(0, n, n, 1)}})


@pytest.mark.parametrize("rank", [4, -1])
def test_rank_outside_the_basis_capacity_is_refused(setup, rank):
    grads, _ = setup
    tx = subspace_projection()
    basis = SubspaceBasis(random_basis(0, 6, 3, 3).vectors, jnp.asarray(rank, jnp.int32))
    with pytest.raises(ValueError, match=rf"'dense/kernel': rank must be in \[0, capacity\] "
                                         rf"= \[0, 3\].*got {rank}"):
        tx.update(grads, tx.init(grads), bases={"dense": {"kernel": basis}})
