"""GPM's handling of tensors with no basis: reported when trained, frozen on request."""

import logging

import numpy as np
import pytest
from flax import nnx

from clax.methods.gpm import unprotected_paths
from clax.models import TinyCausalLM, TinyViT
from clax.training import default_config, train_continual


def test_unprotected_tensors_of_transformers():
    lm = TinyCausalLM((8,), num_classes=16, dim=8, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    assert unprotected_paths(nnx.state(lm, nnx.Param)) == ["embed/embedding", "pos_embed"]
    vit = TinyViT((8, 8, 1), num_classes=3, patch_size=4, dim=8, depth=1, num_heads=2,
                  num_tasks=2, rngs=nnx.Rngs(0))
    # The multi-head head (T, D, C) trains freely by design; it is not "unprotected".
    assert unprotected_paths(nnx.state(vit, nnx.Param)) == ["cls_token", "pos_embed"]


def _config(num_tasks, unprojected):
    c = default_config()
    c.objective.name = "language_modeling"
    c.scenario.name = "synthetic_token_domains"
    c.scenario.unlock()
    del c.scenario["classes_per_task"]
    c.scenario.update({"num_tasks": num_tasks, "vocab_size": 16, "seq_len": 8,
                       "num_train": 64, "num_test": 16})
    c.model.name = "causal_lm"
    c.model.causal_lm.update({"dim": 16, "depth": 1, "num_heads": 2})
    c.method.name = "gpm"
    c.method.gpm.unprojected = unprojected
    c.method.gpm.num_samples = 32
    c.optimizer.learning_rate = 0.5
    c.train.update({"batch_size": 16, "eval_batch_size": 16, "num_devices": 1})
    return c


@pytest.mark.parametrize("unprojected", ["train", "freeze"])
def test_embeddings_frozen_or_reported(unprojected, caplog):
    # One run of task 0 alone gives the parameters at the boundary of the two-task run
    # (same seed, same first task).
    first = train_continual(_config(1, unprojected), keep_state=True).state.params
    with caplog.at_level(logging.WARNING):
        both = train_continual(_config(2, unprojected), keep_state=True).state.params
    for name in ("embedding",):
        a, b = np.asarray(first["embed"][name]), np.asarray(both["embed"][name])
        assert np.array_equal(a, b) == (unprojected == "freeze")
    assert np.array_equal(first["pos_embed"], both["pos_embed"]) == (unprojected == "freeze")
    warned = [r.getMessage() for r in caplog.records if "neither projected nor frozen" in
              r.getMessage()]
    if unprojected == "train":
        assert warned and "embed/embedding" in warned[0] and "pos_embed" in warned[0]
    else:
        assert not warned
    # Projected kernels still train in task 1 either way.
    assert not np.array_equal(first["blocks"][0]["fc1"]["kernel"],
                              both["blocks"][0]["fc1"]["kernel"])


def test_unprojected_choice_is_checked():
    from clax.core import make_method
    with pytest.raises(ValueError, match="unprojected"):
        make_method("gpm", unprojected="ignore")
