"""Parameter-tree utilities: path names, block depths, regex labels, structure checks."""

from clax.params.paths import (
    OUTSIDE,
    block_depths,
    check_same_structure,
    head_backbone_labels,
    label_params,
    path_str,
    plain_path,
)

__all__ = [
    "OUTSIDE",
    "block_depths",
    "check_same_structure",
    "head_backbone_labels",
    "label_params",
    "path_str",
    "plain_path",
]
