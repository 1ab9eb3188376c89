"""pretrain_continual_summary on a hand-computed accuracy matrix."""

import numpy as np
import pytest

from clax.metrics import pretrain_continual_summary


def test_hand_computed():
    R = [[0.8, 0.0, 0.0],
         [0.6, 0.9, 0.0],
         [0.4, 0.5, 1.0]]
    s = pretrain_continual_summary(R)
    assert s["base_before"] == pytest.approx(0.8)
    assert s["base_after"] == pytest.approx(0.4)
    assert s["base_retention"] == pytest.approx(0.5)
    assert s["new_tasks_acc"] == pytest.approx(0.75)


def test_zero_base_accuracy_has_no_retention():
    assert pretrain_continual_summary(np.zeros((2, 2)))["base_retention"] is None


def test_needs_new_tasks_and_valid_matrix():
    with pytest.raises(ValueError, match="T >= 2"):
        pretrain_continual_summary([[0.5]])
    with pytest.raises(ValueError, match="fractions"):
        pretrain_continual_summary([[50.0, 0.0], [40.0, 90.0]])
