"""Analytic continual learning of Split Fashion-MNIST, then exact unlearning of a class (ACU).

    python -m experiments.unlearn --config=experiments/configs/unlearn_acu_fmnist.py \
        --workdir=/tmp/clax_unlearn_acu [--config.unlearn.forget_classes=(3,)]

The recipe of ``experiments/analytic_unlearning.py`` (recorded in
``benchmarks/results/analytic_unlearning*.md``): ``acil`` on the five class-incremental
tasks of Split Fashion-MNIST with a model whose "backbone" is the identity (an MLP with no
hidden layer, so the features are the raw pixels) and ACIL's random ReLU buffer of 2048
features, γ = 0.1; then ``acu`` removes every training example of class 0 by the exact
recursive-least-squares downdate, against ridge regression refit on the retained data
(the closed-form reference). Runs under ``jax.enable_x64``, but the registered ``acil``
keeps float32 memory, so this config computes in float32 (compare
``analytic_unlearning_float32.md``); ``experiments/analytic_unlearning.py --dtype=float64``
runs the float64 ACIL. Needs the IDX files of ``dataset-fashion-mnist``.
"""

from clax.training.unlearn import default_unlearn_config
from experiments.configs.benchmarks import use_benchmark


def get_config():
    c = default_unlearn_config()
    c.name = "unlearn_acu_fmnist"
    use_benchmark(c, "split_fmnist")
    c.model.mlp.widths = ()  # no backbone: acil's features are the pixels
    c.method.name = "acil"
    c.method.acil.gamma = 0.1
    c.method.acil.buffer_size = 2048
    c.method.acil.buffer_seed = 0
    # The head trained on task 0 is not used (acil predicts from its memory): one epoch.
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.01
    c.train.epochs_per_task = 1
    c.train.batch_size = 128
    c.train.eval_batch_size = 1024
    c.train.num_devices = 1
    c.unlearn.name = "acu"
    c.unlearn.acu.batch_size = 1024
    c.unlearn.forget = "classes"
    c.unlearn.forget_classes = (0,)
    c.unlearn.reference = "closed_form"
    c.unlearn.repeats = 3
    c.unlearn.x64 = True
    return c
