"""Model zoo for continual learning: MLP, small CNN, reduced ResNet-18, a tiny ViT, a tiny
causal language model, and pretrained-model families: a Llama-architecture LM (SmolLM2,
Llama, Qwen2; GGUF and safetensors loaders, tokenizer, generation) and a ViT-B/16 layout
(timm / Hugging Face safetensors).

Every image model maps images ``(B, H, W, C)`` to logits via ``model(x, task_ids=None)``,
exposes penultimate ``features(x)``, and uses a multi-head output when ``num_tasks > 1``.
`TinyCausalLM` maps token ids ``(B, L)`` to next-token logits ``(B, L, vocab)``.
"""

from clax.models.base import Classifier
from clax.models.capture import DEFAULT_LAYER_TYPES, capture_layer_inputs, conv_patches
from clax.models.cnn import SmallCNN
from clax.models.efficientnet import LITE_MEAN, LITE_STD, EfficientNetLite0, efficientnet_lite0
from clax.models.generate import generate, generate_text, token_nll
from clax.models.gguf import GGUFFile, read_gguf, smollm2_gguf_path
from clax.models.heads import MultiHeadLinear, apply_head, make_head
from clax.models.llama import KVCache, LlamaConfig, LlamaLM
from clax.models.llama_io import (
    load_llama_gguf,
    load_llama_safetensors,
    load_pretrained,
    save_llama_safetensors,
)
from clax.models.lm import TinyCausalLM
from clax.models.mlp import MLP
from clax.models.peft import (
    ADAPTER_KEYS,
    BottleneckAdapter,
    LoRALinear,
    PromptTokens,
    add_adapters,
    add_lora,
    add_prompt,
    count_params,
    merge_lora,
    peft_mask,
    trainable_params,
)
from clax.models.registry import MODELS, make_model, model_kwargs
from clax.models.resnet import BasicBlock, ResNet18
from clax.models.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_json
from clax.models.torch_pickle import load_torch_state_dict
from clax.models.vit import SelfAttention, TinyViT, TransformerBlock
from clax.models.vit_pretrained import (
    ViT,
    ViTConfig,
    load_vit_safetensors,
    resample_pos_embed,
    save_vit_safetensors,
)

__all__ = [
    "ADAPTER_KEYS",
    "LITE_MEAN",
    "LITE_STD",
    "BottleneckAdapter",
    "EfficientNetLite0",
    "LoRALinear",
    "PromptTokens",
    "add_adapters",
    "add_lora",
    "add_prompt",
    "count_params",
    "efficientnet_lite0",
    "load_torch_state_dict",
    "merge_lora",
    "peft_mask",
    "trainable_params",
    "DEFAULT_LAYER_TYPES",
    "KVCache",
    "LlamaConfig",
    "LlamaLM",
    "MLP",
    "MODELS",
    "BasicBlock",
    "Classifier",
    "GGUFFile",
    "MultiHeadLinear",
    "ResNet18",
    "SelfAttention",
    "SmallCNN",
    "TinyCausalLM",
    "TinyViT",
    "Tokenizer",
    "TransformerBlock",
    "ViT",
    "ViTConfig",
    "apply_head",
    "capture_layer_inputs",
    "conv_patches",
    "generate",
    "generate_text",
    "load_llama_gguf",
    "load_llama_safetensors",
    "load_pretrained",
    "load_vit_safetensors",
    "make_head",
    "make_model",
    "model_kwargs",
    "read_gguf",
    "resample_pos_embed",
    "save_llama_safetensors",
    "save_vit_safetensors",
    "smollm2_gguf_path",
    "token_nll",
    "tokenizer_from_gguf",
    "tokenizer_from_json",
]
