"""Layers shared by the model families: RMSNorm, rotary embeddings, attention masks and kernels.

Every parameter is created with logical axis names (`vocab, embed, heads, kv_heads, head_dim, mlp,
layers`); `jaxllm.sharding` maps them onto the device mesh. Activations carry the logical names
`batch, length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab` in sharding constraints.

Dense projections work on tokens flattened to `[batch * length, features]`: on CPU the weight
gradient of a projection applied to `[batch, length, features]` was measured ~2.4x slower than the
flattened form (../shared/docs/cpu-notes.md), and on TPU/GPU the two lower to the same matmul.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import sharding
from jaxllm.config import ConfigError

Dtype = Any
Initializer = Any


def param_with_axes(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Dtype,
) -> jax.Array:
    """Creates `module`'s parameter `name` of `shape`, annotated with logical `axes`.

    Raises:
      ValueError: if `len(axes) != len(shape)`.
    """
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: {len(axes)} axis names for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm without bias or mean subtraction.

    `y = x / sqrt(mean(x^2) + eps) * scale`, computed in float32 (Zhang & Sennrich 2019, eq. 4;
    LLaMA, T5). Input `[..., features]`, output the same shape in `dtype`.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaling of the rotary inverse frequencies for a longer context than pretraining's.

    Attributes:
      kind: "linear" (position interpolation, Chen et al. 2023: every `inv_freq / factor`) or
        "llama3" (Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth
        ramp between; see `scaled_inv_freq`).
      factor: context extension factor (8 for Llama 3.1, 32 for Llama 3.2 1B/3B).
      low_freq_factor, high_freq_factor: "llama3" only; wavelengths above
        `original_max_position / low_freq_factor` are scaled, below
        `original_max_position / high_freq_factor` kept (1 and 4 in Llama 3.1).
      original_max_position: "llama3" only; pretraining context in tokens (8192 for Llama 3).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def scaled_inv_freq(inv_freq: jax.Array, scaling: RopeScaling) -> jax.Array:
    """`inv_freq` `[head_dim // 2]` float32 rescaled by `scaling`.

    "linear": `inv_freq / factor`. "llama3", with `wavelen = 2 pi / inv_freq`, `L = original_max_position`:
    `inv_freq` where `wavelen < L / high_freq_factor`; `inv_freq / factor` where
    `wavelen > L / low_freq_factor`; in between `(1 - s) inv_freq / factor + s inv_freq` with
    `s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
    Source: `apply_scaling` of Meta's Llama 3.1 reference code (meta-llama/llama-models) and
    Hugging Face's `_compute_llama3_parameters` (transformers `modeling_rope_utils.py`), computed
    in float32 as Hugging Face does.
    """
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rope scaling {scaling.kind!r}")
    old_context = scaling.original_max_position
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float,
                     scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables of rotary position embeddings (Su et al. 2021, RoFormer eq. 34).

    Uses the rotate-half layout of GPT-NeoX / Hugging Face LLaMA: frequency `i` pairs dimension `i`
    with dimension `i + head_dim/2`, `inv_freq_i = theta^(-2i/head_dim)`, so one table entry per
    frequency serves both dimensions of its pair.

    Args:
      positions: `[batch, length]` int positions.
      head_dim: even size of each attention head.
      theta: RoPE base (10000 for LLaMA-2, 500000 for LLaMA-3, 1000000 for Qwen2.5).
      scaling: optional long-context rescaling of `inv_freq` (`scaled_inv_freq`); None: none.

    Returns:
      `(cos, sin)`, each `[batch, length, head_dim // 2]` float32.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
    tables = computed_once(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1))
    return tables[..., :half], tables[..., half:]


def computed_once(x: jax.Array) -> jax.Array:
    """`x` `[..., features]` float32, unchanged, materialised once instead of inside each consumer.

    XLA fuses elementwise producers into every consumer and recomputes them per output element: the
    RoPE tables, broadcast over heads and used by the forward and backward rotations of q and k,
    had their cos/sin evaluated ~`heads * 8` times per table entry on CPU, which cost ~7% of the
    baby-GPT train step (bench/train_throughput.py). `jax.lax.optimization_barrier` does not stop
    this: XLA:CPU removes barriers before fusion. A product with the identity is a dot, which XLA
    does not fuse into elementwise loops, and is exact (`x * 1 + 0 + ... + 0`; `HIGHEST` keeps
    accelerators from rounding the operands to bfloat16).
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.dot(x, eye, precision=jax.lax.Precision.HIGHEST)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` `[batch, length, ..., head_dim]` by the tables from `rope_frequencies`.

    `x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`, written per half
    (`[x1 cos - x2 sin, x2 cos + x1 sin]`) so no negated copy of `x` is built; the tables
    `[batch, length, head_dim // 2]` broadcast over the axes between length and head_dim (heads, or
    q/k and heads). Computed in float32, returned in `x.dtype`.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array, *, causal: bool = True) -> jax.Array:
    """Boolean mask `[batch, 1, length, length]`: query i may attend to key j.

    Tokens attend only within their own segment (packed documents never see each other) and, if
    `causal`, only to keys at or before them. Padding (segment 0) attends to padding, so no query row
    is empty and softmax never divides by zero; padding outputs are masked out of every loss.

    Args:
      segment_ids: `[batch, length]` int; 0 marks padding.
      causal: lower-triangular masking.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        length = segment_ids.shape[1]
        same = same & jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None]
    return same[:, None, :, :]


