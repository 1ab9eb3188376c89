"""The ahead-of-time TPU compile command (`experiments.aot`) on a 4-chip v5e topology.

libtpu describes TPU topologies without a TPU attached, so these compile a tiny Llama's
train step for ``v5e:2x2`` on this CPU machine and check the per-device bytes against
shard sizes computed here from the parameter shapes and their partition specs.
"""

import math
import os
import subprocess
import sys
from importlib.util import find_spec

import jax
import numpy as np
import pytest

if find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: it describes the TPU topologies compiled for",
                allow_module_level=True)

from experiments import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(topology="v5e:2x2", preset="tiny", seq_len=32, batch_size=8,
            param_dtype="float32", dtype="float32")


def _hand_shard_bytes(fsdp: int, tensor: int) -> int:
    """Sum over parameters of one device's shard bytes, from shapes and partition specs."""
    from jax.sharding import Mesh, PartitionSpec

    from clax.training.sharding import param_specs

    model = aot.abstract_model("tiny", 32, dtype="float32", param_dtype="float32")
    _, params, _, axes = aot.split_abstract(model)
    sizes = {"data": 4 // (fsdp * tensor), "fsdp": fsdp, "tensor": tensor}
    devices = np.array(aot.tpu_topology("v5e:2x2").devices, dtype=object).reshape(
        sizes["data"], fsdp, tensor)
    specs = param_specs(params, Mesh(devices, ("data", "fsdp", "tensor")), axes=axes)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(params),
                          jax.tree.leaves(specs,
                                          is_leaf=lambda x: isinstance(x, PartitionSpec)),
                          strict=True):
        shape = list(leaf.shape)
        for i, names in enumerate(spec):
            for name in (names,) if isinstance(names, str) else (names or ()):
                assert shape[i] % sizes[name] == 0
                shape[i] //= sizes[name]
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


@pytest.fixture(scope="module")
def fsdp_report():
    return aot.compile_report(aot.Settings(methods=("finetune", "ewc"), **TINY))


def test_fsdp_report_matches_hand_computed_shards(fsdp_report):
    r = fsdp_report
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["topology"]["devices"] == 4 and r["hbm_bytes"] == 16 * 2**30
    finetune, ewc = r["rows"]
    assert finetune["method"] == "finetune" and ewc["method"] == "ewc"
    total = r["model"]["param_bytes_total"]
    # Every tiny-preset dimension divides 4, so each device holds exactly a quarter.
    assert finetune["params"] == _hand_shard_bytes(4, 1) == total // 4
    assert ewc["params"] == finetune["params"]
    # AdamW: two moments like the params; finetune has no memory.
    assert finetune["opt_state"] - 2 * finetune["params"] < 64  # + the step count
    assert finetune["memory"] == 0 and finetune["method_opt_state"] == 0
    # EWC stores the summed Fisher, the anchor and the Fisher-weighted anchor (float32,
    # like these float32 params) plus an int32 count: 3x the params' bytes.
    assert ewc["memory"] == 3 * ewc["params"] + 4
    for row in (finetune, ewc):
        assert row["fits"] is True and row["compile_s"] > 0
        assert row["argument"] >= row["params"] + row["opt_state"] + row["memory"]
        assert 0 < row["total"] < r["hbm_bytes"]
    text = aot.format_table(r)
    assert "| finetune |" in text and "| ewc |" in text and "fsdp=4" in text


def test_tensor_parallel_params_split_by_logical_names():
    # Shardings only (no compile: the fixture compiled on the same topology).
    r = aot.compile_report(aot.Settings(methods=("finetune",), fsdp=2, tensor=2,
                                        compile=False, **TINY))
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    row = r["rows"][0]
    # Norm scales ("embed",) are split over fsdp only: more than a quarter in all.
    assert row["params"] == _hand_shard_bytes(2, 2) > r["model"]["param_bytes_total"] // 4
    assert "total" not in row and "| finetune |" in aot.format_table(r)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(aot.AotError, match=r"fsdp=3 x tensor=1 = 3 does not divide the 4"):
        aot.compile_report(aot.Settings(methods=("finetune",), fsdp=3, **TINY))
    with pytest.raises(aot.AotError, match=r"not divisible by data x fsdp = 1 x 4 = 4"):
        aot.compile_report(aot.Settings(methods=("finetune",), **{**TINY, "batch_size": 6}))
    with pytest.raises(aot.AotError, match=r"unknown or unsupported TPU topology 'v5e:3'.*"
                                           r"v5e:2x2"):
        aot.compile_report(aot.Settings(methods=("finetune",), **{**TINY,
                                                                  "topology": "v5e:3"}))
    with pytest.raises(aot.AotError, match="unknown method"):
        aot.compile_report(aot.Settings(methods=("nope",), **TINY))
    with pytest.raises(aot.AotError, match="unknown Llama preset"):
        aot.compile_report(aot.Settings(methods=("finetune",), **{**TINY, "preset": "x"}))


def test_compiler_oom_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
           "HLO temporaries (41.70G) exceeds available HBM (15.75G).")
    assert aot._parse_oom(msg) == {"temp_required": int(41.70 * 2**30),
                                   "hbm_available": int(15.75 * 2**30)}
    assert aot._parse_oom("INVALID_ARGUMENT: something else") is None


def test_command_line_bad_mesh_exits_with_one_line():
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aot", "--topology=v5e:2x2", "--preset=tiny",
         "--methods=finetune", "--fsdp=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: mesh fsdp=3 x tensor=1 = 3 does not divide the 4 devices of topology "
        "v5e:2x2")
