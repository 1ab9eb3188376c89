"""Model zoo for continual learning: MLP, small CNN, reduced ResNet-18, a tiny ViT and a
tiny causal language model.

Every image model maps images ``(B, H, W, C)`` to logits via ``model(x, task_ids=None)``,
exposes penultimate ``features(x)``, and uses a multi-head output when ``num_tasks > 1``.
`TinyCausalLM` maps token ids ``(B, L)`` to next-token logits ``(B, L, vocab)``.
"""

from clax.models.base import Classifier
from clax.models.capture import DEFAULT_LAYER_TYPES, capture_layer_inputs, conv_patches
from clax.models.cnn import SmallCNN
from clax.models.heads import MultiHeadLinear, apply_head, make_head
from clax.models.llama import KVCache, LlamaConfig, LlamaLM
from clax.models.lm import TinyCausalLM
from clax.models.mlp import MLP
from clax.models.registry import MODELS, make_model, model_kwargs
from clax.models.resnet import BasicBlock, ResNet18
from clax.models.vit import SelfAttention, TinyViT, TransformerBlock

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "KVCache",
    "LlamaConfig",
    "LlamaLM",
    "MLP",
    "MODELS",
    "BasicBlock",
    "Classifier",
    "MultiHeadLinear",
    "ResNet18",
    "SelfAttention",
    "SmallCNN",
    "TinyCausalLM",
    "TinyViT",
    "TransformerBlock",
    "apply_head",
    "capture_layer_inputs",
    "conv_patches",
    "make_head",
    "make_model",
    "model_kwargs",
]
