"""Tests for clax.data.streams: Si-Blurry and recurring streams, online runs of the loop."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from clax import data
from clax.core import Method
from clax.methods import joint
from clax.training import train_continual
from tests.training.helpers import tiny_config, tiny_dataset


def _indexed(n_train=600, n_test=200, num_classes=10, seed=0, imbalance=False):
    """A dataset whose image i is the number i: a task's images name its samples."""
    rng = np.random.default_rng(seed)
    if imbalance:  # class c has about (c + 1) times as many samples as class 0
        p = np.arange(1, num_classes + 1) / np.sum(np.arange(1, num_classes + 1))
        y_tr = rng.choice(num_classes, size=n_train, p=p).astype(np.int32)
    else:
        y_tr = (np.arange(n_train) % num_classes).astype(np.int32)
    y_te = (np.arange(n_test) % num_classes).astype(np.int32)
    x_tr = np.arange(n_train, dtype=np.float32).reshape(-1, 1, 1, 1)
    x_te = np.arange(n_test, dtype=np.float32).reshape(-1, 1, 1, 1)
    return data.Dataset(x_tr, y_tr, x_te, y_te, num_classes, "indexed")


def _ids(x):
    return x.reshape(-1).astype(np.int64)


# --------------------------------------------------------------------------------------
# Si-Blurry


@pytest.mark.parametrize(
    "num_tasks,disjoint_share,blurry_share,seed",
    [(5, 0.5, 0.1, 0), (5, 0.3, 0.4, 1), (10, 0.0, 1.0, 2), (3, 1.0, 0.5, 3), (1, 0.5, 0.5, 4)],
)
def test_blurry_split_every_sample_once_and_ratios(num_tasks, disjoint_share, blurry_share, seed):
    y = _indexed(n_train=997, imbalance=True).y_train
    C = 10
    plan = data.blurry_split(y, num_classes=C, num_tasks=num_tasks,
                             disjoint_share=disjoint_share, blurry_share=blurry_share, seed=seed)
    assert len(plan.task_indices) == num_tasks
    everything = np.concatenate(plan.task_indices)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(y)))  # exactly once
    assert all(len(idx) > 0 for idx in plan.task_indices)
    # Every task owns a class; homes cover the tasks.
    assert sorted(set(plan.home.tolist())) == list(range(num_tasks))
    # Disjoint / blurry ratio: floor(share * C) disjoint classes.
    assert plan.disjoint.sum() == math.floor(disjoint_share * C + 1e-9)
    task_of = np.empty(len(y), int)
    for t, idx in enumerate(plan.task_indices):
        task_of[idx] = t
    for c in range(C):
        tasks_c = task_of[y == c]
        n = len(tasks_c)
        away = int(np.sum(tasks_c != plan.home[c]))
        if plan.disjoint[c] or num_tasks == 1:
            assert away == 0  # one task only: its home
        else:
            assert away == math.floor(blurry_share * n + 1e-9)  # the configured leak share


def test_blurry_classes_span_random_task_sets_and_task_sizes_vary():
    y = _indexed(n_train=4000, num_classes=10).y_train
    plan = data.blurry_split(y, num_classes=10, num_tasks=5, disjoint_share=0.5,
                             blurry_share=0.5, seed=0)
    spans = [set(np.flatnonzero([np.any(y[idx] == c) for idx in plan.task_indices]))
             for c in range(10)]
    for c in range(10):
        if plan.disjoint[c]:
            assert spans[c] == {plan.home[c]}
        else:
            assert plan.home[c] in spans[c] and len(spans[c]) >= 2
    blurry_spans = {frozenset(spans[c]) for c in range(10) if not plan.disjoint[c]}
    assert len(blurry_spans) >= 2  # spans are random, not one fixed pattern
    sizes = [len(idx) for idx in plan.task_indices]
    assert len(set(sizes)) > 1


