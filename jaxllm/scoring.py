"""Log-probabilities of target tokens under a LLaMA-family decoder, the input of every LM loss.

One function shared by the stages that train on token log-probs (pretraining, prefix-LM
pretraining, SFT, DPO), so `model.loss_chunk_size` switches all of them between the whole
`[batch, length, vocab]` float32 logits (0) and chunks of positions
(`objectives.chunked_token_logprobs`). PPO keeps the full logits: its entropy needs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import objectives
from jaxllm.models import llama


def target_logprobs(config: llama.LlamaConfig, params, inputs: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, targets: jax.Array,
                    prefix_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(logprobs, correct)` of `targets` under the model, chunked when `config.loss_chunk_size > 0`.

    Args:
      config: the model; `loss_chunk_size` positions per chunk, 0 for the unchunked logits.
      params: unboxed parameters of `llama.init(config, ...)`.
      inputs, positions, segment_ids: `[batch, length]` int32 (see `llama.apply`).
      targets: `[batch, length]` int32 token ids in `[0, vocab)`.
      prefix_mask: optional `[batch, length]` int prefix-LM mask (see `llama.apply`).

    Returns:
      `[batch, length]` float32 `log p(target_t)` and `[batch, length]` bool argmax hits; the same
      values either way (up to float reassociation in the head matmul).
    """
    if config.loss_chunk_size:
        hidden, head = llama.apply(config, params, inputs, positions, segment_ids, prefix_mask=prefix_mask,
                                   return_hidden=True)
        return objectives.chunked_token_logprobs(hidden, head, targets, chunk_size=config.loss_chunk_size)
    logits = llama.apply(config, params, inputs, positions, segment_ids, prefix_mask=prefix_mask)
    return objectives.token_logprobs(logits, targets), jnp.argmax(logits, axis=-1) == targets
