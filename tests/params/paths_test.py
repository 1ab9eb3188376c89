"""Tests for clax.params.paths."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from clax.models import make_model
from clax.params import (
    OUTSIDE,
    block_depths,
    check_same_structure,
    head_backbone_labels,
    label_params,
    path_str,
    plain_path,
)
from clax.params.paths import (
    align_to,
    check_same_paths,
    is_masked,
    masked_paths,
    pure_tree,
)

# Small configurations of the four model families (shapes only; no real initialisers).
MODEL_SPECS = {
    "mlp": ((8, 8, 1), {"widths": (8, 6)}),
    "mlp1": ((8, 8, 1), {"widths": (8,)}),
    "cnn": ((8, 8, 1), {"channels": (4, 8), "hidden": 16}),
    "resnet18": ((8, 8, 3), {"width": 4}),
    "vit": ((8, 8, 3), {"dim": 16, "depth": 3, "num_heads": 2}),
}


@functools.cache
def _abstract_params(spec):
    shape, kwargs = MODEL_SPECS[spec]
    name = "mlp" if spec == "mlp1" else spec
    model = nnx.eval_shape(
        lambda: make_model(name, input_shape=shape, num_classes=5, seed=0, **kwargs)
    )
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_params(spec, seed=0):
    """Parameters of ``MODEL_SPECS[spec]`` filled with numpy normals (no XLA init compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), _abstract_params(spec)
    )


def _depth_by_path(params):
    depths, num_blocks = block_depths(params)
    flat = jax.tree_util.tree_flatten_with_path(depths)[0]
    return {path_str(p): d for p, d in flat}, num_blocks


def test_path_str_plain_and_jax_keys():
    assert path_str(("layers", 0, "kernel")) == "layers/0/kernel"
    assert path_str(()) == ""
    (path, _), *_ = jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}]})[0]
    assert plain_path(path) == ("a", 0, "b")
    assert path_str(path) == "a/0/b"


def test_block_depths_mlp():
    depths, num_blocks = _depth_by_path(model_params("mlp"))
    assert num_blocks == 2
    assert depths == {
        "head/bias": -1,
        "head/kernel": -1,
        "layers/0/bias": 0,
        "layers/0/kernel": 0,
        "layers/1/bias": 1,
        "layers/1/kernel": 1,
    }


def test_block_depths_cnn():
    depths, num_blocks = _depth_by_path(model_params("cnn"))
    assert num_blocks == 2
    assert depths == {
        "convs/0/bias": 0,
        "convs/0/kernel": 0,
        "convs/1/bias": 1,
        "convs/1/kernel": 1,
        "fc/bias": -1,
        "fc/kernel": -1,
        "head/bias": -1,
        "head/kernel": -1,
    }


def test_block_depths_resnet18_numbers_the_eight_basic_blocks():
    depths, num_blocks = _depth_by_path(model_params("resnet18"))
    assert num_blocks == 8
    expected_blocks = {
        "stages/0/0": 0,
        "stages/0/1": 1,
        "stages/1/0": 2,
        "stages/1/1": 3,
        "stages/2/0": 4,
        "stages/2/1": 5,
        "stages/3/0": 6,
        "stages/3/1": 7,
    }
    outside = {"conv1/kernel", "bn1/scale", "bn1/bias", "head/kernel", "head/bias"}
    assert {p for p, d in depths.items() if d == -1} == outside
    for path, depth in depths.items():
        if path in outside:
            continue
        assert depth == expected_blocks[path[: len("stages/0/0")]], path
    # Shortcut convs (blocks 2, 4, 6) sit in their block like the main convs.
    assert depths["stages/1/0/shortcut_conv/kernel"] == 2
    assert depths["stages/3/0/shortcut_bn/scale"] == 6
    assert sorted(set(depths.values())) == [-1, 0, 1, 2, 3, 4, 5, 6, 7]


