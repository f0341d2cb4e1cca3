"""The reward model's index of the last real token, its first train step's metrics, and DPO at step 0.

- `reward.sequence_rewards` / `segment_last_indices` against a hand-computed case and a NumPy loop
  on right-padded, left-padded and packed rows, and against the lengths of real preference batches.
- One step of the reward stage (in-process, one device) on random SFT params: its logged `loss`,
  `accuracy`, `margin` and mean rewards equal a float64 recomputation from the scalar head read at
  each sequence's last token of the same first batch.
- Packed rows (several groups per row): the same rewards, DPO log-probs and reward loss sums as
  one group per row.
- DPO at step 0: the policy is the reference, so every log-ratio is 0, the sigmoid loss is log 2
  and the implicit rewards and margins are 0 (through the reference table and the loss fn).
- DPO after one step (sigmoid, IPO, hinge, cDPO): the chosen-minus-rejected log-ratio rises, and
  the reported loss equals the papers' formulas in float64 on the stage's own log-probs.
- K = 3 ranked groups with Llama-2 margins and reward centering: the first step's loss against a
  float64 enumeration.
- The DPO reference cache is keyed by the reference params' values (a mesh-independent
  fingerprint) and the rendered data: new SFT params or another seq_len recompute it.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import checkpoint as ckpt_lib
from jaxllm import sharding
from jaxllm.data import chat, lm, preference
from jaxllm.train import dpo, loop, metrics as metrics_lib, reward
from test_inference import make_run, reference_rewards


# ---------------------------------------------------------------------------------------------
# The index of the last real token
# ---------------------------------------------------------------------------------------------


def test_last_token_index_by_hand():
    segment_ids = jnp.array([
        [1, 1, 1, 0, 0, 0],  # right-padded
        [0, 0, 1, 1, 1, 1],  # left-padded
        [1, 1, 2, 2, 2, 0],  # packed: two sequences, then padding
        [0, 0, 0, 0, 0, 0],  # an empty padding row
    ], jnp.int32)
    assert reward.segment_last_indices(segment_ids, 3).tolist() == [
        [2, -1, -1], [5, -1, -1], [1, 4, -1], [-1, -1, -1]]
    scores = jnp.arange(24, dtype=jnp.float32).reshape(4, 6) / 10
    # Right-padded rows of lengths 3 and 6: scores[0, 2] and scores[1, 5].
    assert reward.sequence_rewards(scores[:2], jnp.array([3, 6])).tolist() == pytest.approx([0.2, 1.1])


def numpy_last_indices(segment_ids, max_segments):
    out = np.full((len(segment_ids), max_segments), -1)
    for b, row in enumerate(segment_ids):
        for t, s in enumerate(row):
            if 1 <= s <= max_segments:
                out[b, s - 1] = t
    return out


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_last_token_index_matches_a_numpy_loop(layout):
    rng = np.random.default_rng({"right": 0, "left": 1, "packed": 2}[layout])
    batch, length = 16, 12
    segment_ids = np.zeros((batch, length), np.int32)
    lengths = rng.integers(1, length + 1, batch)
    for b, n in enumerate(lengths):
        if layout == "right":
            segment_ids[b, :n] = 1
        elif layout == "left":
            segment_ids[b, length - n:] = 1
        else:
            cuts = np.sort(rng.choice(np.arange(1, n), min(2, n - 1), replace=False)) if n > 1 else []
            for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, n])):
                segment_ids[b, lo:hi] = s + 1
    got = np.asarray(reward.segment_last_indices(jnp.asarray(segment_ids), 3))
    np.testing.assert_array_equal(got, numpy_last_indices(segment_ids, 3))
    scores = rng.standard_normal((batch, length)).astype(np.float32)
    if layout == "right":  # the reward stage's layout: lengths give the same index
        np.testing.assert_array_equal(got[:, 0], lengths - 1)
        np.testing.assert_array_equal(np.asarray(reward.sequence_rewards(jnp.asarray(scores), jnp.asarray(lengths))),
                                      scores[np.arange(batch), lengths - 1])
    elif layout == "left":  # every row's last real token is in the last column
        assert (got[:, 0] == length - 1).all()


# ---------------------------------------------------------------------------------------------
# Reward stage: first step
# ---------------------------------------------------------------------------------------------


def pair(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with a random `sft` stage and a small preference file (pairs of different lengths)."""
    root = tmp_path_factory.mktemp("reward_stage") / "run"
    tok, model_config, params = make_run(root, stages=("sft",))
    rng = np.random.default_rng(0)
    words = ["yes", "no", "maybe later", "the answer is 4", "I do not know", "sure!"]
    records = [pair(f"question {i}?" + "?" * int(rng.integers(0, 6)), words[i % 6], words[(i + 1) % 6] + "." * i)
               for i in range(12)]
    path = root.parent / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, tok, model_config, params["sft"], path