def test_blurry_split_is_deterministic_per_seed():
    y = _indexed().y_train
    a = data.blurry_split(y, num_classes=10, seed=7)
    b = data.blurry_split(y, num_classes=10, seed=7)
    c = data.blurry_split(y, num_classes=10, seed=8)
    for x, z in zip(a.task_indices, b.task_indices, strict=False):
        np.testing.assert_array_equal(x, z)
    np.testing.assert_array_equal(a.home, b.home)
    np.testing.assert_array_equal(a.disjoint, b.disjoint)
    assert any(
        len(x) != len(z) or not np.array_equal(x, z)
        for x, z in zip(a.task_indices, c.task_indices, strict=True)
    )


def test_si_blurry_scenario_holds_the_planned_samples():
    ds = _indexed(n_train=600, n_test=200)
    s = data.si_blurry(ds, num_tasks=4, disjoint_share=0.4, blurry_share=0.2, seed=3)
    plan = data.blurry_split(ds.y_train, num_classes=10, num_tasks=4, disjoint_share=0.4,
                             blurry_share=0.2, seed=3)
    assert s.name == "si_blurry/indexed" and s.kind == "class_incremental" and not s.online
    assert s.num_tasks == 4 and s.num_classes == 10 and s.input_shape == (1, 1, 1)
    train_ids = np.concatenate([_ids(t.x_train) for t in s.tasks])
    np.testing.assert_array_equal(np.sort(train_ids), np.arange(600))  # exactly once
    test_ids = np.concatenate([_ids(t.x_test) for t in s.tasks])
    np.testing.assert_array_equal(np.sort(test_ids), np.arange(200))  # test set partitioned
    for t, task in enumerate(s.tasks):
        np.testing.assert_array_equal(_ids(task.x_train), plan.task_indices[t])
        np.testing.assert_array_equal(task.y_train, ds.y_train[_ids(task.x_train)])
        np.testing.assert_array_equal(task.classes, np.unique(task.y_train))
        assert set(task.y_test.tolist()) == set(np.flatnonzero(plan.home == t).tolist())
    same = data.make_scenario("si_blurry", ds, num_tasks=4, disjoint_share=0.4,
                              blurry_share=0.2, seed=3)
    for a, b in zip(s.tasks, same.tasks, strict=False):
        np.testing.assert_array_equal(a.x_train, b.x_train)


def test_si_blurry_subsamples_classes_before_planning():
    ds = _indexed(n_train=600, n_test=200)
    s = data.si_blurry(ds, num_tasks=3, max_train_per_class=20, max_test_per_class=5, seed=0)
    ids = np.concatenate([_ids(t.x_train) for t in s.tasks])
    assert len(ids) == 200 and len(np.unique(ids)) == 200  # 20 per class, each once
    assert np.bincount(ds.y_train[ids], minlength=10).tolist() == [20] * 10
    assert sum(len(t.y_test) for t in s.tasks) == 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_tasks": 11}, r"num_tasks=11 is more than the 10 classes"),
        ({"num_tasks": 0}, r"num_tasks must be a positive int"),
        ({"disjoint_share": 1.5}, r"disjoint_share must be a number in \[0, 1\]"),
        ({"blurry_share": -0.1}, r"blurry_share must be a number in \[0, 1\]"),
        ({"seed": -1}, r"seed must be a non-negative int"),
        ({"max_train_per_class": 0}, r"max_train_per_class must be None or a positive int"),
    ],
)
def test_si_blurry_rejects_unsatisfiable_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.si_blurry(_indexed(), **kwargs)


def test_si_blurry_rejects_wrong_types():
    with pytest.raises(TypeError, match=r"blurry_share must be a number in \[0, 1\], got True"):
        data.si_blurry(_indexed(), blurry_share=True)
    with pytest.raises(TypeError, match=r"num_classes must be a positive int, got 3.0 \(float"):
        data.blurry_split(np.array([0, 1, 2]), num_classes=3.0, num_tasks=1)


def test_blurry_split_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        data.blurry_split(np.array([0, 1, 3]), num_classes=3, num_tasks=1)


# --------------------------------------------------------------------------------------
# Recurring


