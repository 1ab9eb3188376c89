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

from clax import (
    analytic,
    core,
    data,
    edits,
    fisher,
    metrics,
    models,
    params,
    replay,
    subspace,
    training,
    transforms,
    unlearning,
)
from clax.core import (
    Batch,
    Classification,
    LanguageModeling,
    Method,
    Replay,
    TrainState,
    after,
    around,
    before,
    chain_around,
    make_method,
    register_method,
    registered_methods,
)
from clax.data import Scenario, Task, load_source, make_scenario
from clax.edits import (
    average,
    averaged_params,
    interpolate,
    lines_merge,
    lines_scale,
    ssd_dampen,
    ssd_search_alpha,
    weight_averaging,
)
from clax.fisher import diagonal_fisher
from clax.methods import adaptive_ema, ema, lines, slow_learner
from clax.methods import weight_averaging as weight_averaging_method
from clax.models import capture_layer_inputs, make_model
from clax.params import (
    block_depths,
    fisher_importance_mask,
    half_fine_tuning_mask,
    head_backbone_labels,
    kappatune_mask,
    label_params,
    train_only,
)
from clax.subspace import SubspaceBasis, empty_basis, grow_basis, project_out
from clax.training import default_config, train_continual
from clax.unlearning import gradient_ascent_loss, npo_loss
from clax.transforms import (
    agem,
    coso,
    ema_balancing,
    ema_params,
    ewc_penalty,
    geometric_disentanglement,
    l2_penalty,
    subspace_projection,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Classification",
    "LanguageModeling",
    "Method",
    "Replay",
    "Scenario",
    "SubspaceBasis",
    "Task",
    "TrainState",
    "adaptive_ema",
    "after",
    "agem",
    "around",
    "analytic",
    "average",
    "averaged_params",
    "before",
    "block_depths",
    "capture_layer_inputs",
    "chain_around",
    "core",
    "coso",
    "data",
    "default_config",
    "diagonal_fisher",
    "edits",
    "ema",
    "ema_balancing",
    "ema_params",
    "empty_basis",
    "ewc_penalty",
    "fisher",
    "fisher_importance_mask",
    "geometric_disentanglement",
    "gradient_ascent_loss",
    "grow_basis",
    "half_fine_tuning_mask",
    "head_backbone_labels",
    "interpolate",
    "kappatune_mask",
    "l2_penalty",
    "label_params",
    "lines",
    "lines_merge",
    "lines_scale",
    "load_source",
    "make_method",
    "make_model",
    "make_scenario",
    "metrics",
    "models",
    "npo_loss",
    "params",
    "project_out",
    "register_method",
    "registered_methods",
    "replay",
    "slow_learner",
    "ssd_dampen",
    "ssd_search_alpha",
    "subspace",
    "subspace_projection",
    "train_continual",
    "train_only",
    "training",
    "transforms",
    "unlearning",
    "weight_averaging",
    "weight_averaging_method",
]
