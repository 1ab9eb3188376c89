"""Batch order and padding."""

import numpy as np
import pytest

from clax.training import feed


def test_epoch_batches_are_a_deterministic_permutation_without_remainder():
    a = feed.epoch_index_batches(100, 32, seed=0, task_index=1, epoch=2)
    b = feed.epoch_index_batches(100, 32, seed=0, task_index=1, epoch=2)
    c = feed.epoch_index_batches(100, 32, seed=0, task_index=1, epoch=3)
    assert a.shape == (3, 32) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 96 and a.max() < 100


def test_epoch_batches_reject_tiny_tasks():
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        feed.epoch_index_batches(10, 64, seed=0, task_index=0, epoch=0)


def test_padded_eval_batches_mark_padding_invalid():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    batches, valid = feed.padded_eval_batches(x, y, np.zeros(10, np.int32), 4)
    assert batches.x.shape == (4, 4, 1) and valid.shape == (4, 4)  # 3 batches -> 4
    assert valid.sum() == 10 and not valid[2, 2:].any() and not valid[3].any()
    np.testing.assert_array_equal(batches.y.reshape(-1)[:10], y)


def test_subsample_is_fixed_and_sorted():
    s = feed.subsample(100, 10, seed=3)
    np.testing.assert_array_equal(s, feed.subsample(100, 10, seed=3))
    assert len(s) == 10 and np.all(np.diff(s) > 0)
    assert len(feed.subsample(5, 10, seed=0)) == 5
