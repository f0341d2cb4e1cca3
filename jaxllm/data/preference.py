"""Preference data for reward models and DPO: pairs, HH transcripts, ranking groups, batches.

Records and sources (point 1, 2) are `jaxllm.data.preference_records`.

3. **Sequences.** Response `k` is `template.prompt(prompt) + response_k`, `response_k` being the
   tail of `template.render(prompt + response_k)` after the prompt, without the final eos:
   `A <|end|>`, or `A <|end|> <|user|> U <|end|> <|assistant|> A' <|end|>` for a continuation.
   Scored tokens (DPO's log-prob) are the template's supervised response tokens: assistant
   content and its `<|end|>`, not role markers nor user turns of a continuation. Renders are
   cached (untruncated) in `cache_dir/<sha256(source, tokenizer, template)>.npz`.
4. **Fitting** (`fit_groups`). A sequence of `n` tokens fits iff `n <= seq_len`: every token is
   an input (the reward is read at `lengths - 1`) and `tokens[1:]` fill `targets[:n - 1]`. Groups
   with more than `max_responses` responses are dropped (`dropped_too_many_responses`). When the
   longest sequence does not fit, `truncation="drop"` drops the group (`dropped_long`) and
   `"keep_end"` cuts the shared prompt once per group, so all responses keep one context: bos and
   the last `seq_len - 1 - max_k len(response_k)` prompt tokens stay, responses stay whole
   (`truncated`); with no room for one prompt token after bos the group is dropped
   (`dropped_response_too_long`).
5. **Order.** Train epoch `e` is `sft.epoch_examples(sizes, weights, seed, e)` over the fitted
   groups (each once, or `@WEIGHT` mixtures as in SFT); element `i` is item `i % E` of epoch
   `i // E` (`E` the epoch length): a pure function of (seed, index). Eval is finite, in order,
   the last batch padded with all-zero groups. Global batch `s` is elements `s*B ... s*B + B - 1`,
   process `p` of `P` takes its `B / P` (`lm._ProcessSlice`).
6. **Batches** (`K = max_responses`, `L = seq_len`; unused slots and padding groups are zero):
   `inputs`, `targets`, `positions`, `segment_ids` `[b, K, L]` int32 (`inputs[:n] = tokens`,
   `targets[:n-1] = tokens[1:]`, `positions[:n] = 0..n-1`, `segment_ids[:n] = 1`); `loss_mask`
   `[b, K, L]` float32 (1 where the target is a scored token); `lengths`, `ranks` `[b, K]` int32;
   `response_mask` `[b, K]`, `margin` and `has_margin` `[b]` float32 (margin 0 when absent);
   `group_index` `[b]` int32, the group's position among the kept groups of the source set (the
   same in the train and eval views of the same sources; DPO keys its cached reference log-probs
   by it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import uuid
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from jaxllm.data import chat, lm, preference_records, sft, sources
from jaxllm.data.preference_records import PreferenceStats, parse_preference_sources
from jaxllm.data.sources import DataError, SourceSpec

logger = logging.getLogger(__name__)

TRUNCATIONS = ("drop", "keep_end")
_CACHE_FORMAT = 1  # bump when the cache layout changes
_CACHED_EPOCHS = 16  # epoch orders kept in memory (all datasets of the process)


@functools.lru_cache(maxsize=_CACHED_EPOCHS)  # thread-safe, and nothing to pickle for grain
def _epoch_order(sizes: tuple, weights: tuple | None, seed: int, epoch: int) -> np.ndarray:
    order = sft.epoch_examples(sizes, weights, seed, epoch)
    order.setflags(write=False)  # shared by every caller
    return order


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of reward-model and DPO run configs."""
    c = ml_collections.ConfigDict()
    c.sources = "jsonl:{data_root}/preference/hh_rlhf_harmless_base/train.jsonl"
    c.eval_sources = "jsonl:{data_root}/preference/hh_rlhf_harmless_base/test.jsonl"
    c.seq_len = 512  # tokens per response sequence (every token is an input)
    c.max_responses = 2  # K: response slots per group (2 = pairs; InstructGPT used K = 4..9)
    c.truncation = "keep_end"  # over-long groups: "drop" | "keep_end" (cut the prompt's start)
    c.cache_dir = ""  # "" = no render cache; stages pass lm.resolve_cache_dir(...)
    return c


