"""The generic loop's step: gradient accumulation equals the big batch; microbatch split; schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
