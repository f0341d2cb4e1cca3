"""Decoder-only transformer of the LLaMA family (LLaMA-2/3, Mistral, Qwen2).

Pre-norm blocks `x + attn(rmsnorm(x))`, `h + mlp(rmsnorm(h))` with rotary position embeddings
(rotate-half), grouped-query attention, SwiGLU feed-forward (Shazeer 2020) and an optional q/k/v
bias (Qwen2). Attention is segment-aware: packed documents never attend to each other.

Weights use Hugging Face's layout up to a transpose and reshape (never a permutation):
`q_proj [embed, heads, head_dim]` is HF's `q_proj.weight.T` reshaped, and so on, so checkpoint
conversion is a rename.

The model is pure: `init(config, rng) -> params`, `apply(config, params, ...) -> logits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxllm.config import ConfigError

from jaxllm.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_config() -> ml_collections.ConfigDict:
    """The `model` section of a run config (a tiny CPU-sized decoder)."""
    c = ml_collections.ConfigDict()
    c.family = "llama"
    c.vocab_size = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128
    c.embed_dim = 256
    c.num_layers = 4
    c.num_heads = 4
    c.num_kv_heads = 4
    c.head_dim = 0  # 0: embed_dim // num_heads
    c.mlp_dim = 768
    c.rope_theta = 10000.0
    c.norm_eps = 1e-5
    c.tie_embeddings = False
    c.qkv_bias = False
    c.init_std = 0.02
    c.dtype = "float32"  # compute dtype of activations and matmuls
    c.param_dtype = "float32"  # master weights
    c.scan_layers = False  # lax.scan over layers: faster compiles at depth, slower at tiny sizes on CPU
    c.remat_policy = "none"  # one of REMAT_POLICIES
    c.attention_impl = ""  # "" lets JAX choose; "xla" or "cudnn" (jax.nn.dot_product_attention)
    return c


# Shapes of published checkpoints (weights are imported in a later stage). Sources: the models'
# Hugging Face config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5),
    "llama3_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      mlp_dim=14336, rope_theta=500000.0, norm_eps=1e-5),
    "mistral_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       mlp_dim=14336, rope_theta=10000.0, norm_eps=1e-5),
    "qwen2_5_0_5b": dict(vocab_size=151936, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         mlp_dim=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                         tie_embeddings=True),
    "qwen2_5_1_5b": dict(vocab_size=151936, embed_dim=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         mlp_dim=8960, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                         tie_embeddings=True),
    "qwen2_5_7b": dict(vocab_size=152064, embed_dim=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       mlp_dim=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True),
    # CPU sizes.
    "tiny": dict(embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768),
    "baby_gpt": dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=352),
}


def preset(name: str) -> ml_collections.ConfigDict:
    """`default_config()` with the shape of preset `name` (see `PRESETS`).

    Raises:
      KeyError: naming the known presets when `name` is not one.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    c = default_config()
    c.update(PRESETS[name])
    return c


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hashable, validated form of the `model` config section (see `default_config`)."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> "LlamaConfig":
        """Validates the `model` section.

        Raises:
          ConfigError: naming the `model.*` key that is inconsistent (vocab unset, heads not dividing
            the width, kv heads not dividing heads, odd head_dim, unknown dtype or remat policy).
        """
        if c.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (> 0) before building the model")
        head_dim = c.head_dim or c.embed_dim // max(c.num_heads, 1)
        if not c.head_dim and c.embed_dim % c.num_heads:
            raise ConfigError(f"model.embed_dim={c.embed_dim} is not divisible by model.num_heads={c.num_heads}")
        if c.num_kv_heads <= 0 or c.num_heads % c.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={c.num_kv_heads} must divide model.num_heads={c.num_heads}")
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")
        for key in ("dtype", "param_dtype"):
            if c[key] not in DTYPES:
                raise ConfigError(f"model.{key}={c[key]!r}; expected one of {sorted(DTYPES)}")
        if c.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={c.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
        return cls(
            vocab_size=c.vocab_size, embed_dim=c.embed_dim, num_layers=c.num_layers,
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=head_dim,
            mlp_dim=c.mlp_dim, rope_theta=c.rope_theta, norm_eps=c.norm_eps,
            tie_embeddings=c.tie_embeddings, qkv_bias=c.qkv_bias, init_std=c.init_std,
            dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype], scan_layers=c.scan_layers,
            remat_policy=c.remat_policy, attention_impl=c.attention_impl or None,
        )


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings on flattened tokens."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """`x` `[batch * length, embed]` -> `[batch * length, embed]`; `cos, sin` `[batch, length, head_dim]`."""
        cfg = self.config
        batch, length = cos.shape[:2]
        std = cfg.init_std

        def project(name, heads, axes):
            kernel = layers.param_with_axes(
                self, f"{name}_proj", _normal(std), (cfg.embed_dim, heads, cfg.head_dim),
                ("embed", axes, "head_dim"), cfg.param_dtype)
            y = jnp.einsum("te,enh->tnh", x, kernel.astype(cfg.dtype))
            if cfg.qkv_bias:
                bias = layers.param_with_axes(
                    self, f"{name}_bias", nn.initializers.zeros, (heads, cfg.head_dim),
                    (axes, "head_dim"), cfg.param_dtype)
                y = y + bias.astype(cfg.dtype)
            return y.reshape(batch, length, heads, cfg.head_dim)

        q = project("q", cfg.num_heads, "heads")
        k = project("k", cfg.num_kv_heads, "kv_heads")
        v = project("v", cfg.num_kv_heads, "kv_heads")
        q = nn.with_logical_constraint(layers.apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(layers.apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
        out = layers.dot_product_attention(q, k, v, mask, cfg.attention_impl)
        out = out.reshape(batch * length, cfg.num_heads, cfg.head_dim)
        o_kernel = layers.param_with_axes(
            self, "o_proj", _normal(std / (2 * cfg.num_layers) ** 0.5),
            (cfg.num_heads, cfg.head_dim, cfg.embed_dim), ("heads", "head_dim", "embed"), cfg.param_dtype)
        return jnp.einsum("tnh,nhe->te", out, o_kernel.astype(cfg.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward `down(silu(gate(x)) * up(x))` (Shazeer 2020, eq. 6) on flattened tokens."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`x` `[tokens, embed]` -> `[tokens, embed]`."""
        cfg = self.config
        shape, axes = (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp")
        gate = layers.param_with_axes(self, "gate_proj", _normal(cfg.init_std), shape, axes, cfg.param_dtype)
        up = layers.param_with_axes(self, "up_proj", _normal(cfg.init_std), shape, axes, cfg.param_dtype)
        down = layers.param_with_axes(
            self, "down_proj", _normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5),
            (cfg.mlp_dim, cfg.embed_dim), ("mlp", "embed"), cfg.param_dtype)
        h = jax.nn.silu(x @ gate.astype(cfg.dtype)) * (x @ up.astype(cfg.dtype))
        h = nn.with_logical_constraint(h, ("batch", "act_mlp"))
        return h @ down.astype(cfg.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block. With `scan_layers` it is the body of an `nn.scan`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """`x` `[batch * length, embed]`; returns the same (plus `None` as scan output)."""
        cfg = self.config
        norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        h = x + Attention(cfg, name="attn")(norm("attn_norm")(x), cos, sin, mask)
        h = nn.with_logical_constraint(h, ("batch", "act_embed"))
        out = h + MLP(cfg, name="mlp")(norm("mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "act_embed"))
        return out, None


class Decoder(nn.Module):
    """The full decoder: embedding, `num_layers` blocks, final norm, LM head.

    Call with `inputs`, `positions`, `segment_ids`, each `[batch, length]` int32; returns logits
    `[batch, length, vocab]` in float32.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length = inputs.shape
        embedding = layers.param_with_axes(
            self, "embed_tokens", _normal(cfg.init_std), (cfg.vocab_size, cfg.embed_dim),
            ("vocab", "embed"), cfg.param_dtype)
        x = jnp.take(embedding, inputs.reshape(-1), axis=0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "act_embed"))
        cos, sin = layers.rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
        mask = layers.attention_mask(segment_ids, causal=True)

        block = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")(x, cos, sin, mask)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, name=f"layers_{i}")(x, cos, sin, mask)

        x = layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = x @ embedding.astype(cfg.dtype).T
        else:
            head = layers.param_with_axes(
                self, "lm_head", _normal(cfg.init_std), (cfg.embed_dim, cfg.vocab_size),
                ("embed", "vocab"), cfg.param_dtype)
            logits = x @ head.astype(cfg.dtype)
        logits = nn.with_logical_constraint(logits, ("batch", "act_vocab"))
        return logits.astype(jnp.float32).reshape(batch, length, cfg.vocab_size)


def init(config: LlamaConfig, rng: jax.Array, batch_size: int = 1, length: int = 8):
    """Initial parameters, boxed with their logical axis names (`nn.LogicallyPartitioned`).

    Use `flax.linen.unbox` (or `jax.jit` with the shardings from `jaxllm.sharding`) to get arrays.
    """
    ids = jnp.zeros((batch_size, length), jnp.int32)
    return Decoder(config).init(rng, ids, ids, ids + 1)["params"]


def apply(config: LlamaConfig, params, inputs: jax.Array, positions: jax.Array,
          segment_ids: jax.Array) -> jax.Array:
    """Logits `[batch, length, vocab]` float32 for int32 `inputs, positions, segment_ids` `[batch, length]`."""
    return Decoder(config).apply({"params": params}, inputs, positions, segment_ids)


def count_params(config: LlamaConfig, *, embeddings: bool = True) -> int:
    """Number of parameters, optionally without the input embedding (for FLOP counts)."""
    c = config
    attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    if c.qkv_bias:
        attn += c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
    per_layer = attn + 3 * c.embed_dim * c.mlp_dim + 2 * c.embed_dim
    total = c.num_layers * per_layer + c.embed_dim  # + final norm
    head = 0 if c.tie_embeddings else c.vocab_size * c.embed_dim
    emb = c.vocab_size * c.embed_dim
    return total + head + (emb if embeddings else 0)


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), MaxText's convention.

    `6 * (matmul params)` for the weights plus causal attention `6 * layers * heads * head_dim *
    seq_len` (QK^T and AV, halved for the causal mask: Chowdhery et al. 2022, PaLM appendix B, with
    MaxText's causal halving). The input embedding is a gather and costs no FLOPs; a tied
    embedding's use as LM head does.
    """
    c = config
    matmul_params = count_params(c, embeddings=False) - (c.num_layers * 2 + 1) * c.embed_dim
    if c.tie_embeddings:
        matmul_params += c.vocab_size * c.embed_dim
    attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # 12 * ... / 2 (causal)
    return 6.0 * matmul_params + attention
