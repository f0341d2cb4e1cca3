"""Loss functions of arrays only (no model calls).

Token losses return *sums* and the number of real tokens they cover, so the training loop can
normalise by the real target tokens of the whole global (accumulated) batch: gradient accumulation
and data parallelism then never change the loss.
"""

from __future__ import annotations

import math

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


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                           chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs` and argmax hits of `logits = hidden @ head`, a chunk of positions at a time.

    The same values as `token_logprobs((hidden @ head).astype(float32), targets)` (the LM head of
    `jaxllm.models.llama`: a matmul over the flattened tokens in the dtype of `hidden`/`head`, then
    the log-softmax in float32; equal up to float32 reassociation in the gradient), but the
    `[batch, length, vocab]` logits never exist at once: a `lax.scan` over chunks of `chunk_size`
    positions computes one chunk's `[batch, chunk_size, vocab]` float32 logits, reduces them to
    log-probs, and drops them; its body is under `jax.checkpoint`, so the backward pass recomputes
    each chunk's logits from `hidden` and `head` instead of saving them. At once, forward or
    backward, there exist `hidden` (and its gradient), `head` and its float32 gradient accumulator
    `[embed, vocab]`, and one or two chunks' logits and their gradient (softmax - one-hot), i.e.
    `O(batch * chunk_size * vocab)` instead of `O(batch * length * vocab)`, for one more head matmul
    per chunk in the backward pass. The idea of Liger-Kernel's fused linear cross-entropy (Hsu et
    al. 2024) and MaxText's vocabulary tiling (`num_vocab_tiling`), here over sequence chunks.

    A `length` that is not a multiple of `chunk_size` is padded (zero hidden states, target 0) to
    the next multiple and the padding is sliced off; a `chunk_size >= length` is one chunk.

    Args:
      hidden: `[batch, length, embed]` final-normed hidden states (compute dtype).
      head: `[embed, vocab]` LM head weight (same dtype; the transposed embedding when tied).
      targets: `[batch, length]` int32 token ids in `[0, vocab)`.
      chunk_size: positions per chunk (a Python int >= 1).

    Returns:
      `(logprobs, correct)`: `[batch, length]` float32 `log softmax(logits)[targets]` and
      `[batch, length]` bool `argmax(logits) == targets`.

    Raises:
      ValueError: `chunk_size < 1`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    batch, length, embed = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [num_chunks, batch, chunk, ...]: the chunks as scan inputs, so the backward pass writes each
    # chunk's hidden-state gradient into its own slot (no full-size accumulator per chunk).
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, embed).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # saves only its inputs: the backward pass recomputes the chunk's logits
    def one_chunk(w, h, t):
        # A 2-D matmul over the chunk's flattened tokens, llama's head expression: in bfloat16 the
        # same rounding as the unchunked logits (XLA rounds a 3-D dot's output differently), and
        # XLA's CPU dot over the 3-D [batch, chunk, embed] operand was ~1.5x slower.
        logits = (h.reshape(-1, embed) @ w).astype(jnp.float32).reshape(batch, chunk, -1)  # [batch, chunk, vocab]
        return token_logprobs(logits, t), jnp.argmax(logits, axis=-1) == t

    _, (logprobs, correct) = jax.lax.scan(lambda w, xs: (w, one_chunk(w, *xs)), head,
                                          (hidden_chunks, target_chunks))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]  # noqa: E731
    return unchunk(logprobs), unchunk(correct)


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed next-token cross-entropy `-sum_t mask_t log p(target_t)` (nats) of `logits`.

    Args:
      logits: `[batch, length, vocab]`.
      targets: `[batch, length]` int32.
      loss_mask: `[batch, length]` float, 1 for real targets and 0 for padding / document starts.

    Returns:
      See `lm_loss_from_logprobs`.
    """
    correct = jnp.argmax(logits, axis=-1) == targets
    return lm_loss_from_logprobs(token_logprobs(logits, targets), correct, loss_mask)


def lm_loss_from_logprobs(logprobs: jax.Array, correct: jax.Array,
                          loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`lm_loss` from the target log-probs (`token_logprobs` or `chunked_token_logprobs`).

    Args:
      logprobs: `[batch, length]` float32 `log p(target_t)`.
      correct: `[batch, length]` bool, argmax of the logits == target.
      loss_mask: `[batch, length]` float, 1 for real targets and 0 for padding / document starts.

    Returns:
      `(loss_sum, sums)`: scalar float32 loss summed over real targets, and a dict of summed
      statistics with `num_tokens` (real target count) and `correct` (argmax hits), both float32.
    """
    mask = loss_mask.astype(jnp.float32)
    sums = {"num_tokens": jnp.sum(mask), "correct": jnp.sum(correct.astype(jnp.float32) * mask)}
    return jnp.sum(-logprobs * mask), sums


# ---- Reward models ---------------------------------------------------------------------------


def pairwise_reward_loss(
    rewards_chosen: jax.Array,
    rewards_rejected: jax.Array,
    *,
    margin: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry pairwise loss, summed over pairs.

    `loss_i = -log sigmoid(r_c - r_r - m_i)` (InstructGPT, Ouyang et al. 2022, eq. 1; the margin
    `m_i` is Llama-2's, Touvron et al. 2023, eq. 2, and 0 when absent) plus optional reward
    centering `center_coef * (r_c + r_r)^2` per pair (Eisenstein et al. 2023; TRL's
    `center_rewards_coefficient`), which pins the reward's free offset near zero.

    Args:
      rewards_chosen, rewards_rejected: `[pairs]` float rewards.
      margin: `[pairs]` float, or None.
      pair_mask: `[pairs]` float, 1 for real pairs and 0 for padding, or None (all real).
      center_coef: weight of the centering term.

    Returns:
      `(loss_sum, sums)`: the loss summed over real pairs, and summed statistics `count` (pairs),
      `correct` (pairs with r_c > r_r), `margin` (sum of r_c - r_r), `rewards_chosen`,
      `rewards_rejected`.
    """
    rc, rr = rewards_chosen.astype(jnp.float32), rewards_rejected.astype(jnp.float32)
    mask = jnp.ones_like(rc) if pair_mask is None else pair_mask.astype(jnp.float32)
    diff = rc - rr
    shifted = diff if margin is None else diff - margin.astype(jnp.float32)
    per_pair = -jax.nn.log_sigmoid(shifted) + center_coef * jnp.square(rc + rr)
    sums = {
        "count": jnp.sum(mask),
        "correct": jnp.sum((diff > 0).astype(jnp.float32) * mask),
        "margin": jnp.sum(diff * mask),
        "rewards_chosen": jnp.sum(rc * mask),
        "rewards_rejected": jnp.sum(rr * mask),
    }
    return jnp.sum(per_pair * mask), sums


def combined_reward(safety_rewards: jax.Array, helpful_rewards: jax.Array, is_safety: jax.Array, *,
                    safety_threshold: float = 0.15) -> jax.Array:
    """Llama-2's combination of a safety and a helpfulness reward model into one reward.

    Touvron et al. 2023, section 3.2.3 (PPO): `R_c(g|p) = R_s(g|p)` if `IS_SAFETY(p)` or
    `R_s(g|p) < 0.15`, else `R_h(g|p)`, with `R_s, R_h` the models' scores read as probabilities;
    the reward used is `LOGIT(R_c)`. Our reward heads output the logit directly (`R = sigmoid(r)`),
    so this returns the chosen raw score, and the threshold applies as `r_s < logit(0.15)`
    (= -1.735). The threshold treats the safety score as absolute, which Bradley-Terry leaves free
    up to an offset: it is meaningful for a safety model whose scores are centred (its initial head
    is near 0, or train it with `center_coef`).

    Args:
      safety_rewards, helpful_rewards: `[...]` float raw scores (logits) of the same responses.
      is_safety: `[...]` bool, True where the prompt is a safety prompt.
      safety_threshold: probability in (0, 1) below which the safety score wins on any prompt.

    Returns:
      `[...]` float32 combined scores (logits; whiten them per batch before PPO, as Llama-2 does).

    Raises:
      ValueError: `safety_threshold` outside (0, 1).
    """
    if not 0.0 < safety_threshold < 1.0:
        raise ValueError(f"safety_threshold={safety_threshold} must be in (0, 1)")
    rs, rh = jnp.asarray(safety_rewards, jnp.float32), jnp.asarray(helpful_rewards, jnp.float32)
    logit_threshold = math.log(safety_threshold / (1.0 - safety_threshold))
    return jnp.where(jnp.asarray(is_safety, bool) | (rs < logit_threshold), rs, rh)


def ranking_reward_loss(
    rewards: jax.Array, ranks: jax.Array, response_mask: jax.Array, *, margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """InstructGPT's K-wise ranking loss, summed over groups.

    For a prompt with K ranked responses (rank 0 = best; equal ranks are ties), every ordered pair
    `(i, j)` with `rank_i < rank_j` contributes `-log sigmoid(r_i - r_j - m_g)`, and the group's
    sum is weighted by `1 / C(K, 2)` (Ouyang et al. 2022, eq. 1), so each prompt counts once
    however many responses it has. Tied pairs contribute nothing but still count in `C(K, 2)`.
    `m_g` is the group's Llama-2 margin (Touvron et al. 2023, eq. 2; a record carries one per
    group, so it applies to each of the group's ordered pairs; 0 when absent). Reward centering
    adds `center_coef * (2 * mean_k r_k)^2` per group (Eisenstein et al. 2023). For a pair both
    equal `pairwise_reward_loss`: `-log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2`.
    Every response is scored once, by the caller.

    Args:
      rewards: `[groups, K]` float rewards.
      ranks: `[groups, K]` int ranks (lower is better).
      response_mask: `[groups, K]` float, 1 for real responses, 0 for padding slots.
      margin: `[groups]` float, or None (no margins).
      center_coef: weight of the centering term.

    Returns:
      `(loss_sum, sums)`: the loss summed over groups with at least one ordered pair; `count` is
      the number of such groups, `pairs` the ordered pairs, `correct` the ordered pairs the
      rewards order correctly, `margin` the sum over ordered pairs of `r_i - r_j`.
    """
    r = rewards.astype(jnp.float32)
    valid = response_mask.astype(jnp.float32)
    both = valid[:, :, None] * valid[:, None, :]
    better = (ranks[:, :, None] < ranks[:, None, :]).astype(jnp.float32) * both  # i beats j
    diff = r[:, :, None] - r[:, None, :]
    k = jnp.sum(valid, axis=1)
    num_pairs = k * (k - 1) / 2.0
    has_pairs = (jnp.sum(better, axis=(1, 2)) > 0).astype(jnp.float32)
    shifted = diff if margin is None else diff - margin.astype(jnp.float32)[:, None, None]
    group_loss = jnp.sum(-jax.nn.log_sigmoid(shifted) * better, axis=(1, 2)) / jnp.maximum(num_pairs, 1.0)
    if center_coef:
        group_loss = group_loss + center_coef * jnp.square(2.0 * jnp.sum(r * valid, axis=1) / jnp.maximum(k, 1.0))
    sums = {
        "count": jnp.sum(has_pairs),
        "pairs": jnp.sum(better),
        "correct": jnp.sum((diff > 0).astype(jnp.float32) * better),
        "margin": jnp.sum(diff * better),
    }
    return jnp.sum(group_loss * has_pairs), sums


# ---- Direct preference optimisation ------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family losses on sequence log-probabilities, summed over pairs.

    With `h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))`:
    - "sigmoid": `-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)` (DPO, Rafailov et al.
      2023, eq. 7; with `eps = label_smoothing` the conservative cDPO of Mitchell 2023);
    - "ipo": `(h - 1 / (2 beta))^2` (IPO, Azar et al. 2023, eq. 17);
    - "hinge": `max(0, 1 - beta h)` (SLiC, Zhao et al. 2023, as in TRL).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        `[pairs]` float32 summed log-probabilities of the response tokens.
      beta: KL strength (DPO's beta; IPO's tau).
      loss_type: one of `DPO_LOSSES`.
      label_smoothing: cDPO's probability that a preference label is flipped (sigmoid only).
      pair_mask: `[pairs]` 1 for real pairs, or None.

    Returns:
      `(loss_sum, sums)` with TRL's statistics summed over real pairs: `count`,
      `rewards/chosen` (`beta * (log pi - log ref)` of chosen), `rewards/rejected`,
      `rewards/accuracies` (chosen reward > rejected reward), `rewards/margins`, `logps/chosen`,
      `logps/rejected`.

    Raises:
      ValueError: unknown `loss_type`, or label smoothing with a non-sigmoid loss.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo loss_type={loss_type!r}; expected one of {DPO_LOSSES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing (cDPO) applies to the sigmoid loss only")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "sigmoid":
        per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss_type == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        per_pair = jax.nn.relu(1.0 - beta * h)
    mask = jnp.ones_like(h) if pair_mask is None else pair_mask.astype(jnp.float32)
    rc, rr = beta * chosen, beta * rejected
    sums = {
        "count": jnp.sum(mask),
        "rewards/chosen": jnp.sum(rc * mask),
        "rewards/rejected": jnp.sum(rr * mask),
        "rewards/accuracies": jnp.sum((rc > rr).astype(jnp.float32) * mask),
        "rewards/margins": jnp.sum((rc - rr) * mask),
        "logps/chosen": jnp.sum(policy_chosen_logps * mask),
        "logps/rejected": jnp.sum(policy_rejected_logps * mask),
    }
    return jnp.sum(per_pair * mask), sums


# ---- PPO ---------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi.

    With `r = log pi(x) - log ref(x)`: k1 = `r` (unbiased, high variance), k2 = `r^2 / 2`
    (biased, low variance), k3 = `exp(-r) - 1 + r` (unbiased, non-negative). Schulman (2020),
    "Approximating KL divergence".

    Args:
      logprobs, ref_logprobs: `[batch, length]` float32.
      estimator: one of `KL_ESTIMATORS`.

    Raises:
      ValueError: unknown estimator.
    """
    r = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * jnp.square(r)
    if estimator == "k3":
        return jnp.expm1(-r) + r
    raise ValueError(f"kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def gae(rewards: jax.Array, values: jax.Array, response_mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 16).

    `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lam A_{t+1}`, computed with a
    reverse `lax.scan`; the value after the last response token is 0 (episodes end there).
    Responses are left-aligned: `response_mask` is 1 on a prefix of each row.

    Args:
      rewards, values: `[batch, length]` float32 per response token.
      response_mask: `[batch, length]` float, 1 on response tokens.

    Returns:
      `(advantages, returns)`, each `[batch, length]` float32, 0 outside the response;
      `returns = advantages + values`.
    """
    mask = response_mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * mask
    v = values.astype(jnp.float32) * mask
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * next_v - v

    def step(carry, delta_t):
        adv = delta_t + gamma * lam * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), deltas.T, reverse=True)
    advantages = adv.T * mask
    return advantages, (advantages + v) * mask


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over entries where `mask` is 1."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """Normalises `x` to zero mean, unit variance over the masked entries (0 elsewhere).

    The variance is the unbiased masked variance, as in lm-human-preferences and TRL.
    """
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 2.0)
    mean = jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    var = jnp.sum(jnp.square(x - mean) * mask) / (n - 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                    response_mask: jax.Array, clip: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate objective, summed over response tokens (Schulman et al. 2017, eq. 7).

    Per token: `max(-A rho, -A clip(rho, 1 - eps, 1 + eps))` with `rho = exp(logp - logp_old)`.

    Args:
      logprobs, old_logprobs, advantages, response_mask: `[batch, length]`.
      clip: eps.

    Returns:
      `(loss_sum, sums)`: `count` (response tokens), `approxkl` (sum of `(logp - logp_old)^2 / 2`,
      as TRL), `clipfrac` (tokens where the clipped term is active), `ratio` (sum of rho).
    """
    mask = response_mask.astype(jnp.float32)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    sums = {
        "count": jnp.sum(mask),
        "approxkl": jnp.sum(0.5 * jnp.square(log_ratio) * mask),
        "clipfrac": jnp.sum((clipped > unclipped).astype(jnp.float32) * mask),
        "ratio": jnp.sum(ratio * mask),
    }
    return jnp.sum(jnp.maximum(unclipped, clipped) * mask), sums


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                   response_mask: jax.Array, clip: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss `0.5 max((V - R)^2, (V_clip - R)^2)`, summed over response tokens.

    `V_clip = V_old + clip(V - V_old, -eps, eps)` (Ziegler et al. 2019's lm-human-preferences;
    TRL's `cliprange_value`).

    Returns:
      `(loss_sum, sums)`: `count`, `clipfrac` (tokens where the clipped error is the larger).
    """
    mask = response_mask.astype(jnp.float32)
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    err, err_clipped = jnp.square(values - returns), jnp.square(clipped_values - returns)
    sums = {"count": jnp.sum(mask), "clipfrac": jnp.sum((err_clipped > err).astype(jnp.float32) * mask)}
    return jnp.sum(0.5 * jnp.maximum(err, err_clipped) * mask), sums


def adaptive_kl_coef(kl_coef: jax.Array, current_kl: jax.Array, target: float, n_steps: int,
                     horizon: int) -> jax.Array:
    """Adaptive KL controller of Ziegler et al. (2019), section 2.2 (PPO's `ppo.adaptive_kl`).

    `e = clip(KL / target - 1, -0.2, 0.2)`, `beta <- beta (1 + e n / horizon)` where `n` is the
    number of samples (episodes) since the last update.

    Args:
      kl_coef: scalar beta (float or float32 array; traceable under `jit`).
      current_kl: scalar mean KL per episode (nats per sequence) of the last rollout.
      target: the KL target (nats per sequence); n_steps: episodes since the last update;
      horizon: episodes.

    Returns:
      Scalar float32 new beta.
    """
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)
