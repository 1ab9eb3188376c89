"""The main job: one method of each family against finetune and joint, on Split-Digits
(class-incremental) and Permuted-Digits (domain-incremental), offline, about 75 s:

* ``ewc`` (Fisher regularisation), ``gpm`` (gradient projection), ``er`` (replay),
  ``acil`` (closed-form analytic head), ``ema`` (weight-space averaging);
* ``finetune`` (lower bound) and ``joint`` (multitask upper bound).

    python -m experiments.run --config=experiments/configs/digits_compare.py \
        --workdir=/tmp/clax_digits

Digits are scikit-learn's bundled 8x8 images, so this needs no network. Choose methods
with ``--config.compare.methods=finetune,joint,<name>``; every method runs with its
registered defaults (no tuning for this data).
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "digits_compare"
    c.model.mlp.widths = (128, 128)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 5
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.eval_every_steps = 15  # accuracy-vs-step curves (accuracy_curves.png per run)
    c.train.eval_subsample = 200
    c.compare = {"methods": "finetune,ewc,gpm,er,acil,ema,joint",
                 "benchmarks": "split_digits,permuted_digits"}
    c.benchmarks = {name: benchmark(name) for name in ("split_digits", "permuted_digits")}
    return c
