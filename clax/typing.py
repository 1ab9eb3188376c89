"""Type aliases shared by every layer of clax (imports nothing from clax)."""

from __future__ import annotations

from typing import Any, TypeAlias

import jax

# Any nested structure of arrays that jax.tree_util understands (dicts, tuples, NamedTuples,
# nnx.State). Annotating with it says "a pytree" where a precise type would be a lie.
PyTree: TypeAlias = Any
# A key path into a pytree of parameters, e.g. ("layers", 0, "kernel").
Path: TypeAlias = tuple[Any, ...]
Array: TypeAlias = jax.Array

__all__ = ["Array", "Path", "PyTree"]
