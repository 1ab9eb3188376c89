"""Run configuration: the default `ml_collections` config and builders from it.

Sections (every experiment config starts from `default_config()` and edits it):

- ``data``: ``source`` (``digits``, ``idx``, ``fashion_mnist``, ``tfds``) plus that
  source's keyword arguments (unset keys are typed placeholders and are not passed).
- ``scenario``: ``name`` (``class_incremental``, ``task_incremental``, ``permuted``,
  ``rotated``, ...; or a token scenario of `clax.data.text.TEXT_SCENARIOS`, which needs no
  data source) plus its keyword arguments (placeholders likewise).
- ``model``: ``name``, ``multi_head`` (one head per task; task-incremental scenarios
  only) and one subsection per model with its arguments: ``model.mlp.widths``,
  ``model.cnn.channels``, ...; only the selected model's subsection is used.
  ``model.pretrained`` loads weights (``llama``: ``"smollm2-135m"``, a ``.gguf`` file or a
  Hugging Face directory; ``efficientnet_lite0``: ``"imagenet"``; ``vit_b16``: a
  ``.safetensors`` file) and ``model.peft`` adds LoRA / bottleneck adapters / prompt
  tokens and trains only them (plus the ``peft.train`` patterns).
- ``method``: ``name`` and one subsection per registered method with its
  hyperparameters: ``--config.method.name=ewc --config.method.ewc.lam=100``.
- ``objective``: ``name`` (``classification``: masked cross-entropy and accuracy;
  ``language_modeling``: next-token cross-entropy, loss / perplexity / token accuracy).
- ``optimizer``: ``name`` (``sgd``, ``adam``, ``adamw``), ``learning_rate``,
  ``momentum`` (sgd only), ``weight_decay`` (sgd and adamw).
- ``train``: schedule, batch sizes, evaluation, checkpointing, data path.

Model and method subsections are generated from the registered factories' signatures, so
every hyperparameter can be overridden from the command line under its own name.
"""

from __future__ import annotations

import inspect
from typing import Any

import ml_collections
import numpy as np
import optax
from flax import nnx
from ml_collections.config_dict import placeholder

import clax.methods  # noqa: F401  (the driver registers every method explicitly)
from clax import data as clax_data
from clax import models as clax_models
from clax._validation import check_bool, check_int, check_real
from clax.core import (
    Classification,
    LanguageModeling,
    Method,
    Objective,
    make_method,
    method_hyperparameters,
    registered_methods,
)
from clax.data.text import TEXT_SCENARIOS

_SIMPLE = (bool, int, float, str, tuple)
# Keys of train/optimizer that may change when a run resumes (they do not change results).
# Changing them may move results by float rounding (another mesh, chunking of the
# compiled loop of steps, the device-resident or host-fed data path), not by more.
OPERATIONAL_KEYS = ("train.num_devices", "train.mesh_fsdp", "train.mesh_tensor",
                    "train.fsdp_min_size", "train.async_checkpoints",
                    "train.checkpoints_to_keep", "train.eval_batch_size", "train.prefetch",
                    "train.checkpoint_every_steps", "train.device_resident")


def defaults_section(params: dict[str, Any]) -> ml_collections.ConfigDict:
    """A subsection of overridable defaults (simple types only; lists become tuples)."""
    section = {}
    for name, default in params.items():
        if isinstance(default, list):
            default = tuple(default)
        # A FieldReference is a typed placeholder (unset unless given on the command line).
        if default is not inspect.Parameter.empty and isinstance(
                default, (*_SIMPLE, ml_collections.FieldReference)):
            section[name] = default
    return ml_collections.ConfigDict(section)


def _model_defaults(name: str) -> dict[str, Any]:
    sig = inspect.signature(clax_models.MODELS[name].__init__)
    fields = getattr(clax_models.MODELS[name], "config_fields", dict)()
    return {k: sig.parameters[k].default if k in sig.parameters else placeholder(fields[k])
            for k in clax_models.model_kwargs(name)}


