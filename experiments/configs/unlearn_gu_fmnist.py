"""GA / NPO with and without geometric disentanglement (GU) on Fashion-MNIST: one variant.

    python -m experiments.unlearn --config=experiments/configs/unlearn_gu_fmnist.py:npo+gu \
        --workdir=/tmp/clax_unlearn_gu [--config.unlearn.forget=fraction]

The recipe of ``experiments/unlearn_gu.py`` (which runs every variant and both forget
modes): an MLP (256, 256) trained 10 epochs on the whole training set (Adam 1e-3, batch
128); class 0 is forgotten with Adam β1 = 0 (lr 1e-4), a 128-example forget batch and a
128-example retain batch per step, stopping once the forget-train accuracy is within 1
point of the retrained reference (checked every step, at most 1000 steps). The argument is
the variant ``<ga|npo>[+<rt|gu|gu_k>]``: ``rt`` adds the retain gradient (γ·g_f + α·g_r),
``gu`` projects it out first (rank 1, Adam geometry), ``gu_k`` uses the span of 16
per-example retain gradients. Needs the IDX files of ``dataset-fashion-mnist``.
"""

from clax.training.unlearn import default_unlearn_config
from experiments.configs.benchmarks import FASHION_MNIST_DIR

LOSSES = ("ga", "npo")
RULES = ("plain", "rt", "gu", "gu_k")


def apply_variant(c, variant: str, *, gamma: float = 1.0, alpha: float = 1.0, gu_k: int = 16,
                  npo_beta: float = 0.1):
    """Sets ``c.unlearn`` to the unlearner of `variant` (``<ga|npo>[+<rt|gu|gu_k>]``)."""
    loss, _, rule = variant.partition("+")
    rule = rule or "plain"
    if loss not in LOSSES or rule not in RULES:
        raise ValueError(f"unknown variant {variant!r}: <{'|'.join(LOSSES)}>[+<rt|gu|gu_k>]")
    c.unlearn.name = loss
    u = c.unlearn[loss]
    if loss == "npo":
        u.beta = npo_beta
    u.gu = rule in ("gu", "gu_k")
    u.gu_subspace = "span" if rule == "gu_k" else "mean"
    u.gu_k = gu_k
    # plain: the forget gradient alone; rt: γ·g_f + α·g_r; gu: γ·(ĝ_f − proj ĝ_f) + α·ĝ_r.
    u.forget_weight = 1.0 if rule == "plain" else gamma
    u.retain_weight = 0.0 if rule == "plain" else alpha
    u.gu_b2, u.gu_eps = c.unlearn.optimizer.b2, c.unlearn.optimizer.eps
    return c


def get_config(variant: str = "ga+gu"):
    c = default_unlearn_config()
    c.name = "unlearn_gu_fmnist"
    c.data.source = "idx"
    c.data.root = FASHION_MNIST_DIR
    c.data.name = "fashion_mnist"
    c.model.mlp.widths = (256, 256)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.train.epochs_per_task = 10
    c.train.batch_size = 128
    c.train.eval_batch_size = 1024
    c.train.num_devices = 1
    c.unlearn.forget = "classes"
    c.unlearn.forget_classes = (0,)
    c.unlearn.forget_fraction = 0.1  # with --config.unlearn.forget=fraction
    c.unlearn.steps = 1000
    c.unlearn.eval_every = 1
    c.unlearn.batch_size = 128
    c.unlearn.retain_batch_size = 128
    c.unlearn.optimizer.name = "adam"
    c.unlearn.optimizer.b1 = 0.0
    c.unlearn.optimizer.learning_rate = 1e-4
    c.unlearn.reference = "retrain"
    c.unlearn.target_margin = 0.01
    return apply_variant(c, variant or "ga+gu")
