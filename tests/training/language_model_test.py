"""A tiny causal language model trains continually through the same loop and contract.

Two synthetic token "domains" (random sparse Markov chains) in sequence, with the
`LanguageModeling` objective: the metric matrices hold per-task loss, perplexity and token
accuracy; resume and 8-device equality hold as for image classifiers.
"""

import json
import os

import jax
import numpy as np
import pytest

from clax.core import LanguageModeling
from clax.data.text import synthetic_token_domains
from clax.training import loop, train_continual
from tests.training.helpers import tiny_config


def lm_config(**train):
    c = tiny_config(**train)
    c.name = "tiny_lm"
    c.objective.name = "language_modeling"
    c.scenario.name = "synthetic_token_domains"
    c.scenario.unlock()
    c.scenario.update({"num_tasks": 2, "vocab_size": 16, "seq_len": 12, "num_train": 256,
                       "num_test": 64, "seed": 0})
    del c.scenario["classes_per_task"]
    c.model.name = "causal_lm"
    c.model.causal_lm.dim = 32
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    return c


def test_domains_differ_and_targets_are_next_tokens():
    s = synthetic_token_domains(num_tasks=2, vocab_size=16, seq_len=12, num_train=64,
                                num_test=8)
    t0, t1 = s.tasks
    assert t0.x_train.shape == t0.y_train.shape == (64, 12) and t0.x_train.dtype == np.int32
    np.testing.assert_array_equal(t0.x_train[:, 1:], t0.y_train[:, :-1])  # shifted by one

    def bigrams(x):
        counts = np.zeros((16, 16))
        np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
        return counts / counts.sum(1, keepdims=True).clip(1)

    # Each domain concentrates on its own successors: the bigram tables differ.
    assert np.abs(bigrams(t0.x_train) - bigrams(t1.x_train)).sum(1).mean() > 1.0


def test_language_model_learns_each_domain_and_forgets_the_first():
    result = train_continual(lm_config(epochs_per_task=4))
    assert result.metric == "loss" and not result.higher_is_better
    L, P, A = (result.matrices[k] for k in ("loss", "perplexity", "token_accuracy"))
    uniform = np.log(16)  # loss of a model that knows nothing about the domain
    assert result.baseline[0] > uniform - 0.2  # an untrained model is no better than uniform
    assert L[0, 0] < uniform - 0.8 and L[1, 1] < uniform - 0.8  # each domain is learned
    assert L[1, 0] > L[0, 0] + 0.1  # and training on domain 1 raises domain 0's loss
    np.testing.assert_allclose(P, np.exp(L), rtol=1e-5)
    assert ((A >= 0) & (A <= 1)).all()
    # Direction-aware summary: forgetting a loss is positive, BWT negative.
    assert result.summary["forgetting"] == pytest.approx(L[1, 0] - L[0, 0])
    assert result.summary["bwt"] == pytest.approx(-(L[1, 0] - L[0, 0]))
    assert result.summary["acc"] == pytest.approx(L[1].mean())


def test_language_model_resumes_mid_task_and_matches(tmp_path, monkeypatch):
    config = lm_config(checkpoint_every_steps=3, epochs_per_task=2, eval_every_steps=4,
                       eval_subsample=16)
    config.method.name = "er"  # memory that stores token sequences
    reference = train_continual(config, keep_state=True)

    workdir = str(tmp_path / "run")
    real_chunk = loop._train_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += args[5] == 1
        if calls["n"] == 3:  # the third chunk of task 1, after a mid-epoch checkpoint
            raise KeyboardInterrupt("simulated preemption")
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_continual(config, workdir)
    monkeypatch.setattr(loop, "_train_chunk", real_chunk)
    resumed = train_continual(config, workdir, keep_state=True)
    for k in reference.matrices:
        np.testing.assert_array_equal(resumed.matrices[k], reference.matrices[k])
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, reference.state.params)
    assert resumed.curves == reference.curves
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["summary"]["acc"] == pytest.approx(reference.summary["acc"])
    assert os.path.isfile(os.path.join(workdir, "loss_matrix.csv"))


def _sgd_config(**train):
    # Plain SGD: Adam divides by sqrt(v) + 1e-8 and turns float32 summation-order noise in
    # near-zero gradient entries into O(lr) parameter differences between device counts.
    c = lm_config(**train)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.5
    return c


def test_language_model_eight_devices_equal_one():
    runs = [train_continual(_sgd_config(num_devices=n, epochs_per_task=1), keep_state=True)
            for n in (1, 8)]
    # Float32 sums over 8 shards in another order: losses agree to a few ulps of their size.
    np.testing.assert_allclose(runs[0].matrix, runs[1].matrix, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 runs[0].state.params, runs[1].state.params)


def test_language_modeling_objective_loss_and_metrics():
    obj = LanguageModeling()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    y = rng.integers(0, 5, (3, 4)).astype(np.int32)
    y[0, 2:] = -1  # not counted
    from clax.core import Batch

    batch = Batch(x=np.zeros((3, 4), np.int32), y=y, task_ids=np.zeros(3, np.int32))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0]
    mask = y >= 0
    np.testing.assert_allclose(obj.loss(logits, batch), nll[mask].mean(), rtol=1e-6)
    w = np.array([2.0, 0.0, 1.0], np.float32)
    wm = mask * w[:, None]
    np.testing.assert_allclose(obj.loss(logits, batch, w), (nll * wm).sum() / wm.sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(obj.per_example_loss(logits, batch),
                               (nll * mask).sum(1) / mask.sum(1), rtol=1e-6)
    sums = obj.eval_sums(logits, batch, np.array([True, True, False]))
    out = obj.finalize(jax.device_get(sums))
    keep = mask & np.array([True, True, False])[:, None]
    assert out["loss"] == pytest.approx(nll[keep].mean(), rel=1e-6)
    assert out["perplexity"] == pytest.approx(np.exp(nll[keep].mean()), rel=1e-6)
    acc = (logits.argmax(-1) == y)[keep].mean()
    assert out["token_accuracy"] == pytest.approx(acc)
