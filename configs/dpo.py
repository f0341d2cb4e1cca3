"""DPO runs: `jaxllm dpo --config configs/dpo.py:ARG` (after `jaxllm sft` in the same run directory).

ARG is one of:

- `tiny` (default): the stdlib preference pairs (real body over another function's body), after
  `configs/sft.py:tiny` in `runs/tiny`.
    jaxllm dpo --config configs/dpo.py:tiny
- `real`: `DATA_ROOT/preference/{hh_rlhf_harmless_base, oasst_en100_rankings,
  gsm8k_model_solutions, llamafactory_dpo_en_demo}` pairs, with held-out pairs per test split.
    jaxllm dpo --config configs/dpo.py:real --config.data_root=../shared/data --config.run_dir=runs/shared
"""

from jaxllm.train import dpo

REAL_SETS = ("hh_rlhf_harmless_base", "oasst_en100_rankings", "gsm8k_model_solutions", "llamafactory_dpo_en_demo")


def get_config(arg: str = "tiny"):
    c = dpo.default_config()
    if arg == "tiny":
        c.run_dir = "runs/tiny"
        c.stdlib_tasks = True
        c.data.sources = "jsonl:{run_dir}/data/stdlib/preference/train.jsonl"
        c.data.eval_sources = "jsonl:{run_dir}/data/stdlib/preference/test.jsonl"
        c.data.seq_len = 256
        c.train.update(steps=60, batch_size=8, eval_every=0, eval_batches=16, log_every=10)
        c.optimizer.update(lr=5e-5, min_lr=5e-6, warmup_steps=10)
        c.sample.prompts = ()
    elif arg == "real":
        c.run_dir = "runs/shared"
        c.data.sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/train.jsonl" for name in REAL_SETS)
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/test.jsonl" for name in REAL_SETS)
        c.data.seq_len = 512
        c.train.update(steps=150, batch_size=16, eval_every=0, log_every=10)
        c.optimizer.update(lr=5e-5, min_lr=5e-6, warmup_steps=15)
        c.sample.prompts = ("What is the capital of France?",)
    else:
        raise KeyError(f"unknown dpo config {arg!r}; expected tiny or real")
    return c
