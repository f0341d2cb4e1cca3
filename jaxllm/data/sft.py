"""Supervised fine-tuning data: conversation files, weighted mixtures and packed, resumable rows.

1. **Records** (`load_conversations`). Each non-blank line of a JSONL file is one record whose
   format (`messages`, ShareGPT `conversations`, Alpaca `instruction`, `prompt`/`completion`) is
   detected per record, so files may mix formats (`jaxllm.data.chat.to_messages`). Blank lines
   are skipped and counted; anything else bad raises `DataError` naming `file:line`.
2. **Sources.** `data.sources` is a mixture string (see `jaxllm.data.sources`) of
   `jsonl:GLOB[@WEIGHT]` entries; `{data_root}` is substituted, `#field` is not allowed (the format
   is detected).
3. **Examples** (`source_examples`, `truncate_examples`). Each conversation is rendered once by
   `chat.ChatTemplate.render` into `tokens` and `target_mask` (1 = token is supervised). Examples
   longer than a row (`seq_len + 1` tokens) are, per `data.truncation`, dropped (`"drop"`) or cut
   to their first `seq_len + 1` tokens (`"keep_start"`; one left with no supervised token is then
   dropped). Renders are cached (untruncated) under `cache_dir/<sha256 of (source fingerprint,
   tokenizer fingerprint, template fingerprint)>/` when a cache directory is given.
4. **Epochs** (train). Let `N` be the number of examples of all sources. Without weights, epoch
   `e` holds every example once. With weights `w_i`, source `i` (`n_i` examples) contributes
   `c_i = floor(w_i / sum(w) * N + 1/2)` examples: positions `[e * c_i, (e + 1) * c_i)` of its own
   endless stream, which walks through seeded permutations of its examples (pass `q` is permutation
   `derive_seed(seed, 0, i, q)`), so a small source is cycled and a large one is subsampled without
   repeating until it is exhausted. The epoch's examples are then shuffled (permutation
   `derive_seed(seed, 1, e)`); permutations use `np.random.RandomState`, whose stream NumPy keeps
   fixed across versions (NEP 19).
5. **Packing** (`packing.pack_first_fit`). In that order each example goes into the first row (in order of
   creation) with room for it, or opens a new row; rows hold `seq_len + 1` tokens, an example is
   never split, the tail is padding (token 0, segment 0). Epoch `e` has its own number of rows;
   row `r` of the infinite stream is found through the cumulative row counts, computed lazily epoch
   by epoch (plans of recent epochs are cached), so the stream is a pure function of (seed, index).
   Eval packs its examples once, in file order, and is finite.
6. **Model inputs** (`to_model_inputs`), all `[b, seq_len]`, as `lm.to_model_inputs`: `inputs`,
   `targets`, `segment_ids`, `positions` (int32, restarting at 0 per example) and `loss_mask`
   (float32) = `target_mask` of the target AND target in the same example as the input (no example
   is trained to predict the next one's first token).
7. **Processes** use `lm._ProcessSlice`: global batch `s` is rows `s*B ... s*B + B - 1`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from jaxllm import fs
from jaxllm.data import chat, lm, packing, sources
from jaxllm.data.sources import DataError, SourceSpec

logger = logging.getLogger(__name__)

TRUNCATIONS = ("drop", "keep_start")
_CACHE_FORMAT = 1  # bump when the cache layout changes
_PASS_STREAM, _EPOCH_STREAM = 0, 1  # derive_seed streams: per-source passes, epoch shuffles


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of SFT run configs."""
    c = ml_collections.ConfigDict()
    c.sources = "jsonl:{data_root}/sft/oasst_en100/train.jsonl"  # jsonl:GLOB[@W]; ...
    c.eval_sources = "jsonl:{data_root}/sft/oasst_en100/test.jsonl"
    c.seq_len = 512  # tokens per row seen by the model (rows hold seq_len + 1)
    c.truncation = "keep_start"  # over-long examples: "drop" | "keep_start"
    c.cache_dir = ""  # "" = RUN_DIR/cache (lm.resolve_cache_dir)
    return c


