"""Tiny span-corruption configs for fast tests: `jaxllm pretrain --config tests/configs/small_t5.py:ARG`.

A char tokenizer with 100 sentinels reading `train.txt` and `val.txt` under `--config.data_root`
(the tests write a few KB of text there); set `--config.run_dir` too. 10 steps of batch 4, a
metrics row every step, an evaluation every 5 steps.

ARG: `t5` (a width-32 T5, 1+1 layers, T5 span corruption, 32 encoder / 8 decoder tokens per row)
or `prefix_lm` (a width-32, 2-layer decoder-only prefix LM on a 3-denoiser UL2 mixture with mode
tokens, 48 tokens per row).
"""

from jaxllm.train import pretrain_t5


def get_config(arg: str = "t5"):
    if arg not in ("t5", "prefix_lm"):
        raise KeyError(f"unknown small_t5 config {arg!r}; expected t5 or prefix_lm")
    c = pretrain_t5.default_config("t5" if arg == "t5" else "llama")
    c.run_dir = "runs/small_t5"
    c.data_root = "."
    c.tokenizer.update(model_type="char", byte_fallback=False, vocab_size=256, num_sentinels=100)
    c.data.update(sources="text:{data_root}/train.txt", eval_sources="text:{data_root}/val.txt", tokenize_threads=1)
    if arg == "t5":
        c.model.update(embed_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, head_dim=16,
                       mlp_dim=64)
        c.data.inputs_length = 32
    else:
        c.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
        c.data.update(inputs_length=48, denoisers="R(3,0.15) X(8,0.5) S(0.25)")
    c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=2)
    c.train.update(steps=10, batch_size=4, eval_every=5, eval_batches=2, log_every=1, progress_bar=False)
    c.checkpoint.update(every_steps=5, every_minutes=0.0, keep=2)
    c.sample.update(num_examples=1, raw_tokens=24, max_new_tokens=12)
    return c
