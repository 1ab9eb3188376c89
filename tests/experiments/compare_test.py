"""Compare-mode configuration (no training)."""

import pytest

from experiments.compare import run_comparison, run_config
from experiments.configs.digits_compare import get_config


def test_cells_take_data_from_the_benchmark_and_hyperparameters_from_method_sections():
    config = get_config()
    cell = run_config(config, "permuted_digits", "joint")
    assert cell.name == "permuted_digits/joint" and cell.method.name == "joint"
    assert cell.scenario.name == "permuted" and "compare" not in cell
    cell.scenario.num_tasks = 2  # a copy: the benchmark preset is untouched
    assert config.benchmarks.permuted_digits.scenario.num_tasks == 5


def test_top_level_data_edits_are_refused_in_compare_mode(tmp_path):
    config = get_config()
    config.scenario.max_train_per_task = 50
    with pytest.raises(ValueError, match="config.scenario is not used.*benchmarks"):
        run_comparison(config, str(tmp_path))


def test_unknown_method_in_comparison_lists_choices(tmp_path):
    config = get_config()
    config.compare.methods = "finetune,ewcc"
    with pytest.raises(ValueError, match="unknown methods \\['ewcc'\\].*finetune"):
        run_comparison(config, str(tmp_path))
