"""Name -> model class registry and a seeded constructor."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from flax import nnx

from clax.models.cnn import SmallCNN
from clax.models.efficientnet import EfficientNetLite0
from clax.models.llama import LlamaLM
from clax.models.lm import TinyCausalLM
from clax.models.mlp import MLP
from clax.models.resnet import ResNet18
from clax.models.vit import TinyViT
from clax.models.vit_pretrained import ViT

MODELS: dict[str, type[nnx.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "vit": TinyViT,
    "causal_lm": TinyCausalLM,
    "llama": LlamaLM,
    "vit_b16": ViT,
    "efficientnet_lite0": EfficientNetLite0,
}

# Filled by make_model itself, so they are not "model-specific" keyword arguments.
_RESERVED = frozenset({"input_shape", "num_classes", "num_tasks", "rngs"})


def model_kwargs(name: str) -> tuple[str, ...]:
    """Model-specific keyword arguments accepted by ``make_model(name, ...)``.

    Raises:
        ValueError: If ``name`` is not in :data:`MODELS`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid choices: {sorted(MODELS)}")
    params = inspect.signature(MODELS[name].__init__).parameters.values()
    names = tuple(
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED
    )
    # Models configured by a dataclass (LlamaLM) also take its fields as overrides.
    extra = getattr(MODELS[name], "config_fields", None)
    return names + (tuple(extra()) if extra is not None else ())


def make_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    num_tasks: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> nnx.Module:
    """Builds a registered model with parameters initialised from ``seed``.

    Args:
        name: One of :data:`MODELS` (``"mlp"``, ``"cnn"``, ``"resnet18"``, ``"vit"``).
        input_shape: Image shape ``(H, W, C)``.
        num_classes: Logits per example.
        num_tasks: Heads; ``> 1`` gives a multi-head (task-incremental) model.
        seed: Seed of the ``nnx.Rngs`` used for initialisation.
        **kwargs: Model-specific options, e.g. ``widths`` for ``"mlp"``.

    Returns:
        The model.

    Raises:
        ValueError: On an unknown ``name`` (listing the choices), an unknown keyword argument
            (listing the model's valid ones) or a malformed value.
    """
    valid = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {unknown} for model {name!r}; valid keyword "
            f"arguments: {list(valid)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return MODELS[name](
        input_shape,
        num_classes=num_classes,
        num_tasks=num_tasks,
        rngs=nnx.Rngs(seed),
        **kwargs,
    )
