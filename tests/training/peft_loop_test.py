"""Parameter-efficient runs through train_continual: config.model.peft and pretrained."""

import jax
import numpy as np
import pytest
from flax import nnx

from clax.core import ModelFns
from clax.params import path_str
from clax.training import build_model, default_config, train_continual
from clax.training.config import build_scenario, trainable_mask


def _lm_config(**peft):
    c = default_config()
    c.objective.name = "language_modeling"
    c.scenario.name = "synthetic_token_domains"
    c.scenario.unlock()
    del c.scenario["classes_per_task"]
    c.scenario.update({"num_tasks": 2, "vocab_size": 32, "seq_len": 16, "num_train": 64,
                       "num_test": 16})
    c.model.name = "llama"
    c.model.llama.update({"dim": 32, "num_heads": 4, "num_kv_heads": 2, "hidden_dim": 64,
                          "depth": 1})
    c.model.peft.update(peft)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
    c.train.update({"batch_size": 16, "eval_batch_size": 16, "num_devices": 1})
    return c


@pytest.mark.parametrize("method", ["finetune", "er"])
def test_lora_run_trains_adapters_only(method):
    config = _lm_config(lora_rank=4, lora_targets=r".*(q_proj|v_proj)")
    config.method.name = method
    _, before, _ = ModelFns.split(build_model(config, build_scenario(config)))
    result = train_continual(config, keep_state=True)
    after = result.state.params
    assert np.isfinite(result.matrix).all()
    changed = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                            jax.tree_util.tree_leaves(after), strict=True):
        name = path_str(path)
        if "lora_" in name:
            changed += not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} is frozen but changed")
    assert changed == 2 * 2, "every LoRA factor of q_proj and v_proj should train"


def test_mask_follows_peft_config():
    config = _lm_config(lora_rank=2, lora_targets=r".*q_proj", prompt_length=3,
                        train=("norm/scale$",))
    model = build_model(config, build_scenario(config))
    mask = trainable_mask(config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    on = sorted(path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v)
    assert "prompt/tokens" in on or any(n.startswith("prompt") for n in on)
    assert any("q_proj/lora_a" in n for n in on) and "norm/scale" in on
    assert not any("k_proj" in n or "embed_tokens" in n for n in on)
    assert trainable_mask(_lm_config(), {}) is None


def test_bad_peft_and_pretrained_settings():
    config = _lm_config(train=("head",))
    with pytest.raises(ValueError, match="config.model.peft.train needs an adapter"):
        train_continual(config)
    config = _lm_config(lora_rank=-1)
    with pytest.raises(ValueError, match="config.model.peft.lora_rank must be an int >= 0"):
        build_model(config, build_scenario(config))
    config = _lm_config()
    config.model.name = "mlp"
    config.model.pretrained = "smollm2-135m"
    with pytest.raises(ValueError, match="config.model.pretrained is supported for llama"):
        build_model(config, build_scenario(config))
    config = _lm_config()
    config.model.pretrained = "smollm2-135m"
    with pytest.raises(ValueError, match="config.model.llama.depth cannot change a pretrained"):
        build_model(config, build_scenario(config))


def test_prompt_and_adapters_on_llama_through_the_loop():
    config = _lm_config(prompt_length=3, adapter_bottleneck=4)
    config.scenario.num_tasks = 1
    result = train_continual(config, keep_state=True)
    assert np.isfinite(result.matrix).all()
    assert "prompt" in result.state.params
    assert "mlp_adapter" in result.state.params["layers"][0]


def test_resume_refuses_changed_peft_settings(tmp_path):
    config = _lm_config(lora_rank=2)
    config.scenario.num_tasks = 1
    train_continual(config, workdir=str(tmp_path))
    changed = _lm_config(lora_rank=2, lora_alpha=8.0)
    changed.scenario.num_tasks = 1
    with pytest.raises(ValueError, match="model.peft.lora_alpha"):
        train_continual(changed, workdir=str(tmp_path))


def test_llama_overrides_are_config_keys_and_preset_is_checked_with_pretrained():
    config = default_config()
    assert "dtype" in config.model.llama and config.model.llama.dtype is None
    config = _lm_config()
    config.model.llama.unlock()
    for key in ("dim", "num_heads", "num_kv_heads", "hidden_dim", "depth"):
        config.model.llama[key] = None
    config.model.llama.preset = "llama-3.2-1b"
    config.model.pretrained = "smollm2-135m"
    with pytest.raises(ValueError, match="config.model.llama.preset cannot change"):
        build_model(config, build_scenario(config))
