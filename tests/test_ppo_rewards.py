"""PPO against independent float64 NumPy computations, and its reward models.

- The log-probs PPO scores rollouts with (`ppo.response_logprobs`) equal the sampler's own log-probs
  of the sampled tokens and a float64 NumPy forward (`test_model.ref_forward`) of each row alone,
  at temperatures other than 1: a misaligned token or a temperature mismatch fails.
- A full PPO iteration (k1/k2/k3, whitening on and off, ptx, adaptive KL): the rollout's log-probs,
  values and scores, the KL-penalised per-token rewards, GAE advantages and returns, the first
  update's losses, the clipped losses at the updated params and the KL-coefficient update equal a
  float64 NumPy recomputation from the same rollout's tokens.
- One reward model, or Llama-2's combined safety/helpfulness reward R_c (Touvron et al. 2023,
  section 3.2.3) inside the jitted PPO iteration.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import sampling
from jaxllm.models import llama
from jaxllm.train import loop, ppo
from test_model import np_params, ref_forward

STOP, PAD = 3, 0


def model_config():
    c = llama.default_config()
    c.update(dict(vocab_size=64, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=48))
    return llama.LlamaConfig.from_config(c)


def random_params(cfg, seed, head="lm", scale=0.3):
    params = nn.unbox(llama.init(cfg, jax.random.key(seed), head=head))
    noise = jax.random.key(seed + 100)
    return jax.tree.map(lambda x: x + scale * jax.random.normal(noise, x.shape), params)


def prompt_batch(b=4, p=6):
    rng = np.random.default_rng(0)
    lengths = np.array([6, 4, 5, 3][:b], np.int32)
    tokens = np.zeros((b, p), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, p - n:] = rng.integers(4, 64, n)
    return tokens, lengths


def test_response_scores_pick_by_the_llama2_rule():
    cfg = model_config()
    helpful, safety = random_params(cfg, 1, "scalar"), random_params(cfg, 2, "scalar")
    tokens, plengths = prompt_batch()
    responses = np.random.default_rng(1).integers(4, 64, (4, 5)).astype(np.int32)
    lengths = np.array([5, 2, 3, 1], np.int32)
    view, _ = ppo.response_view(tokens, plengths, responses, lengths)

    def own_score(params, i):  # row i alone, unpadded: prompt then its response
        seq = np.concatenate([tokens[i, 6 - plengths[i]:], responses[i, :lengths[i]]])[None]
        n = seq.shape[1]
        out = llama.apply(cfg, params, seq, np.arange(n, dtype=np.int32)[None], np.ones_like(seq), head="scalar")
        return float(out[0, -1])

    rs = [own_score(safety, i) for i in range(4)]
    rh = [own_score(helpful, i) for i in range(4)]
    is_safety = np.array([1, 0, 0, 1], np.int32)
    # A threshold between the safety scores of rows 1 and 2 makes the gate fire on exactly one of them.
    lo, hi = sorted([rs[1], rs[2]])
    threshold = 1.0 / (1.0 + math.exp(-(lo + hi) / 2))
    want = [rs[i] if is_safety[i] or rs[i] < (lo + hi) / 2 else rh[i] for i in range(4)]
    got, by_safety = ppo.response_scores(cfg, {"reward": helpful, "safety_reward": safety}, view, lengths,
                                         is_safety, safety_threshold=threshold)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.asarray(by_safety).tolist() == [True, rs[1] < rs[2], rs[2] < rs[1], True]
    one, none = ppo.response_scores(cfg, {"reward": helpful}, view, lengths, is_safety)
    np.testing.assert_allclose(np.asarray(one), rh, rtol=1e-5, atol=1e-6)
    assert not np.asarray(none).any()


def ppo_step(extra_rewards, is_safety, threshold=0.15, whiten=False):
    """One jitted PPO iteration from fixed params; returns (new policy params, metrics)."""
    cfg = model_config()
    config = ppo.default_config()
    config.prompts.max_prompt_len = 6
    config.ppo.update(max_new_tokens=5, epochs=1, minibatches=2, safety_threshold=threshold,
                      whiten_scores=whiten, missing_eos_penalty=0.0)
    tx, schedule = optax.adam(1e-3), optax.constant_schedule(1e-3)
    params = {"policy": random_params(cfg, 5), "value": random_params(cfg, 6, "scalar", 0.02)}
    extra = {"ref": params["policy"], "kl_coef": jnp.float32(0.05), **extra_rewards}
    state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra=extra)
    tokens, lengths = prompt_batch()
    batch = {"prompt_tokens": tokens, "prompt_lengths": lengths, "prompt_is_safety": np.asarray(is_safety, np.int32)}
    step = jax.jit(ppo.make_step(cfg, config, (STOP,), PAD)(tx, schedule))
    new_state, metrics = step(state, batch)
    return new_state.params["policy"], {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def reward_models():
    cfg = model_config()
    return random_params(cfg, 1, "scalar"), random_params(cfg, 2, "scalar")


def test_step_with_combined_reward_equals_the_chosen_single_model(reward_models):
    helpful, safety = reward_models
    both = {"reward": helpful, "safety_reward": safety}
    single = {"safety": ppo_step({"reward": safety}, [0] * 4), "helpful": ppo_step({"reward": helpful}, [0] * 4)}
    cases = [  # (flags, threshold) -> the model every row must be scored by
        ([1, 1, 1, 1], 1e-9, "safety"),       # safety prompts
        ([0, 0, 0, 0], 1e-9, "helpful"),      # helpfulness prompts, the gate never fires
        ([0, 0, 0, 0], 1 - 1e-9, "safety"),   # the gate fires on every row
    ]
    for flags, threshold, chosen in cases:
        params, metrics = ppo_step(both, flags, threshold)
        want_params, want = single[chosen]
        assert metrics["objective/safety_reward_rate"] == (1.0 if chosen == "safety" else 0.0)
        assert "objective/safety_reward_rate" not in want
        for key in ("objective/scores", "objective/rlhf_reward", "loss/policy", "loss/value"):
            np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, want_params)
    # The two models differ, so the choice is visible in the metrics.
    assert abs(single["safety"][1]["objective/scores"] - single["helpful"][1]["objective/scores"]) > 1e-3


def test_whitened_scores_make_the_update_scale_free(reward_models):
    # Whitening (Llama-2's WHITEN(R_c)) removes the reward models' scale: tripling both score heads
    # triples every raw score but leaves the update unchanged; without whitening it changes it.
    # (The low-safety-score gate is off here: scaling would move scores across its threshold.)
    helpful, safety = reward_models
    scaled = lambda p: {**p, "score_head": 3.0 * p["score_head"]}  # noqa: E731
    flags = [1, 0, 1, 0]
    base = ppo_step({"reward": helpful, "safety_reward": safety}, flags, 1e-9, whiten=True)
    tripled = ppo_step({"reward": scaled(helpful), "safety_reward": scaled(safety)}, flags, 1e-9, whiten=True)
    np.testing.assert_allclose(tripled[1]["objective/scores"], 3.0 * base[1]["objective/scores"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), tripled[0], base[0])
    raw = ppo_step({"reward": scaled(helpful), "safety_reward": scaled(safety)}, flags, 1e-9, whiten=False)
    assert raw[1]["objective/scores"] == pytest.approx(tripled[1]["objective/scores"], rel=1e-5)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), raw[0], base[0]))) > 1e-5


# ---------------------------------------------------------------------------------------------
# Against float64 NumPy
# ---------------------------------------------------------------------------------------------


def np_forward(cfg, params, seq, head="lm"):
    """float64 logits `[len, vocab]` (or scalars `[len]`) of one unpadded row."""
    p = np_params(params)
    if head == "scalar":
        p = {**p, "lm_head": p["score_head"]}
    seq = np.asarray(seq)[None]
    out = ref_forward(cfg, p, seq, np.arange(seq.shape[1])[None], np.ones_like(seq))[0]
    return out[:, 0] if head == "scalar" else out


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_response_logprobs(cfg, params, prompt, response, temperature):
    """float64 `log softmax(logits / T)[token]` of each response token, from its own row."""
    logits = np_forward(cfg, params, np.concatenate([prompt, response]))
    at = len(prompt) - 1 + np.arange(len(response))  # the position that predicts response token t
    return np_log_softmax(logits[at] / temperature)[np.arange(len(response)), response]


def row(tokens, plengths, i):
    return tokens[i, tokens.shape[1] - plengths[i]:]


def test_response_logprobs_equal_the_samplers_and_a_float64_forward():
    cfg = model_config()
    params = random_params(cfg, 5)
    tokens, plengths = prompt_batch()
    per_temperature = {}
    for temperature in (0.6, 1.0, 1.7):
        out = sampling.sample(cfg, params, tokens, plengths, jax.random.key(3), max_new_tokens=5,
                              temperature=temperature, stop_ids=(STOP,), pad_id=PAD)
        view, mask = ppo.response_view(tokens, plengths, out.tokens, out.lengths)
        got = np.asarray(ppo.response_logprobs(cfg, params, view, temperature)[0])
        mask, responses, lengths = np.asarray(mask, bool), np.asarray(out.tokens), np.asarray(out.lengths)
        assert mask.sum() >= 12
        # The sampler's own log-prob of the token it drew (KV-cache decode) ...
        np.testing.assert_allclose(got[mask], np.asarray(out.logprobs)[mask], rtol=0, atol=2e-5)
        # ... and a float64 forward of each row alone, without left padding.
        for i in range(len(tokens)):
            want = np_response_logprobs(cfg, params, row(tokens, plengths, i), responses[i, :lengths[i]], temperature)
            np.testing.assert_allclose(got[i, :lengths[i]], want, rtol=0, atol=2e-4)
        per_temperature[temperature] = (responses, lengths, got)
    # The temperatures give visibly different log-probs of the same tokens, so a mix-up shows:
    # rescore the T=0.6 tokens at T=1.
    responses, lengths, got = per_temperature[0.6]
    for i in range(len(tokens)):
        at_one = np_response_logprobs(cfg, params, row(tokens, plengths, i), responses[i, :lengths[i]], 1.0)
        assert np.abs(at_one - got[i, :lengths[i]]).max() > 0.05


def np_whiten(x):
    return (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8)


def np_gae(rewards, values, gamma, lam):
    """GAE of one episode as a Python loop (Schulman et al. 2016, eq. 16); V after the end is 0."""
    adv, last = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_v - values[t] + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def np_kl(logp, ref, estimator):
    r = logp - ref
    return {"k1": r, "k2": 0.5 * r ** 2, "k3": np.exp(-r) - 1.0 + r}[estimator]


def ptx_rows(b=4, length=7, seed=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 5, 6, 4][:b])
    seg = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {"inputs": (rng.integers(4, 64, (b, length)) * seg).astype(np.int32),
            "targets": (rng.integers(4, 64, (b, length)) * seg).astype(np.int32),
            "positions": (np.arange(length)[None] * seg).astype(np.int32), "segment_ids": seg,
            "loss_mask": seg.astype(np.float32)}


def np_ptx_loss(cfg, params, ptx):
    nll, count = 0.0, 0
    for i in range(len(ptx["inputs"])):
        n = int(ptx["segment_ids"][i].sum())
        logp = np_log_softmax(np_forward(cfg, params, ptx["inputs"][i, :n]))
        nll -= logp[np.arange(n), ptx["targets"][i, :n]].sum()
        count += n
    return nll / count


@pytest.mark.parametrize("estimator,whiten_advantages,whiten_scores",
                         [("k1", True, False), ("k2", False, True), ("k3", True, True)])
def test_ppo_iteration_equals_float64_numpy(estimator, whiten_advantages, whiten_scores):
    cfg = model_config()
    config = ppo.default_config()
    config.prompts.max_prompt_len = 6
    c = config.ppo
    c.update(max_new_tokens=5, epochs=1, minibatches=1, temperature=0.8, kl_estimator=estimator,
             whiten_advantages=whiten_advantages, whiten_scores=whiten_scores, gamma=0.97, lam=0.9,
             missing_eos_penalty=0.5, vf_coef=0.3, ptx_coef=0.5, ptx_batch_size=4, adaptive_kl=True, kl_horizon=40)
    kl_coef0 = 0.05
    params = {"policy": random_params(cfg, 5), "value": random_params(cfg, 6, "scalar", 0.05)}
    extra = {"ref": random_params(cfg, 8), "reward": random_params(cfg, 1, "scalar"),
             "kl_coef": jnp.float32(kl_coef0)}
    tokens, plengths = prompt_batch()
    ptx = ptx_rows()
    batch = {"prompt_tokens": tokens, "prompt_lengths": plengths, "prompt_is_safety": np.zeros(4, np.int32),
             **{ppo.PTX + k: v for k, v in ptx.items()}}
    b, p, n_new = 4, 6, 5

    # The rollout the step makes: `collect` with the step's key (the step's metrics must agree).
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    rollout, aux = jax.jit(lambda prm, ext, bt, key: ppo.collect(cfg, c, prm, ext, bt, key, stop_ids=(STOP,),
                                                                 pad_id=PAD, max_context=p + n_new))(
        params, extra, batch, rng)
    rollout, aux = jax.tree.map(np.asarray, (rollout, aux))
    responses, lengths = aux["responses"], aux["lengths"]
    np.testing.assert_array_equal(rollout["seq"][:, p:], responses)

    # ---- float64: log-probs, values, scores from each row alone --------------------------------
    mask = np.arange(n_new)[None] < lengths[:, None]
    logp, ref, values = (np.zeros((b, n_new)) for _ in range(3))
    score = np.zeros(b)
    for i in range(b):
        prompt, resp, n = row(tokens, plengths, i), responses[i, :lengths[i]], lengths[i]
        logp[i, :n] = np_response_logprobs(cfg, params["policy"], prompt, resp, c.temperature)
        ref[i, :n] = np_response_logprobs(cfg, extra["ref"], prompt, resp, c.temperature)
        seq = np.concatenate([prompt, resp])
        values[i, :n] = np_forward(cfg, params["value"], seq, "scalar")[len(prompt) - 1 + np.arange(n)]
        score[i] = np_forward(cfg, extra["reward"], seq, "scalar")[-1] - c.missing_eos_penalty * (resp[-1] != STOP)
    assert mask.sum() >= 12
    np.testing.assert_allclose(rollout["old_logprobs"][mask], logp[mask], atol=2e-4)
    np.testing.assert_allclose(aux["ref_logprobs"][mask], ref[mask], atol=2e-4)
    np.testing.assert_allclose(rollout["old_values"][mask], values[mask], atol=2e-4)
    np.testing.assert_allclose(aux["score"], score, atol=2e-4)

    # ---- float64: rewards (KL-penalised per token), GAE, whitening -----------------------------
    kl = np_kl(logp, ref, estimator) * mask
    final = np_whiten(score) if whiten_scores else score
    rewards = -kl_coef0 * kl
    rewards[np.arange(b), lengths - 1] += final
    adv, ret = np.zeros((b, n_new)), np.zeros((b, n_new))
    for i in range(b):
        n = lengths[i]
        adv[i, :n], ret[i, :n] = np_gae(rewards[i, :n], values[i, :n], c.gamma, c.lam)
    if whiten_advantages:
        adv[mask] = np_whiten(adv[mask])
    np.testing.assert_allclose(aux["rewards"][mask], rewards[mask], atol=2e-4)
    np.testing.assert_allclose(rollout["advantages"][mask], adv[mask], atol=1e-3)
    np.testing.assert_allclose(rollout["returns"][mask], ret[mask], atol=5e-4)

    # ---- the step: its single update is at the rollout's params (ratio 1) ----------------------
    seq_kl = kl.sum(axis=1)
    c.kl_target = float(seq_kl.mean()) / 1.1  # KL / target - 1 = 0.1: inside the controller's clip
    tx, schedule = optax.adam(0.05), optax.constant_schedule(0.05)
    state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), extra=extra)
    new_state, metrics = jax.jit(ppo.make_step(cfg, config, (STOP,), PAD)(tx, schedule))(state, batch)
    metrics = {k: float(v) for k, v in metrics.items()}
    policy_loss = np.mean(-adv[mask])
    value_loss = np.mean(0.5 * np.square(values - ret)[mask])
    ptx_loss = np_ptx_loss(cfg, params["policy"], ptx)
    want = {"objective/kl": seq_kl.mean(), "objective/scores": score.mean(),
            "objective/rlhf_reward": np.mean(score - kl_coef0 * seq_kl), "objective/kl_coef": kl_coef0,
            "loss/policy": policy_loss, "loss/value": value_loss, "loss/ptx": ptx_loss,
            "loss_sum": policy_loss + c.vf_coef * value_loss + c.ptx_coef * ptx_loss, "policy/ratio": 1.0}
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=2e-4, err_msg=key)
    # Ziegler et al. 2019's controller: beta (1 + e n / horizon), e = 0.1, n = 4 episodes.
    np.testing.assert_allclose(float(new_state.extra["kl_coef"]), kl_coef0 * (1 + 0.1 * b / c.kl_horizon), rtol=1e-4)

    # ---- the clipped losses at the updated params -------------------------------------------------
    new = new_state.params
    total, stats = jax.jit(lambda q, m, x: ppo.minibatch_loss(cfg, c, q, m, x))(new, rollout, ptx)
    new_logp, new_values = np.zeros((b, n_new)), np.zeros((b, n_new))
    for i in range(b):
        prompt, resp, n = row(tokens, plengths, i), responses[i, :lengths[i]], lengths[i]
        new_logp[i, :n] = np_response_logprobs(cfg, new["policy"], prompt, resp, c.temperature)
        new_values[i, :n] = np_forward(cfg, new["value"], np.concatenate([prompt, resp]),
                                       "scalar")[len(prompt) - 1 + np.arange(n)]
    ratio = np.exp(new_logp - logp)
    surrogate = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - c.clip, 1 + c.clip))
    v_clipped = values + np.clip(new_values - values, -c.vf_clip, c.vf_clip)
    v_loss = 0.5 * np.maximum(np.square(new_values - ret), np.square(v_clipped - ret))
    ptx_new = np_ptx_loss(cfg, new["policy"], ptx)
    assert float(stats["policy/clipfrac"]) > 0 and float(stats["val/clipfrac"]) > 0  # clipping is exercised
    want = {"loss/policy": surrogate[mask].mean(), "loss/value": v_loss[mask].mean(), "loss/ptx": ptx_new}
    for key, value in want.items():
        np.testing.assert_allclose(float(stats[key]), value, rtol=1e-3, atol=1e-3, err_msg=key)
    total_want = want["loss/policy"] + c.vf_coef * want["loss/value"] + c.ptx_coef * ptx_new
    np.testing.assert_allclose(float(total), total_want, rtol=1e-3, atol=1e-3)
