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
