"""Tests for clax.data.scenarios: class splits, permutations, rotations and the registry."""


import jax
import numpy as np
import pytest
import scipy.ndimage

from clax import data


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _toy(n_train=40, n_test=20, shape=(4, 4, 2), num_classes=4, seed=0, name="toy"):
    rng = np.random.default_rng(seed)
    return data.Dataset(
        x_train=rng.random((n_train, *shape), dtype=np.float32),
        y_train=(np.arange(n_train) % num_classes).astype(np.int32),
        x_test=rng.random((n_test, *shape), dtype=np.float32),
        y_test=(np.arange(n_test) % num_classes).astype(np.int32),
        num_classes=num_classes,
        name=name,
    )


def _assert_same_scenario(a, b):
    assert a.num_tasks == b.num_tasks
    for ta, tb in zip(a.tasks, b.tasks, strict=False):
        for field in ("x_train", "y_train", "x_test", "y_test", "classes"):
            np.testing.assert_array_equal(getattr(ta, field), getattr(tb, field))


# --------------------------------------------------------------------------------------
# Class splits


@pytest.mark.parametrize("factory", [data.class_incremental, data.task_incremental])
def test_class_splits_disjoint_cover_and_contain_only_their_classes(digits, factory):
    s = factory(digits)
    assert s.num_tasks == 5 and s.num_classes == 10 and s.input_shape == (8, 8, 1)
    seen = [c for t in s.tasks for c in t.classes.tolist()]
    assert sorted(seen) == list(range(10))  # Disjoint (no repeats) and covering.
    for i, t in enumerate(s.tasks):
        assert t.id == i and t.classes.dtype == np.int32
        assert t.classes.tolist() == [2 * i, 2 * i + 1]  # Natural order.
        assert set(np.unique(t.y_train)) == set(t.classes.tolist())
        assert set(np.unique(t.y_test)) == set(t.classes.tolist())
        assert t.y_train.dtype == np.int32 and t.x_train.dtype == np.float32
        # No example lost: the task holds every example of its classes.
        assert len(t.y_train) == np.isin(digits.y_train, t.classes).sum()
        assert len(t.y_test) == np.isin(digits.y_test, t.classes).sum()
        np.testing.assert_array_equal(
            t.x_train, digits.x_train[np.isin(digits.y_train, t.classes)]
        )


def test_kinds_names_and_task_ids(digits):
    ci, ti = data.class_incremental(digits), data.task_incremental(digits)
    assert ci.kind == "class_incremental" and not ci.uses_task_ids
    assert ti.kind == "task_incremental" and ti.uses_task_ids
    assert ci.name == "class_incremental/digits" and ti.name == "task_incremental/digits"
    assert "digits" in repr(ci) and "x_train" not in repr(ci)  # Arrays kept out of repr.


