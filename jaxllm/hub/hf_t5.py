"""T5 v1.1 / Flan-T5 checkpoints in Hugging Face layout, in and out of `jaxllm.models.t5`.

`t5_model_overrides` turns an HF `T5ForConditionalGeneration` `config.json` into `model.*` keys,
`load_t5_params` reads the tensors of any `jaxllm.hub.CheckpointReader` one at a time straight into
their `NamedSharding`s, and `export_t5` writes params back as a folder that
`transformers.T5ForConditionalGeneration.from_pretrained` loads with no missing or unexpected
weights.

The two implementations compute the same function (HF `transformers/models/t5/modeling_t5.py` read
against `jaxllm/models/t5.py`), so the conversion is transposes and reshapes only, exact in any dtype:
- attention logits are `q k^T + bias` in both: HF's `T5Attention.scaling = 1.0` and jaxllm's
  `t5.attention` skip `1/sqrt(d_kv)` (T5 folds it into the query initialisation), so the query
  weights are copied unscaled;
- `feed_forward_proj="gated-gelu"` is HF `T5DenseGatedActDense` with `gelu_new` (tanh GELU), jaxllm's
  `Mlp`; the original T5's `"relu"` feed-forward (`T5DenseActDense`) has no jaxllm counterpart and is
  refused;
- RMS norms without bias (`T5LayerNorm`), relative-position buckets from block 0's
  `relative_attention_bias` shared by the stack's layers, none in cross-attention.

LM head. Original T5 and transformers-4 configs use `tie_word_embeddings` for two things: the LM
head is `shared` and the decoder output is scaled by `d_model**-0.5` before it. transformers 5
always ties unless the checkpoint carries a different `lm_head.weight`, and stores the scaling
separately as `scale_decoder_outputs` (`configuration_t5.py`). jaxllm has two heads: tied and scaled
(`model.tie_embeddings=True`) or an untied `logits_dense` without scaling. So the scaling decides
(`scale_decoder_outputs`, else `tie_word_embeddings`, default True): scaled -> tied (an
`lm_head.weight` must equal `shared.weight`); unscaled -> untied, from `lm_head.weight`, or from
`shared.weight` when a transformers-5 save left `lm_head` out because it was tied.

HF layouts (torch `nn.Linear.weight` is `[out_features, in_features]`), `E = d_model`,
`H = num_heads`, `D = d_kv`, `F = d_ff`, `V = vocab_size`, `B = relative_attention_num_buckets`:

| HF tensor | HF shape | jaxllm param | jaxllm shape |
| --- | --- | --- | --- |
| `shared.weight` | `[V, E]` | `token_embedder` | `[V, E]` |
| `STACK.block.0.layer.0.SelfAttention.relative_attention_bias.weight` | `[B, H]` | `STACK/relpos_bias/rel_embedding` | `[B, H]` |
| `*.{SelfAttention,EncDecAttention}.{q,k,v}.weight` | `[H*D, E]` | `.../{query,key,value}` | `[E, H, D]` |
| `*.{SelfAttention,EncDecAttention}.o.weight` | `[E, H*D]` | `.../out` | `[H, D, E]` |
| `*.DenseReluDense.{wi_0,wi_1}.weight` | `[F, E]` | `.../mlp/{wi_0,wi_1}` | `[E, F]` |
| `*.DenseReluDense.wo.weight` | `[E, F]` | `.../mlp/wo` | `[F, E]` |
| `*.layer_norm.weight`, `*.final_layer_norm.weight` | `[E]` | `.../scale` | `[E]` |
| `lm_head.weight` | `[V, E]` | `decoder/logits_dense` | `[E, V]` |

`STACK` is `encoder` or `decoder`. Encoder block `i`: `layer.0` self-attention, `layer.1` feed-forward; decoder block `i`: `layer.0`
self-attention, `layer.1` `EncDecAttention`, `layer.2` feed-forward.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Any

import flax.core
import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxllm.config import ConfigError
from jaxllm.hub import CheckpointReader, HubError, safetensors_io
from jaxllm.models import t5

ARCHITECTURES = ("T5ForConditionalGeneration",)
FEED_FORWARD = ("gated-gelu", "gated-gelu_new")  # both are HF's `gelu_new` (tanh) gated feed-forward
# Tensors some checkpoints carry that T5ForConditionalGeneration does not load separately: copies of
# `shared` (older torch saves) and a cross-attention bias HF ignores (`_keys_to_ignore_on_load_unexpected`).
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _config_file(where: str) -> str:
    path = pathlib.Path(where)
    return str(path / "config.json") if path.is_dir() else str(where)


# ---- config -----------------------------------------------------------------------------------


def scales_decoder_output(hf_config: dict) -> bool:
    """Whether HF multiplies the decoder output by `d_model**-0.5` before `lm_head` (see the module
    docstring): `scale_decoder_outputs` (transformers 5), else `tie_word_embeddings` (default True)."""
    return bool(hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True)))


def t5_model_overrides(hf_config: dict, where: str) -> dict[str, Any]:
    """The `model.*` keys of jaxllm's T5 fixed by an HF T5 `config.json`.

    Maps `d_model -> embed_dim`, `d_kv -> head_dim`, `d_ff -> mlp_dim`, `num_heads`, `num_layers ->
    num_encoder_layers`, `num_decoder_layers` (default `num_layers`), `relative_attention_num_buckets`,
    `relative_attention_max_distance`, `layer_norm_epsilon -> norm_eps`, `vocab_size`, and
    `tie_embeddings` from the output scaling (`scales_decoder_output`). `dropout_rate` is a training
    choice of the run and is not copied.

    Args:
      hf_config: the parsed `config.json`.
      where: the checkpoint folder (or file), for messages.

    Raises:
      HubError: naming the file: not a `T5ForConditionalGeneration` (naming the supported one), a
        feed-forward other than gated-GELU (the original T5's "relu" included), a missing key, or
        sizes jaxllm's T5 refuses (`t5.T5Config.from_config`'s message).
    """
    file = _config_file(where)
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or ["T5ForConditionalGeneration"]
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if model_type != "t5" or unsupported:
        what = f"architecture {', '.join(unsupported)}" if unsupported else f"model_type {model_type!r}"
        raise HubError(f"{file}: {what} is not supported for T5; supported: {', '.join(ARCHITECTURES)} "
                       f"(model_type 't5': T5 v1.1, Flan-T5 with feed_forward_proj 'gated-gelu')")
    proj = hf_config.get("feed_forward_proj", "relu")  # HF's default: the original T5
    if proj not in FEED_FORWARD:
        original = " (the original T5's feed-forward)" if proj == "relu" else ""
        raise HubError(f"{file}: feed_forward_proj={proj!r}{original} is not supported: jaxllm's T5 is T5 v1.1's "
                       f"gated-GELU; supported: {', '.join(repr(p) for p in FEED_FORWARD)} (T5 v1.1, Flan-T5)")
    keys = {"d_model": "embed_dim", "d_kv": "head_dim", "d_ff": "mlp_dim", "num_heads": "num_heads",
            "num_layers": "num_encoder_layers", "vocab_size": "vocab_size"}
    missing = [k for k in keys if hf_config.get(k) is None]
    if missing:
        raise HubError(f"{file}: missing {', '.join(missing)} (a T5 config.json needs them)")
    out: dict[str, Any] = {"family": "t5", **{ours: int(hf_config[theirs]) for theirs, ours in keys.items()}}
    out["num_decoder_layers"] = int(hf_config.get("num_decoder_layers") or hf_config["num_layers"])
    out["relative_attention_num_buckets"] = int(hf_config.get("relative_attention_num_buckets", 32))
    out["relative_attention_max_distance"] = int(hf_config.get("relative_attention_max_distance", 128))
    out["norm_eps"] = float(hf_config.get("layer_norm_epsilon", 1e-6))
    out["tie_embeddings"] = scales_decoder_output(hf_config)
    c = t5.default_config()
    c.update(out)
    try:
        t5.T5Config.from_config(c)
    except ConfigError as e:
        raise HubError(f"{file}: {e}") from None
    return out


def hf_t5_config(model_config: t5.T5Config, *, pad_token_id: int = 0, eos_token_id: int = 1,
                 decoder_start_token_id: int = 0, dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` dict of `model_config` (inverse of `t5_model_overrides`).

    Writes both `tie_word_embeddings` (transformers 4: tying and scaling) and `scale_decoder_outputs`
    (transformers 5) so either version builds the same head. Token ids: T5's sentencepiece
    vocabulary has pad 0 (also the decoder start, HF `_shift_right`) and eos 1.
    """
    c = model_config
    return {
        "architectures": list(ARCHITECTURES), "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": c.vocab_size, "d_model": c.embed_dim, "d_kv": c.head_dim, "d_ff": c.mlp_dim,
        "num_heads": c.num_heads, "num_layers": c.num_encoder_layers, "num_decoder_layers": c.num_decoder_layers,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": c.norm_eps, "dropout_rate": c.dropout_rate, "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "tie_word_embeddings": c.tie_embeddings, "scale_decoder_outputs": c.tie_embeddings,
        "pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "decoder_start_token_id": decoder_start_token_id,
        "use_cache": True, "dtype": dtype,
    }


