"""finetune vs joint on Split and Permuted Fashion-MNIST (Debian IDX files, a few minutes).

    sudo apt-get install dataset-fashion-mnist
    python -m experiments.run --config=experiments/configs/fmnist_compare.py \
        --workdir=/tmp/clax_fmnist
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "fmnist_compare"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 1
    c.train.batch_size = 128
    c.compare = {"methods": "finetune,joint", "benchmarks": "split_fmnist,permuted_fmnist"}
    c.benchmarks = {name: benchmark(name) for name in ("split_fmnist", "permuted_fmnist")}
    return c
