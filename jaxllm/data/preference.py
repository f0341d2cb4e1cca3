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
7. **Packed rows** (`data.groups_per_row = S > 1`; TRL's `padding_free`, OpenRLHF's
   `--packing_samples`). The element order of point 5 is packed first-fit (`packing`) into rows,
   a group's footprint being its longest sequence, at most `S` groups per row: slot `k` of a row
   holds response `k` of each of its groups one after another, group `j` as segment `j + 1`
   (positions restart at 0; no target crosses a segment, so attention and scores stay within one
   sequence). Token fields stay `[b, K, L]`; the per-response fields `lengths`, `ranks`,
   `response_mask` become `[b, S, K]` and the per-group `margin`, `has_margin`, `group_index`
   `[b, S]` (unused segments zero). `train.batch_size` then counts rows. `flat_groups` gives
   either layout's group fields as `[G, K]` / `[G]`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from jaxllm import fs
from jaxllm.data import chat, lm, packing, preference_records, sft, sources
from jaxllm.data.preference_records import PreferenceStats, parse_preference_sources
from jaxllm.data.sources import DataError, SourceSpec

logger = logging.getLogger(__name__)

TRUNCATIONS = ("drop", "keep_end")
RESPONSE_FIELDS = ("lengths", "ranks", "response_mask", "ref_logps")  # [b, K]; packed [b, S, K]
GROUP_FIELDS = RESPONSE_FIELDS + ("margin", "has_margin", "group_index")  # these [b]; packed [b, S]
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
    c.groups_per_row = 1  # > 1: pack up to this many groups into each row (point 7); batch = rows
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
    path = fs.path(cache_dir) / f"{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with path.open("rb") as raw, np.load(io.BytesIO(raw.read()), allow_pickle=False) as f:
            arrays = {k: f[k] for k in Groups.ARRAYS}
            stats = PreferenceStats(**json.loads(str(f["stats"])))
        logger.info("preference cache hit %s for %r: %d groups", path, spec.text, stats.groups)
        return Groups(stats=stats, **arrays)
    stats = PreferenceStats()
    groups = render_groups(preference_records.read_source(spec, stats), template, stats)
    if path is not None:
        arrays = {k: getattr(groups, k) for k in Groups.ARRAYS}
        with fs.atomic_path(path) as tmp, tmp.open("wb") as f:  # a concurrent writer's entry is identical
            np.savez(f, stats=np.array(json.dumps(dataclasses.asdict(stats))), **arrays)
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

    def fingerprint(self) -> str:
        """sha256 (hex) of what the rows of the kept groups are made of: every source's rendered
        arrays (so the tokenizer, chat template and records), the kept groups and their prompt cuts
        (so truncation), `seq_len` and K. The same for every view and seed of these groups."""
        h = hashlib.sha256(json.dumps([_CACHE_FORMAT, self.seq_len, self.max_responses]).encode("utf-8"))
        arrays = [getattr(part, name) for part in self._parts for name in Groups.ARRAYS] + [self._ids, self._cuts]
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode("utf-8"))
            h.update(a.tobytes())
        return h.hexdigest()

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

    def finite_order(self) -> np.ndarray:
        """`[n]` int64 kept-group positions the finite view reads, in order."""
        return np.arange(len(self._ids), dtype=np.int64) if self._only is None else self._only

    def footprints(self) -> np.ndarray:
        """`[num_groups]` int64 tokens of each kept group's longest sequence (after its cut)."""
        out = np.zeros(len(self._ids), np.int64)
        for k, (part, g, cut) in enumerate(zip(self._part, self._ids, self._cuts)):
            G = self._parts[part]
            a, b = G.group_starts[g], G.group_starts[g + 1]
            prompt = G.prompt_starts[g + 1] - G.prompt_starts[g] - cut
            out[k] = prompt + np.diff(G.response_starts[a : b + 1]).max()
        return out

    def sequences(self, k: int) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], float]:
        """Kept group `k`'s responses as `(tokens, scored, rank)`, `tokens` the cut prompt followed
        by the response and `scored` 1.0 on its scored tokens; and its margin (NaN when absent)."""
        g, cut, G = int(self._ids[k]), int(self._cuts[k]), self._parts[self._part[k]]
        prompt = G.prompt_tokens[G.prompt_starts[g] : G.prompt_starts[g + 1]]
        prompt = np.concatenate([prompt[:1], prompt[1 + cut :]])
        out = []
        for s in range(G.group_starts[g], G.group_starts[g + 1]):
            a, b = G.response_starts[s], G.response_starts[s + 1]
            scored = np.concatenate([np.zeros(len(prompt), np.float32), G.target_mask[a:b]])
            out.append((np.concatenate([prompt, G.response_tokens[a:b]]), scored, int(G.ranks[s])))
        return out, float(G.margins[g])

    def rows(self, ids: Sequence[int], groups_per_row: int) -> dict[str, np.ndarray]:
        """Kept groups `ids` packed into one row: `[K, L]` token fields, `[S, K]` and `[S]` group
        fields (module docstring, point 7; `S = groups_per_row >= len(ids)`).

        Raises:
          DataError: the groups' sequences do not fit one row.
        """
        K, L, S = self.max_responses, self.seq_len, int(groups_per_row)
        out = {key: np.zeros((K, L), np.int32)
               for key in ("inputs", "targets", "positions", "segment_ids")}  # fmt: skip
        out["loss_mask"] = np.zeros((K, L), np.float32)
        out["lengths"], out["ranks"] = np.zeros((S, K), np.int32), np.zeros((S, K), np.int32)
        out["response_mask"] = np.zeros((S, K), np.float32)
        out["group_index"] = np.zeros(S, np.int32)
        out["has_margin"], out["margin"] = np.zeros(S, np.float32), np.zeros(S, np.float32)
        offsets = np.zeros(K, np.int64)
        for j, k in enumerate(ids):
            seqs, margin = self.sequences(int(k))
            for slot, (tokens, scored, rank) in enumerate(seqs):
                o, n = int(offsets[slot]), len(tokens)
                if o + n > L:
                    raise DataError(f"preference groups {list(ids)} do not fit one row of {L} tokens")
                out["inputs"][slot, o : o + n] = tokens
                out["targets"][slot, o : o + n - 1] = tokens[1:]
                out["positions"][slot, o : o + n] = np.arange(n)
                out["segment_ids"][slot, o : o + n] = j + 1
                out["loss_mask"][slot, o : o + n - 1] = scored[1:]
                out["lengths"][j, slot], out["ranks"][j, slot] = n, rank
                out["response_mask"][j, slot] = 1.0
                offsets[slot] += n
            out["group_index"][j] = k  # stable id of the group within this source set
            out["has_margin"][j] = not math.isnan(margin)
            out["margin"][j] = 0.0 if math.isnan(margin) else margin
        return out

    def row(self, k: int) -> dict[str, np.ndarray]:
        """Kept group `k` (in `ids` order) as a dict of `[K, L]`, `[K]` and `[]` arrays."""
        return {key: v[0] if key in GROUP_FIELDS else v for key, v in self.rows([k], 1).items()}

    def __str__(self) -> str:
        return (f"PreferenceGroups(groups={len(self._ids)}, seq_len={self.seq_len}, "
                f"K={self.max_responses}, seed={self._seed}, weights={self._weights})")  # fmt: skip


