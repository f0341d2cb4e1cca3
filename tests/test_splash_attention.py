"""TPU splash attention (`model.attention_impl="splash"`, `layers.splash_attention`).

On CPU the Pallas kernel runs in interpret mode (the same kernel program, executed with XLA ops),
so its masking, grouped-query head mapping, scaling and block-sparse tiling are checked here
against a float64 loop written from the definition (softmax(q k^T / sqrt(head_dim)) v over the
keys of the same segment at or before the query) and against the einsum attention of
`layers.dot_product_attention`. On TPU the compiled Mosaic kernel is used: the ahead-of-time
tests compile it (and a whole train step) for a v5e slice when libtpu is installed.

Tolerances: all f32. The outputs are convex combinations of values with |v| < 5; f32 rounds each
product and sum to 2^-24 relative, and the kernel's online softmax rescales partial sums once per
128-key block (3 here), so the error of an output is a few hundred roundings of numbers of size
~5 in the worst case (~1e-4) and, with random signs, ~sqrt(keys) roundings in practice (~1e-6):
`ATOL = 2e-5` sits between, and a mask, scale or head-mapping mistake moves outputs by ~1e-1.
Gradients are compared relative to their largest entry with the same bound.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import aot
from jaxllm import objectives
from jaxllm import sharding
from jaxllm.config import ConfigError
from jaxllm.models import layers
from jaxllm.models import llama
from jaxllm.train import pretrain

ATOL = 2e-5


def packed_segment_ids(length: int, rows: list[list[int]]) -> np.ndarray:
    """`[len(rows), length]` int32: row r holds segments 1, 2, ... of lengths `rows[r]`, then padding."""
    out = np.zeros((len(rows), length), np.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for s, n in enumerate(lengths):
            out[r, start:start + n] = s + 1
            start += n
        assert start <= length
    return out


def float64_attention(q, k, v, segment_ids) -> np.ndarray:
    """Causal, segment-aware attention by definition, one query at a time, in float64.

    `q` `[b, l, h, d]`, `k, v` `[b, l, kvh, d]`; query head i reads kv head i // (h // kvh);
    query t sees keys s <= t with segment_ids[s] == segment_ids[t] (padding, 0, sees padding).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for t in range(length):
            keys = [s for s in range(t + 1) if segment_ids[i, s] == segment_ids[i, t]]
            for h in range(heads):
                scores = np.array([q[i, t, h] @ k[i, s, h // group] for s in keys]) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[i, t, h] = p @ v[i, keys, h // group]
    return out


def random_qkv(batch, length, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, head_dim))
    k = rng.normal(size=(batch, length, kv_heads, head_dim))
    v = rng.normal(size=(batch, length, kv_heads, head_dim))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v)]


def einsum_attention(q, k, v, segment_ids):
    return layers.dot_product_attention(q, k, v, layers.attention_mask(segment_ids), "xla")


def max_relative_gap(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))


def test_splash_matches_the_definition_with_packing_padding_and_gqa():
    """384 tokens = 3 key blocks of 128: segments cross block edges, the causal mask skips the
    blocks above the diagonal, and 4 query heads share 2 kv heads."""
    length = 384
    assert layers.splash_block_size(length) == 128
    q, k, v = random_qkv(2, length, heads=4, kv_heads=2, head_dim=16)
    seg = packed_segment_ids(length, [[100, 7, 150, 60], [length]])  # row 0 ends in 67 padding tokens
    out = jax.jit(layers.splash_attention)(q, k, v, jnp.asarray(seg))
    assert out.shape == q.shape and out.dtype == jnp.float32
    want = float64_attention(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(out, einsum_attention(q, k, v, jnp.asarray(seg)), rtol=0, atol=ATOL)


def test_splash_gradients_match_einsum_attention():
    """The kernel's own backward (dq and dk/dv Pallas kernels) against autodiff of the einsums."""
    length = 256
    q, k, v = random_qkv(2, length, heads=4, kv_heads=2, head_dim=16, seed=1)
    seg = jnp.asarray(packed_segment_ids(length, [[30, 130, 50], [200]]))
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    grad = lambda attend: jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg) * w), argnums=(0, 1, 2)))
    got, want = grad(layers.splash_attention)(q, k, v), grad(einsum_attention)(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert max_relative_gap(a, b) < ATOL, f"d{name}"


def test_splash_runs_per_shard_under_the_mesh():
    """On a (data 2, fsdp 2, tensor 2) mesh of the 8 CPU devices the kernel runs in a shard_map:
    each device has 1 row and 2 of 4 query heads with their 1 of 2 kv heads."""
    mesh_config = sharding.default_config()
    mesh_config.shape = (2, 2, 2)
    mesh = sharding.make_mesh(mesh_config)
    length = 128
    q, k, v = random_qkv(4, length, heads=4, kv_heads=2, head_dim=16, seed=3)
    seg = jnp.asarray(packed_segment_ids(length, [[60, 40], [128], [5, 5, 100], [1]]))
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(layers.splash_attention)(q, k, v, seg))
        out = jax.jit(layers.splash_attention)(q, k, v, seg)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(out, einsum_attention(q, k, v, seg), rtol=0, atol=ATOL)


def tiny_llama(attention_impl: str) -> llama.LlamaConfig:
    c = llama.default_config()
    c.update(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
             attention_impl=attention_impl)
    return llama.LlamaConfig.from_config(c)


