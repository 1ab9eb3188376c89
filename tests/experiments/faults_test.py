"""The fault-injection script: kill -9 (also mid-save) and corruption, identical results."""

import pytest

from experiments import faults


@pytest.mark.slow
def test_killed_and_corrupted_runs_end_bit_identical():
    summary = faults.run_trials(trials=2, max_kills=2, corrupt_probability=1.0,
                                mid_save_probability=0.5, seed=1, epochs=1)
    assert summary["kills"] >= 1 and summary["lost"] == 0
    assert summary["identical"] == 2


def test_corrupt_refuses_an_unknown_kind(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "data").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="unknown corruption 'melt'"):
        faults.corrupt(str(tmp_path), "melt")