def cached_attention_mask(segment_ids: jax.Array, cache_segment_ids: jax.Array, index: jax.Array) -> jax.Array:
    """Boolean mask `[batch, 1, length, max_len]` of new tokens over the slots of a KV cache.

    The new tokens occupy cache slots `index .. index + length - 1` (already written into
    `cache_segment_ids`). Query `i` may attend to slot `j` when `j <= index + i` (slots are in time
    order, so this is the causal mask) and the slot holds the query's segment. Empty slots and
    padding hold segment 0, which no real token has; a padding query sees at least its own slot.
    Over the same token layout this is exactly `attention_mask(causal=True)`, restricted to the
    slots written so far.

    Args:
      segment_ids: `[batch, length]` int segments of the new tokens; 0 marks padding.
      cache_segment_ids: `[batch, max_len]` int segments of every cache slot (0: empty or padding).
      index: scalar int, the slot of the first new token.
    """
    length, max_len = segment_ids.shape[1], cache_segment_ids.shape[1]
    visible = jnp.arange(max_len)[None, :] <= index + jnp.arange(length)[:, None]  # [length, max_len]
    same = segment_ids[:, :, None] == cache_segment_ids[:, None, :]
    return (same & visible[None])[:, None, :, :]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads (Ainslie et al. 2023).

    `softmax(q k^T / sqrt(head_dim), masked) v` (Vaswani et al. 2017, eq. 1). With
    `implementation="xla"`, or `None` on CPU, it is written out here with einsums; otherwise it is
    `jax.nn.dot_product_attention` (`None` lets JAX choose, e.g. the fused cuDNN kernel on GPU;
    "cudnn" asks for it). The einsum form ran the baby-GPT step's attention ~1.8x faster on CPU than
    `jax.nn.dot_product_attention`'s XLA path, which vmaps over the query groups.

    Args:
      query: `[batch, q_length, heads, head_dim]`.
      key, value: `[batch, kv_length, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      mask: bool, broadcastable to `[batch, heads, q_length, kv_length]`; True = may attend. Every
        query row needs at least one True (the masks of this module guarantee it).
      implementation: None, "xla" or "cudnn".

    Returns:
      `[batch, q_length, heads, head_dim]` in `query.dtype`; scores and softmax in float32.
    """
    if implementation == "xla" or (implementation is None and jax.default_backend() == "cpu"):
        return _einsum_attention(query, key, value, mask)
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)


def _einsum_attention(query, key, value, mask):
    heads, kv_heads, head_dim = query.shape[2], key.shape[2], query.shape[3]
    if heads != kv_heads:  # query head i reads kv head i // group, as jax.nn groups them
        key = jnp.repeat(key, heads // kv_heads, axis=2)
        value = jnp.repeat(value, heads // kv_heads, axis=2)
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    scores = jnp.einsum("blhd,bmhd->bhlm", query, key, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", probs, value).astype(query.dtype)


# Splash attention tiles (query, key) blocks of the attention matrix; key blocks are computed in
# chunks that must be a multiple of the TPU's 128 lanes (`splash_attention_kernel.NUM_LANES`), and
# every block must divide the sequence. 512 is MaxText's default block; smaller ones serve shorter
# or less divisible lengths.
SPLASH_BLOCK_SIZES = (512, 256, 128)
# The logical axes (see jaxllm.sharding) that shard `[batch, length, heads, head_dim]` inside the
# kernel's shard_map; the sequence stays whole on every device (each query block reads all keys).
_SPLASH_Q_AXES = ("batch", None, "act_heads", None)
_SPLASH_KV_AXES = ("batch", None, "act_kv_heads", None)


def splash_block_size(length: int) -> int:
    """The largest of `SPLASH_BLOCK_SIZES` that divides `length`.

    Raises:
      ConfigError: naming `model.attention_impl` when none divides `length`.
    """
    for block in SPLASH_BLOCK_SIZES:
        if length % block == 0:
            return block
    raise ConfigError(
        f"model.attention_impl='splash' tiles the sequence in blocks of {SPLASH_BLOCK_SIZES[-1]} tokens, but "
        f"the attention runs over {length} tokens; make the sequence length (data.seq_len) "
        f"a multiple of {SPLASH_BLOCK_SIZES[-1]}, or use model.attention_impl='' or 'xla'")


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool | None = None) -> jax.Array:
    """Causal, segment-aware attention with TPU splash attention (Pallas; `jax.experimental.pallas.
    ops.tpu.splash_attention`), the same function as `dot_product_attention` under
    `attention_mask(segment_ids, causal=True)`.

    Query `i` attends to keys `j <= i` of its own segment (the kernel's `CausalMask` and-ed with
    `SegmentIds`); padding (segment 0) attends to earlier padding, as in `attention_mask`, so no
    row is empty. Scores are `q k^T / sqrt(head_dim)` (the kernel does not scale, so `q` is scaled
    here in its dtype, as in `dot_product_attention`); softmax and accumulation are float32 in the
    kernel. The kernel works per example on `[heads, length, head_dim]`, so it is vmapped over the
    batch; grouped-query heads map query head `i` to kv head `i // (heads // kv_heads)`, as
    `jax.nn.dot_product_attention` groups them.

    Under a mesh (`jax.sharding.get_abstract_mesh()`, set by `jaxllm.sharding.activate`) the kernel
    runs per shard in `jax.shard_map`: batch and heads split as the logical-axis rules in effect
    say for `batch`, `act_heads`, `act_kv_heads` (default: batch over ('data', 'fsdp'), heads over
    'tensor'), the sequence whole on every device.

    Args:
      query: `[batch, length, heads, head_dim]`.
      key, value: `[batch, length, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      segment_ids: `[batch, length]` int; 0 marks padding.
      interpret: run the kernel in Pallas interpret mode (plain XLA ops; slow, for checking it on
        CPU). None: interpret unless the computation targets TPU (the mesh's devices, else
        `jax.default_backend()`), so TPU runs and TPU ahead-of-time compiles use the Mosaic kernel.

    Returns:
      `[batch, length, heads, head_dim]` in `query.dtype`.

    Raises:
      ConfigError: naming `model.attention_impl` when the length is not a multiple of 128 (see
        `splash_block_size`), the computation targets a GPU (the kernel is Mosaic TPU code), or
        the batch or (kv) heads do not divide over the mesh axes that shard them.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # imports Pallas/Mosaic: only when used

    batch, length, heads, head_dim = query.shape
    if key.shape[1] != length:
        raise ValueError(f"splash_attention is self-attention: {length} queries but {key.shape[1]} keys")
    block = splash_block_size(length)
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform not in ("tpu", "cpu"):
        raise ConfigError(f"model.attention_impl='splash' is a TPU kernel; on {platform} use "
                          f"model.attention_impl='' (or 'cudnn' on GPU)")
    if interpret is None:
        interpret = platform != "tpu"
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def attend(q, k, v, seg):
        # Built inside the shard_map body: its mask covers this shard's heads only. The mask is
        # static (causal), so the kernel's block-sparsity tables are compile-time constants.
        mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(q.shape[2])])
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # the kernel's [heads, length, head_dim]
        out = jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
        return out.transpose(0, 2, 1, 3)

    if mesh.empty:
        return attend(query, key, value, segment_ids)
    rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES  # the project's defaults if none are set
    q_spec = nn.logical_to_mesh_axes(_SPLASH_Q_AXES, rules)
    kv_spec = nn.logical_to_mesh_axes(_SPLASH_KV_AXES, rules)
    for what, size, axes in (("batch", batch, q_spec[0]), ("heads", heads, q_spec[2]),
                             ("kv_heads", key.shape[2], kv_spec[2])):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        shards = 1
        for a in axes:
            shards *= mesh.shape[a]
        if size % shards:
            raise ConfigError(f"model.attention_impl='splash' runs per shard, but {what}={size} does not divide "
                              f"over mesh axes {axes} of size {shards} (mesh {dict(mesh.shape)})")
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    # check_vma=False: the kernel's pallas_call declares no varying-manual-axes types for its outputs
    # (jax 0.10.2 refuses it under check_vma=True).
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(query, key, value, segment_ids)