def test_block_depths_vit():
    depths, num_blocks = _depth_by_path(model_params("vit"))
    assert num_blocks == 3
    for path, depth in depths.items():
        if path.startswith("blocks/"):
            assert depth == int(path.split("/")[1]), path
        else:
            assert depth == -1, path
    outside = {p for p, d in depths.items() if d == -1}
    assert outside == {
        "cls_token",
        "pos_embed",
        "patch_embed/kernel",
        "patch_embed/bias",
        "norm/scale",
        "norm/bias",
        "head/kernel",
        "head/bias",
    }
    assert depths["blocks/2/attn/query/kernel"] == 2
    assert depths["blocks/1/ln2/scale"] == 1


def test_block_depths_tree_matches_params_structure():
    params = model_params("cnn")
    depths, _ = block_depths(params)
    assert jax.tree.structure(depths) == jax.tree.structure(params)
    assert all(isinstance(d, int) for d in jax.tree.leaves(depths))
    assert OUTSIDE == -1


def test_block_depths_several_containers_number_container_by_container():
    x = np.zeros(2)
    params = {
        "encoder": {0: {"w": x}, 1: {"w": x}},
        "decoder": {0: {"w": x}, 1: {"w": x}, 2: {"w": x}},
        "head": {"w": x},
    }
    depths, num_blocks = _depth_by_path(params)
    assert num_blocks == 5
    # Flatten order (sorted keys): decoder first, then encoder.
    assert depths == {
        "decoder/0/w": 0,
        "decoder/1/w": 1,
        "decoder/2/w": 2,
        "encoder/0/w": 3,
        "encoder/1/w": 4,
        "head/w": -1,
    }


def test_block_depths_inner_indices_stay_inside_their_block_and_digit_strings_count():
    x = np.zeros(2)
    params = {"blocks": {"0": {"heads": {0: x, 1: x}}, "1": {"heads": {0: x, 1: x}}}, "emb": x}
    depths, num_blocks = _depth_by_path(params)
    assert num_blocks == 2
    assert depths == {
        "blocks/0/heads/0": 0,
        "blocks/0/heads/1": 0,
        "blocks/1/heads/0": 1,
        "blocks/1/heads/1": 1,
        "emb": -1,
    }


def test_block_depths_orders_numerically_not_as_strings():
    x = np.zeros(1)
    params = {"layers": {i: x for i in range(12)}}
    depths, num_blocks = _depth_by_path(params)
    assert num_blocks == 12
    assert depths["layers/10"] == 10 and depths["layers/2"] == 2


def test_block_depths_without_blocks_errors_with_the_paths():
    params = {"w": np.zeros(3), "dense": {"kernel": np.zeros((3, 2))}}
    with pytest.raises(ValueError, match="cannot derive layer depth.*dense/kernel"):
        block_depths(params)


def test_block_depths_depth_fn_override():
    params = {"first": np.zeros(3), "second": np.zeros(3), "out": np.zeros(1)}
    order = {"first": 0, "second": 1}
    depths, num_blocks = block_depths(params, depth_fn=lambda path: order.get(path[0], -1))
    assert num_blocks == 2
    assert depths == {"first": 0, "second": 1, "out": -1}
    with pytest.raises(TypeError, match=r"depth_fn must return an int >= -1.*'0' \(str\)"):
        block_depths(params, depth_fn=lambda path: "0")
    with pytest.raises(ValueError, match="depth_fn must return an int.*'first'"):
        block_depths(params, depth_fn=lambda path: -2)
    with pytest.raises(ValueError, match="every parameter outside"):
        block_depths(params, depth_fn=lambda path: -1)


