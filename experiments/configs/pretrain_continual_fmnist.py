"""Pretrain-then-continual on Fashion-MNIST: weight-space methods vs finetune (minutes).

    sudo apt-get install dataset-fashion-mnist
    python -m experiments.run --config=experiments/configs/pretrain_continual_fmnist.py \
        --workdir=/tmp/clax_pretrain_fmnist

Task 0 trains on classes 0-4 (the base / "pretraining" task), then {5,6}, {7,8}, {9}
class-incrementally; every task uses the same epochs. Retention of the base accuracy and
new-task accuracy per method: ``experiments/bench/pretrain_continual.py``.
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "pretrain_continual_fmnist"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 2
    c.train.batch_size = 128
    c.method.slow_learner.align_classifier = True
    c.compare = {
        "methods": "finetune,ema,adaptive_ema,weight_averaging,lines,slow_learner",
        "benchmarks": "pretrain_fmnist",
    }
    c.benchmarks = {"pretrain_fmnist": benchmark("pretrain_fmnist")}
    return c