# ---------------------------------------------------------------------------------------------
# Rendering, cache, fitting
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Groups:
    """Rendered groups of one source: `G` groups, `S` responses.

    Group `g`'s prompt (`template.prompt`) is `prompt_tokens[prompt_starts[g]:prompt_starts[g+1]]`
    and its responses are `group_starts[g] ... group_starts[g+1] - 1`; response `s` is
    `response_tokens[response_starts[s]:response_starts[s+1]]`, `target_mask` (same slice) 1 where
    a token is scored. Tokens int32, starts int64 (`[G+1]`, `[S+1]`), `target_mask` float32,
    `ranks` `[S]` int32, `margins` `[G]` float32 (NaN when absent); `stats` of reading them.
    """

    prompt_tokens: np.ndarray
    prompt_starts: np.ndarray
    response_tokens: np.ndarray
    response_starts: np.ndarray
    target_mask: np.ndarray
    group_starts: np.ndarray
    ranks: np.ndarray
    margins: np.ndarray
    stats: PreferenceStats

    ARRAYS = ("prompt_tokens", "prompt_starts", "response_tokens", "response_starts",
              "target_mask", "group_starts", "ranks", "margins")  # fmt: skip

    @property
    def num_groups(self) -> int:
        return len(self.group_starts) - 1


