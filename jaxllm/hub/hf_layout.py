"""Tensor names and layouts of the LLaMA family: jaxllm params <-> Hugging Face tensors.

jaxllm's layout is Hugging Face's up to a transpose and a reshape (`jaxllm.models.llama`), so the
conversion is a rename plus, per tensor, one of three layouts (`Layout`):

| jaxllm | shape | Hugging Face | shape |
| --- | --- | --- | --- |
| `embed_tokens` | `[vocab, embed]` | `model.embed_tokens.weight` | same |
| `layers_i/attn/{q,k,v}_proj` | `[embed, heads, head_dim]` | `model.layers.i.self_attn.{q,k,v}_proj.weight` | `[heads*head_dim, embed]` |
| `layers_i/attn/{q,k,v}_bias` | `[heads, head_dim]` | `...self_attn.{q,k,v}_proj.bias` | `[heads*head_dim]` |
| `layers_i/attn/o_proj` | `[heads, head_dim, embed]` | `...self_attn.o_proj.weight` | `[embed, heads*head_dim]` |
| `layers_i/{attn,mlp}_norm/scale` | `[embed]` | `...{input,post_attention}_layernorm.weight` | same |
| `layers_i/mlp/{gate,up}_proj`, `down_proj` | `[embed, mlp]`, `[mlp, embed]` | `...mlp.*_proj.weight` | transposed |
| `final_norm/scale`, `lm_head` | `[embed]`, `[embed, vocab]` | `model.norm.weight`, `lm_head.weight` | same, transposed |
| `score_head` | `[embed, 1]` | `score.weight` | `[1, embed]` |

With `scan_layers` the layer leaves are stacked under `layers` with a leading `[num_layers]` axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one jaxllm leaf (shape `j`, per layer when stacked) maps to its HF tensor.

    `transpose_at=k > 0`: HF holds `[prod(j[k:]), prod(j[:k])]` (`nn.Linear`'s `[out, in]`, the
    jaxllm input axes `j[:k]` flattened last); else HF holds the leaf reshaped to `hf_ndim` axes.
    """

    transpose_at: int = 0
    hf_ndim: int = 1

    def hf_shape(self, j: tuple[int, ...]) -> tuple[int, ...]:
        if self.transpose_at:
            return math.prod(j[self.transpose_at:]), math.prod(j[:self.transpose_at])
        return tuple(j) if self.hf_ndim == len(j) else (math.prod(j),)

    def to_jaxllm(self, hf: np.ndarray, j: tuple[int, ...]) -> np.ndarray:
        """A view of `hf` in jaxllm's layout (no copy)."""
        return (hf.T if self.transpose_at else hf).reshape(j)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.transpose_at:
            return x.reshape(math.prod(x.shape[:self.transpose_at]), -1).T
        return x.reshape(self.hf_shape(x.shape))


_LINEAR, _OUT_PROJ, _VECTOR, _SAME = Layout(1), Layout(2), Layout(0, 1), Layout(0, 2)
# jaxllm path inside a decoder layer -> (HF name after `model.layers.{i}.`, layout)
LAYER_TENSORS = {
    ("attn", "q_proj"): ("self_attn.q_proj.weight", _LINEAR),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", _LINEAR),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", _LINEAR),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", _VECTOR),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", _VECTOR),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", _VECTOR),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", _OUT_PROJ),
    ("attn_norm", "scale"): ("input_layernorm.weight", _VECTOR),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _VECTOR),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", _LINEAR),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", _LINEAR),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", _LINEAR),
}
TOP_TENSORS = {
    ("embed_tokens",): ("model.embed_tokens.weight", _SAME),
    ("final_norm", "scale"): ("model.norm.weight", _VECTOR),
    ("lm_head",): ("lm_head.weight", _LINEAR),
    ("score_head",): ("score.weight", _LINEAR),
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One jaxllm param leaf and its HF tensors (one per layer when `stacked`)."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    layout: Layout
    stacked: bool
    shape: tuple[int, ...]  # of one HF tensor's jaxllm view (per layer when stacked)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.layout.hf_shape(self.shape)


def plan(flat: dict[tuple[str, ...], Any]) -> list[Leaf]:
    """The `Leaf` of every entry of a flattened llama param tree (arrays or ShapeDtypeStructs)."""
    out = []
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        if path[0] == "layers":
            name, layout = LAYER_TENSORS[path[1:]]
            names = tuple(f"model.layers.{i}.{name}" for i in range(shape[0]))
            out.append(Leaf(path, names, layout, True, shape[1:]))
        elif path[0].startswith("layers_"):
            name, layout = LAYER_TENSORS[path[1:]]
            out.append(Leaf(path, (f"model.layers.{path[0][len('layers_'):]}.{name}",), layout, False, shape))
        else:
            name, layout = TOP_TENSORS[path]
            out.append(Leaf(path, (name,), layout, False, shape))
    return out
