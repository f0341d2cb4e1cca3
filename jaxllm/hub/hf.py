"""Hugging Face checkpoints of the LLaMA family: safetensors folders in, safetensors folders out.

Architectures (`config.json` `architectures` / `model_type`): `LlamaForCausalLM` (Llama 2, 3,
3.1, 3.2, SmolLM/SmolLM2), `MistralForCausalLM`, `Qwen2ForCausalLM` (Qwen2/2.5: q/k/v bias, tied
embeddings on the small ones) and their `...ForSequenceClassification` variants (reward models:
`score.weight [1, embed]` <-> jaxllm's `score_head [embed, 1]`, `head="scalar"`).

Tensor names and layouts: `jaxllm.hub.hf_layout` (a rename plus a transpose/reshape per tensor).

Not supported (HubError naming the file, key and the supported set): other architectures,
`mlp_bias`, Llama's `attention_bias` (it biases `o_proj` too), activations other than SiLU, rope
types other than default / `linear` / `llama3`, partial rotary. Sliding-window attention
(Mistral's `sliding_window`, Qwen2's `use_sliding_window`) is not implemented: jaxllm attends over
the whole sequence, which equals `transformers` for sequences of at most `sliding_window` tokens
(4096 for Mistral-7B-v0.1); a warning says so on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxllm.hub import HubError
from jaxllm.hub.hf_layout import Leaf, plan
from jaxllm.hub.safetensors_io import INDEX_FILE, SafetensorsReader, shard_names, split_shards, write_safetensors

__all__ = ["SafetensorsReader", "SUPPORTED_ARCHITECTURES", "checkpoint_head", "llama_model_overrides",
           "load_llama_params", "hf_config", "export_llama"]

# Hugging Face class -> (model_type, jaxllm head).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "lm"), "LlamaForSequenceClassification": ("llama", "scalar"),
    "MistralForCausalLM": ("mistral", "lm"), "MistralForSequenceClassification": ("mistral", "scalar"),
    "Qwen2ForCausalLM": ("qwen2", "lm"), "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
}
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed from the config
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB")


# ---- config.json -> model.* -------------------------------------------------------------------

def _architecture(hf_config: dict[str, Any], where: str) -> tuple[str, str]:
    """`(model_type, head)` of a supported checkpoint.

    Raises:
      HubError: an architecture or model_type outside `SUPPORTED_ARCHITECTURES`.
    """
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    for arch in archs:
        if arch not in SUPPORTED_ARCHITECTURES:
            raise HubError(f"{where}: architecture {arch!r} is not supported; supported: {supported}")
        if model_type not in (None, SUPPORTED_ARCHITECTURES[arch][0]):
            raise HubError(f"{where}: config.json has architecture {arch} but model_type {model_type!r}")
        return SUPPORTED_ARCHITECTURES[arch]
    if model_type in _CLASS_PREFIX:  # no `architectures` key: the causal LM of its model_type
        return model_type, "lm"
    raise HubError(f"{where}: model_type {model_type!r} (no architectures key) is not supported; supported: "
                   f"{supported}")


def checkpoint_head(hf_config: dict[str, Any], where: str) -> str:
    """"scalar" for a `...ForSequenceClassification` (reward) checkpoint, else "lm".

    Raises:
      HubError: an unsupported architecture (see `llama_model_overrides`).
    """
    return _architecture(hf_config, where)[1]


def _rope_overrides(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
    """The `model.rope_*` keys from the classic `rope_theta` + `rope_scaling` or transformers 5's
    `rope_parameters` (`{rope_theta, rope_type, factor, ...}`)."""
    params = hf_config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise HubError(f"{where}: per-layer-type rope_parameters ({sorted(params)}) are not supported")
    params = {**(hf_config.get("rope_scaling") or {}), **params}
    theta = params.get("rope_theta", hf_config.get("rope_theta")) or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    key = "rope_parameters.rope_type" if "rope_parameters" in hf_config else "rope_scaling.rope_type"
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "", "rope_scaling_factor": 1.0,
                           "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                           "rope_original_max_position": 8192}
    if float(params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise HubError(f"{where}: partial_rotary_factor != 1 is not supported (rotary over the whole head only)")
    if kind == "default":
        return out
    if kind not in ("linear", "llama3"):
        raise HubError(f"{where}: {key}={kind!r} is not supported; supported: default, linear, llama3")
    try:
        out.update(rope_scaling=kind, rope_scaling_factor=float(params["factor"]))
        if kind == "llama3":
            original = params.get("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
            out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                       rope_high_freq_factor=float(params["high_freq_factor"]),
                       rope_original_max_position=int(original))
    except (KeyError, TypeError, ValueError):
        needs = "factor" if kind == "linear" else "factor, low_freq_factor, high_freq_factor and " \
                                                  "original_max_position_embeddings (or max_position_embeddings)"
        raise HubError(f"{where}: rope type {kind} needs numbers {needs} in {key.split('.')[0]}; found "
                       f"{params}") from None
    return out


def llama_model_overrides(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
    """The `model.*` keys of `jaxllm.models.llama.default_config` that an HF `config.json` fixes.

    Returns `family`, `architecture` (the model_type), `vocab_size`, `embed_dim`, `num_layers`,
    `num_heads`, `num_kv_heads`, `head_dim` (`head_dim` key, else hidden/heads), `mlp_dim`,
    `rope_theta`, the rope scaling keys, `norm_eps`, `tie_embeddings` and `qkv_bias`.

    Raises:
      HubError (`where` is the file or folder, for the message): an architecture outside
        `SUPPORTED_ARCHITECTURES` (naming it and them), a missing size key, or an unsupported
        feature (`hidden_act`, `mlp_bias`, Llama's `attention_bias`, rope type, `num_labels` != 1
        of a sequence-classification model), naming the key.
    """
    model_type, head = _architecture(hf_config, where)

    def need(key: str) -> int:
        value = hf_config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise HubError(f"{where}: config.json needs a positive integer {key} (found {value!r})")
        return value

    embed, heads = need("hidden_size"), need("num_attention_heads")
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HubError(f"{where}: hidden_act={act!r} is not supported; supported: silu (SwiGLU)")
    if hf_config.get("mlp_bias"):
        raise HubError(f"{where}: mlp_bias=true is not supported (jaxllm's MLP has no biases)")
    if model_type != "qwen2" and hf_config.get("attention_bias"):
        raise HubError(f"{where}: attention_bias=true is not supported for {model_type} (it biases o_proj too; "
                       f"jaxllm supports q/k/v biases only, as Qwen2 has them)")
    labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {0: 0}))
    if head == "scalar" and labels != 1:
        raise HubError(f"{where}: num_labels={labels} is not supported; a reward model "
                       f"(ForSequenceClassification) needs num_labels=1")
    window = hf_config.get("sliding_window") if model_type == "mistral" or hf_config.get("use_sliding_window") else None
    if window:
        logging.warning("%s: sliding_window=%s is not implemented: attention is over the whole sequence, which "
                        "equals %s for sequences of at most %s tokens", where, window, model_type, window)
    head_dim = hf_config.get("head_dim") or embed // heads
    if not hf_config.get("head_dim") and embed % heads:
        raise HubError(f"{where}: hidden_size={embed} is not divisible by num_attention_heads={heads} and "
                       f"config.json has no head_dim")
    return {
        "family": "llama", "architecture": model_type, "vocab_size": need("vocab_size"), "embed_dim": embed,
        "num_layers": need("num_hidden_layers"), "num_heads": heads,
        "num_kv_heads": int(hf_config.get("num_key_value_heads") or heads), "head_dim": int(head_dim),
        "mlp_dim": need("intermediate_size"), **_rope_overrides(hf_config, where),
        "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)), "qkv_bias": model_type == "qwen2",
    }


# ---- loading -----------------------------------------------------------------------------------

def _file_of(reader, name: str) -> str:
    return reader.file_of(name) if hasattr(reader, "file_of") else reader.path


def _check_tensors(reader, leaves: list[Leaf], head: str, tied: bool) -> bool:
    """Checks the checkpoint's tensors against the plan before anything is read; returns whether a
    tied model's checkpoint also holds `lm_head.weight` (tolerated when equal to the embedding).

    Raises:
      HubError: a missing tensor, one with no place in the model, or a shape other than the
        config implies (naming file, tensor, its shape and the expected one).
    """
    expected = {name: leaf.hf_shape for leaf in leaves for name in leaf.names}
    present = set(reader.names())
    spare_head = head == "lm" and tied and "lm_head.weight" in present
    if "score.weight" in present and head == "lm":
        hint = " (a sequence-classification checkpoint: load it with head='scalar')"
    elif "score.weight" not in present and head == "scalar":
        hint = " (a causal-LM checkpoint has no score head: start a reward model from it with a fresh head)"
    else:
        hint = ""
    missing = sorted(n for n in expected if n not in present)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HubError(f"{reader.path}: tensor {missing[0]}{more} missing from the checkpoint, which the "
                       f"config needs{hint}")
    extra = sorted(n for n in present - expected.keys() - ({"lm_head.weight"} if spare_head else set())
                   if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise HubError(f"{_file_of(reader, extra[0])}: tensor {extra[0]}{more} has no place in the model its "
                       f"config describes{hint}")
    for name, want in expected.items():
        got = tuple(reader.shape(name))
        if got != want:
            raise HubError(f"{_file_of(reader, name)}: tensor {name} has shape {list(got)}, but config.json "
                           f"implies {list(want)}")
    return spare_head


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype.name}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def _aligned_empty(shape: list[int], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """`np.empty(shape, dtype)` starting on an `alignment`-byte boundary. XLA:CPU adopts such host
    arrays as device buffers without a copy (NumPy's own allocations are 16-byte aligned and get
    copied), so on CPU a loaded param costs its size once, not twice."""
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(dtype).reshape(shape)


def _place(read, leaf: Leaf, abstract: jax.ShapeDtypeStruct) -> jax.Array:
    """The global array of `leaf` on `abstract.sharding`, each HF tensor read once.

    Each distinct shard this process's devices hold gets a host buffer of the param dtype, filled
    tensor by tensor (a stacked leaf's shard takes the layers of its index), then handed to
    `jax.make_array_from_callback`: host memory peaks at one HF tensor plus the local shards
    (which on CPU become the device buffers themselves, `_aligned_empty`).
    """
    shape, sharding, dtype = tuple(abstract.shape), abstract.sharding, np.dtype(abstract.dtype)
    buffers: dict[tuple, tuple[tuple[slice, ...], np.ndarray]] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        key = _index_key(index, shape)
        if key not in buffers:
            buffers[key] = (index, _aligned_empty([len(range(*k)) for k in key], dtype))
    for layer, name in enumerate(leaf.names):
        view = leaf.layout.to_jaxllm(read(name), leaf.shape)
        for index, buffer in buffers.values():
            if not leaf.stacked:
                buffer[...] = view[index]
            else:
                start, stop, _ = index[0].indices(shape[0])
                if start <= layer < stop:
                    buffer[layer - start] = view[index[1:]]
        del view
    return jax.make_array_from_callback(shape, sharding, lambda index: buffers[_index_key(index, shape)][1])


def check_llama_checkpoint(reader, model_config, *, head: str = "lm") -> None:
    """Checks the names and shapes of a checkpoint's tensors against `model_config`, reading no data:
    what `load_llama_params` checks first, for callers that must fail before writing anything.

    Raises:
      HubError: as `load_llama_params` (missing, extra or misshapen tensors).
    """
    from jaxllm.models import llama  # noqa: PLC0415
    from jaxllm.train import loop  # noqa: PLC0415

    shapes = loop.unbox_shapes(jax.eval_shape(lambda: llama.init(model_config, jax.random.key(0), head=head)))
    _check_tensors(reader, plan(traverse_util.flatten_dict(shapes)), head, model_config.tie_embeddings)


def load_llama_params(reader, model_config, mesh: jax.sharding.Mesh, rules, *, head: str = "lm") -> dict:
    """The params of `jaxllm.models.llama` from a checkpoint, placed straight into their shardings.

    Shapes and shardings are `jaxllm.train.loop.abstract_params` of `llama.init(model_config, ...,
    head=head)` on `mesh` under `rules`. Every HF tensor is read once (`reader.read`), viewed in
    jaxllm's layout (transpose/reshape), cast to `model_config.param_dtype` shard by shard, and
    each device gets only its shard (`jax.make_array_from_callback`); no host holds the whole model.
    Multi-host: each process reads every tensor but keeps only its devices' shards.

    `head="lm"` reads `lm_head.weight` (absent when `tie_embeddings`; a tied checkpoint that also
    holds it is accepted only when it equals `model.embed_tokens.weight` bit for bit, which is
    checked by hash without a second copy in memory); `head="scalar"` reads a sequence-classification
    checkpoint's `score.weight`. Rotary `inv_freq` buffers are ignored (recomputed from the config).

    Args:
      reader: a `jaxllm.hub.CheckpointReader` (HF names and layouts).
      model_config: `jaxllm.models.llama.LlamaConfig` matching the checkpoint
        (`llama_model_overrides`).
      mesh, rules: the device mesh and logical-axis rules (`jaxllm.sharding`).
      head: "lm" or "scalar".

    Returns:
      The unboxed param tree (jax.Arrays, `param_dtype`), as `llama.init` would make it.

    Raises:
      HubError: a missing tensor or one the model has no place for, a shape other than the config
        implies (naming the file, tensor and both shapes), a tied `lm_head.weight` that differs from
        the embedding, or an unreadable tensor (from the reader).
    """
    from jaxllm.models import llama  # noqa: PLC0415 - the hub is imported lazily by model specs
    from jaxllm.train import loop  # noqa: PLC0415

    abstract = loop.abstract_params(lambda rng: llama.init(model_config, rng, head=head), mesh, rules)
    flat = traverse_util.flatten_dict(abstract)
    leaves = plan(flat)
    spare_head = _check_tensors(reader, leaves, head, model_config.tie_embeddings)
    digests: dict[str, str] = {}

    def read(name: str) -> np.ndarray:
        array = reader.read(name)
        if tuple(array.shape) != tuple(reader.shape(name)):
            raise HubError(f"{_file_of(reader, name)}: tensor {name} read as {list(array.shape)}, header says "
                           f"{list(reader.shape(name))}")
        if spare_head and name == "model.embed_tokens.weight":
            digests[name] = _digest(array)
        return array

    out = {leaf.path: _place(read, leaf, flat[leaf.path]) for leaf in leaves}
    if spare_head and _digest(reader.read("lm_head.weight")) != digests["model.embed_tokens.weight"]:
        raise HubError(f"{_file_of(reader, 'lm_head.weight')}: config.json ties the embeddings "
                       f"(tie_word_embeddings) but lm_head.weight differs from model.embed_tokens.weight")
    return traverse_util.unflatten_dict(out)


# ---- export ------------------------------------------------------------------------------------

def hf_config(model_config, head: str = "lm", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` dict of `model_config` (a `LlamaConfig`) as a `transformers` model.

    The class is `model_config.architecture`'s (`""`: Qwen2 when `qkv_bias`, else Llama), causal
    LM for `head="lm"`, `...ForSequenceClassification` with `num_labels=1` for `head="scalar"`.
    Rope settings go in the classic `rope_theta` + `rope_scaling` form, which transformers 4.x and
    5 both read. Sliding windows are off (jaxllm attends over the whole sequence).
    `max_position_embeddings` (jaxllm does not bound positions) is the llama3 scaling's extended
    context, else 8192, unless `extra` gives it. `extra` (token ids: `bos_token_id`,
    `eos_token_id`, `pad_token_id`; ...) is merged last. A reward model's `pad_token_id` (which
    transformers needs to pool batches) defaults to `eos_token_id` of `extra`, else 0.

    Raises:
      HubError: a model that the chosen class cannot represent (q/k/v bias on Llama/Mistral, none
        on Qwen2).
    """
    c = model_config
    arch = c.architecture or ("qwen2" if c.qkv_bias else "llama")
    if c.qkv_bias != (arch == "qwen2"):
        raise HubError(f"model.architecture={arch!r} with model.qkv_bias={c.qkv_bias}: "
                       f"{'only qwen2 has q/k/v biases' if c.qkv_bias else 'qwen2 always has q/k/v biases'}")
    dtype = np.dtype(c.param_dtype).name
    scaling = c.rope_scaling
    rope_scaling = None
    if scaling is not None:
        rope_scaling = {"rope_type": scaling.kind, "factor": scaling.factor}
        if scaling.kind == "llama3":
            rope_scaling.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                                original_max_position_embeddings=scaling.original_max_position)
    max_positions = 8192
    if scaling is not None and scaling.kind == "llama3":
        max_positions = int(scaling.original_max_position * scaling.factor)
    out: dict[str, Any] = {
        "architectures": [_CLASS_PREFIX[arch] + ("ForSequenceClassification" if head == "scalar" else "ForCausalLM")],
        "model_type": arch, "vocab_size": c.vocab_size, "hidden_size": c.embed_dim,
        "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling, "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
    }
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    extra = dict(extra or {})
    if head == "scalar":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                   pad_token_id=extra.get("pad_token_id", extra.get("eos_token_id", 0)))
    out.update(extra)
    return out