@pytest.mark.parametrize("recurrence,seed", [(0.3, 0), (0.7, 1), (0.5, 2)])
def test_recurring_stream_revisits_tasks_at_the_configured_rate(recurrence, seed):
    T = 400
    y = np.repeat(np.arange(100), 5).astype(np.int32)
    plan = data.recurring_split(y, num_classes=100, num_tasks=T, classes_per_task=5,
                                recurrence=recurrence, samples_per_class=1, seed=seed)
    # Measured from the class sets alone: a task revisits if its set appeared before.
    # With C(100, 5) ~ 7.5e7 sets, fresh draws essentially never collide by chance.
    seen, revisits = set(), 0
    for t, classes in enumerate(plan.task_classes):
        key = tuple(classes.tolist())
        revisits += t > 0 and key in seen
        seen.add(key)
    rate = revisits / (T - 1)
    sd = math.sqrt(recurrence * (1 - recurrence) / (T - 1))
    assert abs(rate - recurrence) < 4 * sd, (rate, recurrence)  # fails ~6e-5 of seeds
    assert revisits == np.sum(plan.repeats >= 0)
    for t in np.flatnonzero(plan.repeats >= 0):
        src = plan.repeats[t]
        assert src < t and plan.repeats[src] == -1  # points at the fresh draw
        np.testing.assert_array_equal(plan.task_classes[t], plan.task_classes[src])


def test_recurring_extremes_and_determinism():
    y = np.repeat(np.arange(10), 60).astype(np.int32)
    never = data.recurring_split(y, num_classes=10, num_tasks=50, recurrence=0.0, seed=0)
    assert np.all(never.repeats == -1)
    always = data.recurring_split(y, num_classes=10, num_tasks=50, recurrence=1.0, seed=0)
    assert np.all(always.repeats[1:] == 0)
    a = data.recurring_split(y, num_classes=10, num_tasks=60, recurrence=0.4, seed=5)
    b = data.recurring_split(y, num_classes=10, num_tasks=60, recurrence=0.4, seed=5)
    c = data.recurring_split(y, num_classes=10, num_tasks=60, recurrence=0.4, seed=6)
    for x, z in zip(a.task_indices, b.task_indices, strict=False):
        np.testing.assert_array_equal(x, z)
    assert any(not np.array_equal(x, z)
               for x, z in zip(a.task_classes, c.task_classes, strict=True))


def test_recurring_deals_every_sample_out_once_or_resamples_per_occurrence():
    y = np.repeat(np.arange(10), 60).astype(np.int32)
    once = data.recurring_split(y, num_classes=10, num_tasks=60, classes_per_task=2,
                                recurrence=0.5, seed=1)
    ids = np.concatenate(once.task_indices)
    assert len(ids) == len(np.unique(ids))  # no sample twice in the stream
    occurring = np.unique(np.concatenate(once.task_classes))
    np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(np.isin(y, occurring)))
    for classes, idx in zip(once.task_classes, once.task_indices, strict=False):
        assert set(y[idx].tolist()) == set(classes.tolist()) and len(classes) == 2
    fixed = data.recurring_split(y, num_classes=10, num_tasks=60, classes_per_task=3,
                                 samples_per_class=7, seed=1)
    for classes, idx in zip(fixed.task_classes, fixed.task_indices, strict=False):
        assert len(idx) == 21 and len(np.unique(idx)) == 21
        assert np.bincount(y[idx], minlength=10)[classes].tolist() == [7, 7, 7]