@dataclasses.dataclass
class SFTStats:
    """Counts (records, examples, tokens) of reading, rendering and truncating SFT data."""

    files: int = 0
    records: int = 0  # conversations read
    blank_lines: int = 0
    multi_turn: int = 0  # conversations with more than one assistant turn
    formats: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: int = 0  # after truncation
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0  # cut to seq_len + 1 tokens (keep_start)
    dropped_long: int = 0  # over-long, dropped (drop)
    dropped_unsupervised: int = 0  # nothing supervised left after the cut (keep_start)

    def merge(self, other: SFTStats) -> SFTStats:
        """Field-wise sum (formats summed per key)."""
        out = dataclasses.replace(self, formats=dict(self.formats))
        for f in dataclasses.fields(self):
            if f.name != "formats":
                setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        for k, v in other.formats.items():
            out.formats[k] = out.formats.get(k, 0) + v
        return out


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def parse_sft_sources(spec: str, data_root: str = "") -> list[SourceSpec]:
    """`sources.parse_sources`, restricted to `jsonl:GLOB[@WEIGHT]` entries without `#field`.

    Raises:
      DataError: as `parse_sources`, another kind, or a `#field`.
    """
    specs = sources.parse_sources(spec, data_root)
    for s in specs:
        if s.kind != "jsonl":
            raise DataError(f"SFT source {s.text!r}: kind {s.kind!r}; expected jsonl:GLOB[@WEIGHT]")
        if "#" in s.text:
            raise DataError(f"SFT source {s.text!r}: no '#field' (the format is detected)")
    return specs


def _read_source(spec: SourceSpec, stats: SFTStats) -> list[list[dict]]:
    conversations, counts = [], collections.Counter()
    for path in sources.resolve_files(spec):
        for lineno, record in chat.read_records(path, counts):
            fmt, messages = chat.to_messages(record, f"{path}:{lineno}")
            stats.records += 1
            stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            stats.multi_turn += sum(m["role"] == "assistant" for m in messages) > 1
            conversations.append(messages)
    stats.files += counts["files"]
    stats.blank_lines += counts["blank_lines"]
    return conversations


def load_conversations(
    spec: str, data_root: str = "", stats: SFTStats | None = None
) -> list[list[dict]]:
    """Reads the conversations of a mixture string (all entries in order; weights ignored).

    Args:
      spec: `jsonl:GLOB[@WEIGHT]` entries joined by `;`; record formats as in `jaxllm.data.chat`.
      data_root: Replaces `{data_root}`.
      stats: Updated in place: files, records, blank lines, multi-turn and per-format counts.

    Returns:
      One list of `{"role", "content"}` messages per record, each ending on an assistant turn.

    Raises:
      DataError: a bad spec, a glob matching nothing, an empty file, or a bad record (file:line).
    """
    stats = stats if stats is not None else SFTStats()
    return [c for s in parse_sft_sources(spec, data_root) for c in _read_source(s, stats)]


# Generation prompts are conversations too: read by `chat.load_prompts`, exported here with the
# rest of the SFT data API.
load_prompts = chat.load_prompts


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Examples:
    """Rendered conversations, concatenated.

    Attributes:
      tokens: `[num_tokens]` int32.
      target_mask: `[num_tokens]` float32, 1.0 where the token is supervised.
      starts: `[num_examples + 1]` int64; example `k` is `tokens[starts[k]:starts[k+1]]`.
      stats: Counts for these examples.
    """

    tokens: np.ndarray
    target_mask: np.ndarray
    starts: np.ndarray
    stats: SFTStats

    @property
    def num_examples(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """`[num_examples]` int64 tokens per example."""
        return np.diff(self.starts)


def _cat(arrays: Sequence[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.zeros(0, dtype)] + [np.asarray(a, dtype) for a in arrays])


def _from_pieces(tokens, masks, stats: SFTStats) -> Examples:
    """Examples from per-example arrays; recounts `examples`, `tokens`, `supervised_tokens`."""
    starts = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=starts[1:])
    out = Examples(_cat(tokens, np.int32), _cat(masks, np.float32), starts, stats)
    stats.examples, stats.tokens = out.num_examples, int(starts[-1])
    stats.supervised_tokens = int(out.target_mask.sum())
    return out


