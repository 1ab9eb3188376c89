"""Weight-space methods: EMA balancing, weight averaging, LiNeS editing, slow learner (SLCA).

Registered with the `Method` contract (``clax.core.method``):

* ``ema`` / ``adaptive_ema``: an EMA of the parameters kept by
  :func:`clax.transforms.ema.ema_balancing`, swapped into the model at each task end (Large
  Continual Instruction Assistant, Qiao et al., ICML 2025).
* ``weight_averaging``: the running mean of the parameters every ``k`` steps within and
  across tasks (ZSCL's weight ensemble, Zheng et al., ICCV 2023), swapped in at task end.
* ``lines``: LiNeS single-task editing of each task's change w.r.t. the base model
  (Wang et al., ICLR 2025).
* ``slow_learner``: SLCA's slow learner and classifier alignment (Zhang et al., ICCV 2023).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax._validation import check_bool, check_int, check_positive_int, check_real
from clax.core import BoundaryContext, Method, TrainState, after, around, register_method
from clax.edits.averaging import WeightAveragingState
from clax.edits.averaging import weight_averaging as _weight_averaging
from clax.edits.lines import lines_scale
from clax.models.batched import batched_apply
from clax.params.paths import align_to, block_depths, head_backbone_labels
from clax.transforms.ema import EMABalancingState, ema_balancing, find_state
from clax.typing import PyTree

# SLCA's classifier-alignment constants (``models/slca.py``): weight decay and momentum of
# the head optimizer, and the ridge added to each class covariance.
CA_WEIGHT_DECAY = 5e-4
CA_COV_RIDGE = 1e-4
CA_MOMENTUM = 0.9
_FEATURE_BATCH = 512


def swap_in(state: TrainState, state_type: type, field: str, **more: Any) -> TrainState:
    """Replaces ``state.params`` by the tree in ``field`` of the ``state_type`` opt state.

    The wrapper's state is rebuilt with the same structure and its tree set to the new
    parameters, so the EMA / running mean continues from the weights the model now holds.

    Args:
        state: The train state.
        state_type: :class:`~clax.transforms.ema.EMABalancingState` or
            :class:`~clax.edits.averaging.WeightAveragingState`.
        field: ``"ema"`` or ``"average"``.
        **more: Other fields of the wrapper state to replace (same shapes and dtypes).

    Trees are matched by parameter path. Inside ``clax.params.train_only(tx, mask)``
    (``optax.partition``) the wrapper tracks only the trainable leaves (its tree holds
    ``optax.MaskedNode`` at the frozen ones): those are swapped in, and the frozen leaves
    are kept as they are (bit-identical; they never move).

    Returns:
        The new state (params and opt_state replaced; same structure, shapes and dtypes).

    Raises:
        ValueError: The tracked tree has a path the params lack, or lacks one that it
            does not mask out (naming the path).
    """
    found = find_state(state.opt_state, state_type)
    tracked = align_to(getattr(found, field), state.params, (f"the {field} state", "params"),
                       missing="masked")
    params = jax.tree.map(lambda s, p: p if s is p else jnp.asarray(s, jnp.result_type(p)),
                          tracked, state.params)
    return _set_tracked(state._replace(params=params), state_type, field, **more)


def _set_tracked(state: TrainState, state_type: type, field: str, **more: Any) -> TrainState:
    """Sets the wrapper's tracked tree (``field``) to ``state.params``; params unchanged.

    By path: where the tree masks a leaf out (``optax.MaskedNode``, a frozen leaf inside
    ``train_only``) it stays masked."""
    found = find_state(state.opt_state, state_type)
    current = getattr(found, field)
    params = align_to(state.params, current, ("params", f"the {field} state"))
    tracked = jax.tree.map(lambda p, s: jnp.asarray(p, jnp.result_type(s)), params, current)

    def replace(x: Any) -> Any:
        return x._replace(**{field: tracked}, **more) if isinstance(x, state_type) else x

    opt_state = jax.tree.map(
        replace, state.opt_state, is_leaf=lambda x: isinstance(x, state_type)
    )
    return state._replace(opt_state=opt_state)


def _tracking_consolidate(state_type: type, field: str, *, swap: bool, start_task: int,
                          restart: dict[str, Any]):
    """Task-end hook: restart the tracked tree after task ``start_task − 1``, swap after."""
    if not swap and start_task == 0:
        return None

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        if ctx.task_index < start_task - 1:
            return state
        if ctx.task_index == start_task - 1:
            # The base model just trained: the average starts from it (CoIN / ZSCL start
            # from a pre-trained model, not from a random initialisation).
            return _set_tracked(state, state_type, field, **restart)
        return swap_in(state, state_type, field) if swap else state

    return consolidate


def _ema_method(name: str, wrapper, swap_at_task_end: bool, start_task: int) -> Method:
    consolidate = _tracking_consolidate(EMABalancingState, "ema", swap=swap_at_task_end,
                                        start_task=start_task, restart={})
    return Method(name=name, optimizer=around(wrapper), consolidate=consolidate)


@register_method("ema")
def ema(*, decay: float = 0.99, swap_at_task_end: bool = True, start_task: int = 1) -> Method:
    """Fixed EMA balancing: ``θ* ← decay·θ* + (1 − decay)·θ_t`` after every step.

    Qiao et al., "Large Continual Instruction Assistant", ICML 2025 (code
    ``JingyangQiao/CoIN``, ``ema_update`` / ``ema_replace``), with the fixed rate the code
    falls back to. The EMA is kept by :func:`clax.transforms.ema.ema_balancing` wrapped
    around the whole optimizer (it sees the final updates), so training itself is unchanged.

    With ``swap_at_task_end`` the model's parameters are replaced by ``θ*`` at each task end
    (CoIN's ``ema_replace``), and the EMA state is set to the swapped parameters. The
    evaluation after each task therefore measures the EMA weights, as CoIN evaluates them,
    and the next task starts from them.

    Base task: CoIN starts its EMA from a pre-trained model. Here tasks before
    ``start_task`` are trained without balancing (in the pretrain-then-continual protocol,
    task 0 is the base / pretraining task); at the end of task ``start_task − 1`` the
    tracked copy is reset to the trained parameters, and the swaps happen at the end of
    tasks ``start_task, start_task + 1, ...``. ``start_task = 0`` tracks and swaps from the
    first step (then the EMA starts from the random initialisation).

    Args:
        decay: EMA decay in ``[0, 1)``. With ``decay = 0.99`` the EMA averages over about
            100 steps: tasks much shorter than that barely move it (high stability).
        swap_at_task_end: Swap ``θ*`` into the model at each task end. ``False`` only keeps
            the EMA in the optimizer state (read it with ``clax.ema_params``).
        start_task: First task whose end swaps ``θ*`` in (an int ``>= 0``).

    Returns:
        The method.

    Raises:
        TypeError: On a non-number ``decay``, a non-bool ``swap_at_task_end`` or a non-int
            ``start_task``.
        ValueError: On ``decay`` outside ``[0, 1)`` or a negative ``start_task``.
    """
    decay = check_real("decay", decay, 0.0, 1.0, low_open=False, high_open=True)
    check_bool("swap_at_task_end", swap_at_task_end)
    start_task = check_int("start_task", start_task, low=0)
    return _ema_method("ema", lambda tx: ema_balancing(tx, decay=decay), swap_at_task_end,
                       start_task)


@register_method("adaptive_ema")
def adaptive_ema(
    *, fallback_rate: float = 0.01, swap_at_task_end: bool = True, start_task: int = 1
) -> Method:
    """Adaptive EMA balancing with CoIN's per-tensor rate (Qiao et al., ICML 2025).

    Per tensor, ``α = 2(1 + ‖g_t‖₁) / (‖θ_t − θ*‖₁·‖g_t − g_{t−1}‖₁)``, ``fallback_rate`` when
    ``α ∉ (0, 1)``, and ``θ* ← (1 − α)·θ* + α·θ_t``. This follows the CoIN code, not the
    paper (factor 2, unnormalised gradient difference); the differences are listed in
    :func:`clax.transforms.ema.ema_balancing`. The gradient the rate sees is the raw
    gradient of the loss (the wrapper is outermost), not a clipped one.

    At each task end (``swap_at_task_end``) ``θ*`` replaces the model's parameters, so the
    evaluation after each task uses the EMA weights, as in CoIN.

    Base task: CoIN starts its EMA from a pre-trained model. Here tasks before
    ``start_task`` are trained without balancing (in the pretrain-then-continual protocol,
    task 0 is the base / pretraining task); at the end of task ``start_task − 1`` the
    tracked copy is reset to the trained parameters, and the swaps happen at the end of
    tasks ``start_task, start_task + 1, ...``. ``start_task = 0`` tracks and swaps from the
    first step (then the EMA starts from the random initialisation).

    Args:
        fallback_rate: Rate used when ``α`` leaves ``(0, 1)``, in ``(0, 1)``.
        swap_at_task_end: Swap ``θ*`` into the model at each task end.
        start_task: First task whose end swaps ``θ*`` in (an int ``>= 0``).

    Returns:
        The method.

    Raises:
        TypeError: On a non-number ``fallback_rate``, a non-bool ``swap_at_task_end`` or a
            non-int ``start_task``.
        ValueError: On ``fallback_rate`` outside ``(0, 1)`` or a negative ``start_task``.
    """
    rate = check_real("fallback_rate", fallback_rate, 0.0, 1.0, low_open=True, high_open=True)
    check_bool("swap_at_task_end", swap_at_task_end)
    start_task = check_int("start_task", start_task, low=0)
    return _ema_method(
        "adaptive_ema",
        lambda tx: ema_balancing(tx, adaptive=True, fallback_rate=rate),
        swap_at_task_end,
        start_task,
    )


@register_method("weight_averaging")
def weight_averaging(
    *, every: int = 1, swap_at_task_end: bool = True, start_task: int = 1
) -> Method:
    """Running mean of the parameters every ``every`` steps, within and across tasks.

    The parameter-space half of ZSCL (Zheng et al., "Preventing Zero-Shot Transfer
    Degradation in Continual Learning of Vision-Language Models", ICCV 2023): after step
    ``k·every`` the parameters enter ``avg ← avg + (θ − avg)/(n + 1)``
    (:func:`clax.edits.averaging.weight_averaging`). With ``swap_at_task_end`` the mean
    replaces the model's parameters at each task end (it is what gets evaluated), and the
    average state is set to it, its count kept, so later steps keep averaging into the same
    mean across tasks.

    Base task: ZSCL averages from the pre-trained model. Tasks before ``start_task`` are
    trained without averaging; at the end of task ``start_task − 1`` the mean restarts as
    the trained (base) parameters, counted as one sample, and the swaps happen at the end
    of tasks ``start_task, ...``. ``start_task = 0`` averages from the first step.

    Args:
        every: Averaging period in steps, a positive int.
        swap_at_task_end: Swap the mean into the model at each task end.
        start_task: First task whose end swaps the mean in (an int ``>= 0``).

    Returns:
        The method.

    Raises:
        TypeError: On a non-int ``every`` or ``start_task``, or a non-bool
            ``swap_at_task_end``.
        ValueError: On ``every < 1`` or a negative ``start_task``.
    """
    every = check_positive_int("every", every)
    check_bool("swap_at_task_end", swap_at_task_end)
    start_task = check_int("start_task", start_task, low=0)
    consolidate = _tracking_consolidate(
        WeightAveragingState, "average", swap=swap_at_task_end, start_task=start_task,
        restart={"num_averaged": jnp.ones((), jnp.int32)},
    )
    return Method(
        name="weight_averaging",
        optimizer=around(lambda tx: _weight_averaging(tx, every=every)),
        consolidate=consolidate,
    )


@register_method("lines")
def lines(*, lam: float = 0.5) -> Method:
    """LiNeS single-task editing after each task (Wang et al., ICLR 2025).

    ``θ ← θ_pre + LiNeS(θ − θ_pre)`` with ``α = λ, β = 1 − λ``: block ``ℓ`` of ``L`` keeps
    ``λ + (1 − λ)·ℓ/(L−1)`` of its change, parameters outside blocks (stem, head) keep ``λ``
    (:func:`clax.edits.lines.lines_scale`). The deepest block keeps all of its change, the
    shallow ones are pulled back towards the reference, which preserves its general
    features.

    Reference ``θ_pre``: this targets the pretrain-then-continual protocol
    (``clax.data.pretrain_continual``), where task 0 is the base / pretraining task. The
    memory holds a copy of the parameters at initialisation, replaced by the parameters at
    the end of task 0 (task 0 itself is not edited). At the end of every later task the
    edit is applied against that fixed base model, so ``τ`` is the accumulated change since
    pretraining (not since the previous task). ``λ = 1`` never changes the parameters;
    ``λ = 0`` keeps only the last block's change.

    Args:
        lam: ``λ`` in ``[0, 1]``.

    Returns:
        The method.

    Raises:
        TypeError: On a non-number ``lam``.
        ValueError: On ``lam`` outside ``[0, 1]``; at init, if the model's block depths
            cannot be derived from its parameter paths.
    """
    lam = check_real("lam", lam, 0.0, 1.0, low_open=False, high_open=False)

    def init_memory(params: PyTree) -> PyTree:
        block_depths(params)  # fail before training if the depths cannot be derived
        return jax.tree.map(lambda p: jnp.array(p, copy=True), params)

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        if ctx.task_index == 0:
            return state._replace(memory=state.params)
        edited = lines_scale(state.memory, state.params, alpha=lam, beta=1.0 - lam)
        edited = jax.tree.map(lambda e, p: e.astype(jnp.result_type(p)), edited, state.params)
        return state._replace(params=edited)

    return Method(name="lines", init_memory=init_memory, consolidate=consolidate)


# --------------------------------------------------------------------------- slow learner


def class_statistics(features: np.ndarray, labels: np.ndarray, classes: np.ndarray
                     ) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per-class feature mean and unbiased covariance (float64), as SLCA's ``torch.cov``.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)``.
        classes: Class ids to compute; absent classes are skipped.

    Returns:
        ``{c: (mean (D,), cov (D, D), count)}``; the covariance of a single example is 0.
    """
    out = {}
    for c in np.asarray(classes).tolist():
        f = np.asarray(features[labels == c], np.float64)
        if len(f) == 0:
            continue
        d = f.shape[1]
        cov = np.cov(f, rowvar=False).reshape(d, d) if len(f) > 1 else np.zeros((d, d))
        out[int(c)] = (f.mean(0), cov, len(f))
    return out


def _batched_features(ctx: BoundaryContext, state: TrainState, x: np.ndarray) -> np.ndarray:
    features = jax.jit(ctx.model.features)
    return batched_apply(lambda xb: features(state.params, state.model_state, xb), x,
                         batch_size=_FEATURE_BATCH)


def _ca_loss(head: PyTree, x: jax.Array, y: jax.Array, task_masks: jax.Array,
             seen: jax.Array, logit_norm: float) -> jax.Array:
    logits = x @ head["kernel"] + head["bias"]
    if logit_norm > 0:
        # SLCA: logits / mean over seen tasks of ‖logits_task‖₂ / logit_norm.
        sq = (logits**2)[:, None, :] * task_masks[None]
        norms = (jnp.sqrt(sq.sum(-1)) + 1e-7).mean(-1, keepdims=True)
        logits = logits / norms / logit_norm
    logits = jnp.where(seen, logits, -1e9)  # CE over the seen classes only
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def align_classifier(
    head: PyTree,
    memory: dict[str, np.ndarray],
    task_masks: np.ndarray,
    *,
    task_index: int,
    rng: jax.Array,
    epochs: int,
    samples_per_class: int,
    learning_rate: float,
    logit_norm: float,
) -> PyTree:
    """SLCA's classifier alignment: retrains the linear head on sampled features.

    Per epoch, ``samples_per_class`` features per seen class ``c`` are drawn from
    ``N(μ_c·(0.9 + 0.1·(t_c+1)/(T+1)), Σ_c + 1e-4·I)`` (``T`` the current task index, ``t_c``
    the class's task), shuffled, and the head is trained in batches of
    ``samples_per_class`` (one batch per seen class, as in SLCA) with SGD momentum 0.9,
    weight decay 5e-4 and a per-epoch cosine learning rate, on the logit-normalised
    cross-entropy over seen classes.

    Args:
        head: ``{"kernel": (D, C), "bias": (C,)}``.
        memory: Class statistics ``means (C, D)``, ``covs (C, D, D)``, ``counts (C,)``,
            ``task (C,)``.
        task_masks: ``(K, C)`` bool, the classes of each seen task (for the logit norm).
        task_index: ``T``.
        rng: Key for sampling and shuffling.
        epochs, samples_per_class, learning_rate, logit_norm: CA hyperparameters.

    Returns:
        The new head (float32).
    """
    seen_classes = np.flatnonzero(np.asarray(memory["counts"]) > 0)
    num_classes = head["kernel"].shape[1]
    seen = np.zeros(num_classes, bool)
    seen[seen_classes] = True
    d = head["kernel"].shape[0]
    shrink = 0.9 + 0.1 * (np.asarray(memory["task"], np.float64)[seen_classes] + 1) / (
        task_index + 1)
    means = np.asarray(memory["means"], np.float64)[seen_classes] * shrink[:, None]
    chols = np.linalg.cholesky(
        np.asarray(memory["covs"], np.float64)[seen_classes] + CA_COV_RIDGE * np.eye(d))
    means, chols = jnp.asarray(means, jnp.float32), jnp.asarray(chols, jnp.float32)
    labels = jnp.repeat(jnp.asarray(seen_classes, jnp.int32), samples_per_class)
    iters = len(seen_classes)

    def lr(count):  # SLCA steps its cosine schedule once per epoch
        epoch = count // iters
        return learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * epoch / epochs))

    tx = optax.chain(optax.add_decayed_weights(CA_WEIGHT_DECAY),
                     optax.sgd(lr, momentum=CA_MOMENTUM))
    head = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), head)
    task_masks = jnp.asarray(task_masks, jnp.float32)
    seen = jnp.asarray(seen)

    @jax.jit
    def epoch_fn(head, opt_state, key):
        k_sample, k_perm = jax.random.split(key)
        z = jax.random.normal(k_sample, (iters, samples_per_class, d), jnp.float32)
        x = means[:, None, :] + jnp.einsum("cij,csj->csi", chols, z)
        perm = jax.random.permutation(k_perm, iters * samples_per_class)
        x = x.reshape(-1, d)[perm].reshape(iters, samples_per_class, d)
        y = labels[perm].reshape(iters, samples_per_class)

        def step(carry, batch):
            head, opt_state = carry
            grads = jax.grad(_ca_loss)(head, batch[0], batch[1], task_masks, seen, logit_norm)
            updates, opt_state = tx.update(grads, opt_state, head)
            return (optax.apply_updates(head, updates), opt_state), None

        (head, opt_state), _ = jax.lax.scan(step, (head, opt_state), (x, y))
        return head, opt_state

    opt_state = tx.init(head)
    for epoch in range(epochs):
        head, opt_state = epoch_fn(head, opt_state, jax.random.fold_in(rng, epoch))
    return head


