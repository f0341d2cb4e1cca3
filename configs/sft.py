"""Supervised fine-tuning runs: `jaxllm sft --config configs/sft.py:ARG` (after `jaxllm pretrain`
with the same `--config.run_dir`).

ARG is one of:

- `tiny` (default): after `configs/pretrain.py:tiny` in `runs/tiny`; SFT on the stdlib task set
  (a function's signature and docstring -> its real body), held-out functions for evaluation.
    jaxllm sft --config configs/sft.py:tiny
- `real`: the shared conversations `DATA_ROOT/sft/{lima,oasst_en100,alpaca_en_demo,
  self_instruct_seed,fastchat_dummy_conversation}` (train splits; test splits held out), after a
  pretraining run on `DATA_ROOT/pretrain/*` (`configs/pretrain.py:shared`) in the same run dir.
    jaxllm sft --config configs/sft.py:real --config.data_root=../shared/data --config.run_dir=runs/shared
- `smollm2`: a published model instead of our own pretraining: SmolLM2-135M-Instruct from the
  project's GGUF (`../shared/models`; run from the repository root), fine-tuned on the same five
  conversation sets in its own ChatML template (seq 256, 40 steps x 8 conversations, lr 2e-5),
  held-out loss on the test splits before and after, into `runs/smollm2`.
    jaxllm sft --config configs/sft.py:smollm2 --config.data_root=../shared/data
  Measured (2026-12-04, 2 cores shared with a test run): held-out loss on the first 64 test
  conversations 2.860 -> 2.733 nats/token (token accuracy 0.427 -> 0.441), train loss 2.53 -> 2.17,
  40 steps in 6 min 53 s (~8.5 s/step, 180-280 tokens/s); bench/RESULTS.md.
"""

from jaxllm.train import sft

SMOLLM2 = "gguf:../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # relative to the repository root
SFT_SETS = ("lima", "oasst_en100", "alpaca_en_demo", "self_instruct_seed", "fastchat_dummy_conversation")


def get_config(arg: str = "tiny"):
    c = sft.default_config()
    if arg == "tiny":
        c.run_dir = "runs/tiny"
        c.stdlib_tasks = True
        c.data.sources = "jsonl:{run_dir}/data/stdlib/sft/train.jsonl"
        c.data.eval_sources = "jsonl:{run_dir}/data/stdlib/sft/test.jsonl"
        c.data.seq_len = 256
        c.train.update(steps=80, batch_size=8, eval_every=0, eval_batches=16, log_every=10)
        c.optimizer.update(lr=5e-4, min_lr=5e-5, warmup_steps=15)
        c.sample.prompts = ("Complete the body of this Python function.\n\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"",)
    elif arg == "real":
        c.run_dir = "runs/shared"
        c.data.sources = ";".join(f"jsonl:{{data_root}}/sft/{name}/train.jsonl" for name in SFT_SETS)
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/sft/{name}/test.jsonl" for name in SFT_SETS)
        c.data.seq_len = 512
        c.train.update(steps=300, batch_size=16, eval_every=100, log_every=20, eval_at_start=True)
        c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=30)
        c.sample.prompts = ("What is the capital of France?", "Give me three tips for staying healthy.")
    elif arg == "smollm2":
        c.run_dir = "runs/smollm2"
        c.init_from = SMOLLM2
        c.data.sources = ";".join(f"jsonl:{{data_root}}/sft/{name}/train.jsonl" for name in SFT_SETS)
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/sft/{name}/test.jsonl" for name in SFT_SETS)
        c.data.seq_len = 256
        c.train.update(steps=40, batch_size=8, eval_every=0, eval_batches=8, log_every=5, eval_at_start=True)
        c.optimizer.update(lr=2e-5, min_lr=2e-6, warmup_steps=5)
        c.checkpoint.every_steps = 20
        c.sample.prompts = ("What is the capital of France?",)
    else:
        raise KeyError(f"unknown sft config {arg!r}; expected tiny, real or smollm2")
    return c
