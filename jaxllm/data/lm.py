"""Causal-LM pretraining data: a token cache and a packed, resumable grain pipeline.

1. **Token cache** (`tokenize_corpus`). Every document of a source becomes `[bos] + tokens + [eos]`;
   the documents are concatenated into one flat array `tokens [num_tokens]` (uint16 when the
   vocabulary has at most 65536 ids, else int32) with `doc_starts [num_docs + 1]` int64 offsets,
   saved as `.npy` under `cache_dir/<sha256 of (source fingerprints, tokenizer fingerprint,
   add_bos, add_eos)>/` (written to a temporary directory, then renamed) and memory-mapped.
2. **Rows** (`PackedRows`). The stream is cut into consecutive windows of `seq_len + 1` tokens
   (the incomplete tail is dropped for training and padded for eval). Each row carries
   `segment_ids` (1, 2, ... per document piece, 0 = padding) and `positions` (restarting at 0 at
   every document start and at the row start), so each row is self-contained.
   For training the dataset is infinite: index `i` is epoch `e = i // n_rows`, row
   `index_shuffle(i % n_rows, seed=f(seed, stream, e))`; the order is a pure function of
   (seed, index), each epoch a fresh permutation.
3. **Mixtures.** Unweighted sources form one corpus (natural proportions); weighted sources get one
   row dataset each (own seed stream), mixed by `grain.MapDataset.mix`. Eval always concatenates.
4. **Per-process slices.** Global batch `s` is rows `s*B ... s*B + B - 1` of the (mixed) dataset;
   process `p` of `P` reads rows `s*B + p*b ...`, `b = B / P`. The global batch never depends on
   the process count, and an iterator's state is just its position.
5. **Model inputs** (`to_model_inputs`), all `[b, seq_len]`: `inputs`, `targets` (int32),
   `segment_ids`, `positions` (int32), `loss_mask` (float32; 1 where the target continues the
   input's document piece, so no document predicts the next one's first token).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxllm import fs
from jaxllm.data import sources
from jaxllm.data.sources import DataError, SourceSpec

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
ENCODE_BATCH_DOCS = 1000  # documents per encode_batch call
_CACHE_FORMAT = 1  # bump when the cache layout changes, to invalidate old entries
_SHUFFLE_ROUNDS = 4  # Feistel rounds of grain's index_shuffle


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of run configs."""
    c = ml_collections.ConfigDict()
    c.sources = "stdlib:train"  # mixture string (see jaxllm.data.sources)
    c.eval_sources = "stdlib:validation"
    c.seq_len = 256  # tokens per row seen by the model (rows hold seq_len + 1)
    c.add_bos = True
    c.add_eos = True
    c.cache_dir = ""  # "" = RUN_DIR/cache
    c.tokenize_threads = 0  # 0 = sentencepiece default (one per CPU)
    return c


