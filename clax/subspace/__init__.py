"""Protected subspaces: fixed-capacity orthonormal bases, sketches, layer representations.

- :mod:`clax.subspace.basis`: :class:`SubspaceBasis` and GPM's energy-threshold growth.
- :mod:`clax.subspace.representations`: per-layer representation matrices (GPM).
- :mod:`clax.subspace.frequent_directions`: Frequent Directions sketches (CoSO).
"""

from clax.subspace.basis import (
    SubspaceBasis,
    check_threshold,
    empty_basis,
    grow_basis,
    orthonormality_error,
    project_out,
    projection_matrix,
    valid_mask,
)
from clax.subspace.frequent_directions import (
    FrequentDirections,
    init_sketch,
    shrink,
    sketch_covariance,
    sketch_matrix,
    update_sketch,
    update_sketch_from_svd,
)
from clax.subspace.representations import (
    collect_representations,
    layer_kinds,
    representation_matrices,
)

__all__ = [
    "FrequentDirections",
    "SubspaceBasis",
    "check_threshold",
    "collect_representations",
    "empty_basis",
    "grow_basis",
    "init_sketch",
    "layer_kinds",
    "orthonormality_error",
    "project_out",
    "projection_matrix",
    "representation_matrices",
    "shrink",
    "sketch_covariance",
    "sketch_matrix",
    "update_sketch",
    "update_sketch_from_svd",
    "valid_mask",
]
