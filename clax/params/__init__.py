"""Parameter-tree utilities: path names, block depths, regex labels, structure checks, and
static trainable masks (HFT, KappaTune, Fisher importance) for optax.masked / partition."""

from clax.params.paths import (
    OUTSIDE,
    block_depths,
    check_same_structure,
    head_backbone_labels,
    label_params,
    path_str,
    plain_path,
)
from clax.params.selection import (
    HFT_CATEGORIES,
    condition_numbers,
    fisher_importance_mask,
    half_fine_tuning_mask,
    invert_mask,
    kappatune_mask,
    mask_labels,
    tensor_importance,
    train_only,
)

__all__ = [
    "HFT_CATEGORIES",
    "OUTSIDE",
    "block_depths",
    "check_same_structure",
    "condition_numbers",
    "fisher_importance_mask",
    "half_fine_tuning_mask",
    "head_backbone_labels",
    "invert_mask",
    "kappatune_mask",
    "label_params",
    "mask_labels",
    "path_str",
    "plain_path",
    "tensor_importance",
    "train_only",
]