def resolve_cache_dir(data_config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> str:
    """`data_config.cache_dir`, or `RUN_DIR/cache` when it is empty."""
    return os.fspath(data_config.cache_dir or fs.path(run_dir) / "cache")


# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents of one or more sources as one token stream.

    Attributes:
      tokens: `[num_tokens]` uint16 (vocab <= 65536) or int32, memory-mapped.
      doc_starts: `[num_docs + 1]` int64; document `d` is `tokens[doc_starts[d]:doc_starts[d+1]]`.
      stats: `documents`, `tokens`, `skipped_empty`, `skipped_undecodable`, `files`, `seconds`
        (tokenization time of the run that built the cache).
      path: The cache directory.
      cached: Whether the cache already existed (nothing was tokenized).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    stats: dict[str, Any]
    path: str
    cached: bool

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def cache_key(specs: Sequence[SourceSpec], tokenizer, add_bos: bool, add_eos: bool) -> str:
    """sha256 (hex) of the source fingerprints, tokenizer fingerprint, add_bos and add_eos."""
    payload = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "sources": [sources.fingerprint(s) for s in specs],
            "tokenizer": tokenizer.fingerprint,
            "add_bos": bool(add_bos),
            "add_eos": bool(add_eos),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenize_corpus(
    specs: Sequence[SourceSpec],
    tokenizer,
    *,
    cache_dir: str | os.PathLike,
    add_bos: bool,
    add_eos: bool,
    num_threads: int = 0,
) -> TokenizedCorpus:
    """Tokenizes the documents of `specs` (in order) once, or loads them from the cache.

    Args:
      specs: Sources whose documents form the corpus, concatenated in order.
      tokenizer: A `jaxllm.data.tokenizer.Tokenizer`.
      cache_dir: Directory holding one subdirectory per cache key.
      add_bos: Prepend `tokenizer.bos_id` to every document.
      add_eos: Append `tokenizer.eos_id` to every document.
      num_threads: sentencepiece encoding threads (0 = one per CPU).

    Returns:
      The corpus, memory-mapped from `cache_dir/<key>/`.

    Raises:
      DataError: bad sources (see `sources.read_documents`), or no documents at all.
      ValueError: add_bos/add_eos with a tokenizer that has no bos/eos piece.
    """
    for flag, name, token in (
        (add_bos, "bos", tokenizer.bos_id),
        (add_eos, "eos", tokenizer.eos_id),
    ):
        if flag and token < 0:
            raise ValueError(
                f"add_{name} is set but tokenizer {tokenizer.path} has no {name} piece"
            )
    names = [s.text for s in specs]
    final = fs.path(cache_dir) / cache_key(specs, tokenizer, add_bos, add_eos)
    if fs.dir_complete(final):
        corpus = _load(final, cached=True)
        logger.info(
            "token cache hit %s for %s: %d docs, %d tokens",
            final,
            names,
            corpus.num_docs,
            corpus.num_tokens,
        )
        return corpus
    start = time.perf_counter()
    tokens, doc_starts, stats = _tokenize(specs, tokenizer, add_bos, add_eos, num_threads)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    # Written to a temporary folder renamed into place (removed on failure); when another process
    # finished first, its identical entry is kept.
    with fs.atomic_path(final) as tmp:
        tmp.mkdir()
        fs.save_npy(tmp / "tokens.npy", tokens)
        fs.save_npy(tmp / "doc_starts.npy", doc_starts)
        (tmp / "stats.json").write_text(json.dumps({**stats, "sources": names}, indent=1))
    logger.info(
        "tokenized %s in %.1f s: %d docs, %d tokens (%.0f tokens/s), skipped %d empty and "
        "%d undecodable documents, %d files -> %s",
        names,
        stats["seconds"],
        stats["documents"],
        stats["tokens"],
        stats["tokens"] / max(stats["seconds"], 1e-9),
        stats["skipped_empty"],
        stats["skipped_undecodable"],
        stats["files"],
        final,
    )
    return _load(final, cached=False)


def _tokenize(specs, tokenizer, add_bos, add_eos, num_threads):
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    prefix = np.array([tokenizer.bos_id] if add_bos else [], dtype)
    suffix = np.array([tokenizer.eos_id] if add_eos else [], dtype)
    source_stats = sources.SourceStats()
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    empty_encodings = 0
    batch: list[str] = []

    def flush():
        nonlocal empty_encodings
        for ids in tokenizer.encode_batch_arrays(batch, num_threads):
            if not len(ids) and not (add_bos or add_eos):
                empty_encodings += 1  # a zero-length document would repeat a doc start
                continue
            piece = np.concatenate([prefix, ids.astype(dtype), suffix])
            pieces.append(piece)
            lengths.append(len(piece))
        batch.clear()

    for doc in sources.read_all_documents(specs, source_stats):
        batch.append(doc)
        if len(batch) == ENCODE_BATCH_DOCS:
            flush()
    if batch:
        flush()
    if not lengths:
        raise DataError(f"sources {[s.text for s in specs]} contain no documents")
    tokens = np.concatenate(pieces)
    doc_starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    stats = {
        "documents": len(lengths),
        "tokens": int(len(tokens)),
        "skipped_empty": source_stats.skipped_empty + empty_encodings,
        "skipped_undecodable": source_stats.skipped_undecodable,
        "files": source_stats.files,
    }
    return tokens, doc_starts, stats


def _load(path: os.PathLike, cached: bool) -> TokenizedCorpus:
    return TokenizedCorpus(
        tokens=fs.load_npy(path / "tokens.npy"),  # memory-mapped when local
        doc_starts=fs.load_npy(path / "doc_starts.npy"),
        stats=json.loads((path / "stats.json").read_text()),
        path=str(path),
        cached=cached,
    )


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def derive_seed(*values: int) -> int:
    """A uint32 seed (index_shuffle's range) derived from non-negative ints, e.g. (seed, epoch)."""
    return int(np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, np.uint32)[0])


