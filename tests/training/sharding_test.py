"""Sharding rules, meshes, a tensor-parallel transformer step, and restore onto other meshes."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clax.core import Batch, DataSpec, LanguageModeling, ModelFns, make_method
from clax.models import make_model
from clax.models.llama import LlamaLM
from clax.training.checkpoint import Checkpointer
from clax.training.sharding import (
    ShardingRules,
    bytes_per_device,
    logical_axes,
    make_mesh,
    param_specs,
    state_shardings,
    tree_specs,
)
from clax.training.steps import StepFns
from tests.training.helpers import tiny_dataset

# ------------------------------------------------------------------ meshes and rules


def test_make_mesh_shapes_and_errors():
    mesh = make_mesh(0, 4, 1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert make_mesh(devices=jax.devices()[:1]).devices.size == 1
    with pytest.raises(ValueError, match="fsdp=3 x tensor=1 = 3 does not divide the 8"):
        make_mesh(0, 3, 1)
    with pytest.raises(ValueError, match="data=3 x fsdp=2 x tensor=1 = 6 devices, but 8"):
        make_mesh(3, 2, 1)
    with pytest.raises(ValueError, match="mesh tensor=0: must be >= 1"):
        make_mesh(0, 1, 0)


def test_logical_names_map_to_mesh_axes():
    mesh = make_mesh(2, 2, 2)
    rules = ShardingRules(fsdp_min_size=1)
    assert rules.spec((64, 128), ("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert rules.spec((128, 64), ("mlp", "embed"), mesh) == P("tensor", "fsdp")
    assert rules.spec((256, 64), ("vocab", "embed"), mesh) == P("tensor", "fsdp")
    # Unnamed: the largest dimension that divides fsdp; small arrays stay replicated.
    assert rules.spec((6, 10), None, mesh) == P(None, "fsdp")
    assert rules.spec((5, 7), None, mesh) == P()
    assert ShardingRules(fsdp_min_size=1000).spec((10, 10), None, mesh) == P()
    # On a data-parallel mesh everything is replicated.
    assert rules.spec((64, 128), ("embed", "mlp"), make_mesh(8, 1, 1)) == P()


def test_named_dimension_that_does_not_divide_names_parameter_and_axis():
    with pytest.raises(ValueError, match=r"parameter layers/0/kernel: dimension 1 \(size 10, "
                                         r"logical axis 'mlp'\) does not divide mesh axis "
                                         r"tensor of size 4"):
        param_specs({"layers": {0: {"kernel": np.zeros((8, 10))}}}, make_mesh(2, 1, 4),
                    axes={("layers", 0, "kernel"): (None, "mlp")})


def test_state_follows_parameters():
    mesh = make_mesh(2, 2, 2)
    rules = ShardingRules(fsdp_min_size=1)
    params = {"w": np.zeros((16, 24)), "b": np.zeros((24,))}
    axes = {("w",): ("embed", "mlp"), ("b",): ("mlp",)}
    specs = param_specs(params, mesh, axes=axes, rules=rules)
    assert specs == {"w": P("fsdp", "tensor"), "b": P("tensor")}
    opt = optax.adam(1e-3).init(params)
    memory = {"basis": {"w": {"vectors": np.zeros((24, 4))}}, "buffer": np.zeros((40, 3)),
              "count": np.zeros(())}
    got = tree_specs((opt, memory), mesh, params=params, specs_of_params=specs, rules=rules)
    adam = got[0][0]
    assert adam.mu == specs and adam.nu == specs and adam.count == P()
    # A basis of w's output space follows w's "tensor" split (and takes "fsdp" on its
    # other dimension); a buffer splits its examples.
    assert got[1]["basis"]["w"]["vectors"] == P("tensor", "fsdp")
    assert got[1]["buffer"] == P("fsdp") and got[1]["count"] == P()


def test_model_logical_axes():
    mlp = make_model("mlp", input_shape=(4, 4, 1), num_classes=4, widths=(16, 16), seed=0)
    axes = logical_axes(mlp)
    assert axes[("layers", 0, "kernel")] == (None, "mlp")
    assert axes[("layers", 1, "kernel")] == ("mlp", "embed")
    assert ("head", "kernel") not in axes
    lm = LlamaLM(preset="tiny", rngs=nnx.Rngs(0))
    axes = logical_axes(lm)
    assert axes[("embed_tokens", "embedding")] == ("vocab", "embed")
    assert axes[("layers", 0, "mlp", "down_proj", "kernel")] == ("mlp", "embed")


# ------------------------------------------------------------------ a sharded transformer


def _lm_steps(method, mesh):
    lm = LlamaLM(preset="tiny", input_shape=(16,), rngs=nnx.Rngs(0))
    fns, params, model_state = ModelFns.split(lm)
    m = make_method(method)
    data = DataSpec(Batch(jax.ShapeDtypeStruct((16,), np.int32),
                          jax.ShapeDtypeStruct((16,), np.int32),
                          jax.ShapeDtypeStruct((), np.int32)),
                    jax.ShapeDtypeStruct((16, lm.vocab_size), np.float32))
    # SGD: a float32 reduction in another order changes an update by ~lr x ulps; Adam's
    # normalisation would blow that up for near-zero gradients (rare tokens' embeddings).
    steps = StepFns(fns, m, m.optimizer(optax.sgd(0.5)), mesh, LanguageModeling(), data,
                    rules=ShardingRules(fsdp_min_size=1), param_axes=logical_axes(lm))
    return steps, steps.init_state(params, model_state, 0), lm.vocab_size


@pytest.mark.parametrize("method", ["ewc", "ema"])
def test_tensor_parallel_transformer_equals_one_device(method):
    rng = np.random.default_rng(0)
    results = {}
    for name, mesh in {"1": make_mesh(devices=jax.devices()[:1]),
                       "2x2x2": make_mesh(2, 2, 2)}.items():
        steps, state, vocab = _lm_steps(method, mesh)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(3):
            tokens = rng.integers(0, vocab, (8, 17)).astype(np.int32)
            batch = steps.shard_batch(Batch(tokens[:, :-1], tokens[:, 1:],
                                            np.zeros(8, np.int32)))
            state, m = steps.train_step(state, batch, np.int32(0))
            losses.append(float(m.loss))
        results[name] = (losses, jax.device_get(state.params), state)
    np.testing.assert_allclose(results["1"][0], results["2x2x2"][0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 results["1"][1], results["2x2x2"][1])
    params = results["2x2x2"][2].params
    attn = params["layers"][0]["self_attn"]
    assert attn["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")  # heads split
    assert attn["o_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    embed = params["embed_tokens"]["embedding"]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert embed.addressable_shards[0].data.size * 4 == embed.size  # fsdp x tensor


# ------------------------------------------------------------------ restore onto another mesh


def _mlp_state(mesh, method="ewc"):
    ds = tiny_dataset()
    model = make_model("mlp", input_shape=ds.x_train.shape[1:], num_classes=ds.num_classes,
                       widths=(16,), seed=0)
    fns, params, model_state = ModelFns.split(model)
    m = make_method(method)
    steps = StepFns(fns, m, m.optimizer(optax.adam(1e-2)), mesh,
                    rules=ShardingRules(fsdp_min_size=1), param_axes=logical_axes(model))
    return steps, steps.init_state(params, model_state, 0), ds


def _keyless(tree):
    def plain(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)
    return jax.tree.map(plain, tree)


@pytest.mark.parametrize("method", ["ewc", "gpm"])
def test_checkpoint_restores_onto_other_meshes(method, tmp_path):
    steps, state, ds = _mlp_state(make_mesh(2, 4, 1), method)
    for i in range(3):
        rows = slice(32 * i, 32 * (i + 1))
        batch = steps.shard_batch(Batch(ds.x_train[rows], ds.y_train[rows],
                                        np.zeros(32, np.int32)))
        state, _ = steps.train_step(state, batch, np.int32(0))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(state, {"step": 3})
    want = _keyless(state)
    for target in (make_mesh(1, 4, 1, devices=jax.devices()[:4]),   # 8 -> 4 devices
                   make_mesh(2, 1, 2, devices=jax.devices()[:4]),   # FSDP -> tensor
                   make_mesh(devices=jax.devices()[:1])):           # -> one device
        other, like, _ = _mlp_state(target, method)
        restored, meta = ckpt.restore(like)
        assert meta == {"step": 3}
        jax.tree.map(np.testing.assert_array_equal, _keyless(restored), want)
        for got, expected in zip(jax.tree.leaves(restored),
                                 jax.tree.leaves(other.state_sharding), strict=True):
            assert got.sharding.is_equivalent_to(expected, got.ndim)
    ckpt.close()


def test_bytes_per_device_fall_with_fsdp():
    sizes = {}
    for n in (1, 2, 4, 8):
        mesh = make_mesh(1, n, 1, devices=jax.devices()[:n])
        x = jax.device_put(np.zeros((64, 32), np.float32),
                           NamedSharding(mesh, P("fsdp")))
        sizes[n] = max(bytes_per_device(x).values())
    assert sizes == {1: 8192, 2: 4096, 4: 2048, 8: 1024}


def test_state_shardings_of_abstract_state():
    mesh = make_mesh(2, 4, 1)
    steps, state, _ = _mlp_state(mesh)
    abstract = jax.eval_shape(lambda s: s, state)
    shardings = state_shardings(abstract, mesh, rules=ShardingRules(fsdp_min_size=1),
                                axes=steps.param_axes)
    assert jax.tree.structure(shardings) == jax.tree.structure(steps.state_sharding)


def test_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    _, state, _ = _mlp_state(make_mesh(devices=jax.devices()[:1]))
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(state, {})
    for widths, message in (((32,), r"params/head/kernel has shape \(16, 4\) in the "
                                    r"checkpoint, \(32, 4\) in this run"),
                            ((16, 16), r"params/layers/1/bias is not in the checkpoint")):
        model = make_model("mlp", input_shape=(4, 4, 1), num_classes=4, widths=widths, seed=0)
        fns, params, model_state = ModelFns.split(model)
        m = make_method("ewc")
        other = StepFns(fns, m, m.optimizer(optax.adam(1e-2)),
                        make_mesh(devices=jax.devices()[:1]))
        with pytest.raises(ValueError, match="checkpoint 0 in .* does not fit this run's "
                                             "state: " + message):
            ckpt.restore(other.init_state(params, model_state, 0))
    ckpt.close()


def test_memory_following_a_tensor_split_is_also_fsdp_split():
    # A (n, n) basis of a ("mlp", "embed") kernel follows its tensor split and takes the
    # FSDP rule on its other dimension: memory per device falls with the pod size.
    mesh = make_mesh(1, 2, 4)
    rules = ShardingRules(fsdp_min_size=1)
    params = {"down": np.zeros((64, 32))}
    specs = param_specs(params, mesh, axes={("down",): ("mlp", "embed")}, rules=rules)
    assert specs == {"down": P("tensor", "fsdp")}
    memory = {"down": {"vectors": np.zeros((64, 64))}}
    got = tree_specs(memory, mesh, params=params, specs_of_params=specs, rules=rules)
    assert got["down"]["vectors"] == P("tensor", "fsdp")
