"""Decode throughput: KV-cache sampling (`jaxllm.sampling.sample`) against full recompute per step.

The peer is the previous sampler: every step runs the whole forward pass over a fixed
`prompt + new` token buffer and reads the logits of each row's last token. Both decode greedily
(no stop ids, so both generate exactly `--new_tokens`) from the same random prompts with the same
random parameters, in one process; the script checks they emit the same tokens and prints
generated tokens per second (prefill included), best of `--repeats` runs after a compile run, and
the ratio.

Model: the `tiny` preset shape (width 256, 4 layers, 4 query / 2 kv heads, SwiGLU 768) with a
4096-token vocabulary, float32.

    python bench/decode_throughput.py [--batch_sizes 1,8] [--prompt_len 64] [--new_tokens 256]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import best_seconds

from jaxllm import sampling
from jaxllm.models import llama


@functools.partial(jax.jit, static_argnames=("model_config", "new_tokens"))
def recompute_greedy(model_config, params, tokens, *, new_tokens):
    """Greedy decoding by a full forward over the `[batch, prompt + new]` buffer at every step."""
    batch, prompt_len = tokens.shape
    total = prompt_len + new_tokens
    buf = jnp.concatenate([tokens, jnp.zeros((batch, new_tokens), jnp.int32)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
    segment_ids = jnp.ones((batch, total), jnp.int32)

    def body(t, buf):
        logits = llama.apply(model_config, params, buf, positions, segment_ids)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len + t - 1, axis=1, keepdims=False)
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, prompt_len + t))

    return jax.lax.fori_loop(0, new_tokens, body, buf)[:, prompt_len:]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    """`(best seconds of `repeats` calls after a warm-up call, the output)` of a JAX function."""
    seconds = best_seconds(lambda: jax.block_until_ready(fn()), repeats)
    return seconds, np.asarray(fn())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    c = llama.preset("tiny")
    c.vocab_size = args.vocab_size
    cfg = llama.LlamaConfig.from_config(c)
    params = nn.unbox(jax.jit(llama.init, static_argnums=0)(cfg, jax.random.key(0)))
    # Wider weights than the 0.02 init so greedy choices are not near-ties between the two methods.
    params = jax.tree.map(lambda x: x * (1.0 if x.ndim == 1 else 10.0), params)

    print(f"date: {datetime.date.today()}  machine: {platform.machine()} {os.cpu_count()} CPU cores, "
          f"{jax.devices()[0].device_kind}  jax {jax.__version__}")
    print(f"model: tiny preset shape, vocab {cfg.vocab_size}, {llama.count_params(cfg):,} params; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"{'batch':>5} {'kv-cache tok/s':>15} {'recompute tok/s':>16} {'ratio':>7}  same tokens")
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        tokens = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        lengths = np.full((batch,), args.prompt_len, np.int32)
        cached_s, cached = timed(lambda: sampling.sample(
            cfg, params, tokens, lengths, jax.random.key(0), max_new_tokens=args.new_tokens,
            temperature=0.0).tokens, args.repeats)
        full_s, full = timed(
            lambda: recompute_greedy(cfg, params, jnp.asarray(tokens), new_tokens=args.new_tokens), args.repeats)
        generated = batch * args.new_tokens
        print(f"{batch:>5} {generated / cached_s:>15.1f} {generated / full_s:>16.1f} {full_s / cached_s:>6.1f}x  "
              f"{bool((cached == full).all())}")


if __name__ == "__main__":
    main()
