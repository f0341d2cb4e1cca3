"""Decoding from a decoder-only model: greedy and temperature sampling.

This version recomputes the full forward pass over a fixed-size token buffer at every step (one
compiled program for all steps and prompt lengths). It is meant for quick looks at generations
during and after training.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import llama


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "temperature", "eos_id"))
def _generate(model_config, params, tokens, lengths, rng, *, max_new_tokens, temperature, eos_id):
    batch, total = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
    segment_ids = jnp.ones((batch, total), jnp.int32)
    rows = jnp.arange(batch)

    def body(i, carry):
        tokens, lengths, done = carry
        logits = llama.apply(model_config, params, tokens, positions, segment_ids)
        last = logits[rows, lengths - 1]  # [batch, vocab]
        if temperature == 0.0:
            nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(rng, i), last / temperature).astype(jnp.int32)
        write = ~done
        tokens = tokens.at[rows, lengths].set(jnp.where(write, nxt, tokens[rows, lengths]))
        lengths = lengths + write.astype(jnp.int32)
        done = done | (write & (nxt == eos_id))
        return tokens, lengths, done

    done = jnp.zeros((batch,), jnp.bool_)
    return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, lengths, done))


def generate(
    model_config: llama.LlamaConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_id: int = -1,
    seed: int = 0,
) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      model_config: the decoder's config.
      params: its parameters (unboxed).
      prompts: token ids per prompt (each non-empty; e.g. starting with bos).
      max_new_tokens: tokens to add per prompt.
      temperature: 0 for greedy decoding, else softmax temperature.
      eos_id: generation of a prompt stops after it emits this id (included in the output).
      seed: sampling seed.

    Returns:
      The generated ids of each prompt (without the prompt).

    Raises:
      ValueError: on an empty prompt.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    total = -(-total // 16) * 16  # round the buffer so nearby lengths share one compilation
    buf = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Activations replicated: a handful of prompts need not divide over the mesh's batch shards.
    with nn.logical_axis_rules(()):
        tokens, new_lengths, _ = _generate(
            model_config, params, jnp.asarray(buf), jnp.asarray(lengths), jax.random.key(seed),
            max_new_tokens=max_new_tokens, temperature=float(temperature), eos_id=int(eos_id))
    tokens, new_lengths = np.asarray(tokens), np.asarray(new_lengths)
    return [tokens[i, lengths[i]: new_lengths[i]].tolist() for i in range(len(prompts))]
