"""PPO runs: `jaxllm ppo --config configs/ppo.py:ARG` (after `jaxllm sft` and `jaxllm reward` in the
same run directory).

ARG is one of:

- `tiny` (default): prompts are signatures and docstrings of stdlib functions held out from the
  SFT and preference sets; after `configs/reward.py:tiny` in `runs/tiny`.
    jaxllm ppo --config configs/ppo.py:tiny
- `real`: prompts of the shared SFT and preference train sets, after `configs/reward.py:real`.
    jaxllm ppo --config configs/ppo.py:real --config.data_root=../shared/data --config.run_dir=runs/shared
- `real_llama2`: `real` rewarded as Llama-2-chat is (Touvron et al. 2023, section 3.2.3): the
  combined reward R_c of the safety and helpfulness reward models of `configs/reward.py:real_safety`
  / `real_helpful` (stages `reward_safety`, `reward_helpful`; the value model starts from the
  helpfulness one), HH-harmless prompts tagged as safety prompts, scores whitened per batch.
    jaxllm ppo --config configs/ppo.py:real_llama2 --config.data_root=../shared/data --config.run_dir=runs/shared
  Measured (32 minutes on 2 shared cores): held-out mean R_c on HH-harmless test prompts 0.067 (SFT)
  -> 0.258, win rate 0.615 against SFT; on OASST 0.509 (level); bench/RESULTS.md.
- `smollm2`: PPO on a published instruct model: policy and reference SmolLM2-135M-Instruct from the
  project's GGUF (`../shared/models`), rewarded by `configs/reward.py:smollm2` (stage `reward` of
  `runs/smollm2`, which also starts the value model), prompts of the shared SFT and preference
  sets in the model's ChatML template (8 iterations x 4 prompts, 32 new tokens, no pretraining mix).
    jaxllm reward --config configs/reward.py:smollm2 --config.data_root=../shared/data
    jaxllm ppo --config configs/ppo.py:smollm2 --config.data_root=../shared/data
  Measured (2026-12-04, 2 cores): 8 iterations in 6 min 0 s (3.5 min of it compiling the
  iteration), ~59 tokens/s; scores stay at the reward model's noise level (|mean| < 0.04, that RM
  is near chance), KL to the reference |kl| < 0.07 nats, clip fraction 0-0.005: it runs the whole
  PPO iteration on a published model, it does not improve it. Peak RSS 24.2 GB (`/usr/bin/time
  -v`): at 8 prompts x 48 new tokens the process was killed for memory at its second iteration, so
  this preset uses 4 x 32 (bench/RESULTS.md).
"""

from jaxllm.train import ppo

SMOLLM2 = "gguf:../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # relative to the repository root
SFT_SETS = ("lima", "oasst_en100", "alpaca_en_demo", "self_instruct_seed", "fastchat_dummy_conversation")
PREF_SETS = ("hh_rlhf_harmless_base", "oasst_en100_rankings", "gsm8k_model_solutions")


def shared_prompts(c) -> None:
    """PPO prompts: the prompts of the shared SFT and preference sets (train; test for evaluation)."""
    for key, split in (("sources", "train"), ("eval_sources", "test")):
        c.prompts[key] = ";".join([f"jsonl:{{data_root}}/sft/{n}/{split}.jsonl" for n in SFT_SETS] +
                                  [f"jsonl:{{data_root}}/preference/{n}/{split}.jsonl" for n in PREF_SETS])


def get_config(arg: str = "tiny"):
    c = ppo.default_config()
    if arg == "tiny":
        c.run_dir = "runs/tiny"
        c.stdlib_tasks = True
        c.prompts.sources = "jsonl:{run_dir}/data/stdlib/prompts/train.jsonl"
        c.prompts.eval_sources = "jsonl:{run_dir}/data/stdlib/prompts/test.jsonl"
        c.prompts.max_prompt_len = 96
        c.ppo.max_new_tokens = 48
        c.train.update(steps=12, batch_size=16)
        c.ppo.update(epochs=2, minibatches=2)
        c.optimizer.update(lr=2e-5, min_lr=2e-6, warmup_steps=8)
    elif arg in ("real", "real_llama2"):
        c.run_dir = "runs/shared"
        shared_prompts(c)
        c.prompts.max_prompt_len = 192
        c.ppo.max_new_tokens = 64
        c.data.sources = "text:{data_root}/pretrain/*/train.txt"
        c.data.seq_len = 256
        c.ppo.ptx_coef = 0.5
        # This reward model's scores span ~0.1 (margins ~0.05): the default 1.0 eos penalty would be
        # all the policy optimises (it learns to stop early, which the reward model does not prefer).
        c.ppo.missing_eos_penalty = 0.0
        c.train.update(steps=40, batch_size=32)
        c.optimizer.update(lr=1e-5, min_lr=1e-6, warmup_steps=20)
        if arg == "real_llama2":
            c.stage = "ppo_llama2"
            c.reward_from, c.safety_reward_from = "reward_helpful", "reward_safety"
            c.prompts.safety_sources = ";".join(f"jsonl:{{data_root}}/preference/hh_rlhf_harmless_base/{split}.jsonl"
                                                for split in ("train", "test"))
            c.ppo.whiten_scores = True
    elif arg == "smollm2":
        c.run_dir = "runs/smollm2"
        c.init_from = SMOLLM2
        c.reward_from = "reward"
        shared_prompts(c)
        c.prompts.max_prompt_len = 128
        c.ppo.max_new_tokens = 32
        c.ppo.missing_eos_penalty = 0.0
        c.train.update(steps=8, batch_size=4)
        c.ppo.update(epochs=2, minibatches=2)
        c.optimizer.update(lr=1e-6, min_lr=1e-7, warmup_steps=2)
    else:
        raise KeyError(f"unknown ppo config {arg!r}; expected tiny, real, real_llama2 or smollm2")
    return c
