"""DPO runs: `jaxllm dpo --config configs/dpo.py:ARG` (after `jaxllm sft` in the same run directory).

ARG is one of:

- `tiny` (default): the stdlib preference pairs (real body over another function's body), after
  `configs/sft.py:tiny` in `runs/tiny`.
    jaxllm dpo --config configs/dpo.py:tiny
- `real`: `DATA_ROOT/preference/{hh_rlhf_harmless_base, oasst_en100_rankings,
  gsm8k_model_solutions, llamafactory_dpo_en_demo}` pairs, with held-out pairs per test split.
    jaxllm dpo --config configs/dpo.py:real --config.data_root=../shared/data --config.run_dir=runs/shared
- `smollm2`: Zephyr's recipe on a published instruct model: DPO from SmolLM2-135M-Instruct (the
  project's GGUF, `../shared/models`; also the reference) on the `real` pairs in its ChatML
  template (seq 256, 30 steps x 4 pairs, beta 0.1, lr 5e-6), held-out preference accuracy on
  the OASST and LLaMA-Factory test pairs, into `runs/smollm2`.
    jaxllm dpo --config configs/dpo.py:smollm2 --config.data_root=../shared/data
  Measured (2026-12-04, 2 shared cores, ~12 s/step): held-out DPO loss 0.6931 -> 0.6907, reward
  margin +0.0052, preference accuracy 0.54 (OASST 17/32, LLaMA-Factory 4/7 pairs that fit 256
  tokens); a CPU-sized smoke run of the recipe, not a converged one (bench/RESULTS.md).
"""

from jaxllm.train import dpo

SMOLLM2 = "gguf:../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # relative to the repository root
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
    elif arg == "smollm2":
        c.run_dir = "runs/smollm2"
        c.init_from = SMOLLM2
        c.data.sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/train.jsonl" for name in REAL_SETS)
        # The reference log-probs of every eval pair are computed up front: the two small test sets.
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/test.jsonl"
                                       for name in ("oasst_en100_rankings", "llamafactory_dpo_en_demo"))
        c.data.seq_len = 256
        c.train.update(steps=30, batch_size=4, eval_every=0, eval_batches=8, log_every=5, eval_at_start=True)
        c.optimizer.update(lr=5e-6, min_lr=5e-7, warmup_steps=5)
        c.sample.prompts = ("What is the capital of France?",)
    else:
        raise KeyError(f"unknown dpo config {arg!r}; expected tiny, real or smollm2")
    return c