def test_recurring_scenario_long_stream():
    ds = _indexed(n_train=1800, n_test=400)
    s = data.recurring(ds, num_tasks=60, classes_per_task=2, recurrence=0.5,
                       max_test_per_task=30, seed=0)
    plan = data.recurring_split(ds.y_train, num_classes=10, num_tasks=60,
                                classes_per_task=2, recurrence=0.5, seed=0)
    assert s.name == "recurring/indexed" and s.num_tasks == 60
    for t, task in enumerate(s.tasks):
        np.testing.assert_array_equal(task.classes, plan.task_classes[t])
        np.testing.assert_array_equal(task.y_train, ds.y_train[plan.task_indices[t]])
        assert len(task.y_test) == 30 and set(task.y_test.tolist()) <= set(task.classes.tolist())
        if plan.repeats[t] >= 0:  # a repeated task is evaluated on the very same samples
            assert task.x_test is s.tasks[plan.repeats[t]].x_test
            assert not task.x_test.flags.writeable


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes_per_task": 11}, r"classes_per_task=11 is more than the 10 classes"),
        ({"classes_per_task": 0}, r"classes_per_task must be a positive int"),
        ({"recurrence": 1.5}, r"recurrence must be a number in \[0, 1\]"),
        ({"num_tasks": 0}, r"num_tasks must be a positive int"),
        ({"samples_per_class": 61}, r"samples_per_class=61 is more than the 60"),
        ({"num_tasks": 400, "recurrence": 0.0}, r"class \d occurs in \d+ tasks but has only 60"),
    ],
)
def test_recurring_rejects_unsatisfiable_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.recurring(_indexed(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes_per_task": "2"}, r"classes_per_task must be a positive int, got '2' \(str\)"),
        ({"samples_per_class": 2.0}, r"samples_per_class must be a positive int, got 2.0"),
        ({"recurrence": None}, r"recurrence must be a number in \[0, 1\], got None"),
    ],
)
def test_recurring_rejects_wrong_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        data.recurring(_indexed(), **kwargs)


# --------------------------------------------------------------------------------------
# Online streams


def test_online_flag_from_registry_and_as_online():
    ds = _indexed()
    s = data.make_scenario("class_incremental", ds, classes_per_task=2, online=True)
    assert s.online and s.kind == "class_incremental"
    assert data.as_online(data.si_blurry(ds)).online
    with pytest.raises(ValueError, match=r"task_incremental scenario gives it task ids"):
        data.make_scenario("task_incremental", ds, online=True)
    with pytest.raises(TypeError, match=r"online must be a bool"):
        data.make_scenario("class_incremental", ds, online="yes")


def _probe_method(**kw):
    """Records, in memory, the largest task index and task id its steps were shown."""

    def update_memory(memory, ctx, out):
        return jnp.maximum(memory, jnp.maximum(ctx.task_index, jnp.max(ctx.batch.task_ids)))

    return Method(name="probe", init_memory=lambda p: jnp.zeros((), jnp.int32),
                  update_memory=update_memory, **kw)


def _tiny_blurry(**kw):
    return data.si_blurry(tiny_dataset(n_train=384), num_tasks=2, disjoint_share=0.5,
                          blurry_share=0.2, seed=0, **kw)


def test_loop_runs_a_blurry_stream_with_boundaries():
    scenario = _tiny_blurry()
    result = train_continual(tiny_config(), scenario=scenario, method=_probe_method(),
                             keep_state=True)
    assert result.accuracy_matrix.shape == (2, 2)
    assert int(result.state.memory) == 1  # offline: the method sees task 1
    steps = sum(2 * (len(t.y_train) // 32) for t in scenario.tasks)  # 2 epochs per task
    assert int(result.state.step) == steps


def test_online_stream_refuses_methods_that_need_boundaries():
    scenario = data.as_online(_tiny_blurry())

    def consolidate(state, ctx):
        return state

    method = Method(name="needs_ends", consolidate=consolidate)
    with pytest.raises(ValueError, match=r"'needs_ends' needs task boundaries.*consolidate"):
        train_continual(tiny_config(), scenario=scenario, method=method)
    with pytest.raises(ValueError, match=r"'joint' chooses its own training data"):
        train_continual(tiny_config(), scenario=scenario, method=joint())
    with pytest.raises(ValueError, match=r"reset_optimizer_per_task=True resets"):
        train_continual(tiny_config(reset_optimizer_per_task=True), scenario=scenario)


def test_loop_runs_an_online_stream_one_pass_hiding_boundaries():
    scenario = data.as_online(_tiny_blurry())
    method = _probe_method()
    result = train_continual(tiny_config(epochs_per_task=3), scenario=scenario, method=method,
                             keep_state=True)
    assert result.accuracy_matrix.shape == (2, 2)  # evaluation still reports every task
    # One pass: epochs_per_task=3 is overridden by the stream.
    assert int(result.state.step) == sum(len(t.y_train) // 32 for t in scenario.tasks)
    assert int(result.state.memory) == 0  # steps saw task index 0 and task ids 0 only
