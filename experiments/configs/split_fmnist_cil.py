"""Class-incremental Split Fashion-MNIST (5 tasks x 2 classes), one shared single-head MLP.

Replay, A-GEM, analytic (ACIL) and prototype (NCM) methods are compared on the same model,
optimizer and data. Choose the methods on the command line:

    python -m experiments.run --config=experiments/configs/split_fmnist_cil.py \
        --config.compare.methods=finetune,er,joint --workdir=/tmp/clax_split_fmnist

Needs Debian's ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist).
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "split_fmnist_cil"
    c.model.name = "mlp"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 2
    c.train.batch_size = 64
    c.compare = {"methods": "finetune,joint", "benchmarks": "split_fmnist"}
    c.benchmarks = {"split_fmnist": benchmark("split_fmnist")}
    return c
