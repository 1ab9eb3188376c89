"""Metrics shared by every unlearning experiment (pure numpy + scikit-learn, no jax).

An unlearning run splits the data four ways: forget-train (the examples to forget), retain-train
(the rest of the training set), and the test set split into forget-test (e.g. the forgotten
class) and retain-test. The metrics:

* **accuracy** on each of the four sets;
* **membership inference (MIA)**, as in Bad-Teacher and SSD (Foster et al., AAAI 2024): a
  ``LogisticRegression(class_weight="balanced")`` is fit on one scalar per example (the entropy
  of the softmax output, or the per-example loss), with retain-train examples labelled 1
  ("member") and test examples labelled 0. The score is the fraction of forget-train examples
  the attack calls "member": lower means the model treats them more like unseen data. A model
  that never saw the data scores about the attack's false-positive rate on test data; a model
  that memorised its training set scores near 1;
* **gap to a reference** (a model retrained from scratch on retain-train only) for each of the
  above, where such a reference exists: ``metric(unlearned) - metric(retrained)``.

All accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

__all__ = [
    "UnlearningSplit",
    "entropy",
    "membership_inference",
    "per_example_loss",
    "reference_gap",
    "unlearning_metrics",
]

_FEATURES = ("entropy", "loss")


class UnlearningSplit(NamedTuple):
    """The four sets of an unlearning evaluation; each is an ``(x, y)`` pair of arrays."""

    forget_train: tuple[np.ndarray, np.ndarray]
    retain_train: tuple[np.ndarray, np.ndarray]
    forget_test: tuple[np.ndarray, np.ndarray]
    retain_test: tuple[np.ndarray, np.ndarray]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the softmax of each row of `logits` (N, C): shape (N,)."""
    logp = _log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=1)


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example: shape (N,)."""
    logp = _log_softmax(logits)
    labels = np.asarray(labels)
    if labels.shape != (logp.shape[0],):
        raise ValueError(f"labels must have shape ({logp.shape[0]},), got {labels.shape}")
    return -logp[np.arange(len(labels)), labels]


def _attack_feature(logits, labels, feature: str) -> np.ndarray:
    if feature == "entropy":
        return entropy(logits)
    if feature == "loss":
        return per_example_loss(logits, labels)
    raise ValueError(f"feature must be one of {_FEATURES}, got {feature!r}")


def membership_inference(
    retain_train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    forget_train: tuple[np.ndarray, np.ndarray],
    *,
    feature: str = "entropy",
) -> float:
    """Fraction of forget-train examples a membership attack calls "member".

    Each argument is ``(logits, labels)`` of the model under attack on that set. The attack is
    a balanced logistic regression on one scalar feature (``"entropy"`` of the output, as SSD
    and Bad-Teacher use, or the per-example ``"loss"``), fit on retain-train (member) versus
    test (non-member) and applied to forget-train.
    """
    from sklearn.linear_model import LogisticRegression

    for name, pair in (("retain_train", retain_train), ("test", test),
                       ("forget_train", forget_train)):
        if len(pair[0]) == 0:
            raise ValueError(f"membership_inference: {name} is empty")
    members = _attack_feature(*retain_train, feature)
    non_members = _attack_feature(*test, feature)
    x = np.concatenate([members, non_members])[:, None]
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    attack = LogisticRegression(class_weight="balanced").fit(x, y)
    target = _attack_feature(*forget_train, feature)[:, None]
    return float(attack.predict(target).mean())


def _logits_in_batches(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                       batch_size: int) -> np.ndarray:
    parts = [np.asarray(predict(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def unlearning_metrics(
    predict: Callable[[np.ndarray], np.ndarray],
    split: UnlearningSplit,
    *,
    feature: str = "entropy",
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracy on the four sets and the MIA score of the model behind `predict`.

    Args:
      predict: maps a batch of inputs to logits (N, C) (numpy or jax arrays).
      split: the four sets.
      feature: the membership attack's feature, ``"entropy"`` or ``"loss"``.
      batch_size: examples per `predict` call.

    Returns:
      ``{"forget_train_acc", "retain_train_acc", "forget_test_acc", "retain_test_acc",
      "mia"}``; the attack is calibrated on retain-train vs the whole test set.
    """
    logits = {}
    out = {}
    for name in UnlearningSplit._fields:
        x, y = getattr(split, name)
        logits[name] = _logits_in_batches(predict, np.asarray(x), batch_size)
        out[f"{name}_acc"] = float(np.mean(logits[name].argmax(axis=1) == np.asarray(y))) \
            if len(y) else float("nan")
    test = (np.concatenate([logits["forget_test"], logits["retain_test"]]),
            np.concatenate([split.forget_test[1], split.retain_test[1]]))
    out["mia"] = membership_inference(
        (logits["retain_train"], split.retain_train[1]), test,
        (logits["forget_train"], split.forget_train[1]), feature=feature)
    return out


def reference_gap(metrics: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """``metrics[k] - reference[k]`` for every key both share (e.g. vs a retrained model)."""
    return {f"{k}_gap": float(metrics[k]) - float(reference[k])
            for k in metrics if k in reference}