def _starts(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def render_groups(
    groups: Sequence[dict], template: chat.ChatTemplate, stats: PreferenceStats | None = None
) -> Groups:
    """Renders normalized groups (module docstring, point 3), untruncated.

    Raises:
      chat.ChatError: an invalid conversation, or a template whose training render does not start
        with its generation prompt (the `ChatTemplate.prompt` contract).
    """
    rendered = template.render_batch([g["prompt"] + r for g in groups for r in g["responses"]])
    eos = template.tokenizer.eos_id
    prompts, responses, masks, k = [], [], [], 0
    for g in groups:
        prompt = np.asarray(template.prompt(g["prompt"]), np.int32)
        prompts.append(prompt)
        for _ in g["responses"]:
            tokens, mask = rendered[k]
            k += 1
            end = len(tokens) - int(len(tokens) > 0 and tokens[-1] == eos)
            if not np.array_equal(tokens[: len(prompt)], prompt) or end <= len(prompt):
                raise chat.ChatError("the training render does not extend the generation prompt")
            responses.append(tokens[len(prompt) : end])
            masks.append(mask[len(prompt) : end])
    margins = [np.nan if g["margin"] is None else g["margin"] for g in groups]
    return Groups(
        prompt_tokens=sft._cat(prompts, np.int32),
        prompt_starts=_starts([len(p) for p in prompts]),
        response_tokens=sft._cat(responses, np.int32),
        response_starts=_starts([len(r) for r in responses]),
        target_mask=sft._cat(masks, np.float32),
        group_starts=_starts([len(g["responses"]) for g in groups]),
        ranks=sft._cat([g["ranks"] for g in groups], np.int32),
        margins=np.asarray(margins, np.float32).reshape(-1),
        stats=stats if stats is not None else PreferenceStats(),
    )


def source_groups(
    spec: SourceSpec, template: chat.ChatTemplate, cache_dir: str | os.PathLike = ""
) -> Groups:
    """Reads and renders one source (untruncated), through `cache_dir/<key>.npz` when set.

    Raises:
      DataError: as `load_groups`.
    """
    payload = {"format": _CACHE_FORMAT, "kind": "preference", "source": sources.fingerprint(spec),
               "tokenizer": template.tokenizer.fingerprint, "template": template.fingerprint}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
    path = pathlib.Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in Groups.ARRAYS}
            stats = PreferenceStats(**json.loads(str(f["stats"])))
        logger.info("preference cache hit %s for %r: %d groups", path, spec.text, stats.groups)
        return Groups(stats=stats, **arrays)
    stats = PreferenceStats()
    groups = render_groups(preference_records.read_source(spec, stats), template, stats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        arrays = {k: getattr(groups, k) for k in Groups.ARRAYS}
        np.savez(tmp, stats=np.array(json.dumps(dataclasses.asdict(stats))), **arrays)
        os.replace(tmp, path)  # atomic; a concurrent writer's entry is identical
    return groups


def fit_groups(
    groups: Groups, seq_len: int, truncation: str, max_responses: int
) -> tuple[np.ndarray, np.ndarray, PreferenceStats]:
    """Chooses the groups that fit and their prompt cuts (module docstring, point 4).

    Returns:
      `(ids [G'] int64, cuts [G'] int64, stats)`: the kept groups in order, and per kept group the
      number of prompt tokens removed after the first one; `stats` gains `examples`, `truncated`,
      `dropped_long`, `dropped_response_too_long`, `dropped_too_many_responses`.

    Raises:
      DataError: an unknown `truncation`.
    """
    if truncation not in TRUNCATIONS:
        raise DataError(f"data.truncation={truncation!r}; expected one of {TRUNCATIONS}")
    stats = dataclasses.replace(groups.stats, formats=dict(groups.stats.formats))
    prompt_lens = np.diff(groups.prompt_starts)
    response_lens = np.diff(groups.response_starts)
    ids, cuts = [], []
    for g in range(groups.num_groups):
        a, b = groups.group_starts[g], groups.group_starts[g + 1]
        longest = int(prompt_lens[g] + response_lens[a:b].max())
        cut = max(longest - seq_len, 0)
        if b - a > max_responses:
            stats.dropped_too_many_responses += 1
        elif cut and truncation == "drop":
            stats.dropped_long += 1
        elif cut > prompt_lens[g] - 2:  # keep bos + at least one prompt token
            stats.dropped_response_too_long += 1
        else:
            ids.append(g)
            cuts.append(cut)
            stats.truncated += bool(cut)
    stats.examples = len(ids)
    return np.asarray(ids, np.int64), np.asarray(cuts, np.int64), stats


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class PreferenceGroups(grain.MapDataset):
    """Fitted groups as model-input dicts (module docstring, point 6, without the batch axis).

    With `seed` set the dataset is infinite (epochs as in point 5); without, it is the finite
    eval split in order.
    """

    def __init__(self, parts: Sequence[Groups], fitted: Sequence[tuple], seq_len: int,
                 max_responses: int, *, seed: int | None = None,
                 weights: Sequence[float] | None = None, only: np.ndarray | None = None):
        """`parts`: rendered groups per source; `fitted`: per source, `(ids, cuts)` of
        `fit_groups`; `weights`: mixture weights per source, or None; `only` (finite view): the
        kept-group positions to read, in this order (None: all of them).

        Raises:
          DataError: no groups, or weights that give an empty epoch.
        """  # fmt: skip
        super().__init__()
        self._fitted = list(fitted)
        self._only = None if only is None else np.asarray(only, np.int64)
        self._parts, self._sizes = list(parts), [len(ids) for ids, *_ in fitted]
        self._part = np.repeat(np.arange(len(self._sizes)), self._sizes)
        self._ids = sft._cat([ids for ids, *_ in fitted], np.int64)
        self._cuts = sft._cat([cuts for _, cuts, *_ in fitted], np.int64)
        self.seq_len, self.max_responses = int(seq_len), int(max_responses)
        if not len(self._ids):
            raise DataError("no preference groups (after skips and truncation)")
        self._seed, self._weights = seed, None if weights is None else list(weights)
        counts = self._sizes if weights is None else sft.mixture_counts(self._sizes, weights)
        self.epoch_length = sum(counts)
        if not self.epoch_length:
            raise DataError(f"mixture sizes {self._sizes} with weights {weights} give no groups")

    def epoch(self, e: int) -> np.ndarray:
        """`[epoch_length]` int64 positions into `ids` of train epoch `e`, in order."""
        weights = None if self._weights is None else tuple(self._weights)
        return _epoch_order(tuple(self._sizes), weights, self._seed, e)

    @property
    def num_groups(self) -> int:
        """Kept groups of the source set (the range of `group_index`)."""
        return len(self._ids)

    def view(self, only: np.ndarray | None = None) -> "PreferenceGroups":
        """The finite, in-order view of the same groups: all of them, or the kept-group positions
        `only` in that order (DPO's reference pass over the train groups a run reads)."""
        return PreferenceGroups(self._parts, self._fitted, self.seq_len, self.max_responses, only=only)

    def visited(self, num_elements: int) -> np.ndarray:
        """Sorted kept-group positions that train elements `0 .. num_elements - 1` read."""
        seen, left, e = [], int(num_elements), 0
        while left > 0:
            seen.append(self.epoch(e)[:left])
            left, e = left - self.epoch_length, e + 1
        return np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)

    def __len__(self) -> int:
        if self._seed is not None:
            return sys.maxsize
        return len(self._ids) if self._only is None else len(self._only)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if self._seed is None:
            index = int(index) % len(self)
            return self.row(index if self._only is None else int(self._only[index]))
        e, j = divmod(int(index), self.epoch_length)
        return self.row(int(self.epoch(e)[j]))

    def row(self, k: int) -> dict[str, np.ndarray]:
        """Kept group `k` (in `ids` order) as a dict of `[K, L]`, `[K]` and `[]` arrays."""
        g, cut = int(self._ids[k]), int(self._cuts[k])
        K, L, G = self.max_responses, self.seq_len, self._parts[self._part[k]]
        out = {key: np.zeros((K, L), np.int32)
               for key in ("inputs", "targets", "positions", "segment_ids")}  # fmt: skip
        out["loss_mask"] = np.zeros((K, L), np.float32)
        out["lengths"], out["ranks"] = np.zeros(K, np.int32), np.zeros(K, np.int32)
        out["response_mask"] = np.zeros(K, np.float32)
        prompt = G.prompt_tokens[G.prompt_starts[g] : G.prompt_starts[g + 1]]
        prompt = np.concatenate([prompt[:1], prompt[1 + cut :]])
        for slot, s in enumerate(range(G.group_starts[g], G.group_starts[g + 1])):
            a, b = G.response_starts[s], G.response_starts[s + 1]
            tokens = np.concatenate([prompt, G.response_tokens[a:b]])
            scored = np.concatenate([np.zeros(len(prompt), np.float32), G.target_mask[a:b]])
            n = len(tokens)
            out["inputs"][slot, :n] = tokens
            out["targets"][slot, : n - 1] = tokens[1:]
            out["positions"][slot, :n] = np.arange(n)
            out["segment_ids"][slot, :n] = 1
            out["loss_mask"][slot, : n - 1] = scored[1:]
            out["lengths"][slot], out["ranks"][slot] = n, G.ranks[s]
            out["response_mask"][slot] = 1.0
        out["group_index"] = np.asarray(k, np.int32)  # stable id of the group within this source set
        margin = float(G.margins[g])
        out["has_margin"] = np.asarray(not math.isnan(margin), np.float32)
        out["margin"] = np.asarray(0.0 if math.isnan(margin) else margin, np.float32)
        return out

    def __str__(self) -> str:
        return (f"PreferenceGroups(groups={len(self._ids)}, seq_len={self.seq_len}, "
                f"K={self.max_responses}, seed={self._seed}, weights={self._weights})")  # fmt: skip