def stage_config(module, root, path, **train):
    config = module.default_config()
    config.run_dir = str(root)
    config.mesh.shape = (1, 1, 1)
    config.data.update(sources=f"jsonl:{path}", eval_sources="", seq_len=48)
    config.train.update(steps=1, batch_size=4, log_every=1, eval_every=0, progress_bar=False, **train)
    config.checkpoint.update(every_steps=0, every_minutes=0.0, async_save=False)
    config.optimizer.update(warmup_steps=1, decay_steps=10)  # the first step's learning rate is 0
    return config


def one_device_mesh(config):
    return sharding.make_mesh(config.mesh, jax.devices()[:1])


@pytest.mark.slow
def test_reward_stage_first_step_metrics(run):
    root, tok, model_config, sft_params, path = run
    config = stage_config(reward, root, path)
    mesh = one_device_mesh(config)
    loop.run(config, reward.build_stage(config, tok, mesh), mesh)

    (row,) = [r for r in metrics_lib.read_metrics(root / "reward") if "loss" in r]
    assert row["step"] == 1
    # Warmup starts at learning rate 0, so the first step leaves the params as they started:
    # the exported params are the ones that produced the logged metrics.
    assert row["learning_rate"] == 0.0
    abstract = nn.unbox(jax.eval_shape(lambda: reward.init_scalar_params(model_config, jax.random.key(0))))
    params = ckpt_lib.load_params(root / "reward" / "params", abstract)
    for key, value in sft_params.items():  # the backbone came from the SFT params, the LM head did not
        if key != "lm_head":
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params[key], value)
    assert "lm_head" not in params and params["score_head"].shape == (model_config.embed_dim, 1)

    # The first train batch, as the loop read it, scored independently.
    batch = preference.preference_dataset(config.data, tok, split="train", global_batch_size=4, seed=config.seed,
                                          cache_dir=lm.resolve_cache_dir(config.data, root))[0]
    assert batch["response_mask"].all()
    sequences = [batch["inputs"][g, k, :batch["lengths"][g, k]] for g in range(4) for k in range(2)]
    rewards = np.asarray(reference_rewards(model_config, params, sequences), np.float64).reshape(4, 2)
    rc, rr = rewards[:, 0], rewards[:, 1]
    diff = rc - rr
    assert np.abs(diff).min() > 1e-5  # no near-ties, so the accuracy is not decided by rounding
    np.testing.assert_allclose(row["loss"], np.mean(np.log1p(np.exp(-diff))), rtol=1e-6)
    assert row["accuracy"] == np.mean(diff > 0)
    np.testing.assert_allclose(row["margin"], diff.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["rewards/chosen"], rc.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["rewards/rejected"], rr.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["margin"], row["rewards/chosen"] - row["rewards/rejected"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_reward_stage_ranked_groups_with_margins_and_centering(run, tmp_path):
    """K = 3 (InstructGPT's ranking loss) with Llama-2 margins on some groups, ties, 2-response
    groups and `center_coef`: the first step's logged loss and accuracy equal a float64
    enumeration over the first batch's ordered pairs (`test_objectives`)."""
    from test_objectives import ranking_reference_with_margin

    root, tok, model_config, _, _ = run
    answers = ["yes", "no", "maybe later", "the answer is 4", "I do not know", "sure!"]
    records = []
    for i in range(8):
        k = 3 if i % 2 == 0 else 2
        responses = [answers[(i + j) % 6] + "!" * j for j in range(k)]
        ranks = [0, 1, 1] if i % 4 == 2 else list(range(k))
        record = {"prompt": [{"role": "user", "content": f"question {i}?"}], "responses": responses, "ranks": ranks}
        if i % 3 != 1:
            record["margin"] = 0.5 + i / 4
        records.append(record)
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = stage_config(reward, tmp_path / "run", path)
    config.init_run_dir = str(root)  # the SFT params of the shared run
    config.data.max_responses = 3
    config.center_coef = 0.1
    mesh = one_device_mesh(config)
    loop.run(config, reward.build_stage(config, tok, mesh), mesh)

    (row,) = [r for r in metrics_lib.read_metrics(tmp_path / "run" / "reward") if "loss" in r]
    assert row["learning_rate"] == 0.0  # the exported params produced the logged metrics
    abstract = nn.unbox(jax.eval_shape(lambda: reward.init_scalar_params(model_config, jax.random.key(0))))
    params = ckpt_lib.load_params(tmp_path / "run" / "reward" / "params", abstract)
    batch = preference.preference_dataset(config.data, tok, split="train", global_batch_size=4, seed=config.seed,
                                          cache_dir=lm.resolve_cache_dir(config.data, tmp_path / "run"))[0]
    mask = batch["response_mask"]
    assert sorted(mask.sum(axis=1).tolist()) != [3.0] * 4 and batch["has_margin"].any()  # mixed K, margins
    cells = [(g, k) for g in range(4) for k in range(3) if mask[g, k]]
    scores = reference_rewards(model_config, params, [batch["inputs"][g, k, :batch["lengths"][g, k]] for g, k in cells])
    rewards = np.zeros((4, 3))
    for (g, k), r in zip(cells, scores):
        rewards[g, k] = r
    margins = batch["margin"] * batch["has_margin"]
    want = ranking_reference_with_margin(rewards, batch["ranks"], mask, margins, 0.1) / 4  # 4 groups with pairs
    np.testing.assert_allclose(row["loss"], want, rtol=1e-5)
    ordered = [(rewards[g, i] > rewards[g, j]) for g in range(4) for i in range(3) for j in range(3)
               if mask[g, i] and mask[g, j] and batch["ranks"][g, i] < batch["ranks"][g, j]]
    assert row["accuracy"] == pytest.approx(np.mean(ordered))


def test_preference_batches_put_the_last_token_at_lengths_minus_one(run):
    root, tok, _, _, path = run
    config = stage_config(reward, root, path)
    data = preference.preference_dataset(config.data, tok, split="train", global_batch_size=4, seed=0)
    template = chat.ChatTemplate(tok)
    for batch in (data[0], data[1]):
        segment_ids = batch["segment_ids"].reshape(8, -1)
        last = np.asarray(reward.segment_last_indices(jnp.asarray(segment_ids), 1))[:, 0]
        np.testing.assert_array_equal(last, batch["lengths"].reshape(-1) - 1)
        # ... and that token closes the response's assistant turn.
        assert (batch["inputs"].reshape(8, -1)[np.arange(8), last] == template.end_id).all()


def test_packed_batches_give_the_unpacked_rewards_logps_and_losses(run):
    """Packed rows (`data.groups_per_row`) score every group as its own unpacked row does."""
    root, tok, model_config, sft_params, path = run
    config = stage_config(reward, root, path)
    view = preference.preference_groups(config.data, tok, split="train", seed=0).view()
    n = view.num_groups
    plain = preference.batch_groups(view, global_batch_size=n)[0]
    packed_data = preference.batch_groups(view, global_batch_size=2, groups_per_row=4)
    packed = [packed_data[s] for s in range(len(packed_data))]
    rm_params = nn.unbox(reward.init_scalar_params(model_config, jax.random.key(1)))
    rm_params = {**{k: v for k, v in sft_params.items() if k != "lm_head"}, "score_head": rm_params["score_head"]}
    rewards = jax.jit(lambda p, b: reward.group_rewards(model_config, p, b))
    logps = jax.jit(lambda p, b: dpo.group_logps(model_config, p, b))
    want_r, want_l = np.asarray(rewards(rm_params, plain)), np.asarray(logps(sft_params, plain))
    assert np.ptp(want_r) > 1e-3 and (want_l < -1.0).all()  # distinct values, so a mix-up shows
    got_r, got_l, seen = np.full_like(want_r, np.nan), np.full_like(want_l, np.nan), []
    for batch in packed:
        groups = preference.flat_groups(batch)
        used = groups["response_mask"].any(axis=1)
        index = groups["group_index"][used]
        got_r[index] = np.asarray(rewards(rm_params, batch))[used]
        got_l[index] = np.asarray(logps(sft_params, batch))[used]
        seen += index.tolist()
    rows = sum(int(b["segment_ids"].any(axis=(1, 2)).sum()) for b in packed)
    assert sorted(seen) == list(range(n)) and rows < n
    np.testing.assert_allclose(got_r, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)

    # The reward loss fn over the packed batches sums to its value over the unpacked batch.
    loss_fn = jax.jit(reward.reward_loss_fn(model_config, 2, center_coef=0.1))
    want_sum, want = loss_fn(rm_params, plain, None)
    parts = [loss_fn(rm_params, batch, None) for batch in packed]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(want_sum), rtol=1e-5)
    for key in ("count", "correct", "margin"):
        np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), float(want[key]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DPO at step 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups_per_row", [1, 4])
def test_dpo_loss_at_step_zero_is_log_2(run, tmp_path, groups_per_row):
    root, tok, model_config, sft_params, path = run
    config = stage_config(dpo, root, path)
    mesh, rules = one_device_mesh(config), config.mesh.rules
    common = dict(seed=config.seed, cache_dir=str(tmp_path / "cache"))
    groups = preference.preference_groups(config.data, tok, split="train", **common)
    layout = dict(global_batch_size=4, groups_per_row=groups_per_row)
    table = dpo.reference_table(model_config, sft_params,
                                lambda only: preference.batch_groups(groups.view(only), **layout),
                                groups.num_groups, mesh, rules, tmp_path / "ref.npy",
                                needed=preference.visited_groups(groups, 8, groups_per_row))
    data = dpo.with_reference(preference.batch_groups(groups, **layout), table)
    for s in range(2):  # the 8 rows the table was made for find their reference values
        reference = preference.flat_groups(data[s])
        assert np.isfinite(reference["ref_logps"][reference["response_mask"].any(axis=1)]).all()
    loss_fn = jax.jit(dpo.dpo_loss_fn(model_config, config.dpo))
    with sharding.activate(mesh, rules):
        loss_sum, sums = loss_fn(sft_params, sharding.global_batch(data[0], mesh, rules), None)
    count = float(sums["count"])
    assert count == preference.flat_groups(data[0])["response_mask"].all(axis=1).sum() >= 4
    logps = float(sums["logps/chosen"]) / count
    assert logps < -1.0  # real sequence log-probs, so a zero log-ratio is not trivial
    np.testing.assert_allclose(float(loss_sum) / count, math.log(2.0), rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(sums[key]) / count) < 1e-6 * abs(logps), key


def np_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, eps):
    """Per-pair DPO-family losses in float64, from the papers: DPO (Rafailov et al. 2023, eq. 7)
    with cDPO's label smoothing `eps` (Mitchell 2023), IPO (Azar et al. 2023, eq. 17), hinge
    (SLiC, Zhao et al. 2023)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":  # -log sigmoid(x) = log(1 + exp(-x))
        return (1 - eps) * np.log1p(np.exp(-beta * h)) + eps * np.log1p(np.exp(beta * h))
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return np.maximum(0.0, 1 - beta * h)


def test_one_dpo_step_raises_the_log_ratio_and_reports_the_float64_loss(run, tmp_path):
    """At step 0 the policy is the reference (h = 0), so the loss is the same whatever the sign
    or beta. One gradient step of the stage's loss fn must raise the chosen-minus-rejected
    log-ratio h for every loss (sigmoid, IPO, hinge, cDPO); after it (h != 0) the loss the stage
    reports equals the papers' formulas in float64 on the stage's own policy and reference log-probs."""
    root, tok, model_config, sft_params, path = run
    config = stage_config(dpo, root, path)
    mesh, rules = one_device_mesh(config), config.mesh.rules
    groups = preference.preference_groups(config.data, tok, split="train", seed=config.seed,
                                          cache_dir=str(tmp_path / "cache"))
    table = dpo.reference_table(model_config, sft_params,
                                lambda only: preference.batch_groups(groups.view(only), global_batch_size=4),
                                groups.num_groups, mesh, rules, tmp_path / "ref.npz",
                                needed=preference.visited_groups(groups, 4, 1))
    batch = dpo.with_reference(preference.batch_groups(groups, global_batch_size=4), table)[0]
    flat = preference.flat_groups(batch)
    pairs = flat["response_mask"].all(axis=1)
    ref = np.asarray(flat["ref_logps"], np.float64)[pairs]
    logps = jax.jit(lambda p, b: dpo.group_logps(model_config, p, b))
    for loss_type, eps, beta in [("sigmoid", 0.0, 0.1), ("ipo", 0.0, 0.5), ("hinge", 0.0, 0.2), ("sigmoid", 0.2, 0.1)]:
        config.dpo.update(loss_type=loss_type, label_smoothing=eps, beta=beta)
        loss_fn = dpo.dpo_loss_fn(model_config, config.dpo)

        def mean_loss(params, batch):
            loss_sum, sums = loss_fn(params, batch, None)
            return loss_sum / sums["count"]

        with sharding.activate(mesh, rules):
            b = sharding.global_batch(batch, mesh, rules)
            grads = jax.jit(jax.grad(mean_loss))(sft_params, b)
            # One normalised gradient step: the same small move for every loss's gradient scale.
            size = 0.005 / float(optax.tree.norm(grads))
            params = jax.tree.map(lambda x, g: x - size * g, sft_params, grads)
            loss_sum, sums = jax.jit(loss_fn)(params, b, None)
            got = np.asarray(logps(params, b), np.float64)[pairs]
        h = (got[:, 0] - ref[:, 0]) - (got[:, 1] - ref[:, 1])
        assert np.abs(h).max() < 5.0 and h.mean() > 0.05, (loss_type, eps, h)  # moved, the right way
        reported = dpo.summarize({"loss_sum": float(loss_sum), **{k: float(v) for k, v in sums.items()}})
        want = np_dpo_loss(got[:, 0], got[:, 1], ref[:, 0], ref[:, 1], beta, loss_type, eps)
        np.testing.assert_allclose(reported["loss"], want.mean(), rtol=1e-5, err_msg=f"{loss_type} eps={eps}")
        np.testing.assert_allclose(reported["rewards/margins"], beta * h.mean(), rtol=1e-4, atol=1e-6)


def test_dpo_reference_covers_the_visited_groups_and_extends_its_cache(run, tmp_path, monkeypatch):
    root, tok, model_config, sft_params, path = run
    config = stage_config(dpo, root, path)
    mesh, rules = one_device_mesh(config), config.mesh.rules
    common = dict(seed=config.seed, cache_dir=str(tmp_path / "cache"))
    groups = preference.preference_groups(config.data, tok, split="train", **common)
    n = groups.num_groups
    read = []

    def make(only):
        read.append(np.asarray(only).tolist())
        return preference.batch_groups(groups.view(only), global_batch_size=4)

    full = dpo.reference_table(model_config, sft_params, make, n, mesh, rules, tmp_path / "full.npy")
    assert np.isfinite(full).all() and read == [list(range(n))]
    first, more = groups.visited(3), groups.visited(8)
    assert 0 < len(first) < len(more) <= n
    part = dpo.reference_table(model_config, sft_params, make, n, mesh, rules, tmp_path / "part.npy", needed=first)
    np.testing.assert_allclose(part[first], full[first], rtol=1e-6)
    assert np.isnan(np.delete(part, first, axis=0)).all()
    # A longer run reuses the cached table and computes only the groups it lacks.
    again = dpo.reference_table(model_config, sft_params, make, n, mesh, rules, tmp_path / "part.npy", needed=more)
    assert read[-1] == sorted(set(more.tolist()) - set(first.tolist()))
    np.testing.assert_allclose(again[more], full[more], rtol=1e-6)
    # Every train batch of those steps finds its reference values.
    data = dpo.with_reference(preference.batch_groups(groups, global_batch_size=4), again)
    for s in range(2):
        assert np.isfinite(data[s]["ref_logps"]).all()


def test_dpo_reference_cache_is_recomputed_for_new_params_or_rendering(run, tmp_path):
    """The cached reference log-probs belong to one reference model and one rendering of the data:
    new SFT params, or a seq_len that cuts prompts differently (same number of groups), recompute
    them; an unchanged rerun reuses them."""
    from test_inference import make_run, random_params

    _, _, _, _, path = run
    root = tmp_path / "run"
    tok, model_config, params = make_run(root, stages=("sft",))
    logps = jax.jit(lambda p, b: dpo.group_logps(model_config, p, b))

    def first_batches(sft_params, seq_len):
        config = stage_config(dpo, root, path)
        config.data.seq_len = seq_len
        config.sample.prompts = ()
        mesh = one_device_mesh(config)
        stage = dpo.build_stage(config, tok, mesh)
        batch = stage.train_data[0]  # the steps x batch rows the table was made for
        used = batch["response_mask"].all(axis=1)
        return [(batch["ref_logps"][used], np.asarray(logps(sft_params, batch))[used])]

    def check(pairs, stale=None):
        for k, (got, want) in enumerate(pairs):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            if stale is not None:  # the stale table would fail the check above
                assert np.abs(stale[k][0] - want).max() > 1e-2

    before = first_batches(params["sft"], 48)
    check(before)
    mtime = (root / "dpo" / "reference").stat().st_mtime_ns
    check(first_batches(params["sft"], 48))  # unchanged: reused
    assert (root / "dpo" / "reference").stat().st_mtime_ns == mtime

    new_params = random_params(model_config, "lm", 7, tok.unk_id, tok.role_id("end_of_turn"))
    ckpt_lib.export_params(root / "sft" / "params", new_params)  # SFT rerun with other results
    after = first_batches(new_params, 48)
    check(after, stale=before)

    cut = first_batches(new_params, 32)  # the same 12 groups, long prompts cut to fit 32 tokens
    check(cut, stale=after)


def test_params_fingerprint_ignores_the_mesh_and_sees_one_element(run):
    """The reference key's params fingerprint: equal for the same values on any mesh (exact
    integer sums), different when one element of one leaf changes by one ulp."""
    from jaxllm.models import llama

    _, _, model_config, sft_params, _ = run

    def on(shape, params):
        c = sharding.default_config()
        c.shape = shape
        mesh = sharding.make_mesh(c, jax.devices()[:int(np.prod(shape))])
        abstract = loop.abstract_params(lambda r: llama.init(model_config, r), mesh, c.rules)
        return dpo.params_fingerprint(jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract), mesh)

    one = on((1, 1, 1), sft_params)
    assert on((1, 8, 1), sft_params) == one and on((2, 2, 2), sft_params) == one
    nudged = jax.tree.map(np.array, sft_params)
    leaf = jax.tree.leaves(nudged)[-1]
    leaf.flat[7] = np.nextafter(leaf.flat[7], np.float32(np.inf))
    assert on((1, 1, 1), nudged) != one