def default_config() -> ml_collections.ConfigDict:
    """The defaults every experiment config edits (digits, split into 5 tasks, MLP)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        {"source": "digits", "root": placeholder(str), "name": placeholder(str),
         "data_dir": placeholder(str), "cache_dir": placeholder(str)}
    )
    c.scenario = ml_collections.ConfigDict(
        {"name": "class_incremental", "classes_per_task": 2, "seed": 0,
         "max_train_per_task": placeholder(int), "max_test_per_task": placeholder(int)}
    )
    c.model = ml_collections.ConfigDict({"name": "mlp", "multi_head": False,
                                         "pretrained": placeholder(str)})
    for name in sorted(clax_models.MODELS):
        c.model[name] = defaults_section(_model_defaults(name))
    # Parameter-efficient tuning: 0 turns a part off. With any part on, only the adapter
    # parameters (and parameters whose path matches a `train` regex) are trained; the base
    # stays bit-identical (`clax.params.train_only` around the whole optimizer chain).
    c.model.peft = ml_collections.ConfigDict({
        "lora_rank": 0, "lora_alpha": placeholder(float),
        # re.fullmatch over '/'-joined module paths; the default is LoRA's classic choice,
        # the query and value projections (LlamaLM q_proj/v_proj, ViTs query/value).
        "lora_targets": r".*(q_proj|v_proj|query|value)",
        "adapter_bottleneck": 0, "adapter_scale": 0.1, "prompt_length": 0, "train": ()})
    c.objective = ml_collections.ConfigDict({"name": "classification"})
    c.method = ml_collections.ConfigDict({"name": "finetune"})
    for name in registered_methods():
        c.method[name] = defaults_section(method_hyperparameters(name))
    c.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.01, "momentum": 0.0, "weight_decay": 0.0}
    )
    c.train = ml_collections.ConfigDict(
        {
            "epochs_per_task": 1,
            "batch_size": 128,
            "eval_batch_size": 512,
            # Continual evaluation: every seen task every N steps (ρ) on a fixed subsample of
            # `eval_subsample` test examples per task (<= 0: all); 0: off. Gives the curves
            # and the stability-gap metrics (min-ACC, WC-ACC, WF/WP) of clax.metrics.stability.
            "eval_every_steps": 0,
            "eval_subsample": 1000,
            # Checkpoint every N steps (0: only at task boundaries). Needs a workdir.
            "checkpoint_every_steps": 0,
            "checkpoints_to_keep": 2,
            # Write checkpoints in the background while training continues (orbax async).
            "async_checkpoints": False,
            # True: each task's data lives on device and runs in compiled loops of steps.
            # False: batches are assembled on the host and fed step by step, by the grain
            # pipeline of clax.data.pipeline (data too large for the device, LM corpora).
            "device_resident": True,
            # Host-fed path: batches gathered ahead in background threads (0: none).
            "prefetch": 2,
            # Re-initialise the whole optimizer state (method transforms included) per task.
            "reset_optimizer_per_task": False,
            # Devices of the run's mesh (0: every device, of every process).
            "num_devices": 0,
            # Mesh ("data", "fsdp", "tensor"): data = num_devices / (fsdp * tensor). FSDP
            # splits parameters, optimizer state and method memory; tensor splits the
            # named matmul dimensions (clax.training.sharding). 1, 1: data parallel.
            "mesh_fsdp": 1,
            "mesh_tensor": 1,
            # Arrays with fewer elements stay replicated under the FSDP rule.
            "fsdp_min_size": 1024,
        }
    )
    return c


# config.train's integer settings and their lowest valid value (checked in one place).
_TRAIN_INTS = {
    "epochs_per_task": 1, "batch_size": 1, "eval_batch_size": 1, "eval_every_steps": 0,
    "checkpoint_every_steps": 0, "checkpoints_to_keep": 1, "prefetch": 0, "num_devices": 0,
    "mesh_fsdp": 1, "mesh_tensor": 1, "fsdp_min_size": 0,
}
_TRAIN_BOOLS = ("async_checkpoints", "device_resident", "reset_optimizer_per_task")
_WHY = {
    "checkpoints_to_keep": " (at least the newest checkpoint must stay on disk)",
    "epochs_per_task": " (a run with no training would report an untrained model's ACC)",
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fixed sections (train, optimizer, top level) against the defaults.

    Every value of ``config.train``, ``config.seed`` and the learning rate is checked
    here, before a workdir is touched: a wrong type raises TypeError, a value out of range
    ValueError, each naming the key. Component arguments (data, scenario, model, method)
    are checked by the components.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"config must be an ml_collections.ConfigDict (start from "
                        f"default_config()), got {type(config).__name__}")
    ref = default_config()
    missing = sorted(set(ref.keys()) - set(config.keys()))
    if missing:
        raise ValueError(f"config lacks section(s) {', '.join(missing)}; start from "
                         "clax.training.default_config() and edit it")
    for section in ("train", "optimizer", "objective"):
        if not isinstance(config[section], ml_collections.ConfigDict):
            raise TypeError(f"config.{section} must be a section (ConfigDict), got "
                            f"{config[section]!r}")
        unknown = sorted(set(config[section].keys()) - set(ref[section].keys()))
        if unknown:
            raise ValueError(
                f"unknown key(s) config.{section}.{unknown[0]}; valid keys of config.{section}: "
                f"{', '.join(sorted(ref[section].keys()))}"
            )
    check_int("config.seed", config.seed, low=0)
    train = config.train
    for key, low in _TRAIN_INTS.items():
        if key in train:
            try:
                check_int(f"config.train.{key}", train[key], low=low)
            except ValueError as e:
                raise ValueError(f"{e}{_WHY.get(key, '')}") from None
    for key in _TRAIN_BOOLS:
        if key in train:
            check_bool(f"config.train.{key}", train[key])
    if "eval_subsample" in train:
        check_int("config.train.eval_subsample", train.eval_subsample)
    if "learning_rate" in config.optimizer:
        check_real("config.optimizer.learning_rate", config.optimizer.learning_rate, 0,
                   float("inf"), low_open=True, high_open=True)


def component_kwargs(section: ml_collections.ConfigDict, *selectors: str) -> dict[str, Any]:
    """The keyword arguments in a flat config section: all but `selectors` and unset keys."""
    d = section.to_dict()
    for key in selectors:
        d.pop(key, None)
    return {k: v for k, v in d.items() if v is not None}


def build_scenario(config: ml_collections.ConfigDict):
    """Loads the data source and splits it into the configured scenario."""
    if config.scenario.name in TEXT_SCENARIOS:
        kwargs = component_kwargs(config.scenario, "name")
        kwargs.pop("classes_per_task", None)  # an image-scenario default
        return TEXT_SCENARIOS[config.scenario.name](**kwargs)
    dataset = clax_data.load_source(config.data.source, **component_kwargs(config.data, "source"))
    return clax_data.make_scenario(
        config.scenario.name, dataset, **component_kwargs(config.scenario, "name")
    )


def _subsection(section: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    sub = section.get(name)
    if sub is None:
        return {}
    if not isinstance(sub, ml_collections.ConfigDict):
        raise ValueError(f"config.{name} must be a section of keyword arguments, got {sub!r}")
    return {k: v for k, v in sub.to_dict().items() if v is not None}


PRETRAINED_MODELS = ("llama", "efficientnet_lite0", "vit_b16")


def _pretrained_model(config: ml_collections.ConfigDict, scenario, num_tasks: int
                      ) -> nnx.Module:
    name, source = config.model.name, config.model.pretrained
    options = _subsection(config.model, name)
    if name == "llama":
        # Only numerics may change; shapes come from the checkpoint.
        fixed = sorted(set(options) - {"preset", "dtype", "param_dtype"})
        if options.get("preset", "tiny") != "tiny":
            fixed = ["preset"] + fixed
        if fixed:
            raise ValueError(f"config.model.llama.{fixed[0]} cannot change a pretrained model "
                             f"(config.model.pretrained={source!r}); only dtype and "
                             f"param_dtype may be set")
        model, tokenizer = clax_models.load_pretrained(
            source, dtype=options.get("dtype", "float32"),
            param_dtype=options.get("param_dtype", "float32"),
            max_len=int(scenario.input_shape[0]))
        if tokenizer.vocab_size > scenario.num_classes:
            raise ValueError(f"scenario {scenario.name!r} has {scenario.num_classes} token ids "
                             f"but the tokenizer of {source!r} has {tokenizer.vocab_size}")
        # A padded embedding (vocabulary larger than the tokenizer's) is fine.
        if model.config.vocab_size < scenario.num_classes:
            raise ValueError(f"scenario {scenario.name!r} has num_classes="
                             f"{scenario.num_classes}, more than the pretrained model's "
                             f"vocabulary of {model.config.vocab_size}; tokenize with its "
                             f"tokenizer")
        return model
    if name == "efficientnet_lite0":
        if source != "imagenet":
            raise ValueError(f"config.model.pretrained for efficientnet_lite0 must be "
                             f"'imagenet', got {source!r}")
        h, w, c = scenario.input_shape
        if h != w or c != 3:
            raise ValueError(f"efficientnet_lite0 needs square RGB inputs (H, H, 3), got "
                             f"{tuple(scenario.input_shape)}; resize with "
                             f"clax.models.preprocess.prepare_images")
        return clax_models.efficientnet_lite0(pretrained=True, num_classes=scenario.num_classes,
                                              num_tasks=num_tasks, input_size=h,
                                              rngs=nnx.Rngs(config.seed))
    if name == "vit_b16":
        return clax_models.load_vit_safetensors(
            source, image_size=int(scenario.input_shape[0]), num_classes=scenario.num_classes,
            num_tasks=num_tasks, rngs=nnx.Rngs(config.seed))
    raise ValueError(f"config.model.pretrained is supported for {', '.join(PRETRAINED_MODELS)}"
                     f", not model {name!r}")


def peft_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.model.peft`` adds any adapter (then only adapters train)."""
    p = config.model.get("peft")
    return p is not None and bool(p.lora_rank or p.adapter_bottleneck or p.prompt_length)