def preference_groups(
    data_config: ml_collections.ConfigDict, tokenizer, *, split: str, seed: int,
    cache_dir: str | os.PathLike = "", data_root: str = "",
) -> PreferenceGroups:  # fmt: skip
    """The global, unbatched `PreferenceGroups` of a split (arguments as `preference_dataset`).

    Raises:
      DataError: as `preference_dataset`.
    """
    if split not in lm.SPLITS:
        raise DataError(f"preference_groups split={split!r}; expected one of {lm.SPLITS}")
    seq_len, truncation = int(data_config.seq_len), str(data_config.truncation)
    max_responses = int(data_config.max_responses)
    problems = [
        truncation not in TRUNCATIONS and f"data.truncation={truncation!r} ({TRUNCATIONS})",
        seq_len < 1 and f"data.seq_len={seq_len} < 1",
        max_responses < 2 and f"data.max_responses={max_responses} < 2",
    ]  # fmt: skip
    if any(problems):
        raise DataError("preference_dataset: bad " + "; ".join(p for p in problems if p))
    template = chat.ChatTemplate(tokenizer)
    specs = parse_preference_sources(
        data_config.sources if split == "train" else data_config.eval_sources, data_root
    )
    parts = [source_groups(s, template, cache_dir) for s in specs]
    fitted = [fit_groups(part, seq_len, truncation, max_responses) for part in parts]
    for s, (ids, _, st) in zip(specs, fitted):
        logger.info("preference %s source %r (seq_len=%d, max_responses=%d, truncation=%s): "
                    "%s", split, s.text, seq_len, max_responses, truncation,
                    ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(st).items()))  # fmt: skip
        if split == "train" and s.weight is not None and not len(ids):
            raise DataError(f"preference source {s.text!r} has no groups left after fitting")
    if split == "eval":
        return PreferenceGroups(parts, fitted, seq_len, max_responses)
    weights = None if specs[0].weight is None else [s.weight for s in specs]
    return PreferenceGroups(parts, fitted, seq_len, max_responses, seed=seed, weights=weights)