def render_examples(
    conversations: Sequence[Sequence[dict]],
    template: chat.ChatTemplate,
    stats: SFTStats | None = None,
) -> Examples:
    """Renders conversations with `template.render` (untruncated).

    Raises:
      chat.ChatError: an invalid conversation (`load_conversations` output never is).
    """
    rendered = template.render_batch(conversations)
    stats = stats if stats is not None else SFTStats()
    return _from_pieces([t for t, _ in rendered], [m for _, m in rendered], stats)


def concat_examples(parts: Sequence[Examples]) -> Examples:
    """The examples of `parts` one after the other; stats are summed."""
    stats = SFTStats()
    for p in parts:
        stats = stats.merge(p.stats)
    offsets = np.cumsum([0] + [len(p.tokens) for p in parts])
    starts = _cat([[0]] + [p.starts[1:] + o for p, o in zip(parts, offsets)], np.int64)
    return Examples(
        _cat([p.tokens for p in parts], np.int32),
        _cat([p.target_mask for p in parts], np.float32),
        starts,
        stats,
    )


def truncate_examples(examples: Examples, seq_len: int, truncation: str) -> Examples:
    """Fits every example into one row of `seq_len + 1` tokens (see the module docstring).

    Returns:
      The remaining examples, in order; `stats` gains `truncated`, `dropped_long`,
      `dropped_unsupervised` and has recounted `examples`, `tokens`, `supervised_tokens`.

    Raises:
      DataError: an unknown `truncation`.
    """
    if truncation not in TRUNCATIONS:
        raise DataError(f"data.truncation={truncation!r}; expected one of {TRUNCATIONS}")
    window = seq_len + 1
    stats = dataclasses.replace(examples.stats, formats=dict(examples.stats.formats))
    tokens, masks = [], []
    for a, b in zip(examples.starts.tolist(), examples.starts[1:].tolist()):
        if b - a > window:
            if truncation == "drop":
                stats.dropped_long += 1
                continue
            if not examples.target_mask[a : a + window].any():
                stats.dropped_unsupervised += 1
                continue
            stats.truncated += 1
            b = a + window
        tokens.append(examples.tokens[a:b])
        masks.append(examples.target_mask[a:b])
    return _from_pieces(tokens, masks, stats)


