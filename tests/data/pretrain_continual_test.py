"""The pretrain-then-continual scenario."""

import numpy as np
import pytest

from clax.data import SCENARIOS, load_source, make_scenario, pretrain_continual
from tests.training.helpers import tiny_dataset


def test_default_base_is_first_half_and_rest_is_class_incremental():
    ds = load_source("digits")
    s = pretrain_continual(ds)
    assert s.kind == "class_incremental" and s.name == "pretrain_continual/digits"
    assert [t.classes.tolist() for t in s.tasks] == [[0, 1, 2, 3, 4], [5, 6], [7, 8], [9]]
    for t in s.tasks:
        assert set(np.unique(t.y_train)) == set(t.classes.tolist())
        assert set(np.unique(t.y_test)) == set(t.classes.tolist())
    assert sum(len(t.y_train) for t in s.tasks) == len(ds.y_train)
    assert "pretrain_continual" in SCENARIOS


def test_explicit_base_and_task_sizes():
    ds = tiny_dataset(num_classes=6)
    s = make_scenario("pretrain_continual", ds, base_classes=(5, 1), classes_per_task=(1, 3),
                      max_train_per_task=20, max_test_per_task=10)
    assert [t.classes.tolist() for t in s.tasks] == [[1, 5], [0], [2, 3, 4]]
    assert [t.id for t in s.tasks] == [0, 1, 2]
    assert all(len(t.y_train) <= 20 and len(t.y_test) <= 10 for t in s.tasks)


def test_deterministic():
    ds = tiny_dataset()
    a = pretrain_continual(ds, max_train_per_task=50, seed=3)
    b = pretrain_continual(ds, max_train_per_task=50, seed=3)
    for ta, tb in zip(a.tasks, b.tasks, strict=False):
        np.testing.assert_array_equal(ta.x_train, tb.x_train)


@pytest.mark.parametrize("kwargs,match", [
    ({"base_classes": ()}, "base_classes"),
    ({"base_classes": (0, 0)}, "base_classes"),
    ({"base_classes": (0, 9)}, "base_classes"),
    ({"base_classes": (0, 1, 2, 3)}, "base_classes"),
    ({"classes_per_task": 0}, "classes_per_task"),
    ({"classes_per_task": (2, 2)}, "classes"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pretrain_continual(tiny_dataset(), **kwargs)
