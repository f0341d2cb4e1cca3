"""Reward-model runs: `jaxllm reward --config configs/reward.py:ARG` (after `jaxllm sft` in the
same run directory).

ARG is one of:

- `tiny` (default): pairs from the stdlib task set (the real function body is preferred over
  the body of a different function), after `configs/sft.py:tiny` in `runs/tiny`.
    jaxllm reward --config configs/reward.py:tiny
- `real`: one reward model on `DATA_ROOT/preference/{hh_rlhf_harmless_base, oasst_en100_rankings,
  gsm8k_model_solutions}` train splits mixed 2:1:1 (HH-harmless weighted up: it prefers the
  shorter answer where the other two prefer the longer one; 400 steps x 8 pairs, lr 1e-4);
  held-out accuracy on each test split.
    jaxllm reward --config configs/reward.py:real --config.data_root=../shared/data --config.run_dir=runs/shared
- `real_rankings`: the same with OASST's human rankings as K-wise groups (InstructGPT's loss).
- `real_safety` / `real_helpful`: Llama-2's two reward models (Touvron et al. 2023, section
  3.2.2: helpfulness and safety preferences pull against each other, so each gets its own RM).
  Safety: HH-harmless alone (seq 256, 260 steps x 16 pairs = 2 epochs, lr 1e-4). Helpfulness:
  OASST and GSM8K solutions mixed 1:1 (seq 512, 300 steps x 8 pairs, lr 1e-4); it is also
  evaluated on HH-harmless to show the tension. They write stages `reward_safety` and
  `reward_helpful` of the run, which `jaxllm score` combines into Llama-2's one reward R_c (the
  safety score on safety prompts and below probability 0.15, else the helpfulness score):
    jaxllm reward --config configs/reward.py:real_safety --config.data_root=../shared/data --config.run_dir=runs/shared
    jaxllm reward --config configs/reward.py:real_helpful --config.data_root=../shared/data --config.run_dir=runs/shared
    jaxllm score --run runs/shared --stage reward_helpful --safety_stage reward_safety --safety_prompts --input ../shared/data/preference/hh_rlhf_harmless_base/test.jsonl
  (the same without `--safety_prompts` for the OASST and GSM8K test files). Measured: bench/RESULTS.md.
- `smollm2`: a reward model on a published backbone: SmolLM2-135M-Instruct from the project's GGUF
  (`../shared/models`) with a fresh scalar head, on the `real` 2:1:1 pairs in its ChatML template
  (seq 256, 40 steps x 4 pairs, lr 1e-5), into `runs/smollm2` (stage `reward`).
    jaxllm reward --config configs/reward.py:smollm2 --config.data_root=../shared/data
  Measured (2026-12-04, 2 shared cores, 9 min): on the first 32 test pairs of each set, accuracy
  HH-harmless 0.469 -> 0.469, OASST 0.656 -> 0.594, GSM8K 0.563 -> 0.656 (all 0.563 -> 0.573, loss
  0.6922 -> 0.6916): 160 training pairs move a fresh head little; a CPU-sized smoke run of the
  stage on a published backbone, not a useful reward model (bench/RESULTS.md).
"""

from jaxllm.train import reward

SMOLLM2 = "gguf:../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # relative to the repository root
REAL_SETS = ("hh_rlhf_harmless_base", "oasst_en100_rankings", "gsm8k_model_solutions")


def get_config(arg: str = "tiny"):
    c = reward.default_config()
    if arg == "tiny":
        c.run_dir = "runs/tiny"
        c.stdlib_tasks = True
        c.data.sources = "jsonl:{run_dir}/data/stdlib/preference/train.jsonl"
        c.data.eval_sources = "jsonl:{run_dir}/data/stdlib/preference/test.jsonl"
        c.data.seq_len = 256
        c.train.update(steps=80, batch_size=8, eval_every=0, eval_batches=16, log_every=10)
        c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=15)
    elif arg in ("real", "real_rankings"):
        c.run_dir = "runs/shared"
        c.data.sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/train.jsonl@{weight}"
                                  for name, weight in zip(REAL_SETS, (2, 1, 1)))
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/test.jsonl" for name in REAL_SETS)
        c.data.seq_len = 512
        c.train.update(steps=400, batch_size=8, eval_every=200, log_every=20, eval_at_start=True)
        c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=30)
        if arg == "real_rankings":
            c.data.max_responses = 9
            c.data.sources = c.data.sources.replace("oasst_en100_rankings/train.jsonl",
                                                    "oasst_en100_rankings/train.jsonl#rankings")
    elif arg == "real_safety":
        c.run_dir = "runs/shared"
        c.stage = "reward_safety"
        c.data.sources = "jsonl:{data_root}/preference/hh_rlhf_harmless_base/train.jsonl"
        c.data.eval_sources = "jsonl:{data_root}/preference/hh_rlhf_harmless_base/test.jsonl"
        c.data.seq_len = 256
        c.train.update(steps=260, batch_size=16, eval_every=65, log_every=20, eval_at_start=True)
        c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=20)
    elif arg == "real_helpful":
        c.run_dir = "runs/shared"
        c.stage = "reward_helpful"
        c.data.sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/train.jsonl@1" for name in REAL_SETS[1:])
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/test.jsonl" for name in REAL_SETS)
        c.data.seq_len = 512
        c.train.update(steps=300, batch_size=8, eval_every=100, log_every=20, eval_at_start=True)
        c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=20)
    elif arg == "smollm2":
        c.run_dir = "runs/smollm2"
        c.init_from = SMOLLM2
        c.data.sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/train.jsonl@{weight}"
                                  for name, weight in zip(REAL_SETS, (2, 1, 1)))
        c.data.eval_sources = ";".join(f"jsonl:{{data_root}}/preference/{name}/test.jsonl" for name in REAL_SETS)
        c.data.seq_len = 256
        c.train.update(steps=40, batch_size=4, eval_every=0, eval_batches=8, log_every=5, eval_at_start=True)
        c.optimizer.update(lr=1e-5, min_lr=1e-6, warmup_steps=5)
    else:
        raise KeyError(f"unknown reward config {arg!r}; expected tiny, real, real_rankings, real_safety, "
                       f"real_helpful or smollm2")
    return c