def test_uneven_classes_per_task(digits):
    s = data.class_incremental(digits, classes_per_task=[3, 3, 4])
    assert [t.classes.tolist() for t in s.tasks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    s = data.class_incremental(digits, classes_per_task=[1, 2])  # Uses only 3 classes.
    assert [t.classes.tolist() for t in s.tasks] == [[0], [1, 2]]
    assert s.num_classes == 10  # Output layer still spans the global labels.


def test_num_tasks_with_int_classes_per_task(digits):
    s = data.class_incremental(digits, classes_per_task=3, num_tasks=3)
    assert [t.classes.tolist() for t in s.tasks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="do not split evenly"):
        data.class_incremental(digits, classes_per_task=3)
    with pytest.raises(ValueError, match="need 12 classes"):
        data.class_incremental(digits, classes_per_task=3, num_tasks=4)
    with pytest.raises(ValueError, match="does not match"):
        data.class_incremental(digits, classes_per_task=[2, 2], num_tasks=3)


def test_explicit_class_order_respected(digits):
    order = [9, 2, 7, 0, 5, 1, 8, 3, 6, 4]
    s = data.class_incremental(digits, class_order=order)
    assert [t.classes.tolist() for t in s.tasks] == [[2, 9], [0, 7], [1, 5], [3, 8], [4, 6]]
    # A subset of the classes, uneven.
    s = data.task_incremental(digits, class_order=[3, 1, 4], classes_per_task=[2, 1])
    assert [t.classes.tolist() for t in s.tasks] == [[1, 3], [4]]
    assert set(np.unique(s.tasks[1].y_train)) == {4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_order": [0, 1, 1, 2]}, "repeat"),
        ({"class_order": [0, 10]}, r"\[0, 10\)"),
        ({"class_order": [0.5, 1.0]}, "ints"),
        ({"class_order": list(range(10)), "shuffle_classes": True}, "not both"),
        ({"classes_per_task": 0}, ">= 1"),
        ({"classes_per_task": [2, 0]}, ">= 1"),
        ({"classes_per_task": [6, 6]}, "need 12 classes"),
        ({"max_train_per_task": 0}, "max_train_per_task"),
        ({"seed": -1}, "seed"),
    ],
)
def test_class_split_validation(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.class_incremental(digits, **kwargs)


def test_same_seed_identical_different_seed_different(digits):
    kw = {"shuffle_classes": True, "max_train_per_task": 50, "max_test_per_task": 10}
    a = data.class_incremental(digits, seed=1, **kw)
    _assert_same_scenario(a, data.class_incremental(digits, seed=1, **kw))
    b = data.class_incremental(digits, seed=2, **kw)
    order_a = [c for t in a.tasks for c in t.classes.tolist()]
    order_b = [c for t in b.tasks for c in t.classes.tolist()]
    assert sorted(order_a) == sorted(order_b) == list(range(10))
    assert order_a != order_b
    # Independent of numpy's global state.
    np.random.seed(123)  # noqa: NPY002  (sets the legacy global state on purpose)
    _assert_same_scenario(a, data.class_incremental(digits, seed=1, **kw))


def test_subsampling_is_a_subset_of_the_task(digits):
    full = data.class_incremental(digits)
    small = data.class_incremental(digits, max_train_per_task=30, max_test_per_task=7)
    for f, s in zip(full.tasks, small.tasks, strict=False):
        assert len(s.y_train) == 30 and len(s.y_test) == 7
        # Every kept row is a row of the full task (matched exactly).
        rows = {r.tobytes() for r in f.x_train}
        assert all(r.tobytes() in rows for r in s.x_train)
        assert set(np.unique(s.y_train)) <= set(f.classes.tolist())


def test_task_is_a_pytree(digits):
    task = data.class_incremental(digits).tasks[0]
    leaves = jax.tree_util.tree_leaves(task)
    assert len(leaves) == 6
    doubled = jax.tree_util.tree_map(lambda v: v * 2, task)
    assert isinstance(doubled, data.Task) and doubled.id == 0


# --------------------------------------------------------------------------------------
# Permuted


def _probe_dataset(shape=(4, 4, 2)):
    """Train image 0 holds each position's index, so a permutation can be read off it."""
    ds = _toy(shape=shape)
    size = int(np.prod(shape))
    x_train = ds.x_train.copy()
    x_train[0] = (np.arange(size, dtype=np.float32) / size).reshape(shape)
    return ds._replace(x_train=x_train), size


def _recover_permutation(task, size):
    return np.rint(task.x_train[0].reshape(-1) * size).astype(int)


def test_permuted_first_task_identity_and_consistent_train_test():
    ds, size = _probe_dataset()
    s = data.permuted(ds, num_tasks=4, seed=0)
    assert s.kind == "domain_incremental" and s.name == "permuted/toy" and not s.uses_task_ids
    np.testing.assert_array_equal(s.tasks[0].x_train, ds.x_train)
    np.testing.assert_array_equal(s.tasks[0].x_test, ds.x_test)
    perms = []
    for t in s.tasks:
        perm = _recover_permutation(t, size)
        assert sorted(perm) == list(range(size))
        inverse = np.argsort(perm)
        # Undoing the permutation read off train image 0 restores every train and test image.
        for x_perm, x in ((t.x_train, ds.x_train), (t.x_test, ds.x_test)):
            restored = x_perm.reshape(len(x), -1)[:, inverse].reshape(x.shape)
            np.testing.assert_array_equal(restored, x)
        np.testing.assert_array_equal(t.y_train, ds.y_train)
        np.testing.assert_array_equal(t.classes, np.arange(ds.num_classes))
        perms.append(tuple(perm))
    assert len(set(perms)) == 4  # Each task its own permutation.


def test_permuted_seed_and_first_identity():
    ds, size = _probe_dataset()
    a = data.permuted(ds, num_tasks=3, seed=0)
    _assert_same_scenario(a, data.permuted(ds, num_tasks=3, seed=0))
    b = data.permuted(ds, num_tasks=3, seed=1)
    assert not np.array_equal(_recover_permutation(a.tasks[1], size),
                              _recover_permutation(b.tasks[1], size))
    c = data.permuted(ds, num_tasks=3, seed=0, first_identity=False)
    assert not np.array_equal(_recover_permutation(c.tasks[0], size), np.arange(size))


def test_permuted_subsample_before_permuting():
    ds, _ = _probe_dataset()
    s = data.permuted(ds, num_tasks=2, max_train_per_task=10, max_test_per_task=5)
    assert [len(t.y_train) for t in s.tasks] == [10, 10]
    assert [len(t.x_test) for t in s.tasks] == [5, 5]


# --------------------------------------------------------------------------------------
# Rotated


def test_rotated_angle_zero_is_identity_and_default_angles():
    ds = _toy(shape=(6, 6, 1))
    s = data.rotated(ds, num_tasks=3)  # Angles 0, 90, 180.
    assert s.kind == "domain_incremental" and s.name == "rotated/toy" and s.num_tasks == 3
    np.testing.assert_array_equal(s.tasks[0].x_train, ds.x_train)
    np.testing.assert_array_equal(s.tasks[0].x_test, ds.x_test)
    np.testing.assert_allclose(s.tasks[2].x_train, np.rot90(ds.x_train, 2, axes=(1, 2)),
                               atol=1e-6)


def test_rotated_90_matches_rot90_counter_clockwise():
    # Convention: positive angles turn counter-clockwise as displayed (row 0 on top),
    # i.e. np.rot90(x, k=1, axes=(1, 2)), the same as scipy.ndimage.rotate.
    ds = _toy(shape=(7, 7, 3))
    s = data.rotated(ds, angles=[0.0, 90.0, -90.0])
    np.testing.assert_allclose(s.tasks[1].x_train, np.rot90(ds.x_train, 1, axes=(1, 2)),
                               atol=1e-6)
    np.testing.assert_allclose(s.tasks[1].x_test, np.rot90(ds.x_test, 1, axes=(1, 2)),
                               atol=1e-6)
    np.testing.assert_allclose(s.tasks[2].x_train, np.rot90(ds.x_train, -1, axes=(1, 2)),
                               atol=1e-6)
    # A marked corner moves where a counter-clockwise turn sends it: top-right to top-left.
    img = np.zeros((1, 5, 5, 1), np.float32)
    img[0, 0, 4, 0] = 1.0
    assert data.rotate_images(img, 90)[0, 0, 0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("angle", [17.0, 45.0, -30.0, 200.0])
def test_rotate_images_matches_scipy(angle):
    x = np.random.default_rng(0).random((3, 9, 13, 2), dtype=np.float32)
    expected = scipy.ndimage.rotate(x, angle, axes=(1, 2), reshape=False, order=1)
    np.testing.assert_allclose(data.rotate_images(x, angle), expected, atol=1e-5)


def test_rotated_argument_checks():
    ds = _toy()
    with pytest.raises(ValueError, match="not both"):
        data.rotated(ds, angles=[0, 10], max_angle=90)
    with pytest.raises(ValueError, match="does not match"):
        data.rotated(ds, angles=[0, 10], num_tasks=3)
    with pytest.raises(ValueError, match="num_tasks"):
        data.rotated(ds, num_tasks=0)
    s = data.rotated(ds, angles=[0, 10, 20], max_train_per_task=8, seed=3)
    assert s.num_tasks == 3 and len(s.tasks[2].y_train) == 8
    _assert_same_scenario(s, data.rotated(ds, angles=[0, 10, 20], max_train_per_task=8, seed=3))


# --------------------------------------------------------------------------------------
# Registry


def test_make_scenario_dispatch_and_names(digits):
    assert set(data.SCENARIOS) == {"class_incremental", "task_incremental", "permuted",
                                   "rotated", "pretrain_continual", "si_blurry", "recurring"}
    s = data.make_scenario("task_incremental", digits, classes_per_task=5)
    assert s.name == "task_incremental/digits" and s.num_tasks == 2
    s = data.make_scenario("rotated", digits, num_tasks=2, max_train_per_task=5)
    assert s.name == "rotated/digits" and len(s.tasks[1].x_train) == 5


def test_make_scenario_unknown_name_lists_choices(digits):
    with pytest.raises(ValueError, match="unknown scenario 'split'") as e:
        data.make_scenario("split", digits)
    for name in ("class_incremental", "task_incremental", "permuted", "rotated"):
        assert name in str(e.value)


def test_make_scenario_unknown_kwarg_lists_valid_arguments(digits):
    with pytest.raises(ValueError, match=r"\['angles'\]") as e:
        data.make_scenario("permuted", digits, angles=[0, 90])
    assert "first_identity" in str(e.value) and "num_tasks" in str(e.value)


def test_scenario_rejects_bad_input(digits):
    with pytest.raises(ValueError, match="clax.data.Dataset"):
        data.class_incremental((digits.x_train, digits.y_train))
    with pytest.raises(ValueError, match="kind"):
        data.Scenario("x", "online", data.class_incremental(digits).tasks, 10, (8, 8, 1))
