"""T5 v1.1 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer"; the v1.1 changes of google-research/text-to-text-transfer-transformer
`released_checkpoints.md`: gated-GELU feed-forward, untied embeddings, no dropout in pretraining).

Pre-norm blocks with RMS layer norm without bias (`x + drop(attn(norm(x)))`, then the MLP). The
encoder attends bidirectionally; the decoder causally to itself, then to the encoder output.
Positions enter only as a learned scalar bias per head on the attention logits, looked up from
T5's relative-position buckets (`relative_position_bucket`: bidirectional in the encoder,
unidirectional in the decoder; 32 buckets, max distance 128), one table per stack shared by its
layers, none in cross-attention. Attention logits are not scaled by `1/sqrt(head_dim)`: T5 folds
that into the initialisation of the query projection. The feed-forward is
`wo(gelu_tanh(x wi_0) * (x wi_1))` (Shazeer 2020, GEGLU; tanh-approximate GELU as in T5 v1.1 /
HF `gelu_new`). Tied embeddings (original T5) scale the logits by `embed_dim ** -0.5`.

Batches use t5x's packed feature names, all `[batch, length]` (int32 unless noted):
`encoder_input_tokens`, `encoder_segment_ids` (0 = padding), `encoder_positions` (restart at 0 per
segment), `decoder_input_tokens` (targets shifted right per segment, starting from id 0),
`decoder_target_tokens`, `decoder_segment_ids`, `decoder_positions`, `decoder_loss_mask` (float32).
Attention never crosses segments: encoder and decoder self-attention stay inside a segment, and a
decoder token attends only to encoder tokens of its own segment id. Relative positions come from
`*_positions`, so packed and unpacked examples give the same logits.

Parameters (logical axes in brackets; HF `T5ForConditionalGeneration` up to transpose/reshape):
`token_embedder [vocab, embed]` (`shared`), per stack `relpos_bias/rel_embedding [relpos_buckets,
heads]` (block 0's `relative_attention_bias`), per layer `attention/{query,key,value} [embed, heads,
head_dim]` and `out [heads, head_dim, embed]` (q, k, v, o), `mlp/wi_0, wi_1 [embed, mlp]`, `wo [mlp,
embed]`, RMS norm scales `[embed]`; `decoder/logits_dense [embed, vocab]` (`lm_head`) when untied.

Generation encodes once (`encode`), builds a cache with the cross-attention keys and values of
every decoder layer (`init_cache`), and feeds decoder tokens with `decode_step`; `t5_generate.generate` runs the
loop jitted (greedy or temperature sampling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxllm.config import ConfigError
from jaxllm.models import layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NEG_INF = -1e10  # masked logits (t5x's attention bias value); finite, so a fully masked row is uniform
BATCH_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_input_tokens",
              "decoder_target_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_mask")
KV_AXES = ("batch", "length", "act_heads", "head_dim")


def default_config() -> ml_collections.ConfigDict:
    """The `model` section of a T5 run config (a tiny CPU-sized model)."""
    c = ml_collections.ConfigDict()
    c.family = "t5"
    c.vocab_size = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128
    c.embed_dim = 256  # d_model
    c.num_encoder_layers = 2
    c.num_decoder_layers = 2
    c.num_heads = 4
    c.head_dim = 64  # d_kv: T5 does not tie it to embed_dim / num_heads
    c.mlp_dim = 512  # d_ff of the gated-GELU feed-forward
    c.relative_attention_num_buckets = 32
    c.relative_attention_max_distance = 128
    c.norm_eps = 1e-6
    c.dropout_rate = 0.0  # T5 v1.1 pretrains without dropout; 0.1 for fine-tuning
    c.tie_embeddings = False  # T5 v1.1: untied; original T5: tied with logits * embed_dim**-0.5
    c.dtype = "float32"
    c.param_dtype = "float32"
    return c


# Shapes of the released T5 v1.1 checkpoints (Hugging Face google/t5-v1_1-{small,base,large}
# config.json: d_model, d_ff, num_layers = num_decoder_layers, num_heads, d_kv, vocab 32128).
PRESETS: dict[str, dict[str, Any]] = {
    "t5_v1_1_small": dict(vocab_size=32128, embed_dim=512, mlp_dim=1024, num_encoder_layers=8,
                          num_decoder_layers=8, num_heads=6, head_dim=64),
    "t5_v1_1_base": dict(vocab_size=32128, embed_dim=768, mlp_dim=2048, num_encoder_layers=12,
                         num_decoder_layers=12, num_heads=12, head_dim=64),
    "t5_v1_1_large": dict(vocab_size=32128, embed_dim=1024, mlp_dim=2816, num_encoder_layers=24,
                          num_decoder_layers=24, num_heads=16, head_dim=64),
    # CPU size (2 cores).
    "tiny": dict(embed_dim=128, mlp_dim=384, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                 head_dim=32),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hashable, validated form of the `model` section (see `default_config`)."""

    vocab_size: int
    embed_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    norm_eps: float
    dropout_rate: float
    tie_embeddings: bool
    dtype: Any
    param_dtype: Any

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> "T5Config":
        """Validates the `model` section.

        Raises:
          ConfigError: naming the `model.*` key: family not "t5", vocab unset, non-positive sizes,
            buckets < 4 or odd, max distance not above the exact-bucket range, dropout outside
            [0, 1), unknown dtype.
        """
        if c.get("family", "t5") != "t5":
            raise ConfigError(f"model.family={c.family!r}: jaxllm.models.t5 builds family 't5'")
        if c.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (> 0) before building the model")
        for key in ("embed_dim", "num_encoder_layers", "num_decoder_layers", "num_heads", "head_dim", "mlp_dim"):
            if c[key] <= 0:
                raise ConfigError(f"model.{key}={c[key]} must be > 0")
        nb, md = c.relative_attention_num_buckets, c.relative_attention_max_distance
        if nb < 4 or nb % 2:
            raise ConfigError(f"model.relative_attention_num_buckets={nb} must be even and >= 4")
        if md <= nb // 2:
            raise ConfigError(f"model.relative_attention_max_distance={md} must exceed "
                              f"relative_attention_num_buckets // 2 = {nb // 2}")
        if not 0.0 <= c.dropout_rate < 1.0:
            raise ConfigError(f"model.dropout_rate={c.dropout_rate} must be in [0, 1)")
        for key in ("dtype", "param_dtype"):
            if c[key] not in DTYPES:
                raise ConfigError(f"model.{key}={c[key]!r}; expected one of {sorted(DTYPES)}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "param_dtype")]
        return cls(**{k: c[k] for k in names}, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])