def batch_groups(groups: PreferenceGroups, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:  # fmt: skip
    """This process's slices of the global batches of `groups` (a finite view is zero-padded to
    whole batches; see `preference_dataset`).

    Raises:
      DataError: a bad batch layout.
    """
    finite = len(groups) < sys.maxsize
    lm.check_batch_layout("preference_dataset", "eval" if finite else "train", global_batch_size,
                          process_index, process_count)  # fmt: skip
    ds = lm._PadToMultiple(groups, global_batch_size) if finite else groups
    local = lm._ProcessSlice(ds, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count)


def preference_dataset(
    data_config: ml_collections.ConfigDict, tokenizer, *, split: str, global_batch_size: int,
    seed: int, cache_dir: str | os.PathLike = "", data_root: str = "", process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:  # fmt: skip
    """The preference dataset of this process: batches of groups (module docstring).

    Args:
      data_config: The `data` section (`default_config()`).
      tokenizer: A `jaxllm.data.tokenizer.Tokenizer` with the role markers.
      split: "train" (`data_config.sources`; infinite, mixed and shuffled by `seed`) or "eval"
        (`data_config.eval_sources`, weights ignored; finite, in order, zero-padded last batch).
      global_batch_size: Groups per global batch, B.
      seed: Data-order seed (train).
      cache_dir: Render cache directory; "" = no cache.
      data_root: Replaces `{data_root}` in source specs.
      process_index, process_count: This process p of P; B % P == 0.

    Returns:
      A `grain.MapDataset` whose element `s` is this process's slice of global batch `s` (module
      docstring, point 6, with b = B / P); `len()` is `sys.maxsize` for train, else the batches.

    Raises:
      DataError: bad sources or records (file:line), a bad split, truncation, max_responses or
        batch layout, seq_len < 1, or no groups left (or a weighted source left empty).
    """
    groups = preference_groups(data_config, tokenizer, split=split, seed=seed, cache_dir=cache_dir,
                               data_root=data_root)
    return batch_groups(groups, global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count)
