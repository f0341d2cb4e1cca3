"""PPO's reward: one reward model, or Llama-2's combined safety/helpfulness reward R_c
(Touvron et al. 2023, section 3.2.3) inside the jitted PPO iteration."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.models import llama
from jaxllm.train import loop, ppo

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
