"""Decoder-only transformer of the LLaMA family (LLaMA-2/3, Mistral, Qwen2).

Pre-norm blocks `x + attn(rmsnorm(x))`, `h + mlp(rmsnorm(h))` with rotary position embeddings
(rotate-half), grouped-query attention, SwiGLU feed-forward (Shazeer 2020) and an optional q/k/v
bias (Qwen2). Attention is segment-aware: packed documents never attend to each other.

Weights use Hugging Face's layout up to a transpose and reshape (never a permutation):
`q_proj [embed, heads, head_dim]` is HF's `q_proj.weight.T` reshaped, and so on, so checkpoint
conversion is a rename.

The model is pure: `init(config, rng) -> params`, `apply(config, params, ...) -> logits`. Decoding
uses an explicit KV cache that goes in and comes out: `init_cache(...) -> cache`,
`decode(config, params, ..., cache) -> (logits, cache)` (see `init_cache` for its layout). The
training path (`apply`) does not touch any cache code.
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
ROPE_SCALINGS = ("", "linear", "llama3")
ARCHITECTURES = ("", "llama", "mistral", "qwen2")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("", "xla", "cudnn", "splash")


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
    # Long-context rescaling of the rotary frequencies (layers.scaled_inv_freq): "" none, "linear"
    # (inv_freq / factor) or "llama3" (Llama 3.1/3.2; the low/high frequency factors and the
    # original context in tokens apply to it only). Set from a checkpoint's rope_scaling.
    c.rope_scaling = ""
    c.rope_scaling_factor = 1.0
    c.rope_low_freq_factor = 1.0
    c.rope_high_freq_factor = 4.0
    c.rope_original_max_position = 8192
    c.norm_eps = 1e-5
    c.tie_embeddings = False
    c.qkv_bias = False
    c.init_std = 0.02
    # "" for jaxllm's own models; else the Hugging Face model_type a checkpoint came from ("llama",
    # "mistral", "qwen2"), which export writes back (jaxllm.hub.hf).
    c.architecture = ""
    c.dtype = "float32"  # compute dtype of activations and matmuls
    c.param_dtype = "float32"  # master weights
    c.scan_layers = False  # lax.scan over layers: faster compiles at depth, slower at tiny sizes on CPU
    c.remat_policy = "none"  # one of REMAT_POLICIES
    c.attention_impl = ""  # one of ATTENTION_IMPLS: "" einsums on CPU, else jax.nn's choice; "xla" | "cudnn"
    # (layers.dot_product_attention); "splash": TPU splash attention kernel (layers.splash_attention)
    # Sequence positions per chunk of the LM loss (objectives.chunked_token_logprobs): the float32
    # [batch, length, vocab] logits never exist at once. 0 = off (the whole logits array).
    c.loss_chunk_size = 0
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
    architecture: str = ""
    rope_scaling: layers.RopeScaling | None = None  # model.rope_* keys (layers.scaled_inv_freq)
    loss_chunk_size: int = 0  # model.loss_chunk_size (jaxllm.scoring); 0 = unchunked

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> "LlamaConfig":
        """Validates the `model` section.

        Raises:
          ConfigError: naming the `model.*` key that is inconsistent (vocab unset, heads not dividing
            the width, kv heads not dividing heads, odd head_dim, unknown dtype, remat policy,
            attention implementation, architecture or rope scaling, rope scaling parameters
            out of range, or a negative loss chunk size).
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
        if c.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention_impl={c.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        architecture = c.get("architecture", "")
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture={architecture!r}; expected one of {ARCHITECTURES}")
        loss_chunk_size = int(c.get("loss_chunk_size", 0))  # configs saved before the key have none
        if loss_chunk_size < 0:
            raise ConfigError(f"model.loss_chunk_size={loss_chunk_size} must be >= 0 (0 = unchunked loss)")
        return cls(
            vocab_size=c.vocab_size, embed_dim=c.embed_dim, num_layers=c.num_layers,
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=head_dim,
            mlp_dim=c.mlp_dim, rope_theta=c.rope_theta, norm_eps=c.norm_eps,
            tie_embeddings=c.tie_embeddings, qkv_bias=c.qkv_bias, init_std=c.init_std,
            dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype], scan_layers=c.scan_layers,
            remat_policy=c.remat_policy, attention_impl=c.attention_impl or None,
            rope_scaling=_rope_scaling(c), architecture=architecture, loss_chunk_size=loss_chunk_size,
        )


