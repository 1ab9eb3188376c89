"""Objectives: the loss a step minimises and the metrics an evaluation reports.

The training step, the evaluation, the Fisher estimators and the unlearning losses read
the task loss from an objective, so nothing below the objective assumes images or class
labels. An objective is a frozen object with:

* ``metrics``: the metrics it reports, each with its direction (`MetricSpec`); the first
  is the run's primary metric (the metric matrix of ACC/BWT/forgetting).
* ``per_example_loss(outputs, batch) -> (B,)`` and ``loss(outputs, batch, weights)``:
  the weighted mean loss of a batch (``weights`` (B,) or None for the plain mean).
* ``eval_sums(outputs, batch, valid) -> dict``: additive statistics of a batch (padding
  excluded by the bool ``valid`` (B,)), summed over batches, then
* ``finalize(sums) -> dict``: the metric values.
* ``sample_targets(outputs, batch, key)`` / ``predicted_targets(outputs, batch)``: targets
  drawn from, or the argmax of, the model's predictive distribution (the "true" and
  "argmax" Fisher).

`Classification` is masked cross-entropy with accuracy; `LanguageModeling` is next-token
cross-entropy over the tokens whose target is not negative, with loss, perplexity and
token accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.core.batch import Batch

# Logits outside a task's classes are pushed to this value (finite, so no inf - inf NaN).
MASKED_LOGIT = -1e9


class MetricSpec(NamedTuple):
    """A metric an objective reports, and whether larger values are better."""

    name: str
    higher_is_better: bool


@runtime_checkable
class Objective(Protocol):
    """What the training loop, the methods and the estimators need from a task's loss."""

    metrics: tuple[MetricSpec, ...]

    def per_example_loss(self, outputs: jax.Array, batch: Batch) -> jax.Array: ...

    def loss(self, outputs: jax.Array, batch: Batch,
             weights: jax.Array | None = None) -> jax.Array: ...

    def eval_sums(self, outputs: jax.Array, batch: Batch,
                  valid: jax.Array) -> dict[str, jax.Array]: ...

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]: ...

    def sample_targets(self, outputs: jax.Array, batch: Batch, key: jax.Array) -> Batch: ...

    def predicted_targets(self, outputs: jax.Array, batch: Batch) -> Batch: ...


def primary_metric(objective: Objective) -> MetricSpec:
    """The first metric of `objective`: the one ACC/BWT/forgetting are computed on."""
    return objective.metrics[0]


def masked_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``logits`` with the entries outside ``mask`` pushed to a large negative value."""
    return logits if mask is None else jnp.where(mask, logits, MASKED_LOGIT)


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy; `mask` (B, C) bool keeps only each example's classes."""
    return optax.softmax_cross_entropy_with_integer_labels(
        masked_logits(logits, mask), labels).mean()