def _gather(array, layer: int | None) -> np.ndarray:
    """One HF tensor's worth of a param on the host (a stacked leaf's `layer`), from every device;
    multi-host, every process takes part (`process_allgather`)."""
    if layer is not None:
        array = array[layer]
    if jax.process_count() > 1 and isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _natural(name: str) -> list:
    """Sort key putting `model.layers.10` after `model.layers.9`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def export_llama(params, model_config, directory: str | os.PathLike, *, head: str = "lm",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict[str, Any] | None = None
                 ) -> pathlib.Path:
    """Writes `params` as a Hugging Face model folder that `transformers` loads without warnings.

    Files: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` (a larger tensor gets its own) with `model.safetensors.index.json`
    (`metadata.total_size` in bytes, `weight_map`), and `config.json` (`hf_config`). Tensors are in
    `param_dtype`, HF names and layouts (the inverse of `load_llama_params`, so an imported
    checkpoint exports bit-identically), gathered one at a time (`jax.device_get`; multi-host
    `process_allgather`, all processes calling this) and streamed to disk by process 0 into a
    temporary folder that is renamed to `directory` at the end. Tokenizer files are not written.

    Args:
      params: unboxed (or boxed) params of `jaxllm.models.llama` with head `head`.
      model_config: its `LlamaConfig` (or the `model` config section).
      directory: the folder to create; it must not exist or be empty.
      head: "lm" (causal LM) or "scalar" (`...ForSequenceClassification`, `score.weight`).
      max_shard_bytes: shard size limit in bytes (default 5 GB, as `save_pretrained`).
      extra_config: merged into `config.json` (token ids, `max_position_embeddings`; see `hf_config`).

    Returns:
      `directory` as a Path.

    Raises:
      HubError: `directory` exists and is not empty, or the model is not representable (`hf_config`).
    """
    import flax.linen as nn  # noqa: PLC0415

    from jaxllm.models import llama  # noqa: PLC0415

    if not isinstance(model_config, llama.LlamaConfig):  # the `model` config section
        model_config = llama.LlamaConfig.from_config(model_config)
    directory = pathlib.Path(directory)
    config = hf_config(model_config, head, extra_config)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise HubError(f"{directory}: exists and is not an empty folder; export to a new folder")
    flat = traverse_util.flatten_dict(nn.unbox(params))
    tensors = {}  # HF name -> (leaf, layer or None)
    for leaf in plan(flat):
        for layer, name in enumerate(leaf.names):
            tensors[name] = (leaf, layer if leaf.stacked else None)
    names = sorted(tensors, key=_natural)
    dtype = np.dtype(model_config.param_dtype)
    entries = [(n, tensors[n][0].hf_shape, dtype) for n in names]
    shard_of = split_shards([math.prod(shape) * dtype.itemsize for _, shape, _ in entries], max_shard_bytes)
    files = shard_names(shard_of[-1] + 1)
    writer = jax.process_index() == 0
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def fetch(name: str) -> np.ndarray:
        leaf, layer = tensors[name]
        host = _gather(flat[leaf.path], layer)
        return leaf.layout.to_hf(host).astype(dtype, copy=False)

    total = 0
    for shard, file in enumerate(files):
        chunk = [e for e, s in zip(entries, shard_of) if s == shard]
        total += write_safetensors(tmp / file if writer else None, chunk, fetch, {"format": "pt"})
    if writer:
        if len(files) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: files[s] for (n, _, _), s in zip(entries, shard_of)}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            directory.rmdir()
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"export_llama {directory}")
    return directory
