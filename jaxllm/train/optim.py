"""Optimizer and learning-rate schedule from the `optimizer` config section (optax)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxllm.config import ConfigError
import optax


NAMES = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")


def default_config() -> ml_collections.ConfigDict:
    """The `optimizer` section: AdamW with linear warmup then cosine decay, global-norm clipping."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # "adamw" | "adafactor" (T5's optimizer; `b1`, `b2`, `eps` are AdamW's)
    c.lr = 3e-4  # peak learning rate
    c.min_lr = 3e-5  # end of the cosine decay
    c.warmup_steps = 100
    c.decay_steps = 0  # 0: decay over train.steps
    c.schedule = "cosine"  # "cosine" | "linear" | "constant" | "rsqrt" (all after warmup)
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1  # decoupled (Loshchilov & Hutter 2019), on matrices only
    c.grad_clip = 1.0  # global-norm clipping; 0 disables
    return c


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 -> lr over `warmup_steps`, then decay to `min_lr`
    (cosine, linear), stay (constant), or fall as `lr * sqrt(warmup_steps / step)` (rsqrt: T5's
    inverse square root, Raffel et al. 2020 section 3.1.2, which holds 0.01 for 10^4 steps and then
    decays as `1 / sqrt(step)`; `min_lr` is its floor).

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
    if c.schedule == "rsqrt":
        if c.warmup_steps < 1:
            raise ConfigError("optimizer.schedule='rsqrt' needs optimizer.warmup_steps >= 1 (it decays as "
                              "sqrt(warmup_steps / step))")
        warmup = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
        return lambda step: jnp.where(step < c.warmup_steps, warmup(step), jnp.maximum(
            c.lr * jnp.sqrt(c.warmup_steps / jnp.maximum(step, 1)), c.min_lr))
    raise ConfigError(f"optimizer.schedule={c.schedule!r}; expected one of {', '.join(SCHEDULES)}")


def _decay_mask(params):
    # Norm scales and biases are not decayed (as in GPT-2/nanoGPT and LLaMA recipes).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(c: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)`: clip by global norm, then AdamW or Adafactor with the schedule.

    Adafactor (Shazeer & Stern 2018; `optax.adafactor` with T5's settings: factored second moments,
    decay rate 0.8, update clipping at RMS 1, no momentum) scales each update by the parameter's
    RMS, so a parameter moves by about `lr` of its own size per step whatever its initial scale
    (T5 initialises its embedding as N(0, 1)). `weight_decay` stays decoupled and scaled by the
    learning rate, as in AdamW: `p -= lr(step) * weight_decay * p`.

    Raises:
      ConfigError: naming `optimizer.name` or `optimizer.schedule` when unknown.
    """
    if c.name not in NAMES:
        raise ConfigError(f"optimizer.name={c.name!r}; expected one of {', '.join(NAMES)}")
    lr = schedule(c, total_steps)
    parts = []
    if c.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(c.grad_clip))
    if c.name == "adamw":
        parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=_decay_mask))
    else:
        decay = (lambda step: lr(step) * c.weight_decay) if c.weight_decay else None
        parts.append(optax.adafactor(lr, weight_decay_rate=decay, weight_decay_mask=_decay_mask))
    return optax.chain(*parts), lr


def fit_state_axes(tree):
    """Replicates the optimizer statistics whose rank differs from their parameter's.

    `tx.init` on boxed params keeps each parameter's logical axis names on every statistic it maps
    from it; Adafactor's factored row / column statistics have one dimension fewer, and its unused
    slots are `(1,)` placeholders, so their names would not fit (a name on a size-1 dimension
    would split it). They are vectors: replicating them costs little.
    """
    def fit(x):
        if not isinstance(x, nn.LogicallyPartitioned):
            return x
        shape = x.value.shape
        if len(x.names) != len(shape) or any(n is not None and d == 1 for n, d in zip(x.names, shape)):
            return x.replace(names=(None,) * len(shape))
        return x

    return jax.tree.map(fit, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
