"""The LLaMA-family decoder against an independent float64 NumPy implementation, and its invariances."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import objectives
from jaxllm.models import layers, llama


def make_config(**overrides):
    c = llama.default_config()
    c.update(dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                  rope_theta=500.0, norm_eps=1e-6))
    c.update(overrides)
    return llama.LlamaConfig.from_config(c)


def np_params(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(params))


# ---- float64 NumPy reference (written from the papers, not from the JAX code) --------------------

def ref_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x, positions, theta):
    """RoFormer rotation written with complex numbers: dims (i, i + d/2) form one complex pair."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * positions[..., None, None] * inv_freq)  # [b, l, heads, d/2]
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_attention(q, k, v, segment_ids):
    """Explicit loops over batch, head, query: softmax over allowed keys only."""
    b, length, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(heads):
            for i in range(length):
                allowed = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
                scores = np.array([q[bi, i, h] @ k[bi, j, h // group] for j in allowed]) / np.sqrt(d)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, i, h] = sum(wj * v[bi, j, h // group] for wj, j in zip(w, allowed))
    return out


def ref_forward(cfg, p, inputs, positions, segment_ids):
    x = p["embed_tokens"][inputs]
    for i in range(cfg.num_layers):
        lp = p[f"layers_{i}"]
        h = ref_rmsnorm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
        a = lp["attn"]
        q = np.einsum("ble,enh->blnh", h, a["q_proj"])
        k = np.einsum("ble,enh->blnh", h, a["k_proj"])
        v = np.einsum("ble,enh->blnh", h, a["v_proj"])
        if cfg.qkv_bias:
            q, k, v = q + a["q_bias"], k + a["k_bias"], v + a["v_bias"]
        q, k = ref_rope(q, positions, cfg.rope_theta), ref_rope(k, positions, cfg.rope_theta)
        att = ref_attention(q, k, v, segment_ids)
        x = x + np.einsum("blnh,nhe->ble", att, a["o_proj"])
        h = ref_rmsnorm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        m = lp["mlp"]
        g = h @ m["gate_proj"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"])) @ m["down_proj"]
    x = ref_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed_tokens"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def random_batch(rng, batch, length, vocab, docs_per_row=2):
    inputs = rng.integers(0, vocab, (batch, length))
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(1, length - 1), docs_per_row - 1, replace=False))
        bounds = [0, *cuts, length - 2]  # the last two tokens are padding
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[b, lo:hi] = s + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    return inputs.astype(np.int32), positions, segment_ids


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}, {"num_kv_heads": 1}])
def test_decoder_matches_float64_reference(overrides):
    cfg = make_config(**overrides)
    params = llama.init(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), nn.unbox(params))
    inputs, positions, segment_ids = random_batch(np.random.default_rng(0), 2, 12, cfg.vocab_size)
    got = llama.apply(cfg, params, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segment_ids))
    want = ref_forward(cfg, np_params(params), inputs, positions, segment_ids)
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=2e-4, atol=2e-4)


def test_rope_matches_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 1000, (2, 5))
    cos, sin = layers.rope_frequencies(jnp.asarray(positions), 8, 10000.0)
    got = layers.apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(got), ref_rope(x.astype(np.float64), positions, 10000.0), atol=2e-4)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)

    def score(pq, pk):
        cq, sq = layers.rope_frequencies(jnp.array([[pq]]), 16, 10000.0)
        ck, sk = layers.rope_frequencies(jnp.array([[pk]]), 16, 10000.0)
        return float(jnp.sum(layers.apply_rope(jnp.asarray(q), cq, sq) * layers.apply_rope(jnp.asarray(k), ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_packed_rows_give_each_documents_own_loss():
    """A row packing three documents gives every document the loss it has alone."""
    cfg = make_config()
    params = nn.unbox(llama.init(cfg, jax.random.key(3)))
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, cfg.vocab_size, n) for n in (5, 9, 4)]

    def doc_loss(tokens_row, seg_row, pos_row, target_row, mask_row):
        logits = llama.apply(cfg, params, tokens_row[None], pos_row[None], seg_row[None])
        per_token = -objectives.token_logprobs(logits, target_row[None])[0]
        return np.asarray(per_token), np.asarray(mask_row)

    packed = np.concatenate(docs)
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d)) for d in docs])
    targets = np.roll(packed, -1)
    mask = np.append(seg[1:] == seg[:-1], False).astype(np.float32)
    per_token, _ = doc_loss(*(jnp.asarray(a) for a in (packed, seg, pos, targets, mask)))
    offset = 0
    for d in docs:
        alone, _ = doc_loss(jnp.asarray(d), jnp.ones(len(d), jnp.int32), jnp.arange(len(d)),
                            jnp.asarray(np.roll(d, -1)), None)
        n = len(d) - 1
        np.testing.assert_allclose(per_token[offset: offset + n], alone[:n], rtol=1e-5, atol=1e-5)
        offset += len(d)


def test_scan_over_layers_equals_unrolled():
    cfg = make_config(num_layers=3)
    scan_cfg = make_config(num_layers=3, scan_layers=True)
    params = nn.unbox(llama.init(cfg, jax.random.key(0)))
    stacked = stack_layers(params, 3)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
        jnp.shape, nn.unbox(llama.init(scan_cfg, jax.random.key(0))))
    inputs, positions, segment_ids = (jnp.asarray(a) for a in random_batch(np.random.default_rng(0), 2, 10, 97))
    a = llama.apply(cfg, params, inputs, positions, segment_ids)
    b = llama.apply(scan_cfg, stacked, inputs, positions, segment_ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def stack_layers(params, num_layers):
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
    return out


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims"])
def test_remat_policies_keep_gradients(policy):
    inputs, positions, segment_ids = (jnp.asarray(a) for a in random_batch(np.random.default_rng(0), 2, 10, 97))
    params = nn.unbox(llama.init(make_config(), jax.random.key(0)))

    def grads(cfg, p):
        return jax.grad(lambda p: jnp.sum(llama.apply(cfg, p, inputs, positions, segment_ids) ** 2))(p)

    base = grads(make_config(), params)
    got = grads(make_config(remat_policy=policy), params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), base, got)
    got = grads(make_config(remat_policy=policy, scan_layers=True), stack_layers(params, 2))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                 stack_layers(base, 2), got)


def test_every_parameter_has_logical_axes():
    for scan in (False, True):
        cfg = make_config(scan_layers=scan, qkv_bias=True)
        boxed = llama.init(cfg, jax.random.key(0))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
            assert ("layers" in leaf.names) == (scan and leaf.value.ndim > 1 and leaf.names[0] == "layers")


def test_param_count_and_presets():
    cfg = make_config(qkv_bias=True)
    params = nn.unbox(llama.init(cfg, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(params)) == llama.count_params(cfg)
    c = llama.preset("llama2_7b")
    assert llama.count_params(llama.LlamaConfig.from_config(c)) == 6_738_415_616  # Llama-2-7B's published count
    c = llama.preset("qwen2_5_0_5b")
    assert llama.count_params(llama.LlamaConfig.from_config(c)) == 494_032_768  # Qwen2.5-0.5B (tied)


@pytest.mark.parametrize("bad, message", [
    ({"vocab_size": 0}, "model.vocab_size"),
    ({"num_kv_heads": 3}, "model.num_kv_heads"),
    ({"embed_dim": 30}, "model.embed_dim"),
    ({"remat_policy": "some"}, "model.remat_policy"),
    ({"dtype": "float8"}, "model.dtype"),
])
def test_bad_model_config_names_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        make_config(**bad)
