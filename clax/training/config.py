"""Run configuration: the default `ml_collections` config and builders from it.

Sections (every experiment config starts from `default_config()` and edits it):

- ``data``: ``source`` (``digits``, ``idx``, ``fashion_mnist``, ``tfds``) plus that
  source's keyword arguments.
- ``scenario``: ``name`` (``class_incremental``, ``task_incremental``, ``permuted``,
  ``rotated``) plus its keyword arguments.
- ``model``: ``name`` (``mlp``, ``cnn``, ``resnet18``, ``vit``), ``multi_head`` (one
  head per task; task-incremental scenarios only) plus the model's keyword arguments.
- ``method``: ``name`` plus the method's hyperparameters.
- ``optimizer``: ``name`` (``sgd``, ``momentum``, ``adam``, ``adamw``) and its settings.
- ``train``: schedule, batch sizes, evaluation, checkpointing, data path.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax
from ml_collections.config_dict import placeholder
from flax import nnx

from clax import data as clax_data
from clax import models as clax_models
from clax.training.method import Method, make_method

# Keys of a section that select the component; the rest are passed as keyword arguments.
_SELECTORS = {"data": ("source",), "scenario": ("name",), "model": ("name", "multi_head"),
              "method": ("name",)}


def default_config() -> ml_collections.ConfigDict:
    """The defaults every experiment config edits (digits, split into 5 tasks, MLP)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    # None means "not set": such keys are not passed to the component, so one section
    # can carry the options of several sources/scenarios (and command-line overrides).
    c.data = ml_collections.ConfigDict(
        {"source": "digits", "root": placeholder(str), "name": placeholder(str),
         "data_dir": placeholder(str), "cache_dir": placeholder(str)}
    )
    c.scenario = ml_collections.ConfigDict(
        {"name": "class_incremental", "classes_per_task": 2, "seed": 0,
         "max_train_per_task": placeholder(int), "max_test_per_task": placeholder(int)}
    )
    c.model = ml_collections.ConfigDict(
        {"name": "mlp", "multi_head": False, "widths": (256, 256)}
    )
    c.method = ml_collections.ConfigDict({"name": "finetune"})
    c.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 0.0}
    )
    c.train = ml_collections.ConfigDict(
        {
            "epochs_per_task": 1,
            "batch_size": 128,
            "eval_batch_size": 512,
            # Evaluate seen tasks every N steps on `eval_subsample` test examples (0: off).
            "eval_every_steps": 0,
            "eval_subsample": 1000,
            # Checkpoint every N steps (0: only at task boundaries). Needs a workdir.
            "checkpoint_every_steps": 0,
            "checkpoints_to_keep": 2,
            # True: each task's data lives on device and an epoch is one lax.scan.
            # False: batches are assembled on the host and fed step by step.
            "device_resident": True,
            "reset_optimizer_per_task": False,
            # Devices to shard the batch over (0: all local devices).
            "num_devices": 0,
        }
    )
    return c


def component_kwargs(section: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """The keyword arguments in config `section`: all but its selector keys and None values."""
    d = section.to_dict()
    for key in _SELECTORS[name]:
        d.pop(key, None)
    return {k: v for k, v in d.items() if v is not None}


def build_scenario(config: ml_collections.ConfigDict):
    """Loads the data source and splits it into the configured scenario."""
    dataset = clax_data.load_source(config.data.source, **component_kwargs(config.data, "data"))
    return clax_data.make_scenario(
        config.scenario.name, dataset, **component_kwargs(config.scenario, "scenario")
    )


def build_model(config: ml_collections.ConfigDict, scenario) -> nnx.Module:
    """Builds the configured NNX model for `scenario` (input shape, classes, heads)."""
    multi_head = bool(config.model.get("multi_head", False))
    if multi_head and not scenario.uses_task_ids:
        raise ValueError(
            f"config.model.multi_head=True needs task ids, but scenario {scenario.name!r} "
            f"is {scenario.kind}; use a task_incremental scenario or multi_head=False"
        )
    return clax_models.make_model(
        config.model.name,
        input_shape=tuple(scenario.input_shape),
        num_classes=scenario.num_classes,
        num_tasks=scenario.num_tasks if multi_head else 1,
        seed=config.seed,
        **component_kwargs(config.model, "model"),
    )


def build_method(config: ml_collections.ConfigDict) -> Method:
    """Builds the registered method named by ``config.method.name``."""
    return make_method(config.method.name, **component_kwargs(config.method, "method"))


_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def build_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The base optimizer from ``config.optimizer``."""
    name, lr = opt.name, opt.learning_rate
    if not lr > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {lr}")
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=opt.get("momentum", 0.9))
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=opt.get("weight_decay", 1e-4))
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(_OPTIMIZERS)}")
