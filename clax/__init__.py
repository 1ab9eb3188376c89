"""clax: continual learning and machine unlearning for JAX / Flax NNX.

Methods are optax gradient transformations that compose with ``optax.chain`` around any
optimizer and any Flax model. Subpackages:

- `clax.data`: data sources (digits, IDX files, tfds) and continual scenarios.
- `clax.models`: NNX models (MLP, CNN, reduced ResNet-18, tiny ViT) and layer-input capture.
- `clax.core`: the contract: `Method`, `TrainState`, batches, objectives, `ModelFns`,
  the method registry.
- `clax.training`: the driver: jitted steps, the continual task loop, config, checkpoints.
- `clax.metrics`: accuracy-matrix metrics (ACC, BWT, FWT, forgetting), stability-gap and
  unlearning metrics, reports, plots.
- `clax.transforms`: optax transforms (subspace projection, CoSO, GU, EWC, A-GEM, EMA).
- `clax.subspace`: fixed-capacity bases (GPM's energy rule), representations, FD sketches.
- `clax.fisher`: diagonal Fisher estimators. `clax.replay`: device-resident buffers.
- `clax.analytic`: closed-form (RLS) learners with exact unlearning, prototype heads.
- `clax.edits`: one-shot weight edits (averaging, LiNeS, SSD). `clax.params`: paths, masks.
- `clax.methods`: the registered `Method`s (build them with `make_method(name)`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Subpackages and the public names re-exported here, imported on first use: `import clax`
# is cheap, and importing one leaf module (e.g. the pure-numpy `clax.metrics.continual`)
# does not load the rest of the package.
_SUBPACKAGES = (
    'analytic',
    'core',
    'data',
    'edits',
    'fisher',
    'methods',
    'metrics',
    'models',
    'params',
    'replay',
    'subspace',
    'training',
    'transforms',
    'unlearning',
)
_EXPORTS = {
    'adaptive_ema': ('clax.methods', 'adaptive_ema'),
    'after': ('clax.core', 'after'),
    'agem': ('clax.transforms', 'agem'),
    'around': ('clax.core', 'around'),
    'average': ('clax.edits', 'average'),
    'averaged_params': ('clax.edits', 'averaged_params'),
    'Batch': ('clax.core', 'Batch'),
    'before': ('clax.core', 'before'),
    'block_depths': ('clax.params', 'block_depths'),
    'capture_layer_inputs': ('clax.models', 'capture_layer_inputs'),
    'chain_around': ('clax.core', 'chain_around'),
    'Classification': ('clax.core', 'Classification'),
    'coso': ('clax.transforms', 'coso'),
    'default_config': ('clax.training', 'default_config'),
    'diagonal_fisher': ('clax.fisher', 'diagonal_fisher'),
    'ema': ('clax.methods', 'ema'),
    'ema_balancing': ('clax.transforms', 'ema_balancing'),
    'ema_params': ('clax.transforms', 'ema_params'),
    'empty_basis': ('clax.subspace', 'empty_basis'),
    'ewc_penalty': ('clax.transforms', 'ewc_penalty'),
    'fisher_importance_mask': ('clax.params', 'fisher_importance_mask'),
    'geometric_disentanglement': ('clax.transforms', 'geometric_disentanglement'),
    'gradient_ascent_loss': ('clax.unlearning', 'gradient_ascent_loss'),
    'grow_basis': ('clax.subspace', 'grow_basis'),
    'half_fine_tuning_mask': ('clax.params', 'half_fine_tuning_mask'),
    'head_backbone_labels': ('clax.params', 'head_backbone_labels'),
    'interpolate': ('clax.edits', 'interpolate'),
    'kappatune_mask': ('clax.params', 'kappatune_mask'),
    'l2_penalty': ('clax.transforms', 'l2_penalty'),
    'label_params': ('clax.params', 'label_params'),
    'LanguageModeling': ('clax.core', 'LanguageModeling'),
    'lines': ('clax.methods', 'lines'),
    'lines_merge': ('clax.edits', 'lines_merge'),
    'lines_scale': ('clax.edits', 'lines_scale'),
    'load_source': ('clax.data', 'load_source'),
    'make_method': ('clax.core', 'make_method'),
    'make_model': ('clax.models', 'make_model'),
    'make_scenario': ('clax.data', 'make_scenario'),
    'Method': ('clax.core', 'Method'),
    'npo_loss': ('clax.unlearning', 'npo_loss'),
    'project_out': ('clax.subspace', 'project_out'),
    'register_method': ('clax.core', 'register_method'),
    'registered_methods': ('clax.core', 'registered_methods'),
    'Replay': ('clax.core', 'Replay'),
    'Scenario': ('clax.data', 'Scenario'),
    'slow_learner': ('clax.methods', 'slow_learner'),
    'ssd_dampen': ('clax.edits', 'ssd_dampen'),
    'ssd_search_alpha': ('clax.edits', 'ssd_search_alpha'),
    'subspace_projection': ('clax.transforms', 'subspace_projection'),
    'SubspaceBasis': ('clax.subspace', 'SubspaceBasis'),
    'Task': ('clax.data', 'Task'),
    'train_continual': ('clax.training', 'train_continual'),
    'train_only': ('clax.params', 'train_only'),
    'TrainState': ('clax.core', 'TrainState'),
    'weight_averaging': ('clax.edits', 'weight_averaging'),
    'weight_averaging_method': ('clax.methods', 'weight_averaging'),
}

# Names whose use needs every built-in method registered (the registry lives in clax.core,
# which must not import the methods above it).
_NEEDS_METHODS = frozenset({"make_method", "registered_methods", "default_config",
                            "train_continual"})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"clax.{name}")
    elif name in _EXPORTS:
        if name in _NEEDS_METHODS:
            importlib.import_module("clax.methods")
        module_name, attr = _EXPORTS[name]
        module = getattr(importlib.import_module(module_name), attr)
    else:
        raise AttributeError(f"module 'clax' has no attribute {name!r}")
    globals()[name] = module  # later lookups skip __getattr__
    return module


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBPACKAGES, *_EXPORTS])


__all__ = sorted([*_SUBPACKAGES, *_EXPORTS], key=str.lower)