# ---- tensor names and layouts -----------------------------------------------------------------
# Layout kinds: "same" (copied), "t" (transposed), "heads_in" (HF [H*D, E] <-> [E, H, D]),
# "heads_out" (HF [E, H*D] <-> [H, D, E]).


def _attention(prefix: str, hf: str) -> dict[tuple[str, ...], tuple[str, str]]:
    names = {"query": "q", "key": "k", "value": "v"}
    out = {(*prefix.split("/"), ours): (f"{hf}.{theirs}.weight", "heads_in") for ours, theirs in names.items()}
    out[(*prefix.split("/"), "out")] = (f"{hf}.o.weight", "heads_out")
    return out


def _mlp(prefix: str, hf: str) -> dict[tuple[str, ...], tuple[str, str]]:
    return {(*prefix.split("/"), name): (f"{hf}.DenseReluDense.{name}.weight", "t") for name in ("wi_0", "wi_1", "wo")}


def param_names(config: t5.T5Config) -> dict[tuple[str, ...], tuple[str, str]]:
    """jaxllm param path -> (HF tensor name, layout kind); `decoder/logits_dense` only when untied.

    The LM head maps to `lm_head.weight`; `load_t5_params` falls back to `shared.weight` for it
    (see the module docstring).
    """
    names: dict[tuple[str, ...], tuple[str, str]] = {("token_embedder",): ("shared.weight", "same")}
    for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        names[(stack, "relpos_bias", "rel_embedding")] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same")
        final = "encoder_norm" if stack == "encoder" else "decoder_norm"
        names[(stack, final, "scale")] = (f"{stack}.final_layer_norm.weight", "same")
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
            if stack == "encoder":
                parts = [("attention", "pre_attention_layer_norm", f"{hf}.0", "SelfAttention"),
                         ("mlp", "pre_mlp_layer_norm", f"{hf}.1", None)]
            else:
                parts = [("self_attention", "pre_self_attention_layer_norm", f"{hf}.0", "SelfAttention"),
                         ("encoder_decoder_attention", "pre_cross_attention_layer_norm", f"{hf}.1", "EncDecAttention"),
                         ("mlp", "pre_mlp_layer_norm", f"{hf}.2", None)]
            for module, norm, layer, attn in parts:
                names[(*ours.split("/"), norm, "scale")] = (f"{layer}.layer_norm.weight", "same")
                if attn is None:
                    names.update(_mlp(f"{ours}/{module}", layer))
                else:
                    names.update(_attention(f"{ours}/{module}", f"{layer}.{attn}"))
    if not config.tie_embeddings:
        names[("decoder", "logits_dense")] = ("lm_head.weight", "t")
    return names