# ---- Pieces -----------------------------------------------------------------------------------


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
    """T5's `_relative_position_bucket` (mesh-tensorflow `transformer/attention.py`; HF `T5Attention`).

    `relative_position = key_position - query_position` (int array). Bidirectional: half the buckets
    for keys after the query; unidirectional (decoder): future keys share bucket 0. Of the remaining
    `nb` buckets, distances `n < nb/2` get one each, larger ones `nb/2 + int(log(n / (nb/2)) /
    log(max_distance / (nb/2)) * (nb/2))` (float32), clipped to `nb - 1`. Returns int32 buckets in
    `[0, num_buckets)`, shaped like `relative_position`.
    """
    n = -relative_position.astype(jnp.int32)
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    # max(n, 1) only keeps log away from 0: those n are exact buckets.
    large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(n < max_exact, n, large)


def attention(query, key, value, bias, mask, dropout: nn.Module, deterministic: bool) -> jax.Array:
    """T5 attention: `softmax(q k^T + bias)` (no `1/sqrt(d)`), masked, with dropout on the weights.

    `query` `[batch, q_len, heads, head_dim]`, `key, value` `[batch, kv_len, heads, head_dim]`, `bias`
    `[batch, heads, q_len, kv_len]` or None, bool `mask` broadcastable to it (True = may attend).
    Returns `[batch, q_len, heads, head_dim]`; logits and softmax in float32.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, NEG_INF)
    weights = dropout(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class Attention(nn.Module):
    """Projections of one attention block on flattened tokens `[batch * length, embed]`.

    Initialisation (mesh-tensorflow / HF `T5PreTrainedModel._init_weights`, factor 1): query
    `N(0, (embed * head_dim)^-1)` (the folded `1/sqrt(head_dim)`), key and value `N(0, 1/embed)`,
    out `N(0, 1/(heads * head_dim))`.
    """

    config: T5Config

    def setup(self):
        c = self.config
        shape, axes = (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim")
        self.query = layers.param_with_axes(self, "query", _normal((c.embed_dim * c.head_dim) ** -0.5), shape,
                                            axes, c.param_dtype)
        self.key = layers.param_with_axes(self, "key", _normal(c.embed_dim ** -0.5), shape, axes, c.param_dtype)
        self.value = layers.param_with_axes(self, "value", _normal(c.embed_dim ** -0.5), shape, axes, c.param_dtype)
        self.out = layers.param_with_axes(self, "out", _normal((c.num_heads * c.head_dim) ** -0.5),
                                          (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"),
                                          c.param_dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def _project(self, x, kernel, batch):
        y = jnp.einsum("te,ehd->thd", x, kernel.astype(self.config.dtype))
        y = y.reshape(batch, -1, *y.shape[1:])
        return nn.with_logical_constraint(y, KV_AXES)

    def q(self, x: jax.Array, batch: int) -> jax.Array:
        """`[batch * len, embed]` -> `[batch, len, heads, head_dim]`."""
        return self._project(x, self.query, batch)

    def kv(self, x: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """`[batch * len, embed]` -> keys and values, each `[batch, len, heads, head_dim]`."""
        return self._project(x, self.key, batch), self._project(x, self.value, batch)

    def attend(self, q, k, v, bias, mask, deterministic: bool) -> jax.Array:
        """Attention and output projection -> `[batch * q_len, embed]`."""
        ctx = attention(q, k, v, bias, mask, self.dropout, deterministic)
        ctx = ctx.reshape(-1, *ctx.shape[2:])
        return jnp.einsum("thd,hde->te", ctx, self.out.astype(self.config.dtype))


class Mlp(nn.Module):
    """Gated-GELU feed-forward `wo(gelu_tanh(x wi_0) * (x wi_1))` on `[tokens, embed]`.

    Init `N(0, 1/embed)` for `wi_*` and `N(0, 1/mlp)` for `wo` (HF T5 `_init_weights`). Dropout on
    the hidden activations (t5x `intermediate_dropout_rate`, HF `T5DenseGatedActDense`).
    """

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        wi = [layers.param_with_axes(self, f"wi_{i}", _normal(c.embed_dim ** -0.5), (c.embed_dim, c.mlp_dim),
                                     ("embed", "mlp"), c.param_dtype) for i in (0, 1)]
        wo = layers.param_with_axes(self, "wo", _normal(c.mlp_dim ** -0.5), (c.mlp_dim, c.embed_dim),
                                    ("mlp", "embed"), c.param_dtype)
        h = jax.nn.gelu(x @ wi[0].astype(c.dtype), approximate=True) * (x @ wi[1].astype(c.dtype))
        h = nn.with_logical_constraint(h, ("batch", "act_mlp"))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return h @ wo.astype(c.dtype)


class RelativePositionBias(nn.Module):
    """One stack's bias table `[relpos_buckets, heads]` and its lookup -> `[batch, heads, q, k]`.

    Init `N(0, 1/embed)` (HF T5). Buckets from `key_positions - query_positions`.
    """

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        c = self.config
        table = layers.param_with_axes(self, "rel_embedding", _normal(c.embed_dim ** -0.5),
                                       (c.relative_attention_num_buckets, c.num_heads), ("relpos_buckets", "heads"),
                                       c.param_dtype)
        rel = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                           num_buckets=c.relative_attention_num_buckets,
                                           max_distance=c.relative_attention_max_distance)
        bias = jnp.take(table.astype(jnp.float32).T, buckets, axis=1)  # [heads, batch, q, k]
        return nn.with_logical_constraint(jnp.swapaxes(bias, 0, 1), ("batch", "act_heads", None, None))


def _norm(config: T5Config, name: str | None = None) -> layers.RMSNorm:
    return layers.RMSNorm(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def _embed(embedding: jax.Array, tokens: jax.Array, config: T5Config) -> jax.Array:
    x = jnp.take(embedding.astype(config.dtype), tokens, axis=0)
    return x.reshape(-1, config.embed_dim)


class EncoderLayer(nn.Module):
    """Pre-norm T5 encoder block: bidirectional self-attention (relative-position `bias`, segment
    `mask`) then the gated-GELU MLP, each residual; `x` `[batch * len, embed]` in and out."""

    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, batch: int, deterministic: bool):
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        attn = Attention(c, name="attention")
        h = _norm(c, "pre_attention_layer_norm")(x)
        k, v = attn.kv(h, batch)
        x = x + drop(attn.attend(attn.q(h, batch), k, v, bias, mask, deterministic), deterministic=deterministic)
        h = Mlp(c, name="mlp")(_norm(c, "pre_mlp_layer_norm")(x), deterministic)
        return nn.with_logical_constraint(x + drop(h, deterministic=deterministic), ("batch", "act_embed"))


class Encoder(nn.Module):
    """Embedding (shared, passed in) -> layers -> final norm: `[batch, len, embed]`."""

    config: T5Config

    @nn.compact
    def __call__(self, embedding, tokens, segment_ids, positions, deterministic: bool):
        c = self.config
        batch = tokens.shape[0]
        drop = nn.Dropout(c.dropout_rate)
        x = drop(_embed(embedding, tokens, c), deterministic=deterministic)
        bias = RelativePositionBias(c, bidirectional=True, name="relpos_bias")(positions, positions)
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        for i in range(c.num_encoder_layers):
            x = EncoderLayer(c, name=f"layers_{i}")(x, bias, mask, batch, deterministic)
        x = drop(_norm(c, "encoder_norm")(x), deterministic=deterministic)
        return x.reshape(batch, -1, c.embed_dim)


class DecoderLayer(nn.Module):
    """Pre-norm T5 decoder block: causal self-attention (optionally over a KV cache), cross-attention
    to the encoder output, then the MLP, each residual; `x` `[batch * len, embed]`."""

    config: T5Config

    def setup(self):
        c = self.config
        self.pre_self_attention_layer_norm = _norm(c)
        self.self_attention = Attention(c)
        self.pre_cross_attention_layer_norm = _norm(c)
        self.encoder_decoder_attention = Attention(c)
        self.pre_mlp_layer_norm = _norm(c)
        self.mlp = Mlp(c)
        self.dropout = nn.Dropout(c.dropout_rate)

    def cross_kv(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values of `encoded` `[batch, enc_len, embed]`."""
        return self.encoder_decoder_attention.kv(encoded.reshape(-1, self.config.embed_dim), encoded.shape[0])

    def __call__(self, x, self_bias, self_mask, cross_kv, cross_mask, batch: int, deterministic: bool,
                 cache: dict | None = None, index: jax.Array | None = None):
        """`x` `[batch * len, embed]` -> (`x`, updated `cache` or None)."""
        drop = functools.partial(self.dropout, deterministic=deterministic)
        h = self.pre_self_attention_layer_norm(x)
        q = self.self_attention.q(h, batch)
        k, v = self.self_attention.kv(h, batch)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
            cache = {**cache, "k": nn.with_logical_constraint(k, KV_AXES), "v": nn.with_logical_constraint(v, KV_AXES)}
        x = x + drop(self.self_attention.attend(q, k, v, self_bias, self_mask, deterministic))
        h = self.pre_cross_attention_layer_norm(x)
        ck, cv = cross_kv
        x = x + drop(self.encoder_decoder_attention.attend(
            self.encoder_decoder_attention.q(h, batch), ck, cv, None, cross_mask, deterministic))
        x = x + drop(self.mlp(self.pre_mlp_layer_norm(x), deterministic))
        return nn.with_logical_constraint(x, ("batch", "act_embed")), cache


