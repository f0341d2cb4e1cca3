"""A tiny pretraining config for fast tests: `jaxllm pretrain --config tests/configs/small.py`.

A char tokenizer and a 2-layer, width-32 decoder (~29K parameters) reading `train.txt` and
`val.txt` under `--config.data_root` (the tests write a few KB of text there); set
`--config.run_dir` too. 12 steps of 4 x 16 tokens, a metrics row every step, an evaluation every 3
steps and a checkpoint every 4 (tests/test_resume.py aims its signals at these windows). A
finished run takes ~7 s on 2 CPU cores once XLA's compilations are cached, ~20 s before.

ARG: `default`, or `noeval` (no eval split, no evaluation).
"""

from jaxllm.train import pretrain


def get_config(arg: str = "default"):
    c = pretrain.default_config()
    c.run_dir = "runs/small"
    c.data_root = "."
    c.tokenizer.update(model_type="char", byte_fallback=False, vocab_size=128, num_sentinels=0)
    c.data.update(sources="text:{data_root}/train.txt", eval_sources="text:{data_root}/val.txt",
                  seq_len=16, tokenize_threads=1)
    c.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
    c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=2)
    c.train.update(steps=12, batch_size=4, eval_every=3, eval_batches=2, log_every=1, progress_bar=False)
    c.checkpoint.update(every_steps=4, every_minutes=0.0, keep=3)
    c.sample.update(prompts=("the ",), max_new_tokens=8)
    if arg == "noeval":
        c.data.eval_sources = ""
        c.train.eval_every = 0
    elif arg != "default":
        raise KeyError(f"unknown small config {arg!r}; expected default or noeval")
    return c
