"""llama.cpp GGUF files as Hugging Face checkpoints: weights, config and tokenizer.

A GGUF file holds the model config and the tokenizer as metadata (`llama.block_count`,
`tokenizer.ggml.tokens`, ...) and the weights as (often quantised) tensors under llama.cpp's names
(`blk.0.attn_q.weight`). `GGUFCheckpoint` presents it as a `jaxllm.hub.CheckpointReader`: an
HF-style `config.json` dict and the tensors under their Hugging Face names and layouts,
dequantised to float32 one at a time from the memory map, with the row permutation llama.cpp's
converter applies to `attn_q` / `attn_k` of llama-architecture models undone. What `read` returns
is exactly what `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` holds.
`tokenizer_from_gguf` rebuilds the tokenizer (byte-level BPE or sentencepiece-style BPE) and the
chat template the way transformers' GGUF converter does, as a `jaxllm.data.hf_tokenizer.HFTokenizer`.

Supported: architectures `llama` (including Mistral, which llama.cpp stores as `llama`) and
`qwen2`; tensor types F32, F16, BF16 and every quantisation `gguf.quants.dequantize` implements
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import numpy as np

from jaxllm.hub import HubError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# HF model_type -> the architecture name transformers' config.json carries.
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
# llama3-style rope scaling is baked by llama.cpp into this tensor of per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"


def _gguf():
    import gguf  # noqa: PLC0415 - only GGUF users need the package

    return gguf


def dequantisable_types() -> tuple[str, ...]:
    """Names of the GGML tensor types `read` can turn into float32 (F32, F16 and every type
    `gguf.quants` implements: BF16, Q4_0, Q8_0, Q4_K, ...)."""
    gguf = _gguf()
    types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
    return tuple(sorted(t.name for t in types))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a q/k projection (or its bias).

    llama.cpp's converter stores `W_gguf = W_hf.reshape(n, 2, d, *rest).swapaxes(1, 2).reshape(W.shape)`
    (per head, the rotate-half pairs `(i, i + d)` become adjacent rows `(2i, 2i + 1)`), with
    `n = n_heads` (query heads for q, key/value heads for k) and `d = rows // n // 2`. This returns
    `W_hf = W_gguf.reshape(n, d, 2, *rest).swapaxes(1, 2).reshape(W.shape)`.

    Args:
      w: `[n_heads * head_dim, in]` weight or `[n_heads * head_dim]` bias, as llama.cpp stores it.
      n_heads: number of heads the rows belong to.
    Returns:
      the same shape and dtype, rows in Hugging Face (rotate-half) order.
    """
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader_class():
    """`gguf.GGUFReader` naming the tensor a truncated file cuts short (it only raises a bare
    numpy reshape error there)."""
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            try:
                super()._build_tensors(start_offs, fields)
            except ValueError:
                cut = self._first_cut_tensor(start_offs, fields)
                if cut is None:
                    raise
                raise _Truncated(cut) from None

        def _first_cut_tensor(self, start_offs, fields) -> str | None:
            try:  # best effort over gguf 0.19's tensor-info record: (name_len, name, n_dims, dims, type, offset)
                for field in fields:
                    _, name, _, dims, raw_type, offset = field.parts
                    ggml_type = gguf.GGMLQuantizationType(int(raw_type[0]))
                    block, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
                    end = int(start_offs) + int(offset[0]) + int(np.prod(dims)) * type_bytes // block
                    if end > len(self.data):
                        return (f"tensor {bytes(name).decode(errors='replace')} ({ggml_type.name}) needs bytes up "
                                f"to {end} but the file has {len(self.data)}")
            except (ValueError, TypeError, KeyError):
                pass
            return None

    return Reader


class _Truncated(Exception):
    pass


def _open(path: str):
    """`gguf.GGUFReader` over `path` (memory-mapped: a tensor's bytes are read when it is read).

    Raises:
      HubError: no such file, not a GGUF file (magic), or a truncated / corrupt one (naming the
        tensor whose data runs past the end of the file, with its type).
    """
    if not os.path.isfile(path):
        raise HubError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise HubError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        return _reader_class()(path)
    except _Truncated as e:
        raise HubError(f"{path}: truncated GGUF file: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise HubError(f"{path}: truncated or corrupt GGUF file ({os.path.getsize(path)} bytes): "
                       f"{type(e).__name__}: {e}") from None


