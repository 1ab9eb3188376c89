"""Fashion-MNIST end to end (slow: real 60k-image data; run with `pytest -m slow`)."""

import os

import pytest

from clax.training import train_continual
from experiments.configs.fmnist_compare import get_config
from experiments.compare import run_config

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("benchmark", ["split_fmnist", "permuted_fmnist"])
def test_fmnist_finetune_forgets_and_joint_does_not(benchmark):
    config = get_config()
    results = {m: train_continual(run_config(config, benchmark, m)) for m in ("finetune", "joint")}
    assert results["joint"].summary["acc"] > results["finetune"].summary["acc"] + 0.1
    assert results["finetune"].summary["forgetting"] > 0.1
