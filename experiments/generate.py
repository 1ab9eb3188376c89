r"""Text generation with a pretrained LM (greedy by default; KV cache, one compile).

    python -m experiments.generate --model=smollm2-135m --prompt="The capital of Spain is"
    python -m experiments.generate --chat --prompt="Name three primary colours." \
        --max_new_tokens=48 --temperature=0.7 --top_k=40

``--chat`` wraps the prompt in the model's chat template (SmolLM2-Instruct: ChatML).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Pretrained model name, .gguf file or HF dir.")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample from the top-k tokens only (0: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", False, "Apply the chat template.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
flags.mark_flags_as_required(["prompt"])


def main(argv: list[str]) -> None:
    del argv
    from clax.models.generate import generate_text
    from clax.models.llama_io import load_pretrained

    try:
        model, tokenizer = load_pretrained(FLAGS.model, dtype=FLAGS.dtype,
                                           param_dtype=FLAGS.dtype, max_len=2048)
        t0 = time.perf_counter()
        text = generate_text(model, tokenizer, FLAGS.prompt,
                             max_new_tokens=FLAGS.max_new_tokens, chat=FLAGS.chat,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                             seed=FLAGS.seed)
    except (ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"generated in {time.perf_counter() - t0:.1f} s (compile included)", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    app.run(main)
