"""Token packing and the text-file scenario (one task per local file)."""

import numpy as np
import pytest

from clax.data.text import pack_tokens, text_file_domains


def test_pack_tokens_targets_every_token_once():
    ids = np.arange(23)
    rows = pack_tokens(ids, 5)
    assert rows.shape == (4, 6)
    targets = rows[:, 1:].ravel().tolist()
    assert targets == list(range(1, 21))  # the tail of < seq_len tokens is dropped
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # rows overlap by one token
    with pytest.raises(ValueError, match="too short"):
        pack_tokens(np.arange(4), 5)


def test_text_file_domains(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gguf")
    try:
        from clax.models.gguf import smollm2_gguf_path
        smollm2_gguf_path()
    except ImportError as e:
        pytest.skip(str(e))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    b.write_text("def f(x):\n    return x + 1\n" * 40)
    s = text_file_domains(files=f"{a},{b}", seq_len=16, test_fraction=0.25)
    again = text_file_domains(files=(str(a), str(b)), seq_len=16, test_fraction=0.25)
    assert s.num_tasks == 2 and s.input_shape == (16,) and s.num_classes == 49152
    for t, u in zip(s.tasks, again.tasks, strict=True):
        np.testing.assert_array_equal(t.x_train, u.x_train)  # deterministic split
        np.testing.assert_array_equal(t.x_train[:, 1:], t.y_train[:, :-1])  # next token
        assert len(t.x_test) >= 1 and len(t.x_train) >= 1
    with pytest.raises(ValueError, match="does not exist"):
        text_file_domains(files=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        text_file_domains(files=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("Hi there.")
    with pytest.raises(ValueError, match="too short"):
        text_file_domains(files=str(tmp_path / "short.txt"), seq_len=16)
