"""The task loop end to end: learning, resume, devices, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from clax.models import make_model
from clax.training import NonFiniteLossError, loop, train_continual
from clax.training.checkpoint import Checkpointer
from tests.training.helpers import tiny_config, tiny_scenario


def test_finetune_learns_each_task_and_fills_the_matrix():
    scenario = tiny_scenario()
    result = train_continual(tiny_config(), scenario=scenario)
    R = result.accuracy_matrix
    assert R.shape == (2, 2) and result.baseline.shape == (2,)
    # Each task is learned when it is current (prototype data is easy).
    assert R[0, 0] > 0.9 and R[1, 1] > 0.9
    # Class-incremental finetune forgets task 0 almost completely.
    assert R[1, 0] < 0.5
    assert result.summary["bwt"] < -0.4


def test_joint_keeps_old_tasks():
    scenario = tiny_scenario()
    c = tiny_config()
    c.method.name = "joint"
    R = train_continual(c, scenario=scenario).accuracy_matrix
    assert R[1, 0] > 0.9 and R[1, 1] > 0.9


def test_task_incremental_multi_head_run():
    scenario = tiny_scenario("task_incremental")
    c = tiny_config()
    c.model.multi_head = True
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=scenario.num_classes,
                       num_tasks=scenario.num_tasks, widths=(16,), seed=0)
    R = train_continual(c, scenario=scenario, model=model).accuracy_matrix
    # Per-task heads and masks: a 2-way decision per task, nearly perfect on this data.
    assert R[1, 0] > 0.9 and R[1, 1] > 0.9


def test_device_resident_and_host_fed_paths_agree():
    scenario = tiny_scenario()
    a = train_continual(tiny_config(device_resident=True), scenario=scenario, keep_state=True)
    b = train_continual(tiny_config(device_resident=False), scenario=scenario, keep_state=True)
    np.testing.assert_allclose(a.accuracy_matrix, b.accuracy_matrix)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 a.state.params, b.state.params)


def test_eight_devices_equal_one():
    scenario = tiny_scenario()
    one = train_continual(tiny_config(num_devices=1), scenario=scenario, keep_state=True)
    eight = train_continual(tiny_config(num_devices=8), scenario=scenario, keep_state=True)
    assert len(jax.tree.leaves(eight.state.params)[0].sharding.device_set) == 8
    np.testing.assert_allclose(one.accuracy_matrix, eight.accuracy_matrix)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                 one.state.params, eight.state.params)


def test_periodic_evaluation_records_curves():
    scenario = tiny_scenario()
    result = train_continual(tiny_config(eval_every_steps=5, eval_subsample=20), scenario=scenario)
    steps = sorted({c["step"] for c in result.curves})
    assert steps and all(s % 5 == 0 for s in steps)
    # Only seen tasks are evaluated: task 1 first appears after task 0's steps (2 epochs x 7).
    first_t1 = min(c["step"] for c in result.curves if c["eval_task"] == 1)
    assert first_t1 > 14


@pytest.mark.parametrize("async_checkpoints", [False, True])
def test_resume_after_interruption_gives_the_same_metrics(tmp_path, monkeypatch,
                                                          async_checkpoints):
    import jax.numpy as jnp

    from clax.core import Method

    def consolidate(state, ctx):  # memory written at task ends, read every step
        return state._replace(memory={**state.memory, "anchor": state.params})

    method = Method(
        name="counting_anchor",
        init_memory=lambda p: {"anchor": p, "seen": jnp.zeros((), jnp.int32)},
        update_memory=lambda m, ctx, out: {**m, "seen": m["seen"] + ctx.batch.y.shape[0]},
        loss_terms=lambda p, ctx: 1e-3 * sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ctx.memory["anchor"]),
                            strict=True)),
        consolidate=consolidate,
    )
    scenario = tiny_scenario()
    config = tiny_config(checkpoint_every_steps=4, epochs_per_task=3, eval_every_steps=5,
                         eval_subsample=30, async_checkpoints=async_checkpoints)
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 0.01
    reference = train_continual(config, scenario=scenario, method=method, keep_state=True)

    workdir = str(tmp_path / "run")
    real_chunk = loop._train_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        task_index = args[5]
        calls["n"] += task_index == 1
        if calls["n"] == 3:  # the third chunk of task 1: after a mid-epoch checkpoint
            raise KeyboardInterrupt("simulated preemption")
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_continual(config, workdir, scenario=scenario, method=method)
    monkeypatch.setattr(loop, "_train_chunk", real_chunk)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    _, meta = ckpt.restore(reference.state)
    assert (meta["task"], meta["epoch"]) == (1, 0) and meta["step_in_epoch"] > 0  # mid-epoch

    resumed = train_continual(config, workdir, scenario=scenario, method=method, keep_state=True)
    np.testing.assert_allclose(resumed.accuracy_matrix, reference.accuracy_matrix)
    for part in ("params", "opt_state", "memory"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                     getattr(resumed.state, part), getattr(reference.state, part))
    steps_per_epoch = [len(t.y_train) // 32 for t in scenario.tasks]
    assert int(resumed.state.memory["seen"]) == 3 * 32 * sum(steps_per_epoch)
    assert resumed.curves == reference.curves
    assert len(resumed.task_train_time_s) == 2
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f)["summary"]["acc"] == pytest.approx(reference.summary["acc"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    import jax.numpy as jnp

    from clax.core import Method

    def poison(params, ctx):  # NaN loss from task 1 on
        return jnp.where(ctx.task_index >= 1, jnp.nan, 0.0)

    scenario = tiny_scenario()
    workdir = str(tmp_path / "run")
    method = Method(name="poisoned", loss_terms=poison)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 14 \(task 1"):
        train_continual(tiny_config(), workdir, scenario=scenario, method=method)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest() == 0  # saved after task 0, nothing after
    fresh = train_continual(tiny_config(), scenario=scenario, keep_state=True,
                            method=Method(name="plain"))
    state, meta = ckpt.restore(fresh.state)
    assert meta["task"] == 1 and len(meta["rows"]) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_reusing_a_workdir_with_another_config_is_refused(tmp_path):
    scenario = tiny_scenario()
    workdir = str(tmp_path / "run")
    train_continual(tiny_config(), workdir, scenario=scenario)
    latest = Checkpointer(os.path.join(workdir, "checkpoints")).latest()
    other = tiny_config()
    other.optimizer.learning_rate = 0.5
    with pytest.raises(ValueError, match="different config.*optimizer.learning_rate"):
        train_continual(other, workdir, scenario=scenario)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest() == latest


def test_unused_method_and_model_sections_do_not_block_resuming(tmp_path):
    """Registering a method (a new config.method.<name> section) keeps workdirs resumable."""
    scenario = tiny_scenario()
    workdir = str(tmp_path / "run")
    first = train_continual(tiny_config(), workdir, scenario=scenario)
    other = tiny_config()
    other.method.ema.decay = 0.5  # a method this (finetune) run does not use
    other.model.cnn.channels = (3, 5)  # a model it does not use
    again = train_continual(other, workdir, scenario=scenario)
    np.testing.assert_array_equal(first.accuracy_matrix, again.accuracy_matrix)
    used = tiny_config()
    used.model.mlp.widths = (8,)  # the model it does use
    with pytest.raises(ValueError, match="different config.*model.mlp.widths"):
        train_continual(used, workdir, scenario=scenario)


def test_model_data_shape_mismatch_names_both_shapes():
    scenario = tiny_scenario()
    model = make_model("mlp", input_shape=(8, 8, 1), num_classes=4, widths=(8,), seed=0)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\).*\(4, 4, 1\)"):
        train_continual(tiny_config(), scenario=scenario, model=model)


def test_batch_must_divide_over_devices():
    with pytest.raises(ValueError, match="divisible by the 8 batch shards of the mesh"):
        train_continual(tiny_config(batch_size=30, num_devices=8), scenario=tiny_scenario())
    # Only data x fsdp split the batch: 12 divides (2 data x 2 fsdp) x 2 tensor's 4 shards.
    with pytest.raises(ValueError, match=r"batch_size=30 must be divisible by the 4 batch "
                                         r"shards.*'data': 2, 'fsdp': 2, 'tensor': 2"):
        train_continual(tiny_config(batch_size=30, num_devices=8, mesh_fsdp=2, mesh_tensor=2),
                        scenario=tiny_scenario())


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match=r"config.train.mesh_fsdp / mesh_tensor: mesh fsdp=3 "
                                         r"x tensor=1 = 3 does not divide the 8 devices"):
        train_continual(tiny_config(num_devices=8, mesh_fsdp=3), scenario=tiny_scenario())


def test_callers_model_keeps_its_arrays():
    scenario = tiny_scenario()
    model = make_model("mlp", input_shape=scenario.input_shape, num_classes=4, widths=(16,),
                       seed=0)
    before = np.asarray(model(scenario.tasks[0].x_test[:4]))
    train_continual(tiny_config(), scenario=scenario, model=model)  # steps donate buffers
    np.testing.assert_array_equal(np.asarray(model(scenario.tasks[0].x_test[:4])), before)
