"""Full-class unlearning with Selective Synaptic Dampening (SSD) on Fashion-MNIST.

    python -m experiments.unlearn --config=experiments/configs/unlearn_ssd_fmnist.py:0 \
        --workdir=/tmp/clax_unlearn_ssd          # class 0, SSD's α = 10, λ = 1
    python -m experiments.unlearn --config=experiments/configs/unlearn_ssd_fmnist.py:6,search \
        --workdir=/tmp/clax_unlearn_ssd_6        # class 6, clax's α search (target 1 %)

The recipe of ``experiments/unlearn_ssd.py`` (recorded in
``benchmarks/results/unlearn_ssd.md``): clax's SmallCNN (conv 32, conv 64, dense 128)
trained 5 epochs with Adam 1e-3, batch 128, on 20000 training examples; SSD's importances
are the batch-granularity empirical Fisher, batch 64, model in evaluation mode, on the
whole training set and on the forget class; the reference is the same network retrained
without the class. The argument is ``<class>[,search]``. Needs the IDX files of
``dataset-fashion-mnist``.
"""

from clax.training.unlearn import default_unlearn_config
from experiments.configs.benchmarks import FASHION_MNIST_DIR


def get_config(arg: str = "0"):
    parts = [p for p in (arg or "0").split(",") if p]
    options = {p for p in parts if not p.isdigit()}
    if options - {"search"} or sum(p.isdigit() for p in parts) != 1:
        raise ValueError(f"unlearn_ssd_fmnist takes '<class>[,search]', got {arg!r}")
    c = default_unlearn_config()
    c.name = "unlearn_ssd_fmnist"
    c.data.source = "idx"
    c.data.root = FASHION_MNIST_DIR
    c.data.name = "fashion_mnist"
    c.scenario.max_train_per_task = 20000
    c.model.name = "cnn"
    c.model.cnn.channels = (32, 64)
    c.model.cnn.hidden = 128
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.train.epochs_per_task = 5
    c.train.batch_size = 128
    c.train.num_devices = 1
    # One jitted step per batch: XLA:CPU runs convolutions inside a loop much slower.
    c.train.device_resident = False
    c.unlearn.name = "ssd"
    c.unlearn.ssd.alpha = 10.0
    c.unlearn.ssd.lam = 1.0
    c.unlearn.ssd.fisher_batch_size = 64
    c.unlearn.ssd.search_target = 0.01 if "search" in options else -1.0
    c.unlearn.forget = "classes"
    c.unlearn.forget_classes = (int(next(p for p in parts if p.isdigit())),)
    c.unlearn.reference = "retrain"
    c.unlearn.repeats = 1  # unlearn_s: the compiled (second) run of the edit
    return c
