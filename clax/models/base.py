"""Shared model contract: input-shape checking, feature extractor + head."""

from __future__ import annotations

import jax
from flax import nnx

from clax.models.heads import apply_head, make_head


class Classifier(nnx.Module):
    """Base class: ``__call__(x, task_ids) = head(features(x))``.

    Subclasses call :meth:`_init_classifier` once they know the feature size and implement
    :meth:`_features` on already-validated input.

    Attributes:
        input_shape: Expected per-example image shape ``(H, W, C)``.
        num_classes: Logits per example.
        num_tasks: Number of heads (1 means a single shared head).
        feature_dim: Size ``D`` of :meth:`features`.
        head: ``nnx.Linear`` or :class:`~clax.models.heads.MultiHeadLinear`.
    """

    def _init_classifier(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_tasks: int,
        feature_dim: int,
        rngs: nnx.Rngs,
    ) -> None:
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.feature_dim = feature_dim
        self.head = make_head(feature_dim, num_classes, num_tasks, rngs=rngs)

    def check_input(self, x: jax.Array) -> None:
        """Raises ``ValueError`` unless ``x`` is ``(B, *self.input_shape)`` (static check)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.input_shape))}) for "
                f"input_shape={self.input_shape}, got x.shape={tuple(x.shape)}"
            )

    def _features(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate features.

        Args:
            x: Images of shape ``(B, H, W, C)``.

        Returns:
            Features of shape ``(B, feature_dim)``.

        Raises:
            ValueError: If ``x.shape[1:] != input_shape``.
        """
        self.check_input(x)
        return self._features(x)

    def __call__(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """Logits ``(B, num_classes)``.

        Args:
            x: Images of shape ``(B, H, W, C)``.
            task_ids: Int task ids ``(B,)``; required when ``num_tasks > 1``, ignored otherwise.

        Raises:
            ValueError: On a shape mismatch or missing ``task_ids`` for a multi-head model.
        """
        return apply_head(self.head, self.features(x), task_ids)