@pytest.mark.slow
def test_llama_with_splash_equals_the_default_attention():
    """A whole forward and the LM loss's parameter gradients (the train step's backward)."""
    length = 128
    default, splash = tiny_llama(""), tiny_llama("splash")
    params = nn.unbox(llama.init(default, jax.random.key(0)))
    rng = np.random.default_rng(4)
    seg = packed_segment_ids(length, [[50, 70], [128]])
    positions = np.concatenate([np.arange(n) for n in (50, 70, 8)])[None].repeat(2, 0).astype(np.int32)
    positions[1] = np.arange(length)
    inputs = jnp.asarray(rng.integers(0, 128, size=(2, length)), jnp.int32)
    seg, positions = jnp.asarray(seg), jnp.asarray(positions)

    def loss(config, params):
        logits = llama.apply(config, params, inputs, positions, seg)
        loss_sum, _ = objectives.lm_loss(logits, jnp.roll(inputs, -1, axis=1), (seg > 0).astype(jnp.float32))
        return loss_sum, logits

    (loss_a, logits_a), grads_a = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)(
        default, params)
    (loss_b, logits_b), grads_b = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)(
        splash, params)
    np.testing.assert_allclose(logits_b, logits_a, rtol=0, atol=ATOL)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(grads_a)[0], jax.tree.leaves(grads_a),
                          jax.tree.leaves(grads_b)):
        assert max_relative_gap(b, a) < ATOL, jax.tree_util.keystr(path[0])


def test_splash_errors_name_the_setting():
    q, k, v = random_qkv(1, 100, heads=2, kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match=r"model.attention_impl='splash'.*100 tokens.*multiple of 128"):
        layers.splash_attention(q, k, v, jnp.ones((1, 100), jnp.int32))
    bad = llama.default_config()
    bad.update(vocab_size=128, attention_impl="flash")
    with pytest.raises(ConfigError, match=r"model.attention_impl='flash'"):
        llama.LlamaConfig.from_config(bad)
    config = tiny_llama("splash")
    params = nn.unbox(llama.init(config, jax.random.key(0)))  # the short init rows do not reach the kernel
    ids = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ConfigError, match=r"model.attention_impl='splash'.*prefix"):
        jax.eval_shape(lambda p: llama.apply(config, p, ids, ids, ids, prefix_mask=ids), params)


def test_decoding_with_a_cache_keeps_the_default_attention():
    """`decode` (prefill + a step, 5 + 1 tokens: no 128-token tiles) runs with attention_impl="splash"
    and gives the logits of the default model, as the cache path never calls the kernel."""
    default, splash = tiny_llama(""), tiny_llama("splash")
    params = nn.unbox(llama.init(default, jax.random.key(0)))
    ids = jnp.asarray([[3, 4, 5, 6, 7]], jnp.int32)
    positions = jnp.arange(5, dtype=jnp.int32)[None]
    out = {}
    for name, config in (("default", default), ("splash", splash)):
        cache = llama.init_cache(config, 1, 8)
        logits, cache = llama.decode(config, params, ids, positions, jnp.ones_like(ids), cache)
        step, _ = llama.decode(config, params, ids[:, -1:], positions[:, -1:] + 1, jnp.ones((1, 1), jnp.int32), cache)
        out[name] = (logits, step)
    for a, b in zip(out["default"], out["splash"]):
        np.testing.assert_array_equal(a, b)


def tpu_devices(topology: str):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jaxllm[tpu]'): no TPU "
                                         "topology to compile for")
    return aot.topology_devices(topology)


def test_tpu_compiles_the_mosaic_kernel():
    """For TPU devices the kernel is the compiled Mosaic program (a `tpu_custom_call` per forward,
    dq and dkv kernel), not interpret mode, although this process's backend is the CPU."""
    devices = tpu_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 2, 2), sharding.MESH_AXES)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
    args = [jax.ShapeDtypeStruct((2, 256, h, 64), jnp.bfloat16, sharding=spec) for h in (4, 2, 2)]
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None)))
    loss = lambda q, k, v, s: jnp.sum(layers.splash_attention(q, k, v, s).astype(jnp.float32))
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args, seg).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 3


def splash_pretrain_config(attention_impl: str):
    c = pretrain.default_config()
    c.model.update(vocab_size=512, embed_dim=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                   mlp_dim=512, dtype="bfloat16", attention_impl=attention_impl)
    c.mesh.shape = (1, 2, 2)  # rows over fsdp, heads over tensor
    c.train.batch_size = 8
    c.data.seq_len = 1024
    return c


@pytest.mark.slow
def test_train_step_with_splash_compiles_for_tpu():
    """The real train step (`jaxllm compile`'s path) with splash attention compiles for a v5e 2x2
    slice, and its memory and FLOPs come back. The kernel never materialises a `[length, length]`
    score matrix (its backward recomputes scores block by block from a saved logsumexp per query),
    so the step's XLA temporaries stay below one float32 score tensor of the chip's 4 rows x 2
    heads x 1024^2 (32 MiB); XLA's own attention needs 128 MiB of temporaries at 2048 tokens, where
    the splash step needs 8 MiB (measured with libtpu 0.0.42)."""
    devices = tpu_devices("v5e:2x2")
    config = splash_pretrain_config("splash")
    fit = aot.compile_step(config, devices, "v5e:2x2")
    assert fit.fits and not fit.error and fit.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 2}
    mc = llama.LlamaConfig.from_config(config.model)
    rows, length = config.train.batch_size, config.data.seq_len
    assert fit.flops == llama.flops_per_token(mc, length) * rows * length / 4
    # Every parameter is split over fsdp (embed) and most also over tensor: between 1/4 and 1/2 of it.
    assert llama.count_params(mc) * 4 / 4 <= fit.param_bytes <= llama.count_params(mc) * 4 / 2
    scores = (rows // 2) * (mc.num_heads // 2) * length**2 * 4
    assert 0 < fit.temp_bytes < scores, (fit.temp_bytes, scores)
