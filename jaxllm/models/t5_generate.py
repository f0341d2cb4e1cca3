"""T5 decoding: encode each input once, then decode with the decoder's KV cache (`t5.init_cache`,
`t5.decode_step`) in one jitted `while_loop`, greedy or sampled at a temperature.

The decoder-only models decode through `jaxllm.sampling`; this is T5's counterpart (span-corruption
sentinel fills in `jaxllm.train.pretrain_t5`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding
from jaxllm.models import t5


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature"))
def _generate(config: t5.T5Config, params, tokens, segment_ids, positions, rng, eos_id, start_id, *,
              max_new_tokens: int, temperature: float):
    batch = tokens.shape[0]
    encoded = t5.encode(config, params, tokens, segment_ids, positions)
    cache = t5.init_cache(config, params, encoded, segment_ids, max_new_tokens)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(state):
        t, _, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, last, cache, done, out = state
        logits, cache = t5.decode_step(config, params, last, ones * t, ones, cache)
        logits = logits[:, -1]
        if temperature > 0:
            nxt = jax.random.categorical(jax.random.fold_in(rng, t), logits / temperature)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        out = out.at[:, t].set(nxt)
        return t + 1, nxt[:, None], cache, done | (nxt == eos_id), out

    start = jnp.full((batch, 1), start_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), start, cache, jnp.zeros((batch,), jnp.bool_), out)
    return jax.lax.while_loop(cond, body, state)[-1]


def generate(config: t5.T5Config, params, encoder_tokens: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, eos_id: int = -1, seed: int = 0, start_id: int = 0) -> list[list[int]]:
    """Encodes each input once and decodes up to `max_new_tokens` tokens with a KV cache.

    Inputs are right-padded (segment 0) to a multiple of 16 tokens, and rows are repeated up to a
    multiple of the batch shards of the active mesh; decoding starts from `start_id` (T5: 0).

    `encoder_tokens`: ids of each input (non-empty, e.g. corrupted text ending with eos);
    `temperature` 0 is greedy; a row stops after emitting `eos_id` (-1: never). Returns the generated
    ids of each input up to and including eos. Raises `ValueError` on an empty input,
    `max_new_tokens < 1` or `temperature < 0`.
    """
    if not encoder_tokens or any(len(t) == 0 for t in encoder_tokens):
        raise ValueError("every encoder input needs at least one token")
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens}, {temperature}")
    n = len(encoder_tokens)
    length = -(-max(len(t) for t in encoder_tokens) // 16) * 16
    shards = sharding.batch_shards()
    rows = -(-n // shards) * shards
    tokens = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    for i in range(rows):
        t = encoder_tokens[min(i, n - 1)]
        tokens[i, :len(t)], segments[i, :len(t)] = t, 1
    positions = np.where(segments > 0, np.arange(length)[None, :], 0).astype(np.int32)
    out = np.asarray(_generate(config, params, tokens, segments, positions, jax.random.key(seed),
                               jnp.int32(eos_id), jnp.int32(start_id), max_new_tokens=max_new_tokens,
                               temperature=float(temperature)))
    result = []
    for row in out[:n].tolist():
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result