class PackedPreferenceGroups(packing.PackedRows):
    """`groups` packed first-fit, at most `groups_per_row` per row (module docstring, point 7):
    infinite when `groups` is (its epochs packed one by one), else its finite view packed once."""

    def __init__(self, groups: PreferenceGroups, groups_per_row: int):
        """Raises: DataError: `groups_per_row < 1`."""
        if groups_per_row < 1:
            raise DataError(f"data.groups_per_row={groups_per_row} < 1")
        self.groups, self.groups_per_row = groups, int(groups_per_row)
        super().__init__(groups.footprints(), groups.seq_len, infinite=len(groups) == sys.maxsize,
                         max_items=self.groups_per_row)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.groups.epoch(epoch)

    def eval_order(self) -> np.ndarray:
        return self.groups.finite_order()

    def materialize(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.groups.rows(ids, self.groups_per_row)

    def __str__(self) -> str:
        return f"PackedPreferenceGroups({self.groups}, groups_per_row={self.groups_per_row})"


def visited_groups(groups: PreferenceGroups, num_rows: int, groups_per_row: int = 1) -> np.ndarray:
    """Sorted kept-group positions that train rows `0 .. num_rows - 1` read, one group per row or
    packed `groups_per_row` to a row (DPO computes reference log-probs for exactly these)."""
    if groups_per_row == 1:
        return groups.visited(num_rows)
    return PackedPreferenceGroups(groups, groups_per_row).visited(num_rows)


def flat_groups(batch: dict) -> dict:
    """The group fields of a batch of either layout (module docstring, points 6 and 7) with the
    groups on one axis: `[G, K]` for `RESPONSE_FIELDS`, `[G]` for the others; `G = b`, or `b * S`
    for packed rows. Works on NumPy and JAX arrays; fields a batch lacks are left out."""
    packed = batch["response_mask"].ndim == 3
    out = {}
    for key in GROUP_FIELDS:
        if key in batch:
            x = batch[key]
            out[key] = x.reshape(-1, x.shape[-1]) if packed and key in RESPONSE_FIELDS else (
                x.reshape(-1) if packed else x)
    return out


def segments_to_groups(per_segment, batch_size: int, max_responses: int):
    """Per-sequence-row, per-segment values `[b * K, S]` (rows `b * K + k`, the flattened token
    fields of a packed batch) -> per-group `[b * S, K]`, the order of `flat_groups`."""
    s = per_segment.shape[-1]
    return per_segment.reshape(batch_size, max_responses, s).transpose(0, 2, 1).reshape(batch_size * s, max_responses)


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
        int(data_config.groups_per_row) < 1 and f"data.groups_per_row={data_config.groups_per_row} < 1",
    ]  # fmt: skip
    if any(problems):
        raise DataError("preference_dataset: bad " + "; ".join(p for p in problems if p))
    template = chat.template_for(tokenizer)
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


