"""Small configs and scenarios shared by the training tests (fast on 2 CPU cores)."""

import numpy as np

from clax.data import Dataset, make_scenario
from clax.training import default_config


def tiny_dataset(n_train=512, n_test=128, shape=(4, 4, 1), num_classes=4, seed=0):
    """A learnable synthetic dataset: each class is a noisy fixed prototype."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, (num_classes, *shape)).astype(np.float32)

    def make(n):
        y = rng.integers(0, num_classes, n).astype(np.int32)
        x = protos[y] + 0.1 * rng.normal(size=(n, *shape)).astype(np.float32)
        return np.clip(x, 0, 1).astype(np.float32), y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return Dataset(xtr, ytr, xte, yte, num_classes, "tiny")


def tiny_scenario(kind="class_incremental", **kwargs):
    ds = tiny_dataset()
    if kind in ("class_incremental", "task_incremental"):
        kwargs.setdefault("classes_per_task", 2)
    else:
        kwargs.setdefault("num_tasks", 2)
    return make_scenario(kind, ds, **kwargs)


def tiny_config(**train):
    c = default_config()
    c.name = "tiny"
    c.model.mlp.widths = (16,)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.train.epochs_per_task = 2
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.num_devices = 1
    c.train.update(train)
    return c
