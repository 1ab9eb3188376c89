"""BatchNorm train/eval behaviour of ResNet18."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.models import ResNet18
from clax.models.resnet import BN_MOMENTUM
from tests.models.models_test import images, materialize


def _model():
    # Same configuration as models_test's tiny ResNet, so compiled programs are shared.
    return materialize(
        nnx.eval_shape(lambda: ResNet18((8, 8, 1), num_classes=5, width=4, rngs=nnx.Rngs(0)))
    )


def _x(batch=4, seed=0):
    return images((8, 8, 1), batch=batch, seed=seed) * 2.0 + 1.0


# nnx.jit writes BatchStat updates back into the model object.
_forward = nnx.jit(lambda model, x: model(x))


def test_train_mode_updates_running_stats_with_documented_momentum():
    model = _model()
    assert model.bn1.momentum == BN_MOMENTUM == 0.9
    assert not model.bn1.use_running_average
    x = _x()
    stem = model.conv1(x)  # what bn1 normalises
    _forward(model, x)
    batch_mean = stem.mean(axis=(0, 1, 2))
    batch_var = stem.var(axis=(0, 1, 2))
    # Running stats start at mean 0, var 1 and move 10% towards the batch statistics.
    np.testing.assert_allclose(model.bn1.mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.bn1.var[...], 0.9 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)


def test_eval_mode_uses_running_stats_and_differs_from_train():
    model = _model()
    x = _x()
    for _ in range(3):  # give the running stats non-trivial values
        train_out = _forward(model, x)
    stats = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))

    model.eval()
    norms = [m for _, m in model.iter_modules() if isinstance(m, nnx.BatchNorm)]
    assert len(norms) == 1 + 2 * 8 + 3 and all(m.use_running_average for m in norms)
    eval_out = _forward(model, x)
    assert not np.allclose(train_out, eval_out, atol=1e-4)
    # Eval leaves the running stats alone...
    jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))
    # ...normalises each example on its own (other examples do not matter)...
    mixed = x.at[1:].set(_x(seed=1)[1:])
    np.testing.assert_allclose(_forward(model, mixed)[0], eval_out[0], rtol=1e-5, atol=1e-5)
    # ...and follows the running stats.
    model.bn1.mean[...] = model.bn1.mean[...] + 1.0
    assert not np.allclose(_forward(model, x), eval_out, atol=1e-4)

    model.train()
    assert not model.bn1.use_running_average
    # Train mode depends on the rest of the batch.
    assert not np.allclose(_forward(model, mixed)[0], _forward(model, x)[0], atol=1e-4)