def _rope_scaling(c: ml_collections.ConfigDict) -> layers.RopeScaling | None:
    """The validated `model.rope_*` scaling keys (configs saved before they existed have none).

    Raises:
      ConfigError: naming the key of an unknown kind or an out-of-range value.
    """
    kind = c.get("rope_scaling", "")
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"model.rope_scaling={kind!r}; expected one of {ROPE_SCALINGS}")
    if not kind:
        return None
    scaling = layers.RopeScaling(
        kind, float(c.get("rope_scaling_factor", 1.0)), float(c.get("rope_low_freq_factor", 1.0)),
        float(c.get("rope_high_freq_factor", 4.0)), int(c.get("rope_original_max_position", 8192)))
    if scaling.factor <= 0:
        raise ConfigError(f"model.rope_scaling_factor={scaling.factor} must be > 0")
    if kind == "llama3":
        if scaling.low_freq_factor <= 0:
            raise ConfigError(f"model.rope_low_freq_factor={scaling.low_freq_factor} must be > 0")
        if scaling.high_freq_factor <= scaling.low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor={scaling.high_freq_factor} must be greater than "
                              f"model.rope_low_freq_factor={scaling.low_freq_factor}")
        if scaling.original_max_position <= 0:
            raise ConfigError(f"model.rope_original_max_position={scaling.original_max_position} must be > 0")
    return scaling


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")  # logical axes of a cached k or v


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings on flattened tokens."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: dict | None = None, cache_index: jax.Array | None = None):
        """`x` `[batch * length, embed]` -> (`[batch * length, embed]`, updated `cache` or None).

        `cos, sin` `[batch, length, head_dim // 2]`. With a `cache` (`{"k", "v"}`, each `[batch, max_len,
        kv_heads, head_dim]`), the rotated keys and values of the new tokens are written at slot
        `cache_index` and the queries attend over all cache slots under `mask` `[batch, 1, length,
        max_len]`; without one, over the `length` new tokens (the training path), where with
        `attention_impl="splash"` `mask` is the `[batch, length]` int `segment_ids` (the kernel builds
        the causal, segment-aware mask itself; `layers.splash_attention`).
        """
        cfg = self.config
        batch, length = cos.shape[:2]
        std = cfg.init_std

        kernels, biases = {}, {}
        for name, heads, axes in (("q", cfg.num_heads, "heads"), ("k", cfg.num_kv_heads, "kv_heads"),
                                  ("v", cfg.num_kv_heads, "kv_heads")):
            kernels[name] = layers.param_with_axes(
                self, f"{name}_proj", _normal(std), (cfg.embed_dim, heads, cfg.head_dim),
                ("embed", axes, "head_dim"), cfg.param_dtype).astype(cfg.dtype)
            if cfg.qkv_bias:
                biases[name] = layers.param_with_axes(
                    self, f"{name}_bias", nn.initializers.zeros, (heads, cfg.head_dim), (axes, "head_dim"),
                    cfg.param_dtype).astype(cfg.dtype)

        # Projections of one shape run as one matmul over their kernels stacked on a new, unsharded
        # axis (q, k, v when heads == kv_heads, else k, v): fewer, wider matmuls were measurably
        # faster on CPU, and stacking (not concatenating along heads) leaves every device's shard
        # of the stack made of its own shards, so tensor parallelism adds no communication.
        groups = [("q", "k", "v")] if cfg.num_heads == cfg.num_kv_heads else [("q",), ("k", "v")]
        projected = {}
        for group in groups:
            stacked = jnp.stack([kernels[n] for n in group], axis=1)  # [embed, len(group), heads, head_dim]
            # A 2-D matmul: the same product as an einsum over the 4-D kernel, ~7% faster step on CPU.
            y = (x @ stacked.reshape(cfg.embed_dim, -1)).reshape(batch, length, *stacked.shape[1:])
            if cfg.qkv_bias:
                y = y + jnp.stack([biases[n] for n in group])
            projected.update({n: y[:, :, i] for i, n in enumerate(group)})
        q, k, v = projected["q"], projected["k"], projected["v"]
        q = nn.with_logical_constraint(layers.apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = nn.with_logical_constraint(layers.apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
        impl = cfg.attention_impl
        if cache is not None:
            k, v = (nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), (0, cache_index, 0, 0)),
                KV_AXES) for name, new in (("k", k), ("v", v)))
            cache = {"k": k, "v": v}
            k, v = k.astype(cfg.dtype), v.astype(cfg.dtype)
            # XLA's attention for cached decoding: the fused cuDNN kernel targets training shapes, and a
            # one-token query over a long, mostly masked cache is untested with it here (no GPU in CI).
            # Splash tiles whole 128-token blocks of self-attention; decoding takes the backend's default.
            impl = {"cudnn": "xla", "splash": None}.get(impl, impl)
        if impl == "splash":
            out = layers.splash_attention(q, k, v, mask)
        else:
            out = layers.dot_product_attention(q, k, v, mask, impl)
        out = out.reshape(batch * length, cfg.num_heads * cfg.head_dim)
        o_kernel = layers.param_with_axes(
            self, "o_proj", _normal(std / (2 * cfg.num_layers) ** 0.5),
            (cfg.num_heads, cfg.head_dim, cfg.embed_dim), ("heads", "head_dim", "embed"), cfg.param_dtype)
        return out @ o_kernel.astype(cfg.dtype).reshape(-1, cfg.embed_dim), cache


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
        # gate and up as one matmul over kernels stacked on a new unsharded axis (see Attention).
        gate_up = (x @ jnp.stack([gate, up], axis=1).astype(cfg.dtype).reshape(cfg.embed_dim, -1))
        gate_up = gate_up.reshape(-1, 2, cfg.mlp_dim)
        h = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
        h = nn.with_logical_constraint(h, ("batch", "act_mlp"))
        return h @ down.astype(cfg.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block. With `scan_layers` it is the body of an `nn.scan`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """`x` `[batch * length, embed]`; returns the same and this layer's updated cache (or None).

        The cache is the scan output when layers are scanned (stacked on a leading layers axis).
        """
        cfg = self.config
        norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn_out, cache = Attention(cfg, name="attn")(norm("attn_norm")(x), cos, sin, mask, cache, cache_index)
        h = x + attn_out
        h = nn.with_logical_constraint(h, ("batch", "act_embed"))
        out = h + MLP(cfg, name="mlp")(norm("mlp_norm")(h))
        out = nn.with_logical_constraint(out, ("batch", "act_embed"))
        return out, cache


HEADS = ("lm", "scalar")


class Decoder(nn.Module):
    """The full decoder: embedding, `num_layers` blocks, final norm, LM head.

    With `head="scalar"` the LM head is replaced by a `[embed, 1]` `score_head` (reward and value
    models) and the output is `[batch, length]` float32 scores.

    Call with `inputs`, `positions`, `segment_ids`, each `[batch, length]` int32; returns logits
    `[batch, length, vocab]` in float32. With a `cache` (see `init_cache`) the tokens are appended to
    it and `(logits, cache)` is returned; `last_logits_only` then computes logits `[batch, 1, vocab]`
    of the last token only (the LM head over a whole prompt is wasted work when sampling).
    `prefix_mask` `[batch, length]` makes a prefix LM: tokens with `prefix_mask == 1` also attend
    to the later prefix tokens of their segment (Raffel et al. 2020, section 3.2.1;
    `jaxllm.data.packing.prefix_lm_attention_mask`). With a cache it covers the new tokens
    only: a prefill of the whole prefix in one call gives its bidirectional attention, the decode
    steps after it are causal, and the result equals the uncached forward of the whole sequence.
    `return_hidden` (training path, LM head only) stops before the LM head matmul and returns
    `(hidden, head)` instead of logits (see `apply`).
    """

    config: LlamaConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: dict | None = None, last_logits_only: bool = False, prefix_mask: jax.Array | None = None,
                 return_hidden: bool = False):
        cfg = self.config
        batch, length = inputs.shape
        embedding = layers.param_with_axes(
            self, "embed_tokens", _normal(cfg.init_std), (cfg.vocab_size, cfg.embed_dim),
            ("vocab", "embed"), cfg.param_dtype)
        x = jnp.take(embedding, inputs.reshape(-1), axis=0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "act_embed"))
        cos, sin = layers.rope_frequencies(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if cache is not None:
            x, cache = self._cached_layers(x, cos, sin, segment_ids, cache, prefix_mask)
            if last_logits_only:
                x, length = x.reshape(batch, length, cfg.embed_dim)[:, -1], 1
            return self._head(x, embedding, batch, length), cache
        if cfg.attention_impl == "splash":
            if prefix_mask is not None:
                raise ConfigError("model.attention_impl='splash' has the causal mask only; a prefix LM "
                                  "(prefix_mask) needs model.attention_impl='' or 'xla'")
            mask = segment_ids  # the kernel masks from segment ids (see Attention)
        else:
            mask = layers.attention_mask(segment_ids, causal=True)
        if prefix_mask is not None:
            prefix = prefix_mask.astype(jnp.bool_)
            both_prefix = (prefix[:, :, None] & prefix[:, None, :])[:, None]
            mask = mask | (layers.attention_mask(segment_ids, causal=False) & both_prefix)

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
        return self._head(x, embedding, batch, length, return_hidden)

    def _cached_layers(self, x, cos, sin, segment_ids, cache, prefix_mask=None):
        """The blocks over the new tokens `x` with the KV `cache`; returns `(x, updated cache)`.

        A `prefix_mask` `[batch, length]` over the new tokens adds their bidirectional block: new
        prefix tokens of one segment see each other (slots `index ..`), on top of the causal mask.
        """
        cfg = self.config
        index = cache["index"]
        cache_segment_ids = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
        mask = layers.cached_attention_mask(segment_ids, cache_segment_ids, index)
        if prefix_mask is not None:
            prefix = prefix_mask.astype(jnp.bool_)
            block = (prefix[:, :, None] & prefix[:, None, :]
                     & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]  # [batch, 1, length, length]
            mask = mask | jax.lax.dynamic_update_slice(jnp.zeros_like(mask), block, (0, 0, 0, index))
        new = {"segment_ids": cache_segment_ids, "index": index + segment_ids.shape[1]}
        # No remat: nothing is differentiated while decoding (module names, hence params, match).
        if cfg.scan_layers:
            x, new["layers"] = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")(x, cos, sin, mask, cache["layers"], index)
        else:
            for i in range(cfg.num_layers):
                x, new[f"layers_{i}"] = DecoderLayer(cfg, name=f"layers_{i}")(
                    x, cos, sin, mask, cache[f"layers_{i}"], index)
        return x, new

    def _head(self, x, embedding, batch, length, return_hidden=False):
        """Final norm and LM head: `x` `[batch * length, embed]` -> float32 `[batch, length, vocab]`.

        With `return_hidden`: `(hidden [batch, length, embed], head [embed, vocab])`, both in
        `cfg.dtype`, whose product cast to float32 is exactly these logits.
        """
        cfg = self.config
        x = layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        if return_hidden and self.head != "lm":
            raise ValueError(f"return_hidden needs the LM head, not head={self.head!r}")
        if self.head == "scalar":
            # Initialised small so first rewards/values are ~0 and the backbone's features lead.
            score = layers.param_with_axes(
                self, "score_head", _normal(cfg.init_std / cfg.embed_dim ** 0.5), (cfg.embed_dim, 1),
                ("embed", "score"), cfg.param_dtype)
            return (x @ score.astype(cfg.dtype)).astype(jnp.float32).reshape(batch, length)
        if cfg.tie_embeddings:
            head = embedding.astype(cfg.dtype).T
        else:
            head = layers.param_with_axes(
                self, "lm_head", _normal(cfg.init_std), (cfg.embed_dim, cfg.vocab_size),
                ("embed", "vocab"), cfg.param_dtype).astype(cfg.dtype)
        if return_hidden:
            return nn.with_logical_constraint(x, ("batch", "act_embed")).reshape(batch, length, cfg.embed_dim), head
        logits = x @ head
        logits = nn.with_logical_constraint(logits, ("batch", "act_vocab"))
        return logits.astype(jnp.float32).reshape(batch, length, cfg.vocab_size)


def init(config: LlamaConfig, rng: jax.Array, batch_size: int = 1, length: int = 8, head: str = "lm"):
    """Initial parameters, boxed with their logical axis names (`nn.LogicallyPartitioned`).

    Use `flax.linen.unbox` (or `jax.jit` with the shardings from `jaxllm.sharding`) to get arrays.
    `head="scalar"` gives the reward/value model (`score_head` instead of `lm_head`).
    """
    ids = jnp.zeros((batch_size, length), jnp.int32)
    # Parameters do not depend on the attention kernel, and splash cannot tile the short init rows.
    config = dataclasses.replace(config, attention_impl=None) if config.attention_impl == "splash" else config
    return Decoder(config, head=head).init(rng, ids, ids, ids + 1)["params"]


def apply(config: LlamaConfig, params, inputs: jax.Array, positions: jax.Array,
          segment_ids: jax.Array, head: str = "lm", prefix_mask: jax.Array | None = None,
          return_hidden: bool = False):
    """Logits `[batch, length, vocab]` float32 (or scores `[batch, length]` with `head="scalar"`)
    for int32 `inputs, positions, segment_ids` `[batch, length]`; optional int `prefix_mask`
    `[batch, length]` (1 = bidirectional prefix token) trains a prefix LM (see `Decoder`).

    `return_hidden=True` returns `(hidden, head)` instead of logits: the final-normed hidden states
    `[batch, length, embed]` and the LM head weight `[embed, vocab]` (the transposed embedding when
    tied), both in the compute dtype `config.dtype`; `(hidden @ head).astype(float32)` is the logits,
    computed the same way, so a loss can take them chunk by chunk
    (`objectives.chunked_token_logprobs`). Raises ValueError with `head="scalar"`.
    """
    return Decoder(config, head=head).apply({"params": params}, inputs, positions, segment_ids,
                                            prefix_mask=prefix_mask, return_hidden=return_hidden)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype: Any = None) -> dict:
    """An empty KV cache for `decode`: a plain pytree that goes in and comes out explicitly.

    Layout (slot `j` of a row is the `j`-th token fed to `decode` for that row, in time order):
      - `"layers_{i}": {"k", "v"}` per layer, each `[batch, max_len, kv_heads, head_dim]`: rotated
        keys and values; with `scan_layers`, one `"layers": {"k", "v"}` entry stacked on a leading
        `[num_layers, ...]` axis, mirroring the parameters.
      - `"segment_ids"`: `[batch, max_len]` int32 segment of each slot; 0 = empty or padding, which
        no real token attends to. Masks come from these, never from token ids.
      - `"index"`: scalar int32, the next slot to write (shared by all rows).
    Positions are not stored: keys carry theirs in the rotary embedding, and `decode` takes the
    positions of new tokens explicitly, so padding anywhere in a row (left or right) is just
    segment-0 slots.

    Entries carry logical axis constraints (`batch, length, act_kv_heads, head_dim`, plus `layers`);
    under `jaxllm.sharding.activate` the cache shards batch over ('data', 'fsdp') and kv heads over
    'tensor'. See `cache_logical_axes` for `out_shardings`.

    Args:
      config: the model.
      batch_size: rows.
      max_len: slots per row (tokens of prompt and generation that will be fed).
      dtype: of k and v; default `config.dtype`.
    """
    dtype = dtype or config.dtype
    shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
    axes = cache_logical_axes(config)
    if config.scan_layers:
        shape = (config.num_layers, *shape)
    kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    cache = {"layers": kv()} if config.scan_layers else {f"layers_{i}": kv() for i in range(config.num_layers)}
    cache["segment_ids"] = jnp.zeros((batch_size, max_len), jnp.int32)
    cache["index"] = jnp.zeros((), jnp.int32)
    return nn.with_logical_constraint(cache, axes)


