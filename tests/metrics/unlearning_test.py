"""Unlearning metrics: entropy/loss features, the membership attack, the four accuracies."""

import numpy as np
import pytest

from clax.metrics.unlearning import (
    UnlearningSplit,
    entropy,
    membership_inference,
    per_example_loss,
    reference_gap,
    unlearning_metrics,
)


def test_entropy_and_loss_by_hand():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    np.testing.assert_allclose(entropy(logits),
                               [np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))])
    np.testing.assert_allclose(per_example_loss(logits, np.array([0, 1])), [np.log(2), np.log(4)])


def _memorizer(train_x, num_classes, rng_seed=0):
    """Confident and right on its training inputs, a random guess elsewhere."""
    table = {x.tobytes(): int(i) for i, x in enumerate(train_x)}
    rng = np.random.default_rng(rng_seed)
    labels = rng.integers(0, num_classes, len(train_x))

    def predict(x):
        out = rng.normal(0, 0.1, (len(x), num_classes))
        for row, xi in enumerate(x):
            i = table.get(xi.tobytes())
            if i is not None:
                out[row, labels[i]] += 10.0
        return out

    return predict, labels


def _split(rng, n=300, d=5, num_classes=4):
    xs = rng.normal(size=(4, n, d)).astype(np.float32)
    return xs, num_classes


def test_mia_high_on_memorizing_model_and_near_half_on_unseen():
    rng = np.random.default_rng(0)
    xs, c = _split(rng)
    forget_x, retain_x, ftest_x, rtest_x = xs
    train_x = np.concatenate([forget_x, retain_x])
    predict, labels = _memorizer(train_x, c)
    y_forget, y_retain = labels[:len(forget_x)], labels[len(forget_x):]
    y_test = rng.integers(0, c, (2, len(ftest_x)))
    split = UnlearningSplit((forget_x, y_forget), (retain_x, y_retain),
                            (ftest_x, y_test[0]), (rtest_x, y_test[1]))
    m = unlearning_metrics(predict, split, batch_size=64)
    assert m["mia"] > 0.95
    assert m["forget_train_acc"] == 1.0 and m["retain_train_acc"] == 1.0
    assert m["retain_test_acc"] < 0.5

    # A model that never saw any of the data: members look like non-members.
    scores = []
    for seed in range(5):
        r = np.random.default_rng(seed)
        mk = lambda n, r=r: (r.normal(size=(n, c)), r.integers(0, c, n))  # noqa: E731
        scores.append(membership_inference(mk(300), mk(300), mk(300)))
    assert abs(np.mean(scores) - 0.5) < 0.15, scores


def test_bad_input():
    with pytest.raises(ValueError, match="feature must be one of"):
        membership_inference(*((np.zeros((2, 2)), np.zeros(2, int)),) * 3, feature="margin")
    with pytest.raises(ValueError, match="forget_train is empty"):
        membership_inference((np.zeros((2, 2)), np.zeros(2, int)),
                             (np.zeros((2, 2)), np.zeros(2, int)),
                             (np.zeros((0, 2)), np.zeros(0, int)))
    with pytest.raises(ValueError, match="logits must be"):
        entropy(np.zeros(3))


def test_reference_gap():
    assert reference_gap({"mia": 0.3, "forget_test_acc": 0.1}, {"mia": 0.2}) == \
        pytest.approx({"mia_gap": 0.1})
