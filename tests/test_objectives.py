"""Losses against hand-computed values and float64 Python loops."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import objectives


def softplus_neg(x):  # -log sigmoid(x), in float64
    return math.log1p(math.exp(-x)) if x > -30 else -x


def test_lm_loss_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    loss_sum, sums = objectives.lm_loss(logits, jnp.array([[1, 2]]), jnp.array([[1.0, 0.0]]))
    assert float(loss_sum) == pytest.approx(-math.log(0.25), rel=1e-6)
    assert float(sums["num_tokens"]) == 1.0 and float(sums["correct"]) == 0.0


def test_pairwise_margin_and_centering_hand_computed():
    rc, rr = jnp.array([1.0, 0.5, 3.0]), jnp.array([0.0, 1.5, 1.0])
    margin = jnp.array([0.5, 0.0, 0.0])
    mask = jnp.array([1.0, 1.0, 0.0])
    loss, sums = objectives.pairwise_reward_loss(rc, rr, margin=margin, pair_mask=mask, center_coef=0.01)
    want = softplus_neg(0.5) + softplus_neg(-1.0) + 0.01 * (1.0 ** 2 + 2.0 ** 2)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(sums["count"]) == 2 and float(sums["correct"]) == 1
    assert float(sums["margin"]) == pytest.approx(1.0 - 1.0)
    loss_plain, _ = objectives.pairwise_reward_loss(rc[:2], rr[:2])
    assert float(loss_plain) == pytest.approx(softplus_neg(1.0) + softplus_neg(-1.0), rel=1e-6)


def test_combined_reward_follows_llama2_rule():
    # R_c = R_s if IS_SAFETY(p) or sigmoid(r_s) < 0.15 else R_h; logit(0.15) = ln(0.15/0.85) = -1.7346.
    rs = jnp.array([0.3, 0.3, -1.70, -1.77, -3.0, 2.0])
    rh = jnp.array([1.0, 1.0, 5.00, 5.00, -4.0, -2.0])
    is_safety = jnp.array([True, False, False, False, False, True])
    got = objectives.combined_reward(rs, rh, is_safety)
    np.testing.assert_array_equal(np.asarray(got), np.array([0.3, 1.0, 5.0, -1.77, -3.0, 2.0], np.float32))
    # A looser threshold (0.2: logit -1.386) hands the third response to the safety score too.
    assert float(objectives.combined_reward(rs, rh, is_safety, safety_threshold=0.2)[2]) == pytest.approx(-1.70)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="safety_threshold"):
            objectives.combined_reward(rs, rh, is_safety, safety_threshold=bad)


def ranking_reference(rewards, ranks, mask):
    """Explicit enumeration of all pairs of each group, in float64."""
    total, groups = 0.0, 0
    for r, k, m in zip(rewards, ranks, mask):
        idx = [i for i in range(len(r)) if m[i]]
        pairs = list(itertools.combinations(idx, 2))
        ordered = [(i, j) if k[i] < k[j] else (j, i) for i, j in pairs if k[i] != k[j]]
        if not ordered:
            continue
        groups += 1
        total += sum(softplus_neg(float(r[i]) - float(r[j])) for i, j in ordered) / len(pairs)
    return total, groups


def test_ranking_loss_hand_computed():
    loss, sums = objectives.ranking_reward_loss(jnp.array([[2.0, 1.0, 0.0]]), jnp.array([[0, 1, 2]]),
                                                jnp.ones((1, 3)))
    want = (softplus_neg(1.0) + softplus_neg(2.0) + softplus_neg(1.0)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(sums["pairs"]) == 3 and float(sums["correct"]) == 3


@pytest.mark.parametrize("seed", range(5))
def test_ranking_loss_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    groups, kmax = 6, 9
    rewards = rng.standard_normal((groups, kmax)) * 2
    ranks = rng.integers(0, 4, (groups, kmax))  # many ties
    sizes = rng.integers(2, kmax + 1, groups)
    mask = (np.arange(kmax)[None] < sizes[:, None]).astype(np.float64)
    loss, sums = objectives.ranking_reward_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks),
                                                jnp.asarray(mask, jnp.float32))
    want, want_groups = ranking_reference(rewards, ranks, mask)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(sums["count"]) == want_groups


def test_ranking_two_responses_is_pairwise():
    rc, rr = jnp.array([0.3, -1.0]), jnp.array([0.1, 0.4])
    loss, _ = objectives.ranking_reward_loss(jnp.stack([rc, rr], 1), jnp.array([[0, 1], [0, 1]]), jnp.ones((2, 2)))
    pair, _ = objectives.pairwise_reward_loss(rc, rr)
    assert float(loss) == pytest.approx(float(pair), rel=1e-6)


def ranking_reference_with_margin(rewards, ranks, mask, margins, center_coef):
    """Float64 enumeration: each ordered pair (i better than j) of group g adds
    `-log sigmoid(r_i - r_j - m_g)`, averaged over the group's C(k, 2) pairs, plus
    `center_coef * (2 * mean of the group's rewards)^2` (a pair: `(r_c + r_r)^2`)."""
    total = 0.0
    for r, k, m, margin in zip(rewards, ranks, mask, margins):
        idx = [i for i in range(len(r)) if m[i]]
        pairs = list(itertools.combinations(idx, 2))
        ordered = [(i, j) if k[i] < k[j] else (j, i) for i, j in pairs if k[i] != k[j]]
        if not ordered:
            continue
        total += sum(softplus_neg(float(r[i]) - float(r[j]) - float(margin)) for i, j in ordered) / len(pairs)
        total += center_coef * (2.0 * sum(float(r[i]) for i in idx) / len(idx)) ** 2
    return total


@pytest.mark.parametrize("seed", range(3))
def test_ranking_loss_with_margins_and_centering_equals_enumeration(seed):
    rng = np.random.default_rng(10 + seed)
    groups, kmax = 8, 5
    rewards = rng.standard_normal((groups, kmax)) * 2
    ranks = rng.integers(0, 3, (groups, kmax))
    sizes = rng.integers(2, kmax + 1, groups)
    mask = (np.arange(kmax)[None] < sizes[:, None]).astype(np.float64)
    margins = np.where(rng.random(groups) < 0.5, rng.uniform(0.0, 3.0, groups), 0.0)  # absent: 0
    loss, sums = objectives.ranking_reward_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks),
                                                jnp.asarray(mask, jnp.float32),
                                                margin=jnp.asarray(margins, jnp.float32), center_coef=0.3)
    assert float(loss) == pytest.approx(ranking_reference_with_margin(rewards, ranks, mask, margins, 0.3), rel=1e-5)
    plain, _ = objectives.ranking_reward_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks),
                                              jnp.asarray(mask, jnp.float32))
    want, groups_with_pairs = ranking_reference(rewards, ranks, mask)
    assert float(plain) == pytest.approx(want, rel=1e-5) and float(sums["count"]) == groups_with_pairs


def test_ranking_two_responses_with_margin_and_centering_is_llama2_pairwise():
    rc, rr = jnp.array([0.3, -1.0, 2.0]), jnp.array([0.1, 0.4, -0.5])
    margin = jnp.array([1.0, 0.0, 2.5])
    loss, _ = objectives.ranking_reward_loss(jnp.stack([rc, rr], 1), jnp.zeros((3, 2), jnp.int32).at[:, 1].set(1),
                                             jnp.ones((3, 2)), margin=margin, center_coef=0.05)
    pair, _ = objectives.pairwise_reward_loss(rc, rr, margin=margin, center_coef=0.05)
    assert float(loss) == pytest.approx(float(pair), rel=1e-6)


def test_dpo_family_hand_computed():
    args = tuple(jnp.array([v]) for v in (-10.0, -12.0, -11.0, -11.0))  # h = 1 - (-1) = 2
    beta = 0.1
    sig, sums = objectives.dpo_loss(*args, beta=beta)
    assert float(sig) == pytest.approx(softplus_neg(0.2), rel=1e-6)
    assert float(sums["rewards/chosen"]) == pytest.approx(0.1) and float(sums["rewards/rejected"]) == pytest.approx(-0.1)
    assert float(sums["rewards/accuracies"]) == 1.0 and float(sums["rewards/margins"]) == pytest.approx(0.2)
    cdpo, _ = objectives.dpo_loss(*args, beta=beta, label_smoothing=0.1)
    assert float(cdpo) == pytest.approx(0.9 * softplus_neg(0.2) + 0.1 * softplus_neg(-0.2), rel=1e-6)
    ipo, _ = objectives.dpo_loss(*args, beta=beta, loss_type="ipo")
    assert float(ipo) == pytest.approx((2.0 - 1 / (2 * beta)) ** 2, rel=1e-6)
    hinge, _ = objectives.dpo_loss(*args, beta=beta, loss_type="hinge")
    assert float(hinge) == pytest.approx(0.8, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        objectives.dpo_loss(*args, loss_type="kto")


def test_kl_estimators_average_to_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(4):
        p = rng.dirichlet(np.ones(5))
        q = rng.dirichlet(np.ones(5))
        exact = float(np.sum(p * (np.log(p) - np.log(q))))
        lp, lq = jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))
        # Exact expectation under p: k1 and k3 are unbiased.
        for est in ("k1", "k3"):
            expectation = float(jnp.sum(jnp.asarray(p) * objectives.kl_penalty(lp, lq, est)))
            assert expectation == pytest.approx(exact, rel=1e-5)
        # Monte Carlo average of samples from p, within 4 standard errors.
        samples = rng.choice(5, size=200_000, p=p)
        for est in ("k1", "k3"):
            vals = np.asarray(objectives.kl_penalty(lp[samples], lq[samples], est), np.float64)
            assert abs(vals.mean() - exact) < 4 * vals.std() / math.sqrt(len(vals))
    # k2 is a second-order approximation: close for nearby distributions.
    p = np.array([0.3, 0.3, 0.4]); q = np.array([0.31, 0.29, 0.40])
    k2 = float(np.sum(p * np.asarray(objectives.kl_penalty(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)), "k2"))))
    assert k2 == pytest.approx(float(np.sum(p * np.log(p / q))), rel=0.05)


def gae_reference(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(n)):
            next_v = values[i, s + 1] if s + 1 < n else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    return adv, adv + values * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_equals_python_loop(gamma, lam):
    rng = np.random.default_rng(1)
    b, t = 5, 13
    rewards, values = rng.standard_normal((b, t)), rng.standard_normal((b, t))
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    adv, ret = objectives.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                              jnp.asarray(mask, jnp.float32), gamma=gamma, lam=lam)
    want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_whiten_masked():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    w = np.asarray(objectives.whiten(x, mask))
    np.testing.assert_allclose(w[0, :3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3], ddof=1), rtol=1e-5)
    assert w[0, 3] == 0.0


def test_ppo_policy_loss_first_minibatch_and_clipping():
    rng = np.random.default_rng(2)
    logp = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    adv = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    mask = jnp.ones((3, 4))
    loss, sums = objectives.ppo_policy_loss(logp, logp, adv, mask)
    assert float(sums["ratio"]) / 12 == 1.0 and float(sums["approxkl"]) == 0.0 and float(sums["clipfrac"]) == 0.0
    assert float(loss) == pytest.approx(-float(jnp.sum(adv)), rel=1e-6)
    # Hand case: ratio 1.5 with A = +1 is clipped at 1.2; ratio 0.5 with A = -1 is clipped at 0.8.
    new = jnp.log(jnp.array([[1.5, 0.5]]))
    loss, sums = objectives.ppo_policy_loss(new, jnp.zeros((1, 2)), jnp.array([[1.0, -1.0]]), jnp.ones((1, 2)))
    assert float(loss) == pytest.approx(-1.2 + 0.8, rel=1e-6)
    assert float(sums["clipfrac"]) == 2.0


def test_ppo_value_loss_hand_computed():
    loss, sums = objectives.ppo_value_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]]),
                                           jnp.array([[2.0, 0.1]]), jnp.ones((1, 2)), clip=0.2)
    # token 0: V=1, V_clip=0.2, R=2 -> max(1, 3.24) / 2; token 1: V=0, V_clip=0 -> 0.01 / 2
    assert float(loss) == pytest.approx(0.5 * 3.24 + 0.5 * 0.01, rel=1e-6)
    assert float(sums["clipfrac"]) == 1.0


def test_adaptive_kl_controller_follows_formula():
    beta = 0.1
    script = [(9.0, 0.2), (6.0, 0.0), (3.0, -0.2), (5.4, -0.1)]  # (KL, expected clipped error)
    for kl, e in script:
        new = objectives.adaptive_kl_coef(beta, kl, target=6.0, n_steps=256, horizon=10_000)
        assert float(new) == pytest.approx(beta * (1 + e * 256 / 10_000), rel=1e-6)  # float32
        beta = float(new)
    # Traceable: PPO calls it inside its jitted step with array arguments.
    jitted = jax.jit(lambda b, kl: objectives.adaptive_kl_coef(b, kl, 6.0, 256, 10_000))(0.1, 9.0)
    assert float(jitted) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000), rel=1e-6)
