"""Causal-LM pretraining runs: `jaxllm pretrain --config configs/pretrain.py:ARG`.

ARG is one of:

- `tiny` (default): BPE 4096 tokenizer and a 5.2M-parameter decoder on the embedded default corpus
  (the Python standard library's source files). 2 min 39 s on 2 quiet CPU cores from an empty run
  directory, tokenizer included (2026-12-02; held-out loss 4.46).
    jaxllm pretrain --config configs/pretrain.py:tiny
- `shakespeare_char`: nanoGPT's CPU "baby GPT" on Tiny Shakespeare characters (block 64,
  batch 12, 4 layers, 4 heads, width 128, 2000 iterations, lr 1e-3 -> 1e-4, no dropout).
  Expected: validation loss <= 1.88 (see bench/RESULTS.md for time and tokens/s).
    jaxllm pretrain --config configs/pretrain.py:shakespeare_char --config.data_root=../shared/data
- `shared`: a word-piece (BPE 8192) model trained on all of `DATA_ROOT/pretrain/*`.
    jaxllm pretrain --config configs/pretrain.py:shared --config.data_root=../shared/data
- a model preset from `jaxllm.models.llama.PRESETS` (`llama2_7b`, `llama3_8b`, `mistral_7b`,
  `qwen2_5_0_5b`, `qwen2_5_1_5b`, `qwen2_5_7b`): that architecture's shape with bf16 compute,
  scanned layers and full rematerialisation, for pod runs and ahead-of-time fitting.
"""

from jaxllm.models import llama
from jaxllm.train import pretrain

PRETRAIN_SETS = ("tinyshakespeare", "botchan", "nltk_gutenberg", "c4_en_sample",
                 "us_state_of_the_union", "us_inaugural_addresses")


def get_config(arg: str = "tiny"):
    c = pretrain.default_config()
    c.run_dir = f"runs/{arg}"

    if arg == "tiny":
        c.tokenizer.vocab_size = 4096
        c.tokenizer.input_sentence_size = 200_000
        c.model.update(llama.PRESETS["tiny"])
        c.data.seq_len = 256
        c.train.update(steps=200, batch_size=8, eval_every=100, eval_batches=8, log_every=10)
        c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=20)
        c.checkpoint.every_steps = 100
        c.sample.prompts = ("def ", "import ")

    elif arg == "shakespeare_char":
        c.tokenizer.update(model_type="char", byte_fallback=False, vocab_size=128, num_sentinels=0)
        c.data.sources = "text:{data_root}/pretrain/tinyshakespeare/train.txt"
        c.data.eval_sources = "text:{data_root}/pretrain/tinyshakespeare/validation.txt"
        c.data.seq_len = 64
        c.model.update(llama.PRESETS["baby_gpt"])
        c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_steps=100, b2=0.99, weight_decay=0.1, grad_clip=1.0)
        c.train.update(steps=2000, batch_size=12, eval_every=250, eval_batch_size=64, log_every=50)
        c.checkpoint.every_steps = 1000
        c.sample.prompts = ("ROMEO:\n",)
        c.sample.max_new_tokens = 200

    elif arg == "shared":
        c.tokenizer.vocab_size = 8192
        c.data.sources = ";".join(f"text:{{data_root}}/pretrain/{name}/train.txt" for name in PRETRAIN_SETS)
        c.data.eval_sources = ";".join(f"text:{{data_root}}/pretrain/{name}/validation.txt" for name in PRETRAIN_SETS)
        c.model.update(llama.PRESETS["tiny"])
        c.data.seq_len = 256
        c.train.update(steps=1000, batch_size=16, eval_every=250, eval_batches=40, log_every=25)
        c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=100)
        c.sample.prompts = ("The ", "Once upon a time")

    elif arg in llama.PRESETS:
        c.model.update(llama.PRESETS[arg])
        c.model.update(dtype="bfloat16", scan_layers=True, remat_policy="full")
        c.data.seq_len = 4096
        c.train.update(steps=100_000, batch_size=256, eval_every=2000, eval_batches=50)
        c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=2000)

    else:
        raise KeyError(f"unknown pretrain config {arg!r}; expected tiny, shakespeare_char, shared or one of "
                       f"{sorted(llama.PRESETS)}")
    return c
