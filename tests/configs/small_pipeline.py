"""A miniature of `configs/pipeline.py:tiny` for tests: `jaxllm pipeline --config tests/configs/small_pipeline.py`.

Every stage runs on the embedded stdlib corpus as in the real preset, with a BPE 512 tokenizer, a
2-layer width-32 decoder and a handful of steps per stage, so the whole recipe (tokenizer ->
pretrain -> SFT -> reward -> PPO -> DPO -> eval) finishes in about two minutes on 2 CPU cores.
Checkpoints every 2 steps give tests/test_pipeline.py windows to kill a stage between saves.
Set `--config.run_dir`.
"""

from jaxllm.config import load_config_file


def get_config(arg: str = ""):
    del arg
    c = load_config_file("configs/pipeline.py:tiny")
    c.run_dir = "runs/small_pipeline"
    model = dict(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
    c.pretrain.tokenizer.update(vocab_size=512, input_sentence_size=20_000)
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
        s = c[stage]
        s.model.update(model)
        s.train.update(eval_batches=2, log_every=1, progress_bar=False)
        s.optimizer.update(warmup_steps=1)
        s.checkpoint.update(every_steps=2, every_minutes=0.0)
        if stage != "pretrain":
            s.stdlib_max_examples = 64
    c.pretrain.data.seq_len = 64
    c.pretrain.train.update(steps=8, batch_size=8, eval_every=4)
    c.pretrain.sample.update(prompts=("def ",), max_new_tokens=8)
    for stage in ("sft", "reward", "dpo"):
        c[stage].data.seq_len = 96
        c[stage].train.update(steps=6, batch_size=4, eval_every=3)
    c.sft.sample.max_new_tokens = 8
    c.ppo.prompts.max_prompt_len = 48
    c.ppo.ppo.update(max_new_tokens=8, epochs=2, minibatches=2, ptx_coef=0.5, ptx_batch_size=2)
    c.ppo.data.seq_len = 32
    c.ppo.train.update(steps=4, batch_size=4)
    c.eval.update(num_prompts=8, batch_size=4, max_new_tokens=8, samples_in_report=2)
    c.eval.prompts.max_prompt_len = 48
    return c
