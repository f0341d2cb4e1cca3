"""Sharded training equals single-device training; FSDP really splits the state; bad meshes fail."""

import math

import jax
import numpy as np
import pytest

from jaxllm import sharding
from jaxllm.models import llama
from jaxllm.train import loop, pretrain


def small_config(mesh_shape, *, batch_size=8, grad_accum_steps=1, steps=3):
    c = pretrain.default_config()
    c.model.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
    c.mesh.shape = mesh_shape
    c.train.update(steps=steps, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    # Adam divides by sqrt(v) + eps: with the default eps, a parameter whose gradient is ~0 (a rare
    # token's embedding) turns float re-association noise of order 1e-9 into a visible update
    # difference. A larger eps keeps updates proportional to gradients so params compare tightly.
    c.optimizer.update(lr=1e-2, warmup_steps=1, eps=1e-3)
    return c


def synthetic_batches(n, batch_size, length=16, vocab=256, seed=0):
    """Packed rows of 1-3 random documents each, shaped like `jaxllm.data.lm` batches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, (batch_size, length + 1)).astype(np.int32)
        seg = np.zeros((batch_size, length + 1), np.int32)
        pos = np.zeros_like(seg)
        for b in range(batch_size):
            cuts = sorted(rng.choice(np.arange(2, length - 1), rng.integers(0, 3), replace=False))
            bounds = [0, *cuts, length + 1 - rng.integers(0, 3)]
            for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                seg[b, lo:hi], pos[b, lo:hi] = s + 1, np.arange(hi - lo)
        out.append({
            "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
            "loss_mask": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(np.float32),
        })
    return out


def make_stage(config):
    model = llama.LlamaConfig.from_config(config.model)
    return loop.Stage(name="pretrain", init_params=lambda rng: llama.init(model, rng),
                      loss_fn=pretrain.lm_loss_fn(model), train_data=None)


def train(config, batches, devices):
    """Runs one train step per batch on a mesh over `devices`; returns (losses, final state)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    compiled = loop.compile_stage(config, make_stage(config), mesh)
    losses = []
    with sharding.activate(mesh, config.mesh.rules):
        state = compiled.init_state()
        for batch in batches:
            state, metrics = compiled.train_step(state, sharding.global_batch(batch, mesh, config.mesh.rules))
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return losses, state


@pytest.fixture(scope="module")
def single_device_run():
    batches = synthetic_batches(3, 8)
    return batches, train(small_config((1, 1, 1)), batches, jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_does_not_change_losses(mesh_shape, single_device_run):
    batches, (want_losses, want_state) = single_device_run
    losses, state = train(small_config(mesh_shape), batches, jax.devices())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 state.params, want_state.params)


def test_fsdp_splits_params_and_optimizer_state():
    config = small_config((1, 8, 1))
    mesh = sharding.make_mesh(config.mesh)
    compiled = loop.compile_stage(config, make_stage(config), mesh)
    with sharding.activate(mesh, config.mesh.rules):
        state = compiled.init_state()
    for tree in (state.params, state.opt_state):
        leaves = [x for x in jax.tree.leaves(tree) if x.ndim > 0]
        total = sum(x.size for x in leaves)
        for device in jax.devices():
            held = sum(math.prod(s.data.shape) for x in leaves for s in x.addressable_shards if s.device == device)
            assert held == total // 8, (device, held, total)
    embed = state.params["embed_tokens"]
    assert embed.addressable_shards[0].data.shape == (256, 64 // 8)


def test_tensor_parallel_shards_heads_and_mlp():
    config = small_config((1, 1, 4))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    compiled = loop.compile_stage(config, make_stage(config), mesh)
    with sharding.activate(mesh, config.mesh.rules):
        state = compiled.init_state()
    layer = state.params["layers_0"]
    assert layer["attn"]["q_proj"].addressable_shards[0].data.shape == (64, 1, 16)
    assert layer["mlp"]["gate_proj"].addressable_shards[0].data.shape == (64, 32)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 1), "mesh.shape"),
    ((2, 2, 1), "mesh.shape"),
    ((-1, -1, 1), "at most one -1"),
    ((2, 2), "3 entries"),
    ((3, -1, 1), "cannot be filled"),
])
def test_impossible_mesh_is_a_clear_error(shape, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(small_config(shape).mesh)


def test_indivisible_parameter_names_it():
    config = small_config((1, 1, 8))  # 4 heads over 8 tensor shards
    mesh = sharding.make_mesh(config.mesh)
    with pytest.raises(sharding.MeshError, match=r"heads=4 is not divisible"):
        loop.compile_stage(config, make_stage(config), mesh)