@register_method("slow_learner")
def slow_learner(
    *,
    backbone_lr_scale: float = 0.01,
    align_classifier: bool = False,
    ca_epochs: int = 5,
    ca_samples_per_class: int = 256,
    ca_learning_rate: float = 0.01,
    ca_logit_norm: float = 0.1,
) -> Method:
    """SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023).

    Code ``GengDavid/SLCA`` @169d4e6, ``models/slca.py``.

    **Slow learner.** The base optimizer's updates of backbone parameters are multiplied by
    ``backbone_lr_scale`` (SLCA: backbone lr = head lr / 100), through ``optax.partition``
    with labels from :func:`clax.params.paths.head_backbone_labels` (``head/...`` is the
    head). As an update-space transform (``after``) it works with any base optimizer; for
    SGD this is exactly
    a backbone learning rate ``lr·s``. SLCA also trains on current-task logits only; here
    the loss is the loop's (all classes in class-incremental runs).

    **Classifier alignment** (``align_classifier``). At each task end the feature mean and
    unbiased covariance of each class of the current task are computed on the task's
    training data (``model.features``, evaluation mode: SLCA uses test transforms) and
    stored in fixed-capacity memory (``means (C, D)``, ``covs (C, D, D)``, ``counts (C,)``,
    ``task (C,)``: the task the class was last seen in, ``-1`` if never); old classes keep
    their statistics. A class that recurs in a later task (domain-incremental scenarios) is
    overwritten by its latest statistics. After each task ``t > 0`` only the head is
    retrained on features sampled from ``N(μ_c·(0.9 + 0.1·(t_c+1)/(t+1)), Σ_c + 1e-4·I)``, for
    ``ca_epochs`` epochs of SGD (momentum 0.9, weight decay 5e-4, per-epoch cosine
    learning rate from ``ca_learning_rate``) on cross-entropy over the seen classes with
    logit normalisation ``logits / mean_k ‖logits_{task k}‖₂ / ca_logit_norm`` (see
    :func:`align_classifier`). Sampling uses the boundary's ``ctx.rng``.

    Multi-head models (``head/kernel`` of shape ``(T, D, C)``) are not supported with
    ``align_classifier`` (SLCA is class-incremental with one head): a ValueError at init.

    Args:
        backbone_lr_scale: Backbone update scale ``s`` in ``(0, 1]``.
        align_classifier: Run classifier alignment at task ends.
        ca_epochs: Alignment epochs, a positive int.
        ca_samples_per_class: Sampled features per class and epoch (also the batch size).
        ca_learning_rate: Head learning rate of the alignment, ``> 0``.
        ca_logit_norm: Logit-normalisation temperature ``> 0``; ``0`` turns it off.

    Returns:
        The method.

    Raises:
        TypeError: On a hyperparameter of the wrong type.
        ValueError: On a hyperparameter out of range; at init, with ``align_classifier``,
            if the parameters have no ``head/kernel`` of shape ``(D, C)``.
    """
    scale = check_real("backbone_lr_scale", backbone_lr_scale, 0.0, 1.0,
                        low_open=True, high_open=False)
    check_bool("align_classifier", align_classifier)
    check_positive_int("ca_epochs", ca_epochs)
    check_positive_int("ca_samples_per_class", ca_samples_per_class)
    ca_lr = check_real("ca_learning_rate", ca_learning_rate, 0.0, math.inf,
                        low_open=True, high_open=True)
    ca_norm = check_real("ca_logit_norm", ca_logit_norm, 0.0, math.inf,
                          low_open=False, high_open=True)

    post = optax.partition(
        {"head": optax.identity(), "backbone": optax.scale(scale)}, head_backbone_labels
    )
    if not align_classifier:
        return Method(name="slow_learner", optimizer=after(post))

    def init_memory(params: PyTree) -> PyTree:
        kernel = params.get("head", {}).get("kernel") if isinstance(params, dict) else None
        if kernel is None or np.ndim(kernel) != 2:
            shape = None if kernel is None else np.shape(kernel)
            raise ValueError(
                "slow_learner(align_classifier=True) needs a single linear head with "
                f"params['head']['kernel'] of shape (D, C); got {shape}. Multi-head models "
                "(kernel (T, D, C)) are not supported: set align_classifier=False"
            )
        d, c = np.shape(kernel)
        return {
            "means": jnp.zeros((c, d), jnp.float32),
            "covs": jnp.zeros((c, d, d), jnp.float32),
            "counts": jnp.zeros((c,), jnp.int32),
            "task": jnp.full((c,), -1, jnp.int32),
        }

    def consolidate(state: TrainState, ctx: BoundaryContext) -> TrainState:
        t = ctx.task_index
        memory = {k: np.array(v) for k, v in state.memory.items()}
        feats = _batched_features(ctx, state, np.asarray(ctx.train.x))
        stats = class_statistics(feats, np.asarray(ctx.train.y), ctx.tasks[t].classes)
        for c, (mean, cov, n) in stats.items():
            memory["means"][c], memory["covs"][c] = mean, cov
            memory["counts"][c], memory["task"][c] = n, t
        params = state.params
        if t > 0:
            masks = np.zeros((t + 1, memory["counts"].shape[0]), bool)
            for k in range(t + 1):
                masks[k, np.asarray(ctx.tasks[k].classes)] = True
            head = align_classifier_fn(
                {"kernel": np.asarray(params["head"]["kernel"]),
                 "bias": np.asarray(params["head"]["bias"])},
                memory, masks, task_index=t, rng=ctx.rng, epochs=ca_epochs,
                samples_per_class=ca_samples_per_class, learning_rate=ca_lr,
                logit_norm=ca_norm,
            )
            new_head = dict(params["head"])
            for k in ("kernel", "bias"):
                new_head[k] = head[k].astype(jnp.result_type(params["head"][k]))
            params = {**params, "head": new_head}
        memory = {k: jnp.asarray(v) for k, v in memory.items()}
        return state._replace(params=params, memory=memory)

    return Method(name="slow_learner", optimizer=after(post), init_memory=init_memory,
                  consolidate=consolidate)


# The factory's `align_classifier` argument shadows the function inside it.
align_classifier_fn = align_classifier