def cache_logical_axes(config: LlamaConfig) -> dict:
    """Logical `PartitionSpec`s of the entries of `init_cache(config, ...)`, same tree structure."""
    kv_axes = (("layers",) if config.scan_layers else ()) + KV_AXES
    kv = {"k": jax.sharding.PartitionSpec(*kv_axes), "v": jax.sharding.PartitionSpec(*kv_axes)}
    axes = {"layers": kv} if config.scan_layers else {f"layers_{i}": kv for i in range(config.num_layers)}
    axes["segment_ids"] = jax.sharding.PartitionSpec("batch", "length")
    axes["index"] = jax.sharding.PartitionSpec()
    return axes


def decode(config: LlamaConfig, params, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array,
           cache: dict, *, last_logits_only: bool = False,
           prefix_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Feeds `length` new tokens per row through the model with a KV cache (prefill or one step).

    The tokens go to cache slots `cache["index"] .. + length - 1`; each attends to the earlier slots
    of its own segment (see `layers.cached_attention_mask`). Feeding a sequence in any number of
    chunks gives the logits `apply` gives for the whole sequence (same positions and segment ids),
    up to float reassociation.

    Args:
      config: the model.
      params: unboxed parameters of `init(config, ...)`.
      inputs, positions, segment_ids: `[batch, length]` int32 new tokens, their positions
        (continuing each row's real tokens) and segments (0 = padding).
      cache: from `init_cache` or a previous `decode`. Needs `index + length <= max_len`; this is not
        checked inside jit, where `dynamic_update_slice` would clamp the write onto the last slots.
      last_logits_only: return logits of the last new token only.
      prefix_mask: `[batch, length]` int, 1 where a new token is a prefix-LM prefix token (attends
        to the later new prefix tokens of its segment too; see `Decoder`); None: causal.

    Returns:
      `(logits, cache)`: float32 `[batch, length or 1, vocab]` and the cache with the new slots and
      `index` advanced by `length`.
    """
    return Decoder(config).apply({"params": params}, inputs, positions, segment_ids, cache, last_logits_only,
                                 prefix_mask)


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

    MaxText's `calculate_tflops_training_per_device` divided by the tokens of a step:
    `6 * (matmul weights)` (q/k/v/o, gate/up/down of every layer and the LM head; norm scales and
    q/k/v biases are not matmuls) plus causal attention `6 * layers * heads * head_dim * seq_len`
    (`4 * seq_len * heads * head_dim` forward FLOPs of QK^T and AV per token and layer, halved for
    the causal mask, times 3 for forward and backward; Chowdhery et al. 2022, PaLM appendix B,
    with MaxText's causal halving). The input embedding is a gather and costs no FLOPs; a tied
    embedding's use as LM head does.
    """
    c = config
    matmul_params = count_params(c, embeddings=False) - (c.num_layers * 2 + 1) * c.embed_dim
    if c.qkv_bias:
        matmul_params -= c.num_layers * c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
    if c.tie_embeddings:
        matmul_params += c.vocab_size * c.embed_dim
    attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # 12 * ... / 2 (causal)
    return 6.0 * matmul_params + attention
