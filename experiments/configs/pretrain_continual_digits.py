"""Pretrain-then-continual on digits: weight-space methods vs finetune (offline, ~1 min).

    python -m experiments.run --config=experiments/configs/pretrain_continual_digits.py \
        --workdir=/tmp/clax_pretrain_digits

Task 0 trains on classes 0-4 (the base / "pretraining" task), then {5,6}, {7,8}, {9}
class-incrementally; every task uses the same epochs. Retention of the base accuracy and
new-task accuracy per method: ``experiments/bench/pretrain_continual.py``. LiNeS at another
λ: ``--config.method.lines.lam=0.25``.
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "pretrain_continual_digits"
    c.model.mlp.widths = (128, 128)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 5
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.method.slow_learner.align_classifier = True
    c.compare = {
        "methods": "finetune,ema,adaptive_ema,weight_averaging,lines,slow_learner",
        "benchmarks": "pretrain_digits",
    }
    c.benchmarks = {"pretrain_digits": benchmark("pretrain_digits")}
    return c
