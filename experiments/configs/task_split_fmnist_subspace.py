"""CoSO and GPM on task-incremental Split Fashion-MNIST (5 tasks x 2 classes, multi-head MLP).

One head per task (task ids at test time); hidden MLP 784-256-256 shared. Plain SGD lr 0.05,
as GPM trains. CoSO's transform emits Adam directions that this SGD scales, so CoSO's Adam
learning rate is ``learning_rate · method.coso.scale`` = 0.05 · 0.02 = 1e-3 (CoSO's own
runs use 3e-4-5e-4 on a pre-trained ViT). CoSO's protection is first order (the update is
orthogonal to the previous tasks' gradient directions), so it needs small steps: with the
method's default scale 0.1 (Adam lr 5e-3) it forgets almost as much as finetune; see
``benchmarks/results/task_split_fmnist_subspace.md``. Run:

    python -m experiments.run --config=experiments/configs/task_split_fmnist_subspace.py \
        --workdir=/tmp/clax_task_split_fmnist_subspace

Needs Debian's ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist).
"""

from clax.training import default_config
from experiments.configs.benchmarks import benchmark


def get_config():
    c = default_config()
    c.name = "task_split_fmnist_subspace"
    c.model.name = "mlp"
    c.model.mlp.widths = (256, 256)
    c.model.multi_head = True
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.train.epochs_per_task = 2
    c.train.batch_size = 64
    # GPM: one threshold for both hidden kernels (the heads are task-specific and free).
    c.method.gpm.threshold = 0.97
    c.method.coso.scale = 0.02  # Adam learning rate 0.05 * 0.02 = 1e-3
    c.compare = {"methods": "finetune,gpm,coso", "benchmarks": "task_split_fmnist"}
    c.benchmarks = {"task_split_fmnist": benchmark("task_split_fmnist")}
    return c
