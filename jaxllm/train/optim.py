"""Optimizer and learning-rate schedule from the `optimizer` config section (optax)."""

from __future__ import annotations

import jax
import ml_collections

from jaxllm.config import ConfigError
import optax


def default_config() -> ml_collections.ConfigDict:
    """The `optimizer` section: AdamW with linear warmup then cosine decay, global-norm clipping."""
    c = ml_collections.ConfigDict()
    c.lr = 3e-4  # peak learning rate
    c.min_lr = 3e-5  # end of the cosine decay
    c.warmup_steps = 100
    c.decay_steps = 0  # 0: decay over train.steps
    c.schedule = "cosine"  # "cosine" | "linear" | "constant" (all after warmup)
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1  # decoupled (Loshchilov & Hutter 2019), on matrices only
    c.grad_clip = 1.0  # global-norm clipping; 0 disables
    return c


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 -> lr over `warmup_steps`, then decay to `min_lr`.

    Raises:
      ConfigError: naming `optimizer.schedule` when unknown, or when warmup exceeds the decay.
    """
    decay_steps = c.decay_steps or total_steps
    if c.warmup_steps >= decay_steps:
        raise ConfigError(f"optimizer.warmup_steps={c.warmup_steps} exceeds the decay steps {decay_steps}")
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps, decay_steps, c.min_lr)
    if c.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, c.lr, c.warmup_steps),
             optax.linear_schedule(c.lr, c.min_lr, decay_steps - c.warmup_steps)],
            [c.warmup_steps])
    if c.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, c.lr, c.warmup_steps), optax.constant_schedule(c.lr)],
            [c.warmup_steps])
    raise ConfigError(f"optimizer.schedule={c.schedule!r}; expected cosine, linear or constant")


def _decay_mask(params):
    # Norm scales and biases are not decayed (as in GPT-2/nanoGPT and LLaMA recipes).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(c: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)`: clip by global norm, then AdamW with the schedule."""
    lr = schedule(c, total_steps)
    parts = []
    if c.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(c.grad_clip))
    parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), lr