def batch_groups(groups: PreferenceGroups, *, global_batch_size: int, groups_per_row: int = 1,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:  # fmt: skip
    """This process's slices of the global batches of `groups`, one group per row or packed
    `groups_per_row` to a row (point 7; a finite view is zero-padded to whole batches; see
    `preference_dataset`).

    Raises:
      DataError: a bad batch layout or `groups_per_row < 1`.
    """
    finite = len(groups) < sys.maxsize
    lm.check_batch_layout("preference_dataset", "eval" if finite else "train", global_batch_size,
                          process_index, process_count)  # fmt: skip
    if groups_per_row != 1:
        groups = PackedPreferenceGroups(groups, groups_per_row)
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
      global_batch_size: Rows per global batch, B (a group per row unless `data.groups_per_row > 1`).
      seed: Data-order seed (train).
      cache_dir: Render cache directory; "" = no cache.
      data_root: Replaces `{data_root}` in source specs.
      process_index, process_count: This process p of P; B % P == 0.

    Returns:
      A `grain.MapDataset` whose element `s` is this process's slice of global batch `s` (module
      docstring, point 6, or 7 when packed, with b = B / P); `len()` is `sys.maxsize` for train,
      else the batches.

    Raises:
      DataError: bad sources or records (file:line), a bad split, truncation, max_responses or
        batch layout, seq_len < 1, or no groups left (or a weighted source left empty).
    """
    groups = preference_groups(data_config, tokenizer, split=split, seed=seed, cache_dir=cache_dir,
                               data_root=data_root)
    return batch_groups(groups, global_batch_size=global_batch_size, groups_per_row=int(data_config.groups_per_row),
                        process_index=process_index, process_count=process_count)
