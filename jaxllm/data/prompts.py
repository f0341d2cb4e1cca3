"""Prompt datasets for rollouts (PPO) and evaluation: left-padded chat prompts.

Sources are a mixture string of `jsonl:GLOB` entries (weights ignored) whose records are anything
`chat.to_prompt` reads: `messages` (a trailing assistant turn is dropped), preference records'
`prompt` messages, `prompt` strings, Alpaca `instruction`/`input`, MT-Bench `turns`. Each prompt
is rendered with `ChatTemplate.prompt` (ending with `<|assistant|>`); a prompt longer than
`max_prompt_len` keeps bos and its last `max_prompt_len - 1` tokens (counted). Identical prompts
are kept once.

Safety prompts (Llama-2's `IS_SAFETY(p)`, Touvron et al. 2023, section 3.2.3, for the combined
reward `objectives.combined_reward`): a prompt is one when its record has `"is_safety": true`, or
it has no `is_safety` field and comes from a file of `safety_sources` (a mixture string whose
files must be among `sources` / `eval_sources`); a prompt kept once from several records is a
safety prompt when any of them says so.

Batches (`b` = this process's rows): `prompt_tokens` `[b, max_prompt_len]` int32 left-padded with
0 (every row's last prompt token in the last column, as `sampling` expects), `prompt_lengths`
`[b]` int32, `prompt_mask` `[b]` float32 (0 for the padding rows of the last eval batch, which
repeat a real prompt so the sampler never sees an empty one), `prompt_index` `[b]` int32,
`prompt_is_safety` `[b]` int32 (1 = safety prompt).
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
    c.safety_sources = ""  # files (of sources/eval_sources) whose prompts are safety prompts (module docstring)
    return c


def prompt_files(spec: str, data_root: str = "", run_dir: str = "") -> list:
    """The files of the mixture string `spec` (`jsonl:GLOB` entries), resolved, in order.

    Raises:
      DataError: bad specs, a kind other than `jsonl`, a glob that matches nothing.
    """
    files = []
    for source in sources.parse_sources(spec.replace("{run_dir}", run_dir), data_root):
        if source.kind != "jsonl":
            raise DataError(f"prompt source {source.text!r}: only jsonl:GLOB sources hold prompts")
        files += [path.resolve() for path in sources.resolve_files(source)]
    return files


def load_prompt_tokens(spec: str, template: chat.ChatTemplate, max_prompt_len: int, data_root: str = "",
                       run_dir: str = "", safety_files=()) -> tuple[list[np.ndarray], list[bool]]:
    """Rendered, de-duplicated prompts of every file of the mixture string `spec`, and whether each
    is a safety prompt (module docstring; `safety_files`: resolved paths whose prompts are).

    Raises:
      DataError: bad specs or records (file:line), a kind other than `jsonl`, no prompts.
    """
    out, is_safety, seen, cut = [], [], {}, 0
    safety_files = set(safety_files)
    for path in prompt_files(spec, data_root, run_dir):
        for lineno, record in chat.read_records(path):
            where = f"{path}:{lineno}"
            messages = chat.to_prompt(record, where)
            flag = chat.safety_flag(record, where)
            flag = path in safety_files if flag is None else flag
            tokens = template.prompt(messages)
            if len(tokens) > max_prompt_len:
                tokens = np.concatenate([tokens[:1], tokens[len(tokens) - max_prompt_len + 1:]])
                cut += 1
            key = tokens.tobytes()
            if key in seen:
                is_safety[seen[key]] |= flag
            else:
                seen[key] = len(out)
                out.append(tokens.astype(np.int32))
                is_safety.append(flag)
    if not out:
        raise DataError(f"no prompts in {spec!r}")
    logger.info("prompts %r: %d unique (%d safety prompts), %d cut to the last %d tokens", spec, len(out),
                sum(is_safety), cut, max_prompt_len)
    return out, is_safety


def safety_files(c: ml_collections.ConfigDict, data_root: str = "", run_dir: str = "") -> list:
    """The resolved files of `c.safety_sources`.

    Raises:
      DataError: as `prompt_files`, or a safety file that is in neither `c.sources` nor
        `c.eval_sources` (a typo would otherwise tag nothing).
    """
    spec = c.get("safety_sources", "")
    if not spec:
        return []
    files = prompt_files(spec, data_root, run_dir)
    known = set()
    for name in ("sources", "eval_sources"):
        if c.get(name):
            known.update(prompt_files(c[name], data_root, run_dir))
    for path in files:
        if path not in known:
            raise DataError(f"prompts.safety_sources file {path} is not among prompts.sources or "
                            f"prompts.eval_sources")
    return files


class PromptRows(grain.MapDataset):
    """Left-padded prompts; infinite and shuffled per epoch with `seed`, else finite in order."""

    def __init__(self, prompts: list[np.ndarray], max_prompt_len: int, *, seed: int | None = None,
                 pad_to_multiple: int = 1, is_safety: list[bool] | None = None):
        super().__init__()
        self._prompts, self._len, self._seed = prompts, int(max_prompt_len), seed
        self._is_safety = list(is_safety) if is_safety is not None else [False] * len(prompts)
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
                "prompt_mask": np.asarray(valid, np.float32), "prompt_index": np.asarray(k, np.int32),
                "prompt_is_safety": np.asarray(self._is_safety[k], np.int32)}

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
    prompts, is_safety = load_prompt_tokens(c.sources if split == "train" else c.eval_sources, template,
                                            c.max_prompt_len, data_root, run_dir, safety_files(c, data_root, run_dir))
    if split == "train":
        rows = PromptRows(prompts, c.max_prompt_len, seed=seed, is_safety=is_safety)
    else:
        rows = PromptRows(prompts, c.max_prompt_len, pad_to_multiple=global_batch_size, is_safety=is_safety)
    local = lm._ProcessSlice(rows, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count)