def correct_predictions(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Boolean (B,) vector of correct argmax predictions (masked like the loss)."""
    return jnp.argmax(masked_logits(logits, mask), axis=-1) == labels


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return values.mean()
    w = weights.astype(jnp.float32)
    return jnp.sum(w * values) / jnp.sum(w)


@dataclasses.dataclass(frozen=True, eq=False)
class Classification:
    """Softmax cross-entropy over class ids ``batch.y`` (B,), with accuracy.

    Args:
      logit_masks: optional (num_tasks, num_classes) bool table; example b only sees the
        classes of its task ``task_ids[b]`` (task-incremental learning). None: all classes.
    """

    logit_masks: np.ndarray | None = None
    metrics: tuple[MetricSpec, ...] = (MetricSpec("accuracy", True), MetricSpec("loss", False))

    def mask_for(self, task_ids: jax.Array) -> jax.Array | None:
        """The (B, C) class mask of each example's task, or None."""
        if self.logit_masks is None:
            return None
        return jnp.asarray(self.logit_masks, bool)[task_ids]

    def per_example_loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        logits = masked_logits(outputs, self.mask_for(batch.task_ids))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)

    def loss(self, outputs: jax.Array, batch: Batch,
             weights: jax.Array | None = None) -> jax.Array:
        return _weighted_mean(self.per_example_loss(outputs, batch), weights)

    def eval_sums(self, outputs: jax.Array, batch: Batch,
                  valid: jax.Array) -> dict[str, jax.Array]:
        correct = correct_predictions(outputs, batch.y, self.mask_for(batch.task_ids))
        ce = self.per_example_loss(outputs, batch)
        return {"correct": jnp.sum(correct & valid).astype(jnp.int32),
                "loss": jnp.sum(jnp.where(valid, ce, 0.0)),
                "count": jnp.sum(valid).astype(jnp.int32)}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        n = max(int(sums["count"]), 1)
        return {"accuracy": int(sums["correct"]) / n, "loss": float(sums["loss"]) / n}

    def sample_targets(self, outputs: jax.Array, batch: Batch, key: jax.Array) -> Batch:
        logits = masked_logits(outputs, self.mask_for(batch.task_ids))
        return batch._replace(y=jax.random.categorical(key, logits).astype(jnp.int32))

    def predicted_targets(self, outputs: jax.Array, batch: Batch) -> Batch:
        logits = masked_logits(outputs, self.mask_for(batch.task_ids))
        return batch._replace(y=jnp.argmax(logits, -1).astype(jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModeling:
    """Next-token cross-entropy over the tokens whose target is not negative.

    ``batch.x`` holds input token ids (B, L), ``batch.y`` the target of each position
    (B, L) int32: the next token, or a negative value where no loss is taken (padding,
    prompt tokens of instruction data). The model's outputs are logits (B, L, V). The
    batch loss is the mean over all counted tokens of the batch (token-weighted: with
    per-example ``weights``, ``Σ_i w_i Σ_t m_it ℓ_it / Σ_i w_i Σ_t m_it``). Metrics: ``loss``
    (nats per token; the primary metric), ``perplexity`` = exp(loss) of the pooled tokens,
    and ``token_accuracy``.

    Example: uniform logits over 4 tokens cost log 4 nats per counted token; the target
    ``-1`` is not counted:

    >>> import numpy as np
    >>> batch = Batch(x=np.zeros((1, 3), np.int32), y=np.array([[1, 2, -1]]),
    ...               task_ids=np.zeros(1, np.int32))
    >>> round(float(LanguageModeling().loss(np.zeros((1, 3, 4)), batch)), 4)
    1.3863
    """

    metrics: tuple[MetricSpec, ...] = (MetricSpec("loss", False),
                                       MetricSpec("perplexity", False),
                                       MetricSpec("token_accuracy", True))

    @staticmethod
    def _token_nll(outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        targets = batch.y
        mask = targets >= 0
        nll = optax.softmax_cross_entropy_with_integer_labels(
            outputs.astype(jnp.float32), jnp.where(mask, targets, 0))
        return jnp.where(mask, nll, 0.0), mask.astype(jnp.float32)

    def per_example_loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        nll, mask = self._token_nll(outputs, batch)
        return nll.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)

    def loss(self, outputs: jax.Array, batch: Batch,
             weights: jax.Array | None = None) -> jax.Array:
        nll, mask = self._token_nll(outputs, batch)
        if weights is not None:
            w = weights.astype(jnp.float32)[:, None]
            nll, mask = nll * w, mask * w
        return nll.sum() / jnp.maximum(mask.sum(), 1e-9)

    def eval_sums(self, outputs: jax.Array, batch: Batch,
                  valid: jax.Array) -> dict[str, jax.Array]:
        nll, mask = self._token_nll(outputs, batch)
        keep = mask * valid[:, None].astype(jnp.float32)
        correct = (jnp.argmax(outputs, -1) == batch.y).astype(jnp.float32) * keep
        return {"nll": jnp.sum(nll * keep), "tokens": jnp.sum(keep),
                "correct": jnp.sum(correct)}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        tokens = max(float(sums["tokens"]), 1.0)
        loss = float(sums["nll"]) / tokens
        return {"loss": loss, "perplexity": float(np.exp(loss)),
                "token_accuracy": float(sums["correct"]) / tokens}

    def sample_targets(self, outputs: jax.Array, batch: Batch, key: jax.Array) -> Batch:
        sampled = jax.random.categorical(key, outputs.astype(jnp.float32)).astype(jnp.int32)
        return batch._replace(y=jnp.where(batch.y >= 0, sampled, batch.y))

    def predicted_targets(self, outputs: jax.Array, batch: Batch) -> Batch:
        top = jnp.argmax(outputs, -1).astype(jnp.int32)
        return batch._replace(y=jnp.where(batch.y >= 0, top, batch.y))


def check_objective(objective: object, *, name: str = "objective") -> Objective:
    """Returns `objective` if it implements `Objective`, else raises TypeError."""
    if not isinstance(objective, Objective):
        missing = [m for m in ("metrics", "per_example_loss", "loss", "eval_sums", "finalize",
                               "sample_targets", "predicted_targets")
                   if not hasattr(objective, m)]
        raise TypeError(f"{name} must implement clax.core.Objective; "
                        f"{type(objective).__name__} lacks {', '.join(missing)}")
    if not objective.metrics:
        raise ValueError(f"{name}.metrics must name at least one metric")
    return objective
