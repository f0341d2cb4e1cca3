"""Loss functions of arrays only (no model calls).

Token losses return *sums* and the number of real tokens they cover, so the training loop can
normalise by the real target tokens of the whole global (accumulated) batch: gradient accumulation
and data parallelism then never change the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of each target token.

    Args:
      logits: `[batch, length, vocab]` (any float dtype; computed in float32).
      targets: `[batch, length]` int32 token ids in `[0, vocab)`.

    Returns:
      `[batch, length]` float32 `log softmax(logits)[targets]`.
    """
    logits = logits.astype(jnp.float32)
    return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed next-token cross-entropy `-sum_t mask_t log p(target_t)` (nats).

    Args:
      logits: `[batch, length, vocab]`.
      targets: `[batch, length]` int32.
      loss_mask: `[batch, length]` float, 1 for real targets and 0 for padding / document starts.

    Returns:
      `(loss_sum, sums)`: scalar float32 loss summed over real targets, and a dict of summed
      statistics with `num_tokens` (real target count) and `correct` (argmax hits), both float32.
    """
    mask = loss_mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), {"num_tokens": jnp.sum(mask), "correct": jnp.sum(correct * mask)}