class Decoder(nn.Module):
    """Decoder stack: embedding, causal relative-position bias, the decoder layers (cross-attending
    to the encoder), final norm and LM head (see `__call__`)."""

    config: T5Config

    def setup(self):
        c = self.config
        self.relpos_bias = RelativePositionBias(c, bidirectional=False)
        self.layers = [DecoderLayer(c) for _ in range(c.num_decoder_layers)]
        self.decoder_norm = _norm(c)
        self.dropout = nn.Dropout(c.dropout_rate)
        if not c.tie_embeddings:
            self.logits_dense = layers.param_with_axes(self, "logits_dense", _normal(c.embed_dim ** -0.5),
                                                       (c.embed_dim, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def cross_kv(self, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        return [layer.cross_kv(encoded) for layer in self.layers]

    def __call__(self, embedding, tokens, segment_ids, positions, encoder_segment_ids, cross_kv,
                 deterministic: bool, cache: dict | None = None):
        """Logits `[batch, len, vocab]` float32 and the updated cache (or None)."""
        c = self.config
        batch, length = tokens.shape
        drop = functools.partial(self.dropout, deterministic=deterministic)
        x = drop(_embed(embedding, tokens, c))
        if cache is None:
            key_segments, key_positions, index = segment_ids, positions, None
            visible = jnp.tril(jnp.ones((length, length), jnp.bool_))
        else:
            index = cache["index"]
            key_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
            key_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
            slots = cache["segment_ids"].shape[1]
            visible = jnp.arange(slots)[None, :] <= index + jnp.arange(length)[:, None]
        self_mask = ((segment_ids[:, :, None] == key_segments[:, None, :]) & visible[None])[:, None]
        self_bias = self.relpos_bias(positions, key_positions)
        cross_mask = (segment_ids[:, :, None] == encoder_segment_ids[:, None, :])[:, None]
        new_cache = None if cache is None else {**cache, "segment_ids": key_segments, "positions": key_positions,
                                                "index": index + length}
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[f"layers_{i}"]
            kv = (layer_cache["cross_k"], layer_cache["cross_v"]) if cache is not None else cross_kv[i]
            x, layer_cache = layer(x, self_bias, self_mask, kv, cross_mask, batch, deterministic, layer_cache, index)
            if cache is not None:
                new_cache[f"layers_{i}"] = layer_cache
        x = drop(self.decoder_norm(x))
        if c.tie_embeddings:
            logits = (x * c.embed_dim ** -0.5) @ embedding.astype(c.dtype).T
        else:
            logits = x @ self.logits_dense.astype(c.dtype)
        logits = nn.with_logical_constraint(logits, ("batch", "act_vocab"))
        return logits.astype(jnp.float32).reshape(batch, length, c.vocab_size), new_cache


class Transformer(nn.Module):
    """The whole model; `encode`, `decode` and `cross_kv` are its entry points."""

    config: T5Config

    def setup(self):
        c = self.config
        # N(0, 1): HF T5 `shared` init (factor 1); the pre-norm keeps the scale harmless.
        self.token_embedder = layers.param_with_axes(self, "token_embedder", _normal(1.0),
                                                     (c.vocab_size, c.embed_dim), ("vocab", "embed"), c.param_dtype)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)

    def encode(self, tokens, segment_ids, positions, deterministic: bool = True):
        return self.encoder(self.token_embedder, tokens, segment_ids, positions, deterministic)

    def cross_kv(self, encoded):
        return self.decoder.cross_kv(encoded)

    def decode(self, tokens, segment_ids, positions, encoder_segment_ids, encoded=None, cache=None,
               deterministic: bool = True):
        cross = self.decoder.cross_kv(encoded) if cache is None else None
        return self.decoder(self.token_embedder, tokens, segment_ids, positions, encoder_segment_ids, cross,
                            deterministic, cache)

    def __call__(self, batch: dict, deterministic: bool = True):
        encoded = self.encode(batch["encoder_input_tokens"], batch["encoder_segment_ids"],
                              batch["encoder_positions"], deterministic)
        logits, _ = self.decode(batch["decoder_input_tokens"], batch["decoder_segment_ids"],
                                batch["decoder_positions"], batch["encoder_segment_ids"], encoded,
                                deterministic=deterministic)
        return logits


# ---- Public API -------------------------------------------------------------------------------


def init(config: T5Config, rng: jax.Array, batch_size: int = 1, length: int = 8):
    """Initial parameters boxed with their logical axes (`nn.LogicallyPartitioned`)."""
    zeros = jnp.zeros((batch_size, length), jnp.int32)
    return Transformer(config).init(rng, {k: zeros for k in BATCH_KEYS})["params"]


def apply(config: T5Config, params, batch: dict[str, jax.Array], *, rng: jax.Array | None = None) -> jax.Array:
    """Decoder logits `[batch, dec_length, vocab]` float32 of a packed batch (see the module docstring).

    Args:
      config: the model.
      params: unboxed parameters of `init`.
      batch: `encoder_*` `[batch, enc_length]` and `decoder_*` `[batch, dec_length]` int32 arrays;
        `decoder_target_tokens` and `decoder_loss_mask` are not used here.
      rng: a `dropout` key; None (or `dropout_rate == 0`) runs deterministically.
    """
    deterministic = rng is None or config.dropout_rate == 0.0
    rngs = {} if deterministic else {"dropout": rng}
    return Transformer(config).apply({"params": params}, batch, deterministic, rngs=rngs)


def encode(config: T5Config, params, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Encoder output `[batch, enc_length, embed]` (deterministic) of int32 `[batch, enc_length]` inputs."""
    return Transformer(config).apply({"params": params}, tokens, segment_ids, positions, method=Transformer.encode)


def init_cache(config: T5Config, params, encoded: jax.Array, encoder_segment_ids: jax.Array, max_len: int,
               dtype: Any = None) -> dict:
    """A decoding cache holding the encoder's cross-attention keys and values (computed once).

    Layout: `"layers_{i}": {"k", "v"}` `[batch, max_len, heads, head_dim]` decoder self-attention
    slots (slot `j` = the `j`-th token fed, in time order) and `{"cross_k", "cross_v"}` `[batch,
    enc_length, heads, head_dim]`; `"segment_ids"`, `"positions"` `[batch, max_len]` int32 of each
    slot (segment 0 = empty or padding); `"encoder_segment_ids"` `[batch, enc_length]`; `"index"`
    scalar int32, the next slot. Keys carry logical axes `KV_AXES`.

    Args: `encoded` from `encode` `[batch, enc_length, embed]`, its `encoder_segment_ids`, `max_len`
    decoder slots, `dtype` of the cached keys and values (default `config.dtype`).
    """
    dtype = dtype or config.dtype
    batch = encoded.shape[0]
    cross = Transformer(config).apply({"params": params}, encoded, method=Transformer.cross_kv)
    shape = (batch, max_len, config.num_heads, config.head_dim)
    zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, dtype), KV_AXES)
    cache: dict[str, Any] = {f"layers_{i}": {"k": zeros(), "v": zeros(), "cross_k": ck.astype(dtype),
                                              "cross_v": cv.astype(dtype)} for i, (ck, cv) in enumerate(cross)}
    cache["segment_ids"] = jnp.zeros((batch, max_len), jnp.int32)
    cache["positions"] = jnp.zeros((batch, max_len), jnp.int32)
    cache["encoder_segment_ids"] = encoder_segment_ids.astype(jnp.int32)
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def decode_step(config: T5Config, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
    """Feeds `length` decoder tokens per row through the cached decoder (one step or a chunk).

    Each token goes to slot `cache["index"] + i` and attends to the earlier slots of its segment
    and to the encoder tokens of its segment. Feeding a sequence in any chunks gives the logits
    `apply` gives (same positions and segments), up to float reassociation.

    `tokens, positions, segment_ids` `[batch, length]` int32; `cache` from `init_cache` or a previous
    step (`index + length <= max_len`, not checked). Returns `(logits [batch, length, vocab] float32,
    cache with index advanced by length)`.
    """
    return Transformer(config).apply({"params": params}, tokens, segment_ids, positions,
                                     cache["encoder_segment_ids"], cache=cache, method=Transformer.decode)


# ---- Size and cost ----------------------------------------------------------------------------


def count_params(config: T5Config) -> int:
    """Number of parameters."""
    c = config
    attn = 4 * c.embed_dim * c.num_heads * c.head_dim
    mlp = 3 * c.embed_dim * c.mlp_dim
    enc = c.num_encoder_layers * (attn + mlp + 2 * c.embed_dim) + c.embed_dim
    dec = c.num_decoder_layers * (2 * attn + mlp + 3 * c.embed_dim) + c.embed_dim
    rel = 2 * c.relative_attention_num_buckets * c.num_heads
    emb = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
    return enc + dec + rel + emb


def flops_per_example(config: T5Config, encoder_length: int, decoder_length: int) -> float:
    """Training FLOPs (forward + backward = 3x forward = 6x multiply-adds) of one packed row.

    Multiply-adds per token: every matmul weight a token goes through (encoder layers for encoder
    tokens, plus the cross-attention keys and values of every decoder layer; decoder self q/k/v/o,
    cross q/o, MLP and LM head for decoder tokens) plus attention `2 * heads * head_dim * kv_length`
    per query (QK^T and AV), halved for the causal decoder self-attention (PaLM appendix B, as
    `llama.flops_per_token`). Embedding gathers cost nothing.
    """
    c = config
    hd = c.num_heads * c.head_dim
    enc_tok = c.num_encoder_layers * (4 * c.embed_dim * hd + 3 * c.embed_dim * c.mlp_dim + 2 * hd * encoder_length)
    enc_tok += c.num_decoder_layers * 2 * c.embed_dim * hd
    dec_tok = c.num_decoder_layers * (6 * c.embed_dim * hd + 3 * c.embed_dim * c.mlp_dim
                                      + hd * decoder_length + 2 * hd * encoder_length)
    dec_tok += c.embed_dim * c.vocab_size
    return 6.0 * (enc_tok * encoder_length + dec_tok * decoder_length)