def test_label_params_gives_every_leaf_exactly_one_label_first_rule_wins():
    params = model_params("vit")
    rules = [
        (r"^blocks/\d+/attn/", "attn"),
        (r"^blocks/", "block"),
        (r"^head/", "head"),
    ]
    labels = label_params(params, rules, default="other")
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = {path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    num_leaves = len(jax.tree.leaves(params))
    assert len(flat) == num_leaves
    counts = {lab: sum(v == lab for v in flat.values()) for lab in ("attn", "block", "head")}
    # 3 blocks x 4 attention Linears x (kernel, bias); 3 x (fc1, fc2, ln1, ln2) x 2 leaves.
    assert counts == {"attn": 24, "block": 24, "head": 2}
    assert sum(counts.values()) + sum(v == "other" for v in flat.values()) == num_leaves
    assert flat["blocks/0/attn/query/kernel"] == "attn"
    assert flat["blocks/0/fc1/kernel"] == "block"
    assert flat["pos_embed"] == "other"


def test_label_params_unmatched_paths_error_lists_them():
    params = model_params("cnn")
    with pytest.raises(ValueError, match=r"4 parameter path\(s\) match no rule.*fc/bias"):
        label_params(params, [(r"^convs/", "conv")])


def test_label_params_validates_rules():
    params = {"w": np.zeros(1)}
    with pytest.raises(ValueError, match=r"rules\[0\] pattern .* not a valid regex"):
        label_params(params, [("(", "x")])
    with pytest.raises(ValueError, match=r"rules\[1\] must be a \(pattern: str, label: str\)"):
        label_params(params, [("w", "x"), ("w",)])
    with pytest.raises(TypeError, match="rules must be a sequence"):
        label_params(params, "w")
    with pytest.raises(TypeError, match=r"rules\[0\] must be a \(pattern: str, label: str\)"):
        label_params(params, [("w", 1)])
    with pytest.raises(TypeError, match="default must be a str label or None, got 0"):
        label_params(params, [("w", "x")], default=0)


def test_head_backbone_labels_drive_optax_partition():
    params = jax.tree.map(np.ones_like, model_params("mlp"))
    labels = head_backbone_labels(params)
    flat = {path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat == {
        "head/bias": "head",
        "head/kernel": "head",
        "layers/0/bias": "backbone",
        "layers/0/kernel": "backbone",
        "layers/1/bias": "backbone",
        "layers/1/kernel": "backbone",
    }
    # SLCA's slow learner: backbone lr = head lr / 100.
    tx = optax.partition({"head": optax.sgd(0.01), "backbone": optax.sgd(1e-4)}, labels)
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.01 * params["head"]["kernel"])
    np.testing.assert_allclose(updates["layers"][1]["bias"], -1e-4 * params["layers"][1]["bias"])
    with pytest.raises(ValueError, match="head_pattern '\\^classifier/' matches no parameter"):
        head_backbone_labels(params, head_pattern=r"^classifier/")


def test_check_same_structure_names_first_differing_path():
    a = {"layers": {0: {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}}
    check_same_structure(a, jax.tree.map(np.ones_like, a))
    b = {"layers": {0: {"kernel": np.zeros((2, 3))}}}
    with pytest.raises(ValueError, match="'layers/0/bias' is in ref but not in new"):
        check_same_structure(a, b, ("ref", "new"))
    with pytest.raises(ValueError, match="'layers/0/bias' is in new but not in ref"):
        check_same_structure(b, a, ("ref", "new"))
    c = {"layers": {0: {"kernel": np.zeros((3, 2)), "bias": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"differ at path 'layers/0/kernel': shape \(2, 3\)"):
        check_same_structure(a, c)


def _tiny_model():
    return make_model("mlp", input_shape=(2, 2, 1), num_classes=3, widths=(4,), seed=0)


def test_paths_of_an_nnx_state_drop_the_variable_value():
    # nnx.Param flattens to (..., GetAttrKey("value")): the reported path has no "value".
    state = nnx.state(_tiny_model(), nnx.Param)
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    pure = nnx.to_pure_dict(state)
    assert names == [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    assert names == ["head/bias", "head/kernel", "layers/0/bias", "layers/0/kernel"]
    # A real key named "value" (a dict entry, not a Variable's attribute) is kept.
    (path, _), = jax.tree_util.tree_flatten_with_path({"attn": {"value": 1.0}})[0]
    assert plain_path(path) == ("attn", "value")


def test_check_same_structure_says_what_differs_in_words():
    state = nnx.state(_tiny_model(), nnx.Param)
    pure = nnx.to_pure_dict(state)
    with pytest.raises(ValueError) as e:
        check_same_structure(state, pure, ("anchor", "params"))
    msg = str(e.value)
    assert "PyTreeDef" not in msg
    assert "anchor holds an nnx.State at the root where params holds a dict" in msg
    assert "anchor holds nnx.Param wrappers: pass plain arrays, nnx.to_pure_dict(state)" in msg
    with pytest.raises(ValueError, match=r"anchor holds an nnx.Param wrapper at path "
                                         r"'head/bias' where params holds an array"):
        check_same_structure(state, nnx.as_pure(state), ("anchor", "params"))
    with pytest.raises(ValueError, match="a holds a list at path 'w' where b holds a tuple"):
        check_same_structure({"w": [np.zeros(2)]}, {"w": (np.zeros(2),)})


def test_align_to_matches_by_path_across_containers():
    state = nnx.as_pure(nnx.state(_tiny_model(), nnx.Param))  # what nnx.Optimizer passes
    pure = nnx.to_pure_dict(state)
    aligned = align_to(pure, state, ("anchor", "params"))
    assert jax.tree.structure(aligned) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(aligned), jax.tree.leaves(pure),
                                      strict=True))
    check_same_paths(pure, nnx.state(_tiny_model(), nnx.Param))
    del pure["head"]["bias"]
    with pytest.raises(ValueError, match="path 'head/bias' is in params but not in anchor"):
        align_to(pure, state, ("anchor", "params"))
    assert jax.tree.structure(pure_tree((state, [nnx.state(_tiny_model())]))) == \
        jax.tree.structure(pure_tree((nnx.to_pure_dict(state),
                                      [nnx.to_pure_dict(nnx.state(_tiny_model()))])))


def test_align_to_selects_the_unmasked_part_of_a_partitioned_tree():
    # What optax.partition / train_only hand a transform: MaskedNode at the frozen leaves.
    full = {"base": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}, "lora": np.zeros(4)}
    masked = {"base": {"kernel": optax.MaskedNode(), "bias": optax.MaskedNode()},
              "lora": np.ones(4)}
    assert masked_paths(masked) == [("base", "bias"), ("base", "kernel")]
    assert is_masked(("base", "kernel"), masked_paths(masked))
    assert is_masked("base/kernel", [("base",)]) and not is_masked("based/x", [("base",)])
    assert not is_masked(("lora",), masked_paths(masked))
    aligned = align_to(full, masked, ("memory", "updates"))
    assert jax.tree.structure(aligned) == jax.tree.structure(masked)
    assert aligned["lora"] is full["lora"]
    assert isinstance(aligned["base"]["kernel"], optax.MaskedNode)
    # Outside the masked part an extra path is still an error, unless extra="drop".
    extra = {**full, "other": np.ones(1)}
    with pytest.raises(ValueError, match="path 'other' is in memory but not in updates"):
        align_to(extra, masked, ("memory", "updates"))
    assert align_to(extra, masked, ("memory", "updates"), extra="drop")["lora"] is full["lora"]
    # A leaf of the reference that the tree lacks is always an error...
    with pytest.raises(ValueError, match="path 'lora' is in updates but not in memory"):
        align_to({"base": full["base"]}, masked, ("memory", "updates"), extra="drop")
    # ... as is a shape difference where they match.
    with pytest.raises(ValueError, match=r"differ at path 'lora': shape \(4,\) vs \(5,\)"):
        align_to({"lora": np.ones(5)}, masked, ("memory", "updates"))


def test_align_to_fills_masked_leaves_from_the_reference():
    # A masked transform's state overlaid on the full params: frozen leaves are kept.
    params = {"base": np.arange(3.0), "lora": np.zeros(2)}
    state = {"base": optax.MaskedNode(), "lora": np.ones(2)}
    out = align_to(state, params, ("state", "params"), missing="masked")
    assert out["base"] is params["base"] and out["lora"] is state["lora"]
    # Only masked leaves are filled; another missing leaf is an error.
    with pytest.raises(ValueError, match="path 'base' is in params but not in state"):
        align_to({"lora": np.ones(2)}, params, ("state", "params"), missing="masked")
    with pytest.raises(ValueError, match="extra must be one of"):
        align_to(state, params, extra="ignore")


def test_align_to_keeps_entries_given_as_leaves():
    none_or_tuple = {"a": None, "b": (np.ones(2), np.ones(1))}
    like = {"a": np.ones(2), "b": np.ones(3)}
    out = align_to(none_or_tuple, like, check_shapes=False,
                   is_leaf=lambda x: x is None or isinstance(x, tuple))
    assert out["a"] is None and out["b"] is none_or_tuple["b"]