class PackedRows(grain.MapDataset):
    """Windows of `seq_len + 1` consecutive tokens of a `TokenizedCorpus`.

    Each element is a dict of `[seq_len + 1]` int32 arrays: `tokens`, `segment_ids` (1, 2, ... for
    each document piece in the row, 0 for padding) and `positions` (0 at each document start and
    at the row start, +1 per token; 0 for padding).

    With `seed` set the dataset is infinite and shuffled: index `i` reads row
    `index_shuffle(i % num_rows, max_index=num_rows - 1, seed=derive_seed(seed, stream, epoch))`
    with `epoch = i // num_rows`. Without a seed it is finite and in order (index `i` reads row
    `i % num_rows`, grain's convention for later epochs).
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        seq_len: int,
        *,
        seed: int | None = None,
        stream: int = 0,
        pad_tail: bool = False,
    ):
        """Builds the row index.

        Args:
          corpus: The token stream.
          seq_len: Model sequence length L; rows hold L + 1 tokens.
          seed: Shuffle seed (infinite dataset), or None (finite, in order).
          stream: Distinguishes datasets that share `seed` (mixture components).
          pad_tail: Keep the incomplete last window, padded with token 0 / segment 0 (eval).

        Raises:
          DataError: the corpus is too short for a single row.
        """
        super().__init__()
        self._tokens = corpus.tokens
        self._doc_starts = corpus.doc_starts
        self.seq_len = int(seq_len)
        self._window = self.seq_len + 1
        self._seed, self._stream = seed, stream
        full, tail = divmod(corpus.num_tokens, self._window)
        self.num_rows = full + int(pad_tail and tail > 0)
        if self.num_rows == 0:
            raise DataError(
                f"corpus {corpus.path} has {corpus.num_tokens} tokens, fewer than one row of "
                f"seq_len + 1 = {self._window}"
            )

    def __len__(self) -> int:
        return sys.maxsize if self._seed is not None else self.num_rows

    def row_index(self, index: int) -> int:
        """The corpus row read at dataset index `index`."""
        epoch, i = divmod(int(index), self.num_rows)
        if self._seed is None:
            return i
        seed = derive_seed(self._seed, self._stream, epoch)
        return grain.experimental.index_shuffle(
            i, max_index=self.num_rows - 1, seed=seed, rounds=_SHUFFLE_ROUNDS
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self.row(self.row_index(index))

    def row(self, r: int) -> dict[str, np.ndarray]:
        """Row `r` of the corpus in order (no shuffling): dict of `[seq_len + 1]` int32 arrays."""
        start = r * self._window
        end = min(start + self._window, len(self._tokens))
        doc_starts = self._doc_starts
        # Document starts strictly inside (start, end): each opens a new segment.
        lo = np.searchsorted(doc_starts, start, side="right")
        hi = np.searchsorted(doc_starts, end, side="left")
        inner = np.asarray(doc_starts[lo:hi])
        offsets = np.arange(start, end, dtype=np.int64)
        k = np.searchsorted(inner, offsets, side="right")  # document starts at or before each token
        segment_start = np.concatenate([[start], inner])[k]
        out = {
            "tokens": np.zeros(self._window, np.int32),
            "segment_ids": np.zeros(self._window, np.int32),
            "positions": np.zeros(self._window, np.int32),
        }
        n = end - start
        out["tokens"][:n] = self._tokens[start:end]
        out["segment_ids"][:n] = k + 1
        out["positions"][:n] = offsets - segment_start
        return out

    def __str__(self) -> str:
        return (
            f"PackedRows(num_rows={self.num_rows}, seq_len={self.seq_len}, seed={self._seed}, "
            f"stream={self._stream})"
        )


class _PadToMultiple(grain.MapDataset):
    """A finite dataset extended with all-padding rows to a multiple of `multiple` elements."""

    def __init__(self, parent: PackedRows, multiple: int):
        super().__init__(parent)
        self._n = len(parent)
        self._len = -(-self._n // multiple) * multiple
        self._pad = {k: np.zeros_like(v) for k, v in parent.row(0).items()}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= self._len
        if index >= self._n:
            return {k: v.copy() for k, v in self._pad.items()}
        return self._parent[index]

    def __str__(self) -> str:
        return f"_PadToMultiple(rows={self._n}, padded_to={self._len})"


class _ProcessSlice(grain.MapDataset):
    """This process's rows of each global batch: element `j` is parent row `s*B + p*b + j % b`."""

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, index: int, count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = global_batch_size // count
        self._offset = index * self._local
        n = len(parent)
        self._len = sys.maxsize if n >= sys.maxsize else (n // global_batch_size) * self._local

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, k = divmod(int(index), self._local)
        return self._parent[step * self._global + self._offset + k]

    def __str__(self) -> str:
        return (
            f"_ProcessSlice(global_batch={self._global}, local_batch={self._local}, "
            f"offset={self._offset})"
        )


def to_model_inputs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batched rows (`[b, L + 1]`) -> model inputs, all `[b, L]`.

    `inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]` (int32); `segment_ids`, `positions`
    (int32) of the inputs; `loss_mask` (float32) = 1 where
    `segment_ids[:, 1:] == segment_ids[:, :-1]` and `segment_ids[:, :-1] > 0`, i.e. the target is
    in the same document piece as its input.
    """
    tokens, segs = rows["tokens"], rows["segment_ids"]
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "segment_ids": np.ascontiguousarray(segs[:, :-1]),
        "positions": np.ascontiguousarray(rows["positions"][:, :-1]),
        "loss_mask": ((segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def check_batch_layout(what: str, split: str, global_batch_size: int, process_index: int,
                       process_count: int) -> None:
    """Checks the split and that process p of P reads a `global_batch_size / P` slice.

    Raises:
      DataError: naming `what` (the dataset function), for a split other than train/eval,
        B < 1, p outside [0, P), or B not divisible by P.
    """
    if split not in SPLITS:
        raise DataError(f"{what} split={split!r}; expected one of {SPLITS}")
    if global_batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"{what}: bad batch layout: global_batch_size={global_batch_size}, "
            f"process_index={process_index}, process_count={process_count}"
        )
    if global_batch_size % process_count:
        raise DataError(
            f"{what}: global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}"
        )


def lm_dataset(
    data_config: ml_collections.ConfigDict,
    tokenizer,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    cache_dir: str | os.PathLike,
    data_root: str = "",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The causal-LM dataset of this process: batches of model inputs.

    Args:
      data_config: The `data` section (`default_config()`).
      tokenizer: A `jaxllm.data.tokenizer.Tokenizer`.
      split: "train" (`data_config.sources`; infinite, shuffled by `seed`) or "eval"
        (`data_config.eval_sources`, weights ignored; finite, in order, last batch padded with
        rows of token 0, `segment_ids` 0, `loss_mask` 0).
      global_batch_size: Rows per global batch, B.
      seed: Data-order seed (train).
      cache_dir: Token cache directory (`resolve_cache_dir`).
      data_root: Replaces `{data_root}` in source specs.
      process_index: This process, p.
      process_count: Number of processes, P; B % P == 0.

    Returns:
      A `grain.MapDataset` whose element `s` is this process's slice of global batch `s`: a dict
      of `[B / P, seq_len]` arrays `inputs`, `targets`, `segment_ids`, `positions` (int32) and
      `loss_mask` (float32). `len()` is `sys.maxsize` for train and the number of eval batches
      for eval.

    Raises:
      DataError: bad sources, a split other than train/eval, B not divisible by P, bad
        process index, seq_len < 1, or a corpus shorter than one row.
    """
    check_batch_layout("lm_dataset", split, global_batch_size, process_index, process_count)
    if data_config.seq_len < 1:
        raise DataError(f"data.seq_len={data_config.seq_len} must be >= 1")
    spec = data_config.sources if split == "train" else data_config.eval_sources
    specs = sources.parse_sources(spec, data_root)
    tokenize = functools.partial(
        tokenize_corpus,
        tokenizer=tokenizer,
        cache_dir=cache_dir,
        add_bos=data_config.add_bos,
        add_eos=data_config.add_eos,
        num_threads=data_config.tokenize_threads,
    )
    if split == "eval":
        rows = PackedRows(tokenize(specs), data_config.seq_len, pad_tail=True)
        rows = _PadToMultiple(rows, global_batch_size)
    elif specs[0].weight is None:
        rows = PackedRows(tokenize(specs), data_config.seq_len, seed=seed)
    else:
        parts = [
            PackedRows(tokenize([s]), data_config.seq_len, seed=seed, stream=i)
            for i, s in enumerate(specs)
        ]
        rows = grain.MapDataset.mix(parts, [s.weight for s in specs])
    local = _ProcessSlice(rows, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count).map(to_model_inputs)


def num_eval_batches(dataset: grain.MapDataset) -> int:
    """Number of batches of an eval dataset from `lm_dataset(split="eval")`.

    Raises:
      ValueError: the dataset is infinite (a train dataset).
    """
    # Batching divides an infinite length (sys.maxsize) by the batch size, so look at every node.
    nodes = [dataset]
    while nodes:
        node = nodes.pop()
        if len(node) >= sys.maxsize:
            raise ValueError("num_eval_batches: the dataset is infinite (a train split?)")
        nodes.extend(node.parents)
    return len(dataset)
