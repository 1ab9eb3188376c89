"""Continual pre-training with replay and Reptile gradient alignment (Abbes et al., 2025).

    python -m experiments.run --config=experiments/configs/continual_pretraining_replay.py \
        --workdir=/tmp/clax_cpt_replay

Pretrain-then-continual Fashion-MNIST (``pretrain_fmnist``): task 0 trains on classes 0-4
(the base / "pretraining" task), then {5,6}, {7,8}, {9} class-incrementally, MLP 784-256-
256-10, SGD 0.05, batch 128, 2 epochs per task. Compared:

* ``finetune``: continual training on the new data only;
* ``er``: replay at 25% of each batch (``replay_ratio = 1/3``), reservoir buffer;
* ``replay_reptile``: the same replay plus a Reptile meta step
  ``θ ← θ_anchor + ε(θ − θ_anchor)`` every ``k`` steps from task 1 on (``start_task = 1``:
  the base task trains without meta steps and is the first anchor). ``ε = 0.1`` as in
  AISteer360; ``k = 20`` instead of its 100, because a task here has only ~190 steps
  (``k = 100`` would give one or two meta steps per task).

The buffer holds 2000 examples (a device reservoir; the paper's disk buffer keeps all past
data). Needs Debian's ``dataset-fashion-mnist``.
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "continual_pretraining_replay"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 2
    c.train.batch_size = 128
    c.method.er.buffer_size = 2000
    c.method.er.replay_ratio = 1.0 / 3.0  # 25% of the mixed batch, as replay_fraction
    c.method.replay_reptile.buffer_size = 2000
    c.method.replay_reptile.replay_fraction = 0.25
    c.method.replay_reptile.reptile_every = 20
    c.method.replay_reptile.meta_lr = 0.1
    c.method.replay_reptile.start_task = 1
    c.compare = {"methods": "finetune,er,replay_reptile", "benchmarks": "pretrain_fmnist"}
    c.benchmarks = {"pretrain_fmnist": benchmark("pretrain_fmnist")}
    return c
