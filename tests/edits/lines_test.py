"""Tests for clax.edits.lines (LiNeS)."""

import jax
import numpy as np
import pytest

from clax.edits import (
    lines_coefficients,
    lines_merge,
    lines_scale,
    merge_alpha,
    scale_task_vector,
)
from clax.params import path_str
from tests.params.paths_test import model_params

# Expected block of every parameter, written out per family independently of block_depths:
# (path prefix, ℓ); anything else is outside blocks. With L blocks.
EXPECTED_BLOCKS = {
    "mlp": ([("layers/0/", 0), ("layers/1/", 1)], 2),
    "cnn": ([("convs/0/", 0), ("convs/1/", 1)], 2),
    "resnet18": (
        [(f"stages/{s}/{b}/", 2 * s + b) for s in range(4) for b in range(2)],
        8,
    ),
    "vit": ([("blocks/0/", 0), ("blocks/1/", 1), ("blocks/2/", 2)], 3),
}


def _flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_scale(path, family, alpha, beta):
    prefixes, num_blocks = EXPECTED_BLOCKS[family]
    for prefix, depth in prefixes:
        if path.startswith(prefix):
            return alpha + beta * depth / (num_blocks - 1)
    return alpha


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet18", "vit"])
def test_per_layer_scale_matches_formula(family):
    pre, ft = model_params(family, seed=0), model_params(family, seed=1)
    alpha, beta = 0.3, 0.5
    out = _flat(lines_scale(pre, ft, alpha=alpha, beta=beta))
    pre_f, ft_f = _flat(pre), _flat(ft)
    assert out.keys() == pre_f.keys()
    seen_scales = set()
    for path in out:
        scale = _expected_scale(path, family, alpha, beta)
        seen_scales.add(round(scale, 6))
        np.testing.assert_allclose(
            out[path] - pre_f[path],
            scale * (ft_f[path] - pre_f[path]),
            rtol=1e-5,
            atol=1e-5,
            err_msg=path,
        )
    num_blocks = EXPECTED_BLOCKS[family][1]
    # Every block's scale shows up, and the deepest block gets α + β.
    assert len(seen_scales) == num_blocks
    assert round(alpha + beta, 6) in seen_scales


def test_outside_parameters_scaled_by_alpha_on_vit():
    pre, ft = model_params("vit", seed=0), model_params("vit", seed=1)
    out = _flat(lines_scale(pre, ft, alpha=0.2, beta=0.7))
    pre_f, ft_f = _flat(pre), _flat(ft)
    for path in ("cls_token", "pos_embed", "patch_embed/kernel", "norm/scale", "head/kernel"):
        np.testing.assert_allclose(
            out[path], pre_f[path] + 0.2 * (ft_f[path] - pre_f[path]), rtol=1e-5, atol=1e-6
        )
    # Middle block of three: α + β/2.
    path = "blocks/1/attn/value/kernel"
    np.testing.assert_allclose(
        out[path], pre_f[path] + 0.55 * (ft_f[path] - pre_f[path]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("family", ["mlp", "resnet18"])
def test_alpha_one_beta_zero_is_identity_and_zero_zero_is_pretrained(family):
    pre, ft = model_params(family, seed=0), model_params(family, seed=1)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        lines_scale(pre, ft, alpha=1.0, beta=0.0),
        ft,
    )
    jax.tree.map(np.testing.assert_array_equal, lines_scale(pre, ft, alpha=0.0, beta=0.0), pre)


def test_single_task_setting_keeps_the_last_block_fully():
    pre, ft = model_params("vit", seed=0), model_params("vit", seed=1)
    lam = 0.4
    out = _flat(lines_scale(pre, ft, alpha=lam, beta=1 - lam))
    path = "blocks/2/fc2/kernel"
    np.testing.assert_allclose(out[path], _flat(ft)[path], rtol=1e-5, atol=1e-6)


def test_single_block_is_scaled_by_alpha_and_beta_has_no_effect():
    pre, ft = model_params("mlp1", seed=0), model_params("mlp1", seed=1)  # only layers/0
    out = lines_scale(pre, ft, alpha=0.3, beta=0.6)
    expected = jax.tree.map(lambda p, f: p + 0.3 * (f - p), pre, ft)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, expected)
    assert lines_coefficients(1, alpha=0.3, beta=0.6) == [0.3]
    np.testing.assert_allclose(lines_coefficients(3, alpha=0.1, beta=0.8), [0.1, 0.5, 0.9])