def t5_param_shape(config: t5.T5Config, path: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of jaxllm T5 param `path` under `config` (as `t5.init` creates it)."""
    c, leaf = config, path[-1]
    attention = (c.embed_dim, c.num_heads, c.head_dim)
    shapes = {"token_embedder": (c.vocab_size, c.embed_dim), "rel_embedding": (c.relative_attention_num_buckets,
              c.num_heads), "query": attention, "key": attention, "value": attention,
              "out": (c.num_heads, c.head_dim, c.embed_dim), "wi_0": (c.embed_dim, c.mlp_dim),
              "wi_1": (c.embed_dim, c.mlp_dim), "wo": (c.mlp_dim, c.embed_dim), "scale": (c.embed_dim,),
              "logits_dense": (c.embed_dim, c.vocab_size)}
    return shapes[leaf]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of a jaxllm param of `shape` and layout `kind`."""
    if kind == "same":
        return tuple(shape)
    if kind == "t":
        return tuple(shape[::-1])
    if kind == "heads_in":  # [E, H, D] <- [H*D, E]
        return (shape[1] * shape[2], shape[0])
    return (shape[2], shape[0] * shape[1])  # heads_out: [H, D, E] <- [E, H*D]


def to_jaxllm(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor `w` -> the jaxllm layout of `shape` (a view where NumPy can)."""
    return w if kind == "same" else w.T.reshape(shape)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """jaxllm param `x` -> HF layout (C-contiguous)."""
    if kind == "same":
        return np.ascontiguousarray(x)
    if kind == "t":
        return np.ascontiguousarray(x.T)
    rows = x.shape[0] if kind == "heads_in" else x.shape[0] * x.shape[1]
    return np.ascontiguousarray(x.reshape(rows, -1).T)


# ---- loading ----------------------------------------------------------------------------------


def _plan(reader: CheckpointReader, config: t5.T5Config, abstract: dict) -> dict[tuple[str, ...], tuple[str, str]]:
    """Checks the checkpoint's names and shapes against `abstract` before anything is read."""
    names = set(reader.names())
    plan = param_names(config)
    head = ("decoder", "logits_dense")
    if head in plan and "lm_head.weight" not in names:
        plan[head] = ("shared.weight", "t")  # a tied-but-unscaled transformers-5 save (module docstring)
    if set(plan) != set(abstract):  # the table above and jaxllm.models.t5 disagree: a bug here
        raise AssertionError(f"T5 name table out of date: {sorted(set(plan) ^ set(abstract))}")
    model = (f"a T5ForConditionalGeneration with {config.num_encoder_layers} encoder and "
             f"{config.num_decoder_layers} decoder layers")
    missing = sorted({hf for hf, _ in plan.values()} - names)
    if missing:
        raise HubError(f"{reader.path}: missing tensor {missing[0]}{_more(missing)}: {model} needs it")
    for path, (hf, kind) in plan.items():
        want, got = hf_shape(kind, abstract[path].shape), tuple(reader.shape(hf))
        if got != want:
            raise HubError(f"{reader.path}: tensor {hf} has shape {list(got)} but config.json implies {list(want)} "
                           f"(jaxllm {'/'.join(path)} {list(abstract[path].shape)})")
    allowed = {hf for hf, _ in plan.values()} | set(IGNORED)
    if config.tie_embeddings:
        allowed.add("lm_head.weight")  # checked equal to shared.weight by load_t5_params
    extra = sorted(names - allowed)
    if extra:
        raise HubError(f"{reader.path}: unexpected tensor {extra[0]}{_more(extra)}: not part of {model}")
    return plan


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def load_t5_params(reader: CheckpointReader, model_config: t5.T5Config, mesh: jax.sharding.Mesh, rules) -> dict:
    """Unboxed params of `jaxllm.models.t5` from an HF T5 checkpoint, placed on `mesh`.

    Names and shapes are checked first (nothing is read from a checkpoint that does not fit). Then
    each tensor is read once, converted to the jaxllm layout (transpose/reshape, exact) and
    `param_dtype`, and placed with `jax.make_array_from_callback` into the `NamedSharding` that
    `rules` give its logical axes, so the host holds one tensor at a time (plus the local shards).

    Args:
      reader: a `jaxllm.hub.CheckpointReader` (e.g. `jaxllm.hub.hf.SafetensorsReader`).
      model_config: the model, normally built from `t5_model_overrides(reader.config, ...)`.
      mesh, rules: the device mesh and logical-axis rules (`jaxllm.sharding`).

    Returns:
      The params tree of `t5.init` (unboxed), each leaf a global `jax.Array` in `param_dtype`.

    Raises:
      HubError: naming the file and tensor: a missing tensor, one the model does not have (besides
        `IGNORED`), a shape that disagrees with the config, or an `lm_head.weight` that differs from
        `shared.weight` while the config scales the decoder output (tied head).
    """
    from jaxllm.train import loop  # noqa: PLC0415 - lazy: importing the hub does not pull in the trainer

    abstract_tree = loop.abstract_params(lambda rng: t5.init(model_config, rng), mesh, rules)
    abstract = traverse_util.flatten_dict(flax.core.unfreeze(abstract_tree))
    plan = _plan(reader, model_config, abstract)
    if model_config.tie_embeddings and "lm_head.weight" in reader.names():
        if not np.array_equal(reader.read("lm_head.weight"), reader.read("shared.weight")):
            raise HubError(f"{reader.path}: lm_head.weight differs from shared.weight, but config.json scales the "
                           f"decoder output by d_model**-0.5 (tie_word_embeddings / scale_decoder_outputs): jaxllm's "
                           f"T5 has a tied scaled head or an untied unscaled one, not an untied scaled one")
    params = {}
    for path, leaf in abstract.items():
        hf, kind = plan[path]
        w = np.asarray(reader.read(hf))
        if w.shape != hf_shape(kind, leaf.shape):
            raise HubError(f"{reader.path}: tensor {hf} read as shape {list(w.shape)}, expected "
                           f"{list(hf_shape(kind, leaf.shape))}")
        host = to_jaxllm(kind, w, leaf.shape).astype(leaf.dtype, copy=False)
        params[path] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index, h=host: h[index])
        del w, host
    return traverse_util.unflatten_dict(params)


# ---- export -----------------------------------------------------------------------------------


def _gather(x: jax.Array) -> np.ndarray:
    """The whole of `x` on this host (a collective across processes when `x` spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def export_t5(params, model_config: t5.T5Config, directory: str | os.PathLike, *,
              max_shard_bytes: int = 5 * 2**30, pad_token_id: int = 0, eos_token_id: int = 1,
              decoder_start_token_id: int = 0) -> pathlib.Path:
    """Writes `params` as an HF `T5ForConditionalGeneration` folder; returns its path.

    Files: `config.json` (`hf_t5_config`), `model.safetensors` or, above `max_shard_bytes`,
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, tensors in HF name order
    and the params' dtype (float32, bfloat16 or float16), each gathered and streamed to disk alone
    (`safetensors_io.write_safetensors`). Everything is written into a temporary sibling folder
    renamed to `directory` at the end, so a failure leaves nothing behind. In a multi-process run
    every process gathers, process 0 writes. Tokenizer files are not written.

    Args:
      params: unboxed (or boxed) params of `t5.init`'s tree, any sharding.
      model_config: their model.
      directory: the output folder; must not exist or be empty.
      max_shard_bytes: size limit of one safetensors file (a larger tensor gets a file alone).
      pad_token_id, eos_token_id, decoder_start_token_id: ids for `config.json` (T5: 0, 1, 0).

    Raises:
      HubError: `directory` exists and is not an empty folder; params whose tree, shapes or dtypes
        do not fit `model_config` (naming the param).
    """
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise HubError(f"{directory}: exists and is not an empty folder; export writes a new folder")
    flat = traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(params)))
    names = param_names(model_config)
    if set(flat) != set(names):
        diff = sorted("/".join(p) for p in set(flat) ^ set(names))
        raise HubError(f"{directory}: params do not match the T5 config (differing: {', '.join(diff[:5])})")
    dtypes = {np.dtype(x.dtype) for x in flat.values()}
    if len(dtypes) != 1 or next(iter(dtypes)).name not in EXPORT_DTYPES:
        raise HubError(f"{directory}: params need one dtype of {', '.join(EXPORT_DTYPES)}, got "
                       f"{sorted(d.name for d in dtypes)}")
    dtype = dtypes.pop()
    by_hf = {}  # HF name -> (jaxllm path, layout kind, HF shape)
    for path, (hf, kind) in sorted(names.items(), key=lambda item: item[1][0]):
        expected = t5_param_shape(model_config, path)
        if tuple(flat[path].shape) != expected:
            raise HubError(f"{directory}: param {'/'.join(path)} has shape {list(flat[path].shape)}, the config "
                           f"implies {list(expected)}")
        by_hf[hf] = (path, kind, hf_shape(kind, expected))
    shard_of = safetensors_io.split_shards([math.prod(shape) * dtype.itemsize for _, _, shape in by_hf.values()],
                                           max_shard_bytes)
    files = safetensors_io.shard_names(shard_of[-1] + 1)
    weight_map = {hf: files[i] for hf, i in zip(by_hf, shard_of)}

    def fetch(hf: str) -> np.ndarray:
        path, kind, _ = by_hf[hf]
        return to_hf(kind, _gather(flat[path]))

    writer = jax.process_index() == 0
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    try:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        for file in files:
            entries = [(hf, by_hf[hf][2], dtype) for hf, f in weight_map.items() if f == file]
            safetensors_io.write_safetensors(tmp / file if writer else None, entries, fetch, {"format": "pt"})
        if writer:
            if len(files) > 1:
                total = sum(math.prod(shape) * dtype.itemsize for _, _, shape in by_hf.values())
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / safetensors_io.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            config = hf_t5_config(model_config, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                  decoder_start_token_id=decoder_start_token_id, dtype=dtype.name)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if directory.exists():
                directory.rmdir()
            os.replace(tmp, directory)
    finally:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
