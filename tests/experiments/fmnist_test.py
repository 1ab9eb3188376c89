"""Fashion-MNIST end to end (slow: real 60k-image data; run with `pytest -m slow`)."""

import os

import pytest

from clax.training import train_continual
from experiments.compare import run_config
from experiments.configs.fmnist_compare import get_config

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("bench", ["split_fmnist", "permuted_fmnist"])
def test_fmnist_finetune_forgets_and_joint_does_not(bench):
    config = get_config()
    results = {m: train_continual(run_config(config, bench, m)) for m in ("finetune", "joint")}
    finetune, joint = results["finetune"].summary, results["joint"].summary
    # One epoch per task: finetune forgets (split: almost everything), joint keeps more.
    assert joint["acc"] > finetune["acc"] + 0.05, (finetune, joint)
    assert finetune["forgetting"] > 0.05 and joint["forgetting"] < finetune["forgetting"]