def _add_peft(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
    p = config.model.peft
    for key in ("lora_rank", "adapter_bottleneck", "prompt_length"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 0:
            raise ValueError(f"config.model.peft.{key} must be an int >= 0 (0: off), got "
                             f"{p[key]!r}")
    rngs = nnx.Rngs(config.seed + 1)
    if p.lora_rank:
        clax_models.add_lora(model, rank=p.lora_rank, alpha=p.lora_alpha,
                             targets=p.lora_targets, rngs=rngs)
    if p.adapter_bottleneck:
        clax_models.add_adapters(model, bottleneck=p.adapter_bottleneck, scale=p.adapter_scale,
                                 dim=getattr(model, "feature_dim", None), rngs=rngs)
    if p.prompt_length:
        clax_models.add_prompt(model, length=p.prompt_length, rngs=rngs)


def trainable_mask(config: ml_collections.ConfigDict, params: Any) -> Any | None:
    """The trainable-parameter mask of a parameter-efficient run, else None (all train)."""
    if not peft_enabled(config):
        if tuple(config.model.get("peft", {}).get("train", ())):
            raise ValueError("config.model.peft.train needs an adapter (lora_rank, "
                             "adapter_bottleneck or prompt_length > 0)")
        return None
    return clax_models.peft_mask(params, train=tuple(config.model.peft.train))


def build_model(config: ml_collections.ConfigDict, scenario) -> nnx.Module:
    """Builds the configured NNX model for `scenario` (input shape, classes, heads), loads
    ``config.model.pretrained`` weights and adds the ``config.model.peft`` adapters."""
    model = _build_base_model(config, scenario)
    if peft_enabled(config):
        _add_peft(config, model)
    return model


def _build_base_model(config: ml_collections.ConfigDict, scenario) -> nnx.Module:
    multi_head = bool(config.model.get("multi_head", False))
    if multi_head and not scenario.uses_task_ids:
        raise ValueError(
            f"config.model.multi_head=True needs task ids, but scenario {scenario.name!r} "
            f"is {scenario.kind}; use a task_incremental scenario or multi_head=False"
        )
    name = config.model.name
    if name not in clax_models.MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid choices: {', '.join(sorted(clax_models.MODELS))}"
        )
    if config.model.get("pretrained") is not None:
        return _pretrained_model(config, scenario, scenario.num_tasks if multi_head else 1)
    return clax_models.make_model(
        name,
        input_shape=tuple(scenario.input_shape),
        num_classes=scenario.num_classes,
        num_tasks=scenario.num_tasks if multi_head else 1,
        seed=config.seed,
        **_subsection(config.model, name),
    )


OBJECTIVES = ("classification", "language_modeling")


def logit_masks(scenario) -> np.ndarray | None:
    """Task-incremental runs see only their task's classes (train and test)."""
    if not scenario.uses_task_ids:
        return None
    masks = np.zeros((scenario.num_tasks, scenario.num_classes), bool)
    for task in scenario.tasks:
        masks[task.id, task.classes] = True
    return masks


def build_objective(config: ml_collections.ConfigDict, scenario) -> Objective:
    """``config.objective.name`` for `scenario` (logit masks for task-incremental runs)."""
    name = config.objective.name
    if name == "classification":
        return Classification(logit_masks=logit_masks(scenario))
    if name == "language_modeling":
        return LanguageModeling()
    raise ValueError(f"unknown objective {name!r}; valid choices: {', '.join(OBJECTIVES)}")


def build_method(config: ml_collections.ConfigDict) -> Method:
    """Builds ``config.method.name`` with the hyperparameters of its subsection."""
    name = config.method.name
    return make_method(name, **_subsection(config.method, name))


_OPTIMIZER_SETTINGS = {
    "sgd": ("momentum", "weight_decay"),
    "adam": (),
    "adamw": ("weight_decay",),
}


def build_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The base optimizer from ``config.optimizer``.

    Raises:
      ValueError: unknown name, or a non-zero setting the chosen optimizer does not use
        (e.g. ``momentum`` with adam), so nothing is silently ignored.
    """
    name, lr = opt.name, opt.learning_rate
    if name not in _OPTIMIZER_SETTINGS:
        raise ValueError(
            f"unknown optimizer {name!r}; valid choices: {', '.join(_OPTIMIZER_SETTINGS)}"
        )
    if not lr > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {lr}")
    for key in ("momentum", "weight_decay"):
        if opt.get(key, 0.0) and key not in _OPTIMIZER_SETTINGS[name]:
            raise ValueError(
                f"config.optimizer.{key}={opt[key]} is not used by {name!r}; set it to 0 "
                f"(settings of {name!r}: {', '.join(_OPTIMIZER_SETTINGS[name]) or 'none'})"
            )
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=opt.weight_decay)
    sgd = optax.sgd(lr, momentum=opt.momentum or None)
    if opt.weight_decay:
        return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
    return sgd
