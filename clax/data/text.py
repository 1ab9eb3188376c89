"""Token-sequence scenarios: each task is a text "domain" for a causal language model.

A task's ``x`` holds input token ids ``(N, L)`` int32 and ``y`` the target of each position
``(N, L)`` int32: the next token (a negative target means "no loss here", for padding or
prompt tokens; `language_modeling_arrays` cuts sequences of ``L + 1`` tokens, so every
position has a target). That is the layout `clax.core.LanguageModeling` reads.

`synthetic_token_domains` makes domains that are learnable and differ from each other
without any download: each domain is a random sparse Markov chain over the vocabulary
(every token has ``branching`` likely successors, drawn per domain), so a model trained
on one domain and then another forgets the first one's transitions.
"""

from __future__ import annotations

import os

import numpy as np

from clax._validation import check_positive_int
from clax.data.scenarios import Scenario, Task
from clax.models.tokenizer import load_tokenizer

__all__ = ["TEXT_SCENARIOS", "language_modeling_arrays", "pack_tokens", "synthetic_token_domains",
           "text_file_domains"]


def language_modeling_arrays(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` of token sequences (N, L+1): ``x = s[:, :-1]``, ``y = s[:, 1:]``."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (N, L+1) token ids with L >= 1, got shape "
                         f"{sequences.shape}")
    return sequences[:, :-1].astype(np.int32), sequences[:, 1:].astype(np.int32)


def _markov_sequences(rng: np.random.Generator, transitions: np.ndarray, n: int,
                      length: int) -> np.ndarray:
    vocab = transitions.shape[0]
    out = np.empty((n, length), np.int64)
    out[:, 0] = rng.integers(0, vocab, n)
    cdf = np.cumsum(transitions, axis=1)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        out[:, t] = np.minimum((u > cdf[out[:, t - 1]]).sum(1), vocab - 1)
    return out


def synthetic_token_domains(
    *,
    num_tasks: int = 2,
    vocab_size: int = 16,
    seq_len: int = 16,
    num_train: int = 256,
    num_test: int = 64,
    branching: int = 2,
    seed: int = 0,
) -> Scenario:
    """Tasks of token sequences, each from its own random sparse Markov chain.

    Args:
        num_tasks: Number of domains (tasks).
        vocab_size: Tokens ``0 .. vocab_size - 1``; the model's output width.
        seq_len: Tokens per training example (inputs and targets are both this long).
        num_train: Training sequences per domain.
        num_test: Test sequences per domain.
        branching: Likely successors of each token in a domain (``1``: deterministic).
        seed: Seed of every random draw.

    Returns:
        A ``domain_incremental`` `Scenario` with ``input_shape = (seq_len,)`` and
        ``num_classes = vocab_size``; ``Task.classes`` lists the whole vocabulary.
    """
    for name, value in (("num_tasks", num_tasks), ("vocab_size", vocab_size),
                        ("seq_len", seq_len), ("num_train", num_train),
                        ("num_test", num_test), ("branching", branching)):
        check_positive_int(name, value)
    if branching > vocab_size:
        raise ValueError(f"branching must be <= vocab_size={vocab_size}, got {branching}")
    rng = np.random.default_rng([seed, 7])
    tasks = []
    for t in range(num_tasks):
        transitions = np.full((vocab_size, vocab_size), 0.02 / vocab_size)
        for token in range(vocab_size):
            transitions[token, rng.choice(vocab_size, branching, replace=False)] += 0.98 / branching
        transitions /= transitions.sum(1, keepdims=True)
        x_tr, y_tr = language_modeling_arrays(
            _markov_sequences(rng, transitions, num_train, seq_len + 1))
        x_te, y_te = language_modeling_arrays(
            _markov_sequences(rng, transitions, num_test, seq_len + 1))
        tasks.append(Task(id=t, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                          classes=np.arange(vocab_size, dtype=np.int32)))
    return Scenario(name=f"synthetic_token_domains/v{vocab_size}", kind="domain_incremental",
                    tasks=tuple(tasks), num_classes=vocab_size, input_shape=(seq_len,))


def pack_tokens(ids: np.ndarray | list[int], seq_len: int) -> np.ndarray:
    """Packs a token stream into ``(N, seq_len + 1)`` rows (inputs plus the next token).

    Consecutive rows overlap by one token, so every token after the first is a target
    exactly once; the tail shorter than a full row is dropped (at most ``seq_len`` tokens).
    """
    ids = np.asarray(ids, np.int64)
    check_positive_int("seq_len", seq_len)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for one sequence of "
                         f"seq_len={seq_len} (+1 target)")
    starts = np.arange(n) * seq_len
    return ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def text_file_domains(
    *,
    files: tuple[str, ...] | list[str] | str,
    tokenizer: str = "smollm2-135m",
    seq_len: int = 128,
    test_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    seed: int = 0,
) -> Scenario:
    """One task per local text file, tokenized with a pretrained model's tokenizer.

    Each file is read as UTF-8, tokenized whole, packed into sequences of ``seq_len + 1``
    tokens (:func:`pack_tokens`) and split at random (seeded) into train and test
    sequences. The vocabulary is the tokenizer's, so the scenario fits the pretrained
    model the tokenizer belongs to.

    Args:
        files: Paths (a tuple, or one string with comma-separated paths).
        tokenizer: See :func:`clax.models.tokenizer.load_tokenizer`.
        seq_len: Tokens per example.
        test_fraction: Share of each file's sequences held out (at least one).
        max_train_per_task: Keep at most this many training sequences per file.
        seed: Seed of the split.

    Raises:
        ValueError: A missing or empty file, a file too short for one train and one test
            sequence, or a malformed argument (each naming the setting).
    """
    paths = [p.strip() for p in files.split(",")] if isinstance(files, str) else list(files)
    if not paths or any(not p for p in paths):
        raise ValueError(f"files must name at least one text file, got {files!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if max_train_per_task is not None:
        check_positive_int("max_train_per_task", max_train_per_task)
    tok = load_tokenizer(tokenizer)
    rng = np.random.default_rng([seed, 11])
    tasks = []
    for t, path in enumerate(paths):
        if not os.path.isfile(path):
            raise ValueError(f"text file {path!r} (scenario files[{t}]) does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError(f"text file {path!r} (scenario files[{t}]) is empty")
        rows = pack_tokens(tok.encode(text), seq_len)
        if len(rows) < 2:
            raise ValueError(f"text file {path!r} gives {len(rows)} sequence(s) of seq_len="
                             f"{seq_len}; need at least 2 (one train, one test)")
        order = rng.permutation(len(rows))
        n_test = min(max(1, int(round(test_fraction * len(rows)))), len(rows) - 1)
        test, train = rows[order[:n_test]], rows[order[n_test:]]
        if max_train_per_task is not None:
            train = train[:max_train_per_task]
        x_tr, y_tr = language_modeling_arrays(train)
        x_te, y_te = language_modeling_arrays(test)
        tasks.append(Task(id=t, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                          classes=np.arange(tok.vocab_size, dtype=np.int32)))
    return Scenario(name=f"text_files/{tokenizer}", kind="domain_incremental",
                    tasks=tuple(tasks), num_classes=tok.vocab_size, input_shape=(seq_len,))


# Scenarios built without an image source (config.scenario.name selects them).
TEXT_SCENARIOS = {"synthetic_token_domains": synthetic_token_domains,
                  "text_files": text_file_domains}
