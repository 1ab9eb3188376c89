"""One run on class-incremental Split-Digits (5 tasks x 2 classes).

    python -m experiments.run --config=experiments/configs/split_digits.py \
        --workdir=/tmp/clax_split_digits --config.method.name=finetune
"""

from clax.training import default_config
from experiments.configs.benchmarks import use_benchmark


def get_config():
    c = default_config()
    c.name = "split_digits"
    use_benchmark(c, "split_digits")
    c.model.mlp.widths = (128, 128)
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 5
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    return c
