"""Prompt datasets for rollouts (PPO) and evaluation: left-padded chat prompts.

Sources are a mixture string of `jsonl:GLOB` entries (weights ignored) whose records are anything
`chat.to_prompt` reads: `messages` (a trailing assistant turn is dropped), preference records'
`prompt` messages, `prompt` strings, Alpaca `instruction`/`input`, MT-Bench `turns`. Each prompt
is rendered with `ChatTemplate.prompt` (ending with `<|assistant|>`); a prompt longer than
`max_prompt_len` keeps bos and its last `max_prompt_len - 1` tokens (counted). Identical prompts
are kept once.

Batches (`b` = this process's rows): `prompt_tokens` `[b, max_prompt_len]` int32 left-padded with
0 (every row's last prompt token in the last column, as `sampling` expects), `prompt_lengths`
`[b]` int32, `prompt_mask` `[b]` float32 (0 for the padding rows of the last eval batch, which
repeat a real prompt so the sampler never sees an empty one), `prompt_index` `[b]` int32.
Train order: a per-epoch permutation that is a pure function of (seed, index); eval: in order.
"""

from __future__ import annotations

import logging
import sys

import grain
import ml_collections
import numpy as np

from jaxllm.data import chat, lm, sources
from jaxllm.data.sources import DataError

logger = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The `prompts` section of PPO and evaluation configs."""
    c = ml_collections.ConfigDict()
    c.sources = "jsonl:{data_root}/sft/oasst_en100/train.jsonl"
    c.eval_sources = "jsonl:{data_root}/sft/oasst_en100/test.jsonl"
    c.max_prompt_len = 128
    return c


def load_prompt_tokens(spec: str, template: chat.ChatTemplate, max_prompt_len: int, data_root: str = "",
                       run_dir: str = "") -> list[np.ndarray]:
    """Rendered, de-duplicated prompts of every file of the mixture string `spec`.

    Raises:
      DataError: bad specs or records (file:line), a kind other than `jsonl`, no prompts.
    """
    spec = spec.replace("{run_dir}", run_dir)
    out, seen, cut = [], set(), 0
    for source in sources.parse_sources(spec, data_root):
        if source.kind != "jsonl":
            raise DataError(f"prompt source {source.text!r}: only jsonl:GLOB sources hold prompts")
        for path in sources.resolve_files(source):
            for messages in chat.load_prompts(path):
                tokens = template.prompt(messages)
                if len(tokens) > max_prompt_len:
                    tokens = np.concatenate([tokens[:1], tokens[len(tokens) - max_prompt_len + 1:]])
                    cut += 1
                key = tokens.tobytes()
                if key not in seen:
                    seen.add(key)
                    out.append(tokens.astype(np.int32))
    if not out:
        raise DataError(f"no prompts in {spec!r}")
    logger.info("prompts %r: %d unique, %d cut to the last %d tokens", spec, len(out), cut, max_prompt_len)
    return out


class PromptRows(grain.MapDataset):
    """Left-padded prompts; infinite and shuffled per epoch with `seed`, else finite in order."""

    def __init__(self, prompts: list[np.ndarray], max_prompt_len: int, *, seed: int | None = None,
                 pad_to_multiple: int = 1):
        super().__init__()
        self._prompts, self._len, self._seed = prompts, int(max_prompt_len), seed
        self._n = len(prompts)
        self._size = -(-self._n // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return sys.maxsize if self._seed is not None else self._size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        valid = 1.0
        if self._seed is not None:
            epoch, i = divmod(index, self._n)
            k = grain.experimental.index_shuffle(i, max_index=self._n - 1, seed=lm.derive_seed(self._seed, epoch),
                                                 rounds=4)
        else:
            k = index % self._size
            if k >= self._n:
                k, valid = 0, 0.0
        tokens = self._prompts[k]
        row = np.zeros(self._len, np.int32)
        row[self._len - len(tokens):] = tokens
        return {"prompt_tokens": row, "prompt_lengths": np.asarray(len(tokens), np.int32),
                "prompt_mask": np.asarray(valid, np.float32), "prompt_index": np.asarray(k, np.int32)}

    def __str__(self) -> str:
        return f"PromptRows(prompts={self._n}, max_prompt_len={self._len}, seed={self._seed})"


def prompt_dataset(c: ml_collections.ConfigDict, template: chat.ChatTemplate, *, split: str, global_batch_size: int,
                   seed: int, data_root: str = "", run_dir: str = "", process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
    """This process's batches of prompts (module docstring) from `c.sources` (train) or `c.eval_sources`.

    Raises:
      DataError: bad sources, split or batch layout.
    """
    lm.check_batch_layout("prompt_dataset", split, global_batch_size, process_index, process_count)
    prompts = load_prompt_tokens(c.sources if split == "train" else c.eval_sources, template, c.max_prompt_len,
                                 data_root, run_dir)
    if split == "train":
        rows = PromptRows(prompts, c.max_prompt_len, seed=seed)
    else:
        rows = PromptRows(prompts, c.max_prompt_len, pad_to_multiple=global_batch_size)
    local = lm._ProcessSlice(rows, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count)
