"""Checkpoints from and to other ecosystems: Hugging Face folders and llama.cpp GGUF files.

A model spec names where a model comes from (`jaxllm.hub.spec`): a stage of a jaxllm run, a
Hugging Face folder or hub id (`hf:DIR`, `hf:ORG/NAME[@REVISION]`) or a GGUF file (`gguf:FILE`).
Every external format is read through one interface, `CheckpointReader`: the model's Hugging Face
`config.json` as a dict and its tensors under their Hugging Face names and layouts
(`model.layers.0.self_attn.q_proj.weight` `[out_features, in_features]`), one tensor at a time.
`jaxllm.hub.hf` converts any reader into sharded jaxllm params and writes params back out as a
Hugging Face folder; `jaxllm.hub.gguf` is a reader over GGUF files (dequantising and undoing
llama.cpp's q/k row permutation, so what it yields is exactly what `transformers` would hold).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from jaxllm.config import ConfigError


class HubError(ConfigError):
    """A checkpoint, tokenizer or chat template that cannot be used: the message names the file
    (and the tensor, key or line) and the problem. The CLI prints it as one line, exit status 2."""


class CheckpointReader(Protocol):
    """Tensors of one checkpoint in Hugging Face names and layouts, read one at a time.

    Attributes:
      path: the file or folder, for messages.
      config: the model's Hugging Face `config.json` as a dict (`model_type`, `hidden_size`, ...).
    """

    path: str
    config: dict[str, Any]

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (Hugging Face naming)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` in Hugging Face layout, without reading it."""

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a NumPy array in Hugging Face layout (float32 for quantised or
        half-precision storage unless the reader was told otherwise).

        Raises:
          HubError: unknown name, truncated file, unsupported storage type (naming the file and
            the tensor).
        """