def _cache_key(spec: SourceSpec, template: chat.ChatTemplate) -> str:
    payload = {
        "format": _CACHE_FORMAT,
        "kind": "sft",
        "source": sources.fingerprint(spec),
        "tokenizer": template.tokenizer.fingerprint,
        "template": template.fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def source_examples(
    spec: SourceSpec, template: chat.ChatTemplate, cache_dir: str | os.PathLike = ""
) -> Examples:
    """Reads and renders one source (untruncated), through the cache when `cache_dir` is set.

    Raises:
      DataError: as `load_conversations`, or a source without records.
    """
    final = fs.path(cache_dir) / _cache_key(spec, template) if cache_dir else None
    if final is not None and fs.dir_complete(final):
        stats = SFTStats(**json.loads((final / "stats.json").read_text()))
        arrays = {k: fs.load_npy(final / f"{k}.npy", mmap=False) for k in ("tokens", "target_mask", "starts")}
        logger.info("SFT cache hit %s for %r: %d examples", final, spec.text, stats.examples)
        return Examples(stats=stats, **arrays)
    stats = SFTStats()
    conversations = _read_source(spec, stats)
    examples = render_examples(conversations, template, stats)
    if final is not None:
        with fs.atomic_path(final) as tmp:  # another process's identical entry may win
            tmp.mkdir()
            for k in ("tokens", "target_mask", "starts"):
                fs.save_npy(tmp / f"{k}.npy", getattr(examples, k))
            (tmp / "stats.json").write_text(json.dumps(dataclasses.asdict(stats)))
    return examples


# ---------------------------------------------------------------------------------------------
# Epochs and packing
# ---------------------------------------------------------------------------------------------


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Examples per epoch of each source: `floor(w_i / sum(w) * sum(sizes) + 1/2)`."""
    total, wsum = sum(sizes), math.fsum(weights)
    return [int(math.floor(w / wsum * total + 0.5)) for w in weights]


def _permutation(n: int, *seed: int) -> np.ndarray:
    return np.random.RandomState(lm.derive_seed(*seed)).permutation(n)


def epoch_examples(
    sizes: Sequence[int], weights: Sequence[float] | None, seed: int, epoch: int
) -> np.ndarray:
    """Example ids (into the sources concatenated in order) of one epoch, shuffled.

    Args:
      sizes: Examples per source.
      weights: Mixture weights per source, or None (every example once per epoch).
      seed: Data-order seed.
      epoch: Epoch number (>= 0).

    Returns:
      `[num]` int64 ids (see the module docstring, point 4).
    """
    if weights is None:
        sizes, counts = [sum(sizes)], [sum(sizes)]
    else:
        counts = mixture_counts(sizes, weights)
    offsets = np.cumsum([0, *sizes])
    chosen = []
    for i, (n, c) in enumerate(zip(sizes, counts)):
        if c and not n:
            raise DataError(f"mixture source {i} has no examples but a share of {c} per epoch")
        begin, end = epoch * c, (epoch + 1) * c
        for q in range(begin // n if c else 0, -(-end // n) if c else 0):
            lo, hi = max(begin - q * n, 0), min(end - q * n, n)
            chosen.append(offsets[i] + _permutation(n, seed, _PASS_STREAM, i, q)[lo:hi])
    ids = np.concatenate([np.zeros(0, np.int64)] + chosen).astype(np.int64)
    return ids[_permutation(len(ids), seed, _EPOCH_STREAM, epoch)]


class PackedExamples(packing.PackedRows):
    """Rows of packed examples: dicts of `[seq_len + 1]` arrays.

    Keys: `tokens`, `segment_ids` (1..k per example in the row, 0 = padding), `positions` (0 at
    each example start) as int32, and `target_mask` (float32, 1 = supervised token).

    With `seed` set the dataset is infinite (epochs as in the module docstring); without, it is
    the finite eval split: all examples, first-fit in order, packed once.
    """

    def __init__(
        self,
        examples: Examples,
        seq_len: int,
        *,
        seed: int | None = None,
        sizes: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ):
        """Prepares the rows.

        Args:
          examples: All sources' examples, concatenated in source order; none longer than a row.
          seq_len: Model sequence length L; rows hold L + 1 tokens.
          seed: Data-order seed (train), or None (eval).
          sizes: Examples per source (default: one source); used with `weights`.
          weights: Mixture weights per source, or None.

        Raises:
          DataError: no examples, an empty epoch, or an example longer than a row.
        """
        self._ex = examples
        self.seq_len = int(seq_len)
        lengths = examples.lengths
        if examples.num_examples == 0:
            raise DataError("no SFT examples (after truncation)")
        if lengths.max() > self.seq_len + 1:
            raise DataError(f"an example has {lengths.max()} tokens > seq_len + 1")
        self._seed, self._weights = seed, None if weights is None else list(weights)
        self._sizes = list(sizes) if sizes is not None else [examples.num_examples]
        if sum(self._sizes) != examples.num_examples:
            raise DataError(f"source sizes {self._sizes} do not add up to {examples.num_examples}")
        if seed is not None and weights is not None and sum(mixture_counts(self._sizes, weights)) == 0:
            raise DataError(f"mixture sizes {self._sizes} with weights {weights} give no examples")
        super().__init__(lengths, self.seq_len + 1, infinite=seed is not None)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_examples(self._sizes, self._weights, self._seed, epoch)

    def materialize(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        window = self.seq_len + 1
        out = {k: np.zeros(window, np.int32) for k in ("tokens", "segment_ids", "positions")}
        out["target_mask"] = np.zeros(window, np.float32)
        p, starts = 0, self._ex.starts
        for k, e in enumerate(ids.tolist(), 1):
            a, b = int(starts[e]), int(starts[e + 1])
            n = b - a
            out["tokens"][p : p + n] = self._ex.tokens[a:b]
            out["target_mask"][p : p + n] = self._ex.target_mask[a:b]
            out["segment_ids"][p : p + n] = k
            out["positions"][p : p + n] = np.arange(n)
            p += n
        return out

    def __str__(self) -> str:
        return (
            f"PackedExamples(examples={self._ex.num_examples}, seq_len={self.seq_len}, "
            f"seed={self._seed}, sizes={self._sizes}, weights={self._weights})"
        )


def to_model_inputs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batched rows (`[b, L + 1]`) -> model inputs (`[b, L]`), as `lm.to_model_inputs`, with
    `loss_mask = target_mask[:, 1:]` and-ed with "target in the input's example"."""
    out = lm.to_model_inputs(rows)
    out["loss_mask"] = out["loss_mask"] * rows["target_mask"][:, 1:].astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def sft_dataset(
    data_config: ml_collections.ConfigDict,
    tokenizer,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    cache_dir: str | os.PathLike = "",
    data_root: str = "",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The SFT dataset of this process: batches of model inputs.

    Args:
      data_config: The `data` section (`default_config()`).
      tokenizer: A `jaxllm.data.tokenizer.Tokenizer` with the role markers.
      split: "train" (`data_config.sources`; infinite, mixed and shuffled by `seed`) or "eval"
        (`data_config.eval_sources`, weights ignored; finite, in order, last batch padded with
        all-zero rows).
      global_batch_size: Rows per global batch, B.
      seed: Data-order seed (train).
      cache_dir: Render cache directory; "" = no cache (render in memory every time).
      data_root: Replaces `{data_root}` in source specs.
      process_index: This process, p.
      process_count: Number of processes, P; B % P == 0.

    Returns:
      A `grain.MapDataset` whose element `s` is this process's slice of global batch `s`: a dict
      of `[B / P, seq_len]` arrays `inputs`, `targets`, `segment_ids`, `positions` (int32) and
      `loss_mask` (float32). `len()` is `sys.maxsize` for train, the number of batches for eval.

    Raises:
      DataError: bad sources or records (file:line), a bad split, truncation or batch layout,
        seq_len < 1, or no examples left after truncation (or a weighted source left empty).
    """
    lm.check_batch_layout("sft_dataset", split, global_batch_size, process_index, process_count)
    seq_len, truncation = int(data_config.seq_len), str(data_config.truncation)
    if seq_len < 1:
        raise DataError(f"data.seq_len={seq_len} must be >= 1")
    if truncation not in TRUNCATIONS:
        raise DataError(f"data.truncation={truncation!r}; expected one of {TRUNCATIONS}")
    template = chat.template_for(tokenizer)
    spec = data_config.sources if split == "train" else data_config.eval_sources
    specs = parse_sft_sources(spec, data_root)
    parts = [
        truncate_examples(source_examples(s, template, cache_dir), seq_len, truncation)
        for s in specs
    ]
    for s, p in zip(specs, parts):
        st = p.stats
        logger.info(
            "SFT %s source %r: %d records (%d multi-turn, formats %s, %d blank lines) -> %d "
            "examples, %d tokens (%d supervised); %d truncated, %d dropped as too long, %d "
            "dropped with nothing supervised (seq_len=%d, truncation=%s)",
            split, s.text, st.records, st.multi_turn, st.formats, st.blank_lines, st.examples,
            st.tokens, st.supervised_tokens, st.truncated, st.dropped_long,
            st.dropped_unsupervised, seq_len, truncation,
        )  # fmt: skip
        if split == "train" and s.weight is not None and not p.num_examples:
            raise DataError(f"SFT source {s.text!r} has no examples left after truncation")
    examples = concat_examples(parts)
    if split == "eval":
        rows = lm._PadToMultiple(PackedExamples(examples, seq_len), global_batch_size)
    else:
        weights = None if specs[0].weight is None else [s.weight for s in specs]
        sizes = [p.num_examples for p in parts]
        rows = PackedExamples(examples, seq_len, seed=seed, sizes=sizes, weights=weights)
    local = lm._ProcessSlice(rows, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count).map(to_model_inputs)