def test_merge_with_one_task_equals_lines_scale():
    pre, ft = model_params("cnn", seed=0), model_params("cnn", seed=1)
    merged = lines_merge(pre, [ft], beta=0.5)  # default α = 1/T = 1
    single = lines_scale(pre, ft, alpha=1.0, beta=0.5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged, single
    )


def test_merge_three_tasks_is_task_arithmetic_with_lines():
    pre = model_params("mlp", seed=0)
    fts = [model_params("mlp", seed=s) for s in (1, 2, 3)]
    out = _flat(lines_merge(pre, fts, beta=0.6))
    pre_f, fts_f = _flat(pre), [_flat(f) for f in fts]
    for path in out:
        tau_sum = sum(f[path] - pre_f[path] for f in fts_f)
        scale = _expected_scale(path, "mlp", 1 / 3, 0.6)
        np.testing.assert_allclose(
            out[path], pre_f[path] + scale * tau_sum, rtol=1e-5, atol=1e-5, err_msg=path
        )
    # α given explicitly overrides 1/T.
    out2 = _flat(lines_merge(pre, fts, alpha=0.0, beta=0.0))
    np.testing.assert_array_equal(out2["head/kernel"], pre_f["head/kernel"])


def test_merge_alpha_is_one_over_t_for_task_arithmetic():
    pre = model_params("mlp", seed=0)
    taus = [jax.tree.map(lambda f, p: f - p, model_params("mlp", seed=s), pre) for s in (1, 2)]
    tau_sum = jax.tree.map(lambda a, b: a + b, *taus)
    assert merge_alpha(taus, tau_sum) == pytest.approx(0.5, rel=1e-6)
    half = jax.tree.map(lambda t: 0.5 * t, tau_sum)
    assert merge_alpha(taus, half) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="L1 norm 0"):
        merge_alpha(taus, jax.tree.map(np.zeros_like, tau_sum))


def test_depth_fn_override_for_a_model_without_list_indices():
    pre = {
        "first": np.zeros(2, np.float32),
        "second": np.zeros(2, np.float32),
        "out": np.zeros(2, np.float32),
    }
    ft = jax.tree.map(np.ones_like, pre)
    with pytest.raises(ValueError, match="cannot derive layer depth.*first"):
        lines_scale(pre, ft, alpha=0.5, beta=0.5)
    order = {"first": 0, "second": 1}
    out = lines_scale(pre, ft, alpha=0.5, beta=0.5, depth_fn=lambda p: order.get(p[0], -1))
    np.testing.assert_allclose(out["first"], 0.5)
    np.testing.assert_allclose(out["second"], 1.0)
    np.testing.assert_allclose(out["out"], 0.5)
    tau = scale_task_vector(ft, alpha=0.5, beta=0.5, depth_fn=lambda p: order.get(p[0], -1))
    np.testing.assert_allclose(tau["second"], 1.0)


def test_bad_inputs():
    pre, ft = model_params("mlp", seed=0), model_params("mlp", seed=1)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        lines_scale(pre, ft, alpha=-0.1, beta=0.5)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        lines_scale(pre, ft, alpha=0.1, beta=-0.5)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        lines_scale(pre, ft, alpha=float("nan"), beta=0.5)
    with pytest.raises(TypeError, match=r"beta must be a finite number >= 0, got None"):
        lines_merge(pre, [ft], beta=None)
    with pytest.raises(ValueError, match="alpha must be"):
        lines_merge(pre, [ft], alpha=-1.0, beta=0.5)
    with pytest.raises(ValueError, match="finetuned_list must be a non-empty sequence"):
        lines_merge(pre, [], beta=0.5)
    with pytest.raises(ValueError, match="finetuned_list must be a non-empty sequence"):
        lines_merge(pre, ft, beta=0.5)
    other = model_params("cnn", seed=1)
    with pytest.raises(ValueError, match="pretrained and finetuned differ"):
        lines_scale(pre, other, alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match=r"pretrained and finetuned_list\[1\] differ"):
        lines_merge(pre, [ft, other], beta=0.5)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        lines_coefficients(0, alpha=0.1, beta=0.1)
    with pytest.raises(TypeError, match=r"num_blocks must be a positive int, got 2.0 \(float"):
        lines_coefficients(2.0, alpha=0.1, beta=0.1)
