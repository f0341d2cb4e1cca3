"""Chunked LM cross-entropy (`model.loss_chunk_size`): compiled memory and step time against the
unchunked loss, measured in the same run.

1. Memory: XLA's `memory_analysis().temp_size_in_bytes` of the jitted loss + gradient
   (`pretrain.lm_loss_fn`, gradient w.r.t. all params) at a realistic shape, compiled for the local
   backend and never run: by default llama3_8b's vocabulary (128256) and layer shape (embed 4096,
   32 / 8 heads, MLP 14336) at 1 layer, batch 1 x 8192 tokens. The float32 logits alone are
   `batch * length * vocab * 4` bytes (4.2 GB here).
2. Speed: ms per loss + gradient of a small model on this machine, chunked and not (the backward
   pass computes the head matmul once more per chunk).

    python bench/chunked_loss.py [--chunks 0,512,1024,2048] [--layers 1] [--length 8192]
        [--speed-chunks 0,128,512] [--speed-shape 4x512]

`--layers 0` leaves only the embedding, final norm, LM head and loss: the part chunking changes.
With layers, XLA's CPU attention materialises `[batch, heads, length, length]` float32 scores
(8 GiB per copy at 32 heads x 8192), which then sets the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from timing import best_seconds  # noqa: E402

from jaxllm.models import llama  # noqa: E402
from jaxllm.train import pretrain  # noqa: E402


def grad_fn(cfg: llama.LlamaConfig):
    loss_fn = pretrain.lm_loss_fn(cfg)
    return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))


def batch_shapes(batch: int, length: int) -> dict:
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return dict(inputs=ids, positions=ids, segment_ids=ids, targets=ids,
                loss_mask=jax.ShapeDtypeStruct((batch, length), jnp.float32))


def temp_bytes(cfg: llama.LlamaConfig, batch: int, length: int) -> int:
    """Temporary (non-argument, non-output) bytes XLA plans for one loss + gradient."""
    params = jax.eval_shape(lambda: nn.unbox(llama.init(cfg, jax.random.key(0))))
    return grad_fn(cfg).lower(params, batch_shapes(batch, length)).compile().memory_analysis().temp_size_in_bytes


def step_ms(cfg: llama.LlamaConfig, batch: int, length: int, repeats: int) -> float:
    params = nn.unbox(llama.init(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    data = dict(inputs=tokens, positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
                segment_ids=jnp.ones_like(tokens), targets=jnp.roll(tokens, -1, axis=1),
                loss_mask=jnp.ones((batch, length), jnp.float32))
    fn = grad_fn(cfg)
    return 1e3 * best_seconds(lambda: jax.block_until_ready(fn(params, data)), repeats=repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="0,512,1024,2048", help="loss_chunk_size values for the memory table")
    ap.add_argument("--preset", default="llama3_8b")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the memory model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--speed-chunks", default="0,128,512", help="loss_chunk_size values for the speed table ('' skips it)")
    ap.add_argument("--speed-shape", default="4x512", help="batch x length of the speed model")
    ap.add_argument("--speed-vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")

    c = llama.preset(args.preset)
    c.num_layers = args.layers
    cfg = llama.LlamaConfig.from_config(c)
    logits = args.batch * args.length * cfg.vocab_size * 4
    print(f"\nmemory: {args.preset} shape, {args.layers} layer(s), vocab {cfg.vocab_size}, batch {args.batch} x "
          f"{args.length}; float32 logits {logits / 2**30:.2f} GiB")
    print("| loss_chunk_size | temp GiB | temp / logits |\n| ---: | ---: | ---: |")
    for chunk in map(int, args.chunks.split(",")):
        temp = temp_bytes(dataclasses.replace(cfg, loss_chunk_size=chunk), args.batch, args.length)
        print(f"| {chunk or 'off'} | {temp / 2**30:.2f} | {temp / logits:.2f} |", flush=True)

    if not args.speed_chunks:
        return
    batch, length = map(int, args.speed_shape.split("x"))
    c = llama.preset("tiny")
    c.vocab_size = args.speed_vocab
    small = llama.LlamaConfig.from_config(c)
    print(f"\nspeed: tiny preset (4 x 256), vocab {small.vocab_size}, batch {batch} x {length}, loss + grad")
    print("| loss_chunk_size | ms/step | vs off |\n| ---: | ---: | ---: |")
    base = None
    for chunk in map(int, args.speed_chunks.split(",")):
        ms = step_ms(dataclasses.replace(small, loss_chunk_size=chunk), batch, length, args.repeats)
        base = base or ms
        print(f"| {chunk or 'off'} | {ms:.1f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
