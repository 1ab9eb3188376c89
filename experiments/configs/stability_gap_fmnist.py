"""The stability gap on Split and Permuted Fashion-MNIST (continual evaluation, CPU-sized).

    python -m experiments.run --config=experiments/configs/stability_gap_fmnist.py \
        --workdir=/tmp/clax_stability_gap
    python -m experiments.report /tmp/clax_stability_gap \
        --out=benchmarks/results/stability_gap/report.md

Every seen task is evaluated every ρ = 2 steps on its 1000 test examples (De Lange et al.,
ICLR 2023, evaluate every ρ_eval iterations on ~1k examples per task), which gives min-ACC,
WC-ACC and WF^w / WP^w (w = 10, 100 evaluations) next to the task-end metrics. To keep a CPU
run to minutes, each task keeps 2000 random training examples (2 epochs of batch 64: 62
steps per task) and 1000 test examples, so task-end ACC and the continual evaluation use the
same examples. MLP 784-256-256-10, plain SGD lr 0.05; 5 tasks each (Split: 2 classes per
task, class-incremental, one head; Permuted: 10 classes, a new pixel permutation per task).

Choose the methods on the command line (default: finetune, joint and experience replay):
``--config.compare.methods=finetune,joint,er,agem``. Needs Debian's ``dataset-fashion-mnist``.
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark

BENCHMARKS = ("split_fmnist", "permuted_fmnist")


def get_config():
    c = default_config()
    c.name = "stability_gap_fmnist"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 2
    c.train.batch_size = 64
    c.train.eval_batch_size = 500
    c.train.eval_every_steps = 2  # ρ
    c.train.eval_subsample = 1000
    c.compare = {"methods": "finetune,joint,er", "benchmarks": ",".join(BENCHMARKS)}
    c.benchmarks = {}
    for name in BENCHMARKS:
        preset = benchmark(name)
        preset.scenario.max_train_per_task = 2000
        preset.scenario.max_test_per_task = 1000
        c.benchmarks[name] = preset
    return c
