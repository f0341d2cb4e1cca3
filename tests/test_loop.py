"""The generic loop's step: gradient accumulation equals the big batch; microbatch split; schedule;
non-finite steps are skipped, counted and stop the run; a crash after the export is finished by a rerun."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib, sharding
from jaxllm.train import loop, optim
from test_sharding import small_config, synthetic_batches, train


@pytest.mark.parametrize("mesh_shape, devices", [((1, 1, 1), 1), ((2, 2, 2), 8)])
def test_accumulation_equals_one_big_batch(mesh_shape, devices):
    """k accumulation steps of batch b give the loss and update of one step of batch k*b."""
    batches = synthetic_batches(2, 16, seed=1)
    want_losses, want = train(small_config(mesh_shape, batch_size=16), batches, jax.devices()[:devices])
    for k in (2, 4):
        losses, got = train(small_config(mesh_shape, batch_size=16, grad_accum_steps=k), batches,
                            jax.devices()[:devices])
        np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                     got.params, want.params)


def test_loss_is_normalised_by_real_tokens_of_the_global_batch():
    """Rows with many padded targets weigh by their real tokens, not per row."""
    batch = synthetic_batches(1, 4, seed=2)[0]
    batch["loss_mask"][0, 3:] = 0.0  # row 0 keeps 3 targets
    losses, _ = train(small_config((1, 1, 1), batch_size=4), [batch], jax.devices()[:1])
    # Independent: the same per-token losses averaged in float64 over the real targets.
    from jaxllm.models import llama
    from jaxllm.objectives import token_logprobs
    import flax.linen as nn
    c = small_config((1, 1, 1))
    model = llama.LlamaConfig.from_config(c.model)
    params = nn.unbox(jax.jit(lambda k: llama.init(model, k))(jax.random.key(c.seed)))
    logits = llama.apply(model, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = -np.asarray(token_logprobs(logits, jnp.asarray(batch["targets"])), np.float64)
    mask = batch["loss_mask"].astype(np.float64)
    np.testing.assert_allclose(losses[0], (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_microbatches_keep_every_row_once_and_stay_local():
    batch = {"x": jnp.arange(16 * 3).reshape(16, 3)}
    mbs = loop.microbatches(batch, 4)["x"]
    assert mbs.shape == (4, 4, 3)
    rows = sorted(tuple(r) for r in np.asarray(mbs).reshape(-1, 3).tolist())
    assert rows == sorted(tuple(r) for r in np.asarray(batch["x"]).tolist())
    # With 2 batch shards of 8 rows, each microbatch takes 2 rows from each shard's block.
    first_rows = np.asarray(mbs)[0, :, 0] // 3
    assert sorted(first_rows) == [0, 4, 8, 12]


def test_schedule_warmup_then_cosine_to_min():
    c = optim.default_config()
    c.update(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lr = optim.schedule(c, 110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    # Halfway through the decay: min + (max - min) * (1 + cos(pi/2)) / 2.
    assert float(lr(60)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-4)


def test_weight_decay_skips_vectors():
    c = optim.default_config()
    c.update(lr=0.1, warmup_steps=1, weight_decay=0.5, grad_clip=0.0, schedule="constant")
    tx, _ = optim.build(c, 10)
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    _, state = tx.update(zero, state, params)  # step 0 has lr 0
    updates, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], 0.0)


def test_rsqrt_schedule_is_t5s_inverse_square_root():
    c = optim.default_config()
    c.update(lr=1e-2, min_lr=1e-3, warmup_steps=100, schedule="rsqrt")
    lr = optim.schedule(c, 10_000)
    assert float(lr(0)) == 0.0 and float(lr(50)) == pytest.approx(5e-3)
    assert float(lr(100)) == pytest.approx(1e-2)
    assert float(lr(400)) == pytest.approx(1e-2 * (100 / 400) ** 0.5)  # 1/sqrt(step) after warmup
    assert float(lr(1_000_000)) == pytest.approx(1e-3)  # floor: min_lr
    c.warmup_steps = 0
    with pytest.raises(optim.ConfigError, match="warmup_steps"):
        optim.schedule(c, 10)


def test_adafactor_first_step_moves_each_parameter_by_lr_of_its_own_scale():
    """Step 1 of Adafactor: the second moment is g^2 (decay 1 - 1^-0.8 = 0), so the scaled update
    has RMS 1 (factored: close to 1) and is clipped at 1, then multiplied by lr and the parameter's
    RMS: |update| / RMS(p) = lr for an N(0, 1) embedding and for a 0.01-scale matrix alike."""
    c = optim.default_config()
    c.update(name="adafactor", lr=0.05, warmup_steps=1, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    tx, _ = optim.build(c, 10)
    rng = np.random.default_rng(0)
    params = {"embedding": jnp.asarray(rng.normal(0, 1.0, (256, 128)), jnp.float32),
              "w": jnp.asarray(rng.normal(0, 0.01, (128, 192)), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1e-3, p.shape), jnp.float32), params)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # warmup step 0: lr 0
    updates, _ = tx.update(grads, state, params)
    rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))  # noqa: E731
    for name in params:
        ratio = rms(updates[name]) / rms(params[name])
        assert 0.9 * c.lr < ratio <= 1.0001 * c.lr, (name, ratio)
    with pytest.raises(optim.ConfigError, match="optimizer.name"):
        c.name = "sgd"
        optim.build(c, 10)


def test_adafactor_trains_sharded_with_replicated_factored_statistics():
    c = small_config((2, 2, 2), batch_size=8)
    c.optimizer.update(name="adafactor", lr=1e-2)
    c.model.update(embed_dim=128, mlp_dim=256)  # dims >= 128: Adafactor factors these matrices
    batches = synthetic_batches(3, 8)
    losses, state = train(c, batches, jax.devices())
    assert losses[-1] < losses[0]
    shapes = {tuple(x.shape): x.sharding.spec for x in jax.tree.leaves(state.opt_state) if x.ndim == 1}
    assert (256,) in shapes or (128,) in shapes  # row / column statistics of factored matrices exist


# ---------------------------------------------------------------------------------------------
# Non-finite losses and the end-of-stage hand-off (issue 20)
# ---------------------------------------------------------------------------------------------


def poisoned_stage(config, batches, eval_batches=None):
    """The LM stage of `make_stage` on fixed batches; a batch whose `poison` is 1 has a NaN loss
    (with zero gradients), 2 a finite loss with NaN gradients."""
    import grain
    from jaxllm.models import llama
    from jaxllm.train import pretrain

    model = llama.LlamaConfig.from_config(config.model)
    lm_loss = pretrain.lm_loss_fn(model)

    def loss_fn(params, batch, rng):
        poison = jnp.max(batch["poison"])
        loss_sum, sums = lm_loss(params, {k: v for k, v in batch.items() if k != "poison"}, rng)

        def grad_only(p):  # value 0, gradient NaN
            s = jnp.sum(p["final_norm"]["scale"])
            return jnp.sqrt(jnp.square(s - jax.lax.stop_gradient(s)))

        # `cond` differentiates the taken branch only (a `where` would spread the NaN gradients).
        loss_sum = loss_sum + jax.lax.cond(poison == 2, grad_only, lambda p: 0.0, params)
        return jnp.where(poison == 1, jnp.nan, loss_sum), sums

    def source(rows):
        return None if rows is None else grain.MapDataset.source(rows)

    return loop.Stage(name="pretrain", init_params=lambda rng: llama.init(model, rng), loss_fn=loss_fn,
                      train_data=source(batches), eval_data=source(eval_batches), tokens_per_step=1)


def poisoned_batches(n, batch_size, poison=()):
    batches = synthetic_batches(n, batch_size, seed=5)
    for i, batch in enumerate(batches):
        batch["poison"] = np.full((batch_size,), dict(poison).get(i, 0), np.int32)
    return batches


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged():
    config = small_config((1, 1, 1), batch_size=4)
    batches = poisoned_batches(5, 4, poison={2: 1, 3: 2})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    compiled = loop.compile_stage(config, poisoned_stage(config, batches), mesh)
    with sharding.activate(mesh, config.mesh.rules):
        state = compiled.init_state()
        before, flags = [], []
        for batch in batches:
            before.append(jax.device_get(state))  # the step donates the state
            state, metrics = compiled.train_step(state, sharding.global_batch(batch, mesh, config.mesh.rules))
            flags.append(float(metrics["nonfinite"]))
            assert int(state.step) == len(before)
        after = jax.device_get(state)
    assert flags == [0.0, 0.0, 1.0, 1.0, 0.0]
    states = before[1:] + [after]
    same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))  # noqa: E731
    # Steps 2 and 3 (NaN loss; finite loss with NaN gradients) are skipped: params and optimizer
    # state stay exactly as they were. Steps 1 and 4 update them (step 0 has learning rate 0).
    for i, skipped in enumerate([False, False, True, True, False]):
        assert same(before[i].params, states[i].params) == (skipped or i == 0), i
        assert same(before[i].opt_state, states[i].opt_state) == skipped, i
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))


def strict_rows(path):
    """metrics.jsonl rows, parsed as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(name):
        raise ValueError(f"{path}: bare {name} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def stage_run_config(tmp_path, steps, **train):
    config = small_config((1, 1, 1), batch_size=4, steps=steps)
    config.run_dir = str(tmp_path / "run")
    config.train.update(progress_bar=False, eval_every=0, **train)
    config.checkpoint.update(every_steps=4, every_minutes=0.0, async_save=False)
    return config


def test_consecutive_nonfinite_steps_stop_the_run_without_a_hand_off(tmp_path):
    """One bad step is skipped and counted; `train.max_nonfinite_steps` bad steps in a row stop
    the run with a one-line error, before any checkpoint, export or done.json of that state."""
    config = stage_run_config(tmp_path, steps=12, log_every=2, max_nonfinite_steps=3)
    bad = {1: 1, 5: 2, 6: 1, 7: 1}  # 0-based batches: step 2 alone, then steps 6, 7, 8 in a row
    batches = poisoned_batches(12, 4, poison=bad)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with pytest.raises(loop.NonFiniteError, match="max_nonfinite_steps") as info:
        loop.run(config, poisoned_stage(config, batches), mesh)
    assert isinstance(info.value, config_lib.ConfigError) and "\n" not in str(info.value)
    assert "steps 6-8" in str(info.value), str(info.value)
    stage_dir = tmp_path / "run" / "pretrain"
    assert not (stage_dir / "params").exists() and not (stage_dir / "done.json").exists()
    saved = sorted(int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [4]  # every 4 steps, but not at the stop (step 8)
    rows = strict_rows(stage_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [r["nonfinite_steps"] for r in rows] == [1, 0, 1, 2]
    assert rows[3]["loss"] is None  # only skipped steps: no value
    assert all(isinstance(r["loss"], float) for r in rows[:3])  # the applied steps of each window


def test_a_crash_after_export_is_finished_by_the_rerun(tmp_path, monkeypatch):
    """`export_params` done but no done.json (a crash in between): the rerun, at start == steps,
    writes done.json with the final evaluation, without a second eval row."""
    from jaxllm import checkpoint as ckpt_lib

    config = stage_run_config(tmp_path, steps=3, log_every=1)
    batches, evals = poisoned_batches(3, 4), poisoned_batches(1, 4)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    export = ckpt_lib.export_params

    def export_then_crash(directory, params):
        export(directory, params)
        raise RuntimeError("crash after export")

    monkeypatch.setattr(ckpt_lib, "export_params", export_then_crash)
    with pytest.raises(RuntimeError, match="crash after export"):
        loop.run(config, poisoned_stage(config, batches, evals), mesh)
    stage_dir = tmp_path / "run" / "pretrain"
    assert (stage_dir / "params").is_dir() and not (stage_dir / "done.json").exists()
    monkeypatch.setattr(ckpt_lib, "export_params", export)
    result = loop.run(config, poisoned_stage(config, batches, evals), mesh)
    done = json.loads((stage_dir / "done.json").read_text())
    assert done["step"] == 3 and set(done["eval"]) == {"eval/loss"}
    assert done["eval"] == result.eval_metrics
    evals_rows = [r for r in strict_rows(stage_dir / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals_rows] == [3] and evals_rows[0]["eval/loss"] == done["eval"]["eval/loss"]