def _metadata(reader, key: str, default: Any = KeyError, *, path: str = "") -> Any:
    """The value of metadata `key` (int, float, bool, str or list), or `default`."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise HubError(f"{path}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _float32_value(x: float) -> float:
    """The shortest decimal that is the same float32: GGUF stores eps / theta as float32, so 1e-5
    reads back as 9.999999747378752e-06; a config that says 1e-5 means the same number."""
    return float(str(np.float32(x)))


class GGUFCheckpoint:
    """A llama.cpp GGUF file as a `jaxllm.hub.CheckpointReader` (Hugging Face names and layouts).

    Attributes:
      path: the file.
      config: HF `config.json`-style dict built from the metadata: model_type ("llama" |
        "mistral" | "qwen2"), architectures, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling
        (None | {"rope_type": "linear" | "llama3" | "yarn", ...}), vocab_size (rows of the
        embedding), tie_word_embeddings (no `output.weight`), attention_bias (has `attn_q.bias`),
        max_position_embeddings, bos/eos/pad_token_id.
      architecture: the file's `general.architecture`.

    Raises (constructor):
      HubError: see `_open`; an unsupported architecture (naming the supported ones); a tensor
        with no Hugging Face counterpart; a tensor type gguf cannot dequantise (naming file,
        tensor and type); a `rope_freqs` tensor that is not llama3 rope scaling.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._reader = _open(self.path)
        self.architecture = _metadata(self._reader, "general.architecture", path=self.path)
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise HubError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}; Mistral files are 'llama')")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._gguf_names = {}  # HF name -> GGUF name
        supported = dequantisable_types()
        for gguf_name, t in self._tensors.items():
            hf_name = self._hf_name(gguf_name)
            if hf_name is not None:
                self._gguf_names[hf_name] = gguf_name
            if t.tensor_type.name not in supported:
                raise HubError(f"{self.path}: tensor {gguf_name} has type {t.tensor_type.name}, which gguf "
                               f"cannot dequantise (supported: {', '.join(supported)})")
        if "token_embd.weight" not in self._tensors:
            raise HubError(f"{self.path}: GGUF file has no token_embd.weight tensor")
        self.config = self._build_config()

    # --- names ---------------------------------------------------------------------------------

    def _hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[gguf_name]
        if gguf_name == _ROPE_FREQS:
            return None  # becomes config["rope_scaling"], not a weight
        m = _LAYER_NAME.match(gguf_name)
        if m and m.group(2) in _LAYER_TENSORS:
            return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
        raise HubError(f"{self.path}: GGUF tensor {gguf_name} has no Hugging Face counterpart in a "
                       f"{self.architecture} model (known: {', '.join(_GLOBAL_TENSORS)}, "
                       f"blk.N.{{{', '.join(_LAYER_TENSORS)}}}, {_ROPE_FREQS})")

    def names(self) -> list[str]:
        """Every weight under its Hugging Face name: embed_tokens, layers in order, norm, lm_head
        (only when untied). `rope_freqs` is config, not a weight."""
        rank = {"model.embed_tokens.weight": (0, 0), "model.norm.weight": (2, 0), "lm_head.weight": (3, 0)}

        def key(name):
            m = re.match(r"model\.layers\.(\d+)\.", name)
            return (*(rank[name] if name in rank else (1, int(m.group(1)))), name)
        return sorted(self._gguf_names, key=key)

    def _tensor(self, name: str):
        if name not in self._gguf_names:
            raise HubError(f"{self.path}: no tensor {name!r} in this GGUF checkpoint")
        return self._tensors[self._gguf_names[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name` in Hugging Face layout (GGUF lists dims fastest-first: reversed)."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def read(self, name: str) -> np.ndarray:
        """Tensor `name`, dequantised to float32, in Hugging Face layout.

        Linear weights come out `[out_features, in_features]` (e.g. q_proj `[heads * head_dim,
        hidden]`), norms and biases 1-D, the embedding `[vocab, hidden]`. For llama-architecture
        files the rows of q_proj (weight and bias) are un-permuted with the query heads and those
        of k_proj with the key/value heads (`unpermute_rows`); qwen2 files are stored unpermuted.

        Raises:
          HubError: unknown name, or dequantisation failing (naming file, tensor and type).
        """
        t = self._tensor(name)
        try:
            w = _gguf().quants.dequantize(t.data, t.tensor_type)
            w = np.array(w, dtype=np.float32).reshape(self.shape(name))  # own copy, off the mmap
        except (ValueError, NotImplementedError, IndexError) as e:
            raise HubError(f"{self.path}: cannot dequantise tensor {t.name} ({t.tensor_type.name}): {e}") from None
        if self.architecture == "llama":
            if ".self_attn.q_proj." in name:
                w = unpermute_rows(w, self.config["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_rows(w, self.config["num_key_value_heads"])
        return w

    # --- config --------------------------------------------------------------------------------

    def _build_config(self) -> dict[str, Any]:
        arch, r, path = self.architecture, self._reader, self.path

        def meta(key, default=KeyError):
            return _metadata(r, f"{arch}.{key}", default, path=path)

        hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
        head_dim = int(meta("attention.key_length", hidden // heads))
        rotary = meta("rope.dimension_count", None)
        if rotary is not None and int(rotary) != head_dim:
            raise HubError(f"{path}: {arch}.rope.dimension_count={rotary} != head_dim {head_dim}: partial "
                           "rotary embeddings are not supported")
        name = str(_metadata(r, "general.name", "", path=path))
        # llama.cpp converts Mistral as `llama`; transformers tells them apart by the name alone.
        model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
        theta = _float32_value(meta("rope.freq_base", 10000.0))
        config = {
            "model_type": model_type,
            "architectures": [_HF_ARCHITECTURES[model_type]],
            "hidden_size": hidden,
            "intermediate_size": int(meta("feed_forward_length")),
            "num_hidden_layers": int(meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": _float32_value(meta("attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(meta, theta, head_dim),
            "vocab_size": int(self.shape("model.embed_tokens.weight")[0]),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "max_position_embeddings": int(meta("context_length", 2048)),
            "hidden_act": "silu",
        }
        for key in ("bos", "eos", "padding"):
            token_id = _metadata(r, f"tokenizer.ggml.{key}_token_id", None, path=path)
            config[f"{'pad' if key == 'padding' else key}_token_id"] = None if token_id is None else int(token_id)
        if model_type == "mistral":
            config["sliding_window"] = None  # llama.cpp's `llama` graph attends to the whole context
        return config

    def _rope_scaling(self, meta, theta: float, head_dim: int) -> dict[str, Any] | None:
        """HF `rope_scaling` from `{arch}.rope.scaling.*` (linear, yarn) or the `rope_freqs`
        tensor (llama3)."""
        original = meta("rope.scaling.original_context_length", None)
        if _ROPE_FREQS in self._tensors:
            t = self._tensors[_ROPE_FREQS]
            freqs = _gguf().quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
            return llama3_scaling_from_rope_freqs(freqs, theta, head_dim, original, where=f"{self.path}: {_ROPE_FREQS}")
        kind = meta("rope.scaling.type", None)
        factor = meta("rope.scaling.factor", None) or meta("rope.scale_linear", None)  # older files: scale_linear
        if kind == "none" or (kind is None and factor is None):
            return None
        scaling = {"rope_type": kind or "linear", "factor": _float32_value(factor or 1.0)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position: int) -> np.ndarray:
    """Llama 3's per-frequency rope divisors (Meta's `apply_scaling`, llama.cpp's `rope_freqs`).

    With inv_freq_i = theta^(-2i / head_dim) and wavelen_i = 2 pi / inv_freq_i:
    1 where wavelen < original / high_freq_factor; `factor` where wavelen > original /
    low_freq_factor; else 1 / ((1 - s) / factor + s) with
    s = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor).

    Returns:
      `[head_dim // 2]` float64 divisors of inv_freq.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original_max_position / high_freq_factor, 1.0,
                    np.where(wavelen > original_max_position / low_freq_factor, factor, mid))


def llama3_scaling_from_rope_freqs(freqs: np.ndarray, theta: float, head_dim: int, original: int | None,
                                   *, where: str) -> dict[str, Any]:
    """Recovers HF's llama3 `rope_scaling` from llama.cpp's `rope_freqs` divisors.

    The divisors depend on (original, low, high) only through original / low and original / high,
    so `original` is the file's `rope.scaling.original_context_length` or Llama 3's 8192; the
    factor is the largest divisor and low/high are Llama 3's 1 and 4. The recomputed divisors must
    match to 1e-5 (relative) or the file is refused.

    Raises:
      HubError: divisors that are not Llama 3's scaling with these parameters.
    """
    if freqs.shape != (head_dim // 2,):
        raise HubError(f"{where}: shape {freqs.shape}, expected ({head_dim // 2},) = head_dim / 2")
    original, factor = int(original or 8192), float(np.max(freqs))
    expected = llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, original)
    if not np.allclose(freqs, expected, rtol=1e-5, atol=0):
        raise HubError(f"{where}: per-frequency rope divisors that are not Llama 3 scaling with factor "
                       f"{factor:g}, low_freq_factor 1, high_freq_factor 4, original context {original} "
                       f"(max relative difference {np.max(np.abs(freqs / expected - 1)):.3g}); not supported")
    return {"rope_type": "llama3", "factor": _float32_value(factor), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


# --- tokenizer -----------------------------------------------------------------------------------

# `tokenizer.ggml.pre` -> the pre-tokenizer split regex its merges were learned with (the same
# choices as transformers' GGUF converter and llama.cpp's llama-vocab.cpp). Names not listed here
# ("smollm", "gpt-2", "default", "starcoder", ...) get GPT-2's byte-level regex, as in transformers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp tokenizes these vocabularies with `ignore_merges` (a word that is a whole vocabulary
# entry is one token even where no merge path builds it), as Llama 3's own tokenizer.json does.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE (`Ġ` for space, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_model(tokens: list[str], merges: list[str], pre: str):
    """Byte-level BPE over `tokens` / `merges` with the split regex of pre-tokenizer `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some files spell a token in raw UTF-8 instead of the byte alphabet; respell it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               ignore_merges=pre in _IGNORE_MERGES))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece_model(tokens: list[str], scores: list[float]):
    """SentencePiece-style BPE (Llama 2, Mistral): `▁` for spaces, a `▁` prepended to the first
    word, byte fallback (`<0x0A>`), merges rebuilt from the piece scores: every split of a piece
    into two vocabulary pieces is a merge, ranked by the piece's score (highest first), then by the
    lengths of its halves (longer first), then by the ids of the halves; as transformers'
    `generate_merges`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        halves = sorted(((piece[:k], piece[k:]) for k in range(1, len(piece))
                         if piece[:k] in vocab and piece[k:] in vocab), key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((score, len(left), len(right), left, right) for left, right in halves)
    # Python's sort is stable (also reversed): ties keep their (vocabulary, halves-by-id) order.
    merges.sort(key=lambda m: m[:3], reverse=True)
    unk = "<unk>" if "<unk>" in vocab else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[3:] for m in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok, None


def gguf_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` a GGUF file describes, and its settings.

    `tokenizer.ggml.model` "gpt2" is byte-level BPE (tokens + merges + the `tokenizer.ggml.pre`
    split regex); "llama" is SentencePiece-style BPE (tokens + scores, byte fallback). Tokens of
    type control (and the bos/eos/unk/pad tokens) become special added tokens, user-defined ones
    plain added tokens, so both stay whole in text; a byte-level "control" token that is not
    spelled in the byte alphabet is a llama.cpp mislabel and is skipped (as transformers does).
    No post-processor: `HFTokenizer` adds bos / eos itself as `add_bos` / `add_eos` say.

    Returns:
      (tokenizer, settings) with settings: bos_token, eos_token, pad_token, unk_token (str or
      None), add_bos, add_eos (bool), chat_template (str or None).
    Raises:
      HubError: as `GGUFCheckpoint` for the file itself; no tokenizer metadata; an unsupported
        `tokenizer.ggml.model` (naming it and the supported ones).
    """
    from tokenizers import AddedToken  # noqa: PLC0415

    path = str(path)
    r = _open(path)

    def meta(key, default=KeyError):
        return _metadata(r, f"tokenizer.{key}", default, path=path)

    kind = meta("ggml.model", None)
    if kind is None:
        raise HubError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.model metadata)")
    tokens = meta("ggml.tokens")
    token_types = meta("ggml.token_type", [])
    pre = meta("ggml.pre", "default")
    if kind == "gpt2":
        tok, alphabet = _byte_level_model(tokens, meta("ggml.merges"), pre)
    elif kind == "llama":
        tok, alphabet = _sentencepiece_model(tokens, meta("ggml.scores"))
    else:
        raise HubError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2 = byte-level "
                       "BPE, llama = SentencePiece BPE)")
    if kind == "gpt2" and pre not in PRE_TOKENIZER_SPLITS:
        logger.info("%s: pre-tokenizer %r: GPT-2 byte-level split", path, pre)

    settings: dict[str, Any] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta(f"ggml.{key}_token_id", None)
        settings[name] = tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None
    vocab = tok.get_vocab()
    control = [t for t, kind_of in zip(tokens, token_types)
               if kind_of == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    control += [settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if settings[k] is not None and settings[k] in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind_of in zip(tokens, token_types) if kind_of == _USER_DEFINED and t in vocab])

    # Older SentencePiece files have no flag; llama.cpp (and transformers) then add BOS.
    settings["add_bos"] = bool(meta("ggml.add_bos_token", kind == "llama")) and settings["bos_token"] is not None
    settings["add_eos"] = bool(meta("ggml.add_eos_token", False)) and settings["eos_token"] is not None
    settings["chat_template"] = meta("chat_template", None)
    return tok, settings


def tokenizer_from_gguf(path: str | os.PathLike):
    """The tokenizer and chat template of a GGUF file as a `jaxllm.data.hf_tokenizer.HFTokenizer`.

    Token ids equal `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)`'s; the chat
    template is the file's `tokenizer.chat_template` string (None when absent).

    Raises:
      HubError: see `gguf_tokenizer`.
    """
    from jaxllm.data.hf_tokenizer import HFTokenizer  # noqa: PLC0415

    tok, s = gguf_tokenizer(path)
    return HFTokenizer(tok, path=str(path), bos_token=s["bos_token"], eos_token=s["eos_token"],
                       pad_token=s["pad_token"], unk_token=s["unk_token"], add_bos=s["add_bos"],
                       add_eos=s["add_eos"], chat_template=s["chat_template"])
