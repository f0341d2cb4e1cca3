"""The whole recipe in one run directory: `jaxllm pipeline --config configs/pipeline.py:ARG`.

tokenizer -> pretrain -> SFT -> reward model -> PPO and DPO -> evaluation (`report.md`).

ARG is one of:

- `tiny` (default, README's main command): every stage on the embedded default corpus, the
  Python standard library (pretraining on its source files; SFT from function signatures and
  docstrings to their real bodies; preference pairs real body vs another function's body; PPO and
  evaluation prompts from held-out functions). Measured: 8.0 minutes on 2 quiet CPU cores from
  an empty run directory (bench/RESULTS.md, "Main job timing").
    jaxllm pipeline --config configs/pipeline.py:tiny
- `real`: the shared data bundle: pretraining on `pretrain/*`, SFT on `sft/*`, reward on
  `preference/*`, PPO prompts from the SFT and preference prompts (see README for the runtime).
    jaxllm pipeline --config configs/pipeline.py:real --config.data_root=../shared/data

Any stage setting can be overridden: `--config.sft.train.steps=50`, `--config.ppo.ppo.kl_coef=0.1`.
"""

import ml_collections

from jaxllm import evaluation, sharding
from jaxllm.config import load_config_file


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "real"):
        raise KeyError(f"unknown pipeline config {arg!r}; expected tiny or real")
    stage_arg = {"tiny": "tiny", "real": "real"}[arg]
    c = ml_collections.ConfigDict()
    c.run_dir = f"runs/pipeline_{arg}"
    c.data_root = "../shared/data"
    c.seed = 0
    c.mesh = sharding.default_config()
    c.distributed = sharding.distributed_config()
    c.stages = ("pretrain", "sft", "reward", "ppo", "dpo")
    c.pretrain = load_config_file(f"configs/pretrain.py:{'tiny' if arg == 'tiny' else 'shared'}")
    for stage in ("sft", "reward", "ppo", "dpo"):
        c[stage] = load_config_file(f"configs/{stage}.py:{stage_arg}")
    c.eval = evaluation.default_config()
    if arg == "tiny":
        c.eval.prompts.eval_sources = "jsonl:{run_dir}/data/stdlib/prompts/test.jsonl"
        c.eval.prompts.max_prompt_len = c.ppo.prompts.max_prompt_len
        c.eval.max_new_tokens = c.ppo.ppo.max_new_tokens
        c.eval.num_prompts = 32
    else:
        c.eval.prompts.eval_sources = c.ppo.prompts.eval_sources
        c.eval.prompts.max_prompt_len = c.ppo.prompts.max_prompt_len
        c.eval.max_new_tokens = c.ppo.ppo.max_new_tokens
        c.eval.num_prompts = 128
    return c
