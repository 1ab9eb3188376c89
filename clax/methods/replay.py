"""Rehearsal methods: ER, DER++, A-GEM and replay with Reptile gradient alignment.

Registered with the `Method` contract (``clax.core.method``). Every method keeps a
fixed-capacity replay buffer (:mod:`clax.replay.buffer`) as its memory; the buffer's shapes
come from the run's `DataSpec` (``init_memory(params, *, data)``). Each step samples from
the buffer *before* the current batch is inserted (``replay`` / ``loss_terms`` /
``extra_args`` read ``ctx.memory``), and ``update_memory`` inserts the current batch
afterwards, as Mammoth's
``observe`` does. Samples are drawn uniformly **with replacement** from the filled slots
(Mammoth draws without replacement; the expectation is the same). While the buffer is
empty the replay terms have weight 0.

* ``er``: experience replay (Chaudhry et al., 2019; Mammoth ``models/er.py``).
* ``derpp``: DER++ (Buzzega et al., NeurIPS 2020; Mammoth ``models/derpp.py``).
* ``agem``: A-GEM (Chaudhry et al., ICLR 2019; Avalanche ``plugins/agem.py``).
* ``replay_reptile``: mixed-batch replay plus Reptile interpolation towards an anchor every
  ``k`` steps, for continual pre-training (Abbes et al., CoLLAs 2025).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clax._validation import check_int, check_positive_int, check_real
from clax.core import (
    BoundaryContext,
    DataSpec,
    Method,
    Replay,
    StepContext,
    StepOutputs,
    TrainState,
    around,
    before,
    plain,
    register_method,
)
from clax.replay.buffer import BufferState, balanced_insert, init_buffer, reservoir_insert, sample
from clax.replay.reptile import reptile
from clax.transforms.agem import agem as agem_transform
from clax.typing import PyTree

# fold_in constants: independent keys for the step's replay draws.
_INSERT, _SAMPLE, _SAMPLE_2 = 0, 1, 2


def _key(ctx: StepContext, purpose: int) -> jax.Array:
    return jax.random.fold_in(ctx.rng, purpose)


def _buffer_init(method: str, buffer_size: int, *, logits: bool = False,
                 num_groups: int | None = None):
    """``init_memory(params, *, data)``: a buffer of ``buffer_size`` examples shaped like
    ``data.example`` (any pytree: images and labels, token sequences and targets), with
    ``data.output``-shaped model outputs when `logits` (DER++)."""

    def init_memory(params: PyTree, *, data: DataSpec | None = None) -> BufferState:
        del params
        if data is None:
            raise ValueError(
                f"{method}: init_memory needs the run's data=DataSpec(example, output) to "
                "size its replay buffer (StepFns.init_state passes it)"
            )
        return init_buffer(buffer_size, example=data.example,
                           outputs=data.output if logits else None, num_groups=num_groups)

    return init_memory


def _replay_size(ctx: StepContext, ratio: float) -> int:
    """Replay batch size ``M = max(1, round(ratio·B))`` (static: B is the batch's shape)."""
    # task_ids is (B,) for every objective; x and y may be pytrees.
    return max(1, round(ratio * ctx.batch.task_ids.shape[0]))


def _effective_size(ctx: StepContext, m: int) -> jax.Array:
    """``min(M, filled slots)`` as float32: what Mammoth's ``get_data`` returns."""
    return jnp.minimum(ctx.memory.size, m).astype(jnp.float32)



def _mixed_batch_method(name: str, *, buffer_size: int, replay_ratio: float,
                        wrapper=None, start_task: int | None = None) -> Method:
    """ER's mixed batch: the mean loss over [current batch; replay batch], in one pass."""

    def replay(ctx: StepContext) -> Replay:
        m = _replay_size(ctx, replay_ratio)
        s = sample(ctx.memory, _key(ctx, _SAMPLE), m)
        # M draws stand for min(M, stored) examples (Mammoth's get_data): each weighs
        # min(M, stored)/M, so the loss is (B·L_cur + m·L_mem)/(B + m); 0 when empty.
        w = _effective_size(ctx, m) / m
        return Replay(s.batch, jnp.full((m,), w, jnp.float32))

    extra_args = None
    if start_task is not None:
        def extra_args(ctx: StepContext) -> dict[str, jax.Array]:
            return {"reptile_active": ctx.task_index >= start_task}

    def update_memory(memory, ctx: StepContext, out: StepOutputs):
        del out
        return reservoir_insert(memory, ctx.batch, _key(ctx, _INSERT))

    return Method(
        name=name,
        optimizer=around(wrapper) if wrapper is not None else plain,
        init_memory=_buffer_init(name, buffer_size),
        replay=replay,
        extra_args=extra_args,
        update_memory=update_memory,
    )


@register_method("er")
def er(*, buffer_size: int = 200, replay_ratio: float = 1.0) -> Method:
    """Experience replay with a reservoir buffer.

    Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019
    (https://arxiv.org/abs/1902.10486); Mammoth ``models/er.py``. Each step draws
    ``M = round(replay_ratio · B)`` examples from the buffer and trains on the mean loss
    over the concatenated batch ``[current (B); replay (m)]``, ``m = min(M, stored)``:

    .. math::

        \\mathcal L = \\frac{B\\,\\mathcal L_{cur} + m\\,\\mathcal L_{mem}}{B + m}

    computed in one forward/backward pass over the concatenated batch
    (``Method.replay``; each of the ``M`` draws weighs ``m/M``, so an empty buffer
    gives a plain finetune step). As in Mammoth, batch statistics (BatchNorm) see the
    concatenated batch. After the update, the current batch enters the reservoir buffer
    (Vitter's algorithm R).

    Args:
        buffer_size: Buffer capacity, a positive int (Mammoth: 200 / 500 / 5120).
        replay_ratio: Replay batch size over current batch size, ``> 0`` (Mammoth's
            ``minibatch_size = batch_size``: 1).

    Returns:
        The method.

    Raises:
        ValueError: On a hyperparameter out of range.
    """
    buffer_size = check_positive_int("buffer_size", buffer_size)
    ratio = check_real("replay_ratio", replay_ratio, 0.0, math.inf, low_open=True,
                        high_open=True)
    return _mixed_batch_method("er", buffer_size=buffer_size, replay_ratio=ratio)


@register_method("derpp")
def derpp(*, buffer_size: int = 200, alpha: float = 0.1, beta: float = 0.5,
          replay_ratio: float = 1.0) -> Method:
    """DER++: dark experience replay with logit distillation and replayed labels.

    Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
    Baseline", NeurIPS 2020 (https://arxiv.org/abs/2004.07211); Mammoth
    ``models/derpp.py``. The buffer (reservoir) stores each example with its targets and
    the outputs (logits) the model gave it when it was trained on (before that step's
    update). Each step draws two independent replay batches of
    ``M = round(replay_ratio · B)`` examples:

    .. math::

        \\mathcal L = \\mathcal L_{cur}
            + \\alpha\\,\\mathrm{mean}\\big((f_\\theta(x') - z')^2\\big)
            + \\beta\\,\\mathrm{CE}(f_\\theta(x''), y'')

    (the MSE averages over every stored output entry, like ``F.mse_loss``: over
    ``(m, C)`` logits for a classifier, ``(m, L, V)`` for a language model; the CE is the
    run's task loss, next-token cross-entropy for an LM). Defaults ``alpha = 0.1``,
    ``beta = 0.5`` are Mammoth's best arguments for Seq-CIFAR-10 with buffer 200
    (``utils/best_args.py``); the paper tunes them per benchmark and buffer size.

    Args:
        buffer_size: Buffer capacity, a positive int.
        alpha: Weight of the logit-matching MSE, ``>= 0``.
        beta: Weight of the replayed-label cross-entropy, ``>= 0``.
        replay_ratio: Replay batch size over current batch size, ``> 0``.

    Returns:
        The method.

    Raises:
        ValueError: On a hyperparameter out of range.
    """
    buffer_size = check_positive_int("buffer_size", buffer_size)
    alpha = check_real("alpha", alpha, 0.0, math.inf, low_open=False, high_open=True)
    beta = check_real("beta", beta, 0.0, math.inf, low_open=False, high_open=True)
    ratio = check_real("replay_ratio", replay_ratio, 0.0, math.inf, low_open=True,
                        high_open=True)

    def loss_terms(params: PyTree, ctx: StepContext) -> jax.Array:
        m = _replay_size(ctx, ratio)
        s1 = sample(ctx.memory, _key(ctx, _SAMPLE), m)
        s2 = sample(ctx.memory, _key(ctx, _SAMPLE_2), m)
        out = ctx.apply(params, s1.batch.x, s1.batch.task_ids)
        # F.mse_loss: the mean over every stored entry, (m, C) or (m, L, V) for an LM.
        mse = jnp.mean((out.astype(jnp.float32) - s1.logits.astype(jnp.float32)) ** 2)
        ce = ctx.loss(params, s2.batch)
        return s1.weight * (alpha * mse + beta * ce)

    def update_memory(memory, ctx: StepContext, out: StepOutputs):
        return reservoir_insert(memory, ctx.batch, _key(ctx, _INSERT), logits=out.outputs)

    return Method(
        name="derpp",
        init_memory=_buffer_init("derpp", buffer_size, logits=True),
        loss_terms=loss_terms,
        update_memory=update_memory,
    )


@register_method("agem")
def agem(*, buffer_size: int = 200, reference_size: int = 256, max_tasks: int = 100
         ) -> Method:
    """A-GEM: project the gradient away from conflicts with a memory gradient.

    Chaudhry, Ranzato, Rohrbach, Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR
    2019 (https://arxiv.org/abs/1812.00420); Avalanche ``plugins/agem.py``. Each step
    samples ``reference_size`` examples of **past** tasks (stored task id < current task)
    from the memory, computes the task-loss gradient on them ``g_ref`` (train mode, current
    parameters), and the transform :func:`clax.transforms.agem.agem`, chained before the
    base optimizer, replaces the raw gradient ``g`` by
    ``g − (⟨g, g_ref⟩/⟨g_ref, g_ref⟩)·g_ref`` when ``⟨g, g_ref⟩ < 0``. On the first task
    (no past examples) ``g_ref = 0`` and nothing is projected.

    Memory: a per-task balanced buffer (CBRS over task ids, :func:`balanced_insert`) that
    the current batch enters after each step, so at the end of each task every task seen
    keeps an equal share ``buffer_size / (tasks seen)`` of random examples. Avalanche
    instead stores ``patterns_per_experience`` random examples at the end of each
    experience and samples ``sample_size // n_exps`` per past experience; sampling here is
    uniform over the past-task slots, which are balanced across tasks.

    Args:
        buffer_size: Memory capacity, a positive int.
        reference_size: Examples per reference gradient (A-GEM paper: 256).
        max_tasks: Upper bound on task ids (sizes the per-task counters); a ValueError at
            the boundary of a task whose id reaches it.

    Returns:
        The method.

    Raises:
        ValueError: On a hyperparameter out of range.
    """
    buffer_size = check_positive_int("buffer_size", buffer_size)
    reference_size = check_positive_int("reference_size", reference_size)
    max_tasks = check_positive_int("max_tasks", max_tasks)

    def extra_args(ctx: StepContext) -> dict[str, PyTree]:
        past = ctx.memory.task_ids < ctx.task_index
        s = sample(ctx.memory, _key(ctx, _SAMPLE), reference_size, where=past)
        g_ref = jax.grad(ctx.loss)(ctx.params, s.batch)
        return {"reference_grads": jax.tree.map(lambda g: g * s.weight.astype(g.dtype), g_ref)}

    def update_memory(memory, ctx: StepContext, out: StepOutputs):
        del out
        return balanced_insert(memory, ctx.batch, _key(ctx, _INSERT), by="task")

    def before_task(state: TrainState, ctx: BoundaryContext) -> TrainState:
        ids = np.asarray(ctx.train.task_ids)
        top = max(ctx.task_index, int(ids.max()) if ids.size else 0)
        if top >= max_tasks:
            raise ValueError(
                f"agem: task id {top} does not fit max_tasks={max_tasks}; raise "
                "config.method.agem.max_tasks above the scenario's number of tasks"
            )
        return state

    return Method(
        name="agem",
        optimizer=before(agem_transform()),
        init_memory=_buffer_init("agem", buffer_size, num_groups=max_tasks),
        extra_args=extra_args,
        update_memory=update_memory,
        before_task=before_task,
    )


@register_method("replay_reptile")
def replay_reptile(*, buffer_size: int = 200, replay_fraction: float = 0.25,
                   reptile_every: int = 100, meta_lr: float = 0.1, start_task: int = 0
                   ) -> Method:
    """Mixed-batch replay plus Reptile gradient alignment, for continual pre-training.

    Abbes et al., "Revisiting Replay and Gradient Alignment for Continual Pre-Training of
    Large Language Models", CoLLAs 2025 (https://arxiv.org/abs/2508.01908), an efficient
    MER (Riemer et al., ICLR 2019).

    * **Replay**: a fraction ``α = replay_fraction`` of each training batch comes from the
      replay buffer: with ``B`` new examples per step, ``M = round(B·α/(1−α))`` replayed
      ones, and the update is that of the mean loss over the mixed batch (as :func:`er`).
      The paper's buffer is disk-backed and holds all past data; here it is a device
      reservoir of ``buffer_size`` examples (make it large for pre-training).
    * **Gradient alignment**: every ``reptile_every`` optimizer steps,
      ``θ ← θ_anchor + ε(θ − θ_anchor)``, ``θ_anchor ← θ``, with ``ε = meta_lr``
      (:func:`clax.replay.reptile`, outermost wrapper). The optimizer state is not reset.
      Defaults ``ε = 0.1``, ``k = 100`` are AISteer360's (``structural_control/mer``);
      ``replay_fraction = 0.25`` is one of the replay rates the paper studies.
    * **Pretrained base**: continual pre-training starts from a trained model. With
      ``start_task = s``, tasks before ``s`` (the base / pretraining task of
      ``clax.data.pretrain_continual``) train with replay but without meta steps, the
      anchor following the parameters; meta steps start at task ``s``, anchored at the
      base model. Replay is on throughout, so the buffer holds base-task data.

    Args:
        buffer_size: Buffer capacity, a positive int.
        replay_fraction: ``α`` in ``(0, 1)``.
        reptile_every: Meta-step period ``k``, a positive int.
        meta_lr: ``ε`` in ``(0, 1]`` (1: replay only).
        start_task: First task with Reptile meta steps, an int ``>= 0``.

    Returns:
        The method.

    Raises:
        ValueError: On a hyperparameter out of range.
    """
    buffer_size = check_positive_int("buffer_size", buffer_size)
    alpha = check_real("replay_fraction", replay_fraction, 0.0, 1.0, low_open=True,
                        high_open=True)
    every = check_positive_int("reptile_every", reptile_every)
    eps = check_real("meta_lr", meta_lr, 0.0, 1.0, low_open=True, high_open=False)
    start_task = check_int("start_task", start_task, low=0)
    return _mixed_batch_method(
        "replay_reptile", buffer_size=buffer_size, replay_ratio=alpha / (1.0 - alpha),
        wrapper=lambda tx: reptile(tx, every=every, meta_lr=eps), start_task=start_task,
    )
