"""The registered closed-form heads ``acil``, ``ncm`` and ``lda`` in the training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clax
from clax.analytic import prototypes as protos
from clax.core import ModelFns, make_method
from clax.methods.analytic import freeze_after
from clax.models import make_model
from clax.training import default_config, train_continual
from tests.precision import (
    EPS32,
    U32,
    assert_relative_error,
    assert_within,
    relative_error,
    ridge_rtol,
    ridge_system,
    spd_condition_number,
)
from tests.training.helpers import tiny_config, tiny_scenario

GAMMA, BUFFER = 1.0, 64


def _run(method, scenario=None, **hp):
    config = tiny_config()
    config.method.name = method
    config.method[method].update(hp)
    return train_continual(config, scenario=scenario or tiny_scenario(), keep_state=True)


def _features(result, x):
    state = result.state
    return np.asarray(result.model.features(state.params, state.model_state, x), np.float64)


def _all_train(scenario):
    return (np.concatenate([t.x_train for t in scenario.tasks]),
            np.concatenate([t.y_train for t in scenario.tasks]))


def _check_eval_uses_head(result, scenario, logits_fn):
    """The loop's last accuracy row equals the accuracy of the head computed here.

    The loop's float32 logits and these float64 ones differ by rounding (relative ≲ k·EPS32
    for inner dimensions k ≤ 64: < 1e-5), so equal accuracies are only guaranteed when no
    example's top two logits are that close: require a relative gap of 1e-4 (measured:
    >= 2e-2), so that a near-tie fails here rather than flipping a prediction on some CPU.
    """
    for j, task in enumerate(scenario.tasks):
        logits = np.asarray(logits_fn(_features(result, task.x_test)), np.float64)
        seen = logits[0] > protos.UNSEEN_LOGIT / 2
        top2 = np.sort(logits[:, seen], axis=1)[:, -2:]
        gap = (top2[:, 1] - top2[:, 0]) / np.abs(logits[:, seen]).max(1)
        assert gap.min() > 1e-4, f"near-tie in the logits of task {j}: {gap.min():.2g}"
        pred = logits.argmax(1)
        assert result.accuracy_matrix[-1, j] == pytest.approx(np.mean(pred == task.y_test))


@pytest.fixture(scope="module")
def scenario():
    return tiny_scenario()


def test_registered_with_defaults():
    config = default_config()
    for name in ("acil", "ncm", "lda"):
        assert name in clax.registered_methods()
    assert config.method.acil.gamma == 0.1
    assert config.method.acil.buffer_size == 2048
    assert config.method.ncm.teen_alpha == 0.0 and config.method.ncm.teen_tau == 16.0
    assert config.method.lda.shrinkage == 1.0


@pytest.mark.parametrize("base", [optax.adam(0.1), optax.sgd(0.1, momentum=0.9)])
def test_freeze_after_zeroes_every_update_from_task_one(base):
    tx = optax.chain(optax.add_decayed_weights(0.1), base, freeze_after(1))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    update = jax.jit(tx.update)
    u, state = update(grads, state, params, task_index=jnp.int32(0))
    assert np.abs(np.asarray(u["w"])).min() > 0
    for _ in range(2):  # momentum / Adam moments are non-zero, updates must still be zero
        u, state = update(grads, state, params, task_index=jnp.int32(1))
        np.testing.assert_array_equal(u["w"], 0.0)
    with pytest.raises(TypeError, match="task_index"):
        tx.update(grads, state, params)


def test_acil_backbone_frozen_and_head_is_ridge(scenario):
    result = _run("acil", scenario, gamma=GAMMA, buffer_size=BUFFER)
    # The head learned task 0 with the features the backbone had at the end of task 0 and
    # task 1 with those at the end of task 1; both equal the final features only if task 1
    # did not move the backbone, so the ridge check below also checks the freezing.
    # The reference is float64 ridge on the very same float32 features (cast exactly); the
    # head is float32 recursive least squares, which agrees only to ≈ κ(A)·√(n + d)·u
    # (A = HᵀH + γI; κ ≈ 7e2 here: tolerance 1.0e-3, error measured 5e-5). A backbone that
    # moved in task 1 gives a relative error of 0.7; leaving out one training example gives
    # 3e-3 (median over the examples), which the tolerance must still reject (checked).
    memory = result.state.memory
    x, y = _all_train(scenario)
    h = np.maximum(_features(result, x) @ np.asarray(memory.projection, np.float64), 0)
    _, want = ridge_system(h, np.eye(4)[y], GAMMA)
    rtol = ridge_rtol(h, GAMMA)
    assert_relative_error(memory.weights, want, rtol, "ACIL head against float64 ridge")
    _, without_one = ridge_system(h[1:], np.eye(4)[y[1:]], GAMMA)
    assert relative_error(without_one, want) > 1.5 * rtol, "tolerance too loose to catch a bug"
    np.testing.assert_array_equal(memory.class_counts, np.bincount(y, minlength=4))
    _check_eval_uses_head(result, scenario, lambda f: h_logits(f, memory))
    assert result.accuracy_matrix[-1].mean() > 0.6


def h_logits(f, memory):
    h = np.maximum(f @ np.asarray(memory.projection, np.float64), 0)
    return np.where(np.asarray(memory.class_counts) > 0, h @ np.asarray(memory.weights), -1e9)


def test_ncm_head_is_class_means_with_teen(scenario):
    teen_alpha = 0.5
    result = _run("ncm", scenario, teen_alpha=teen_alpha)
    memory = result.state.memory
    x, y = _all_train(scenario)
    f = _features(result, x)
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    # Float32 class sums of n_c non-negative (ReLU) features, added to the running sums and
    # divided by n_c: at most n_c + 2 roundings, so |error| ≤ (n_c + 2)·EPS32·mean|f| (the
    # worst case, 2e-5 relative; error measured 4e-7). One example more or less in a class
    # moves its mean by ~1/n_c ≈ 1e-2 relative.
    counts = np.bincount(y, minlength=4)[:, None]
    bound = (counts + 2) * EPS32 * np.stack([np.abs(f[y == c]).mean(0) for c in range(4)])
    assert_within(protos.class_means(memory["stats"]), means, bound, "class means")
    base = np.isin(np.arange(4), scenario.tasks[0].classes)
    np.testing.assert_array_equal(memory["base"], base)
    prototypes = np.asarray(protos.teen_calibrate(jnp.asarray(means, jnp.float32),
                                                  jnp.asarray(base), jnp.asarray(~base),
                                                  alpha=teen_alpha))

    def logits(q):
        unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
        return q / np.linalg.norm(q, axis=1, keepdims=True) @ unit.T

    _check_eval_uses_head(result, scenario, logits)


def test_lda_head_is_fsa_formula(scenario):
    result = _run("lda", scenario)
    memory = result.state.memory
    x, y = _all_train(scenario)
    f = _features(result, x)
    n, d = f.shape
    sigma = np.cov(f, rowvar=False) + np.eye(d)
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    w = np.linalg.solve(sigma, means.T)
    b = np.sum(means.T * w, 0)
    # Float32 statistics (tests/precision.py): Σ comes from raw moments Σffᵀ − nμμᵀ, sums
    # of n terms with error ≈ √n·u·|F|ᵀ|F| each; the class sums are ≈ √n·u relative; the
    # Cholesky solve adds √d·u; all are amplified by κ(Σ) (≈ 1.4 here). Tolerance ≈ 9e-6
    # (error measured 3.5e-7); the biased covariance (n instead of n − 1) moves W by 2.5e-4.
    kappa = spd_condition_number(sigma)
    moments = np.linalg.norm(np.abs(f).T @ np.abs(f), 2) / (n - 1)
    eps_sigma = 2 * np.sqrt(n) * U32 * moments / np.linalg.norm(sigma, 2)
    eps_means = np.sqrt(n) * U32
    rtol_w = kappa * (eps_sigma + eps_means + np.sqrt(d) * U32)
    assert_relative_error(memory["weights"], w, rtol_w, "LDA weights")
    # b_c = μ_cᵀ Σ⁻¹ μ_c ≥ ‖μ_c‖² / λ_max: |Δb_c| / b_c ≤ κ(Σ)·(ε_μ + ‖Δw_c‖ / ‖w_c‖).
    assert_relative_error(memory["bias"], b, kappa * (eps_means + rtol_w), "LDA bias")
    biased = np.linalg.solve(np.cov(f, rowvar=False, bias=True) + np.eye(d), means.T)
    assert relative_error(biased, w) > 10 * rtol_w, "tolerance too loose to catch a bug"
    _check_eval_uses_head(result, scenario, lambda q: q @ w - 0.5 * b)


def test_bad_hyperparameters_and_models():
    with pytest.raises(ValueError, match="gamma"):
        make_method("acil", gamma=0.0)
    with pytest.raises(ValueError, match="buffer_size"):
        make_method("acil", buffer_size=-1)
    with pytest.raises(ValueError, match="teen_alpha"):
        make_method("ncm", teen_alpha=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        make_method("lda", shrinkage=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        freeze_after(0)
    with pytest.raises(TypeError, match=r"num_tasks must be a positive int, got 1.0 \(float\)"):
        freeze_after(1.0)
    with pytest.raises(TypeError, match=r"buffer_size must be a non-negative int, got '8'"):
        make_method("acil", buffer_size="8")
    with pytest.raises(TypeError, match=r"gamma must be a finite number > 0, got None"):
        make_method("acil", gamma=None)
    with pytest.raises(ValueError, match=r"teen_tau must be a finite number > 0, got inf"):
        make_method("ncm", teen_tau=float("inf"))
    model = make_model("mlp", input_shape=(4, 4, 1), num_classes=4, num_tasks=2, widths=(8,),
                       seed=0)
    _, params, _ = ModelFns.split(model)
    for name in ("acil", "ncm", "lda"):
        with pytest.raises(ValueError, match="single linear head"):
            make_method(name).init_memory(params)
