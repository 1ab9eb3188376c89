"""Tiny unlearning run on scikit-learn's digits (offline, well under a minute on 2 cores).

    python -m experiments.unlearn --config=experiments/configs/unlearn_digits.py \
        --workdir=/tmp/clax_unlearn_digits [--config.unlearn.name=ssd]

An MLP trained on all ten classes (one task); class 0 is forgotten with GA + GU (rank 1,
Adam geometry, β1 = 0), stopping once its forget-train accuracy is within 1 point of the
model retrained without it.
"""

from clax.training.unlearn import default_unlearn_config


def get_config():
    c = default_unlearn_config()
    c.name = "unlearn_digits"
    c.model.mlp.widths = (64,)
    c.optimizer.learning_rate = 3e-3
    c.train.epochs_per_task = 10
    c.train.batch_size = 64
    c.train.eval_batch_size = 256
    c.train.num_devices = 1
    c.unlearn.name = "ga"
    c.unlearn.ga.gu = True
    c.unlearn.ga.retain_weight = 1.0
    c.unlearn.forget_classes = (0,)
    c.unlearn.steps = 200
    c.unlearn.eval_every = 5
    c.unlearn.batch_size = 32
    c.unlearn.retain_batch_size = 32
    c.unlearn.optimizer.learning_rate = 1e-3
    c.unlearn.target_margin = 0.01
    return c
