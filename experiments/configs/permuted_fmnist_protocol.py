"""GPM's Permuted-MNIST protocol on Fashion-MNIST: 10 permuted tasks, MLP 784-100-100-10.

Plain SGD (no momentum) with lr 0.01 and batch 10, as GPM's ``main_pmnist.py``; 3 epochs per
task instead of GPM's 5 to keep a CPU run short. Choose the methods on the command line:

    python -m experiments.run --config=experiments/configs/permuted_fmnist_protocol.py \
        --config.compare.methods=finetune,gpm,joint --workdir=/tmp/clax_pfmnist

Needs Debian's ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist).
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "permuted_fmnist_protocol"
    c.model.name = "mlp"
    c.model.mlp.widths = (100, 100)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.01
    c.train.epochs_per_task = 3
    c.train.batch_size = 10
    c.compare = {"methods": "finetune,joint", "benchmarks": "permuted_fmnist_10"}
    c.benchmarks = {"permuted_fmnist_10": benchmark("permuted_fmnist_10")}
    return c
