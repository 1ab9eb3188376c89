"""A tiny causal language model trained on two synthetic token domains in sequence.

    python -m experiments.run --config=experiments/configs/token_domains.py --workdir=/tmp/lm
    python -m experiments.run --config=experiments/configs/token_domains.py --workdir=/tmp/lm_er \
        --config.method.name=er

Each domain is a random sparse Markov chain over 32 tokens
(`clax.data.text.synthetic_token_domains`), so no data is downloaded. The objective is
next-token cross-entropy (`config.objective.name = "language_modeling"`): the run records
per-task loss, perplexity and token accuracy after every task, and per-step loss curves of
every seen task (the stability gap, measured in loss).
"""

from clax.training import default_config


def get_config():
    c = default_config()
    c.name = "token_domains"
    c.objective.name = "language_modeling"
    c.scenario.name = "synthetic_token_domains"
    c.scenario.unlock()
    del c.scenario["classes_per_task"]
    c.scenario.update({"num_tasks": 3, "vocab_size": 32, "seq_len": 32, "num_train": 1024,
                       "num_test": 128, "branching": 2})
    c.model.name = "causal_lm"
    c.model.causal_lm.dim = 64
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    c.train.epochs_per_task = 3
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.train.eval_every_steps = 8
    c.train.eval_subsample = 64
    return c
