"""First-fit packing of variable-length items into fixed rows, as an endless, resumable stream.

Used by SFT (examples into `seq_len + 1`-token rows, `jaxllm.data.sft`) and by reward/DPO data
(preference groups into `[K, seq_len]` rows, `jaxllm.data.preference`). The row layouts of span
corruption (`jaxllm.data.span_corruption`) are here too: `pack_t5` (t5x's packed encoder/decoder
features) and `pack_prefix_lm` (decoder-only prefix-LM rows) with `prefix_lm_attention_mask`.

- **Packing** (`pack_first_fit`). In the given order each item goes into the first row (in order
  of creation) with room for it, or opens a new row; an item is never split; a row may be limited
  to `max_items` items (fixed-size per-item fields).
- **Stream** (`PackedRows`). Train epoch `e` is the packing of the subclass's `epoch_order(e)`;
  epoch `e` has its own number of rows, and row `r` of the infinite stream is found through the
  cumulative row counts, computed lazily epoch by epoch (plans of recent epochs are cached), so
  the stream is a pure function of the order, hence of (seed, index). Eval packs `eval_order()`
  once and is finite.
"""

from __future__ import annotations

import abc
import bisect
import collections
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np

_CACHED_PLANS = 4  # epoch plans kept in memory per dataset
T5_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions", "decoder_input_tokens",
           "decoder_target_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_mask")
PREFIX_LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "prefix_mask")
DECODER_START_ID = 0  # T5 starts decoding from id 0 (pad), HF's `decoder_start_token_id`


def pack_first_fit(
    lengths: Sequence[int] | np.ndarray, capacity: int, max_items: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Packs items, in the given order, first-fit into rows of `capacity` tokens.

    Item `j` goes into the first existing row (in order of creation) whose free space is at least
    `lengths[j]` and that holds fewer than `max_items` items, else into a new row.

    Args:
      lengths: `[n]` item lengths, each in `[1, capacity]`.
      capacity: Tokens per row.
      max_items: Items per row at most (None: no limit).

    Returns:
      `(row_starts [num_rows + 1] int64, members [n] int64)`: row `r` holds the items
      `members[row_starts[r]:row_starts[r+1]]` (indices into `lengths`) in placement order.

    Raises:
      ValueError: an item longer than `capacity` or shorter than 1, or `max_items < 1`.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items={max_items} < 1")
    free = np.empty(len(lengths), np.int64)  # a full row (max_items reached) gets free = -1
    counts = np.zeros(len(lengths), np.int64)
    rows: list[list[int]] = []
    for j, n in enumerate(lengths.tolist()):
        r = int(np.argmax(free[: len(rows)] >= n)) if rows else 0
        if not rows or free[r] < n:
            r = len(rows)
            rows.append([])
            free[r] = capacity
        free[r] -= n
        rows[r].append(j)
        counts[r] += 1
        if max_items is not None and counts[r] >= max_items:
            free[r] = -1
    row_starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=row_starts[1:])
    return row_starts, np.array([j for r in rows for j in r], np.int64)


class PackedRows(grain.MapDataset):
    """Rows of first-fit packed items (module docstring); subclasses say what an item is.

    A subclass calls `__init__` with the item lengths and implements `epoch_order(epoch)` (train:
    `[n]` int64 item ids of one epoch, in order), optionally `eval_order()` (default: every item in
    id order), and `materialize(ids)` (one row's dict of arrays from its item ids).
    """

    def __init__(self, lengths: np.ndarray, capacity: int, *, infinite: bool, max_items: int | None = None):
        """`lengths [num_items]`: tokens per item; `capacity`: tokens per row; `infinite`: the train
        stream (else the finite eval packing, computed here); `max_items`: items per row at most."""
        super().__init__()
        self._lengths = np.asarray(lengths, np.int64)
        self._capacity, self._max_items, self._infinite = int(capacity), max_items, bool(infinite)
        if not self._infinite:
            self._eval_plan = self._pack(np.asarray(self.eval_order(), np.int64))
        self._init_cache()

    # Subclass hooks ------------------------------------------------------------------------------

    @abc.abstractmethod
    def epoch_order(self, epoch: int) -> np.ndarray:
        """`[n]` int64 item ids of train epoch `epoch`, in packing order."""

    def eval_order(self) -> np.ndarray:
        """`[n]` int64 item ids of the finite packing, in order (default: all, by id)."""
        return np.arange(len(self._lengths), dtype=np.int64)

    @abc.abstractmethod
    def materialize(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """One row (a dict of arrays) holding the items `ids`, in order."""

    # Plans ---------------------------------------------------------------------------------------

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._plans: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._epoch_ends: list[int] = []  # cumulative rows at the end of each epoch

    def __getstate__(self):  # for grain's worker processes: locks do not pickle
        state = dict(self.__dict__)
        for k in ("_lock", "_plans", "_epoch_ends"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def _pack(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row_starts, members = pack_first_fit(self._lengths[order], self._capacity, self._max_items)
        return row_starts, order[members]

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`(row_starts [R+1], item_ids [M])` of a train epoch: row r holds the items
        `item_ids[row_starts[r]:row_starts[r+1]]` in order."""
        with self._lock:
            if epoch in self._plans:
                self._plans.move_to_end(epoch)
                return self._plans[epoch]
        plan = self._pack(np.asarray(self.epoch_order(epoch), np.int64))
        with self._lock:
            self._plans[epoch] = plan
            while len(self._plans) > _CACHED_PLANS:
                self._plans.popitem(last=False)
        return plan

    def locate(self, index: int) -> tuple[int, int]:
        """`(epoch, row within the epoch)` of stream index `index` (train)."""
        while not self._epoch_ends or self._epoch_ends[-1] <= index:
            epoch = len(self._epoch_ends)
            rows = len(self.epoch_plan(epoch)[0]) - 1
            with self._lock:
                if len(self._epoch_ends) == epoch:
                    self._epoch_ends.append((self._epoch_ends[-1] if epoch else 0) + rows)
        epoch = bisect.bisect_right(self._epoch_ends, index)
        return epoch, index - (self._epoch_ends[epoch - 1] if epoch else 0)

    def visited(self, num_rows: int) -> np.ndarray:
        """Sorted item ids that train rows `0 .. num_rows - 1` hold (first-fit may put an item
        from late in an epoch's order into an early row, so this reads the epoch plans)."""
        seen, left, epoch = [], int(num_rows), 0
        while left > 0:
            row_starts, ids = self.epoch_plan(epoch)
            take = min(left, len(row_starts) - 1)
            seen.append(ids[: row_starts[take]])
            left, epoch = left - take, epoch + 1
        return np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)

    # Access --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sys.maxsize if self._infinite else len(self._eval_plan[0]) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not self._infinite:
            return self.row(int(index) % len(self))
        epoch, r = self.locate(int(index))
        row_starts, ids = self.epoch_plan(epoch)
        return self.materialize(ids[row_starts[r] : row_starts[r + 1]])

    def row(self, r: int) -> dict[str, np.ndarray]:
        """Row `r` of the eval packing."""
        row_starts, ids = self._eval_plan
        return self.materialize(ids[row_starts[r] : row_starts[r + 1]])


# ---- Span-corruption rows -------------------------------------------------------------------------------------


def pack_t5(pieces: Sequence[tuple[np.ndarray, np.ndarray]], inputs_length: int, targets_length: int
            ) -> dict[str, np.ndarray]:
    """Packs corrupted `(inputs, targets)` pairs into one encoder row and one decoder row.

    Returns t5x's packed features (`T5_KEYS`), each `[length]`: segment `k + 1` holds piece `k`;
    `decoder_input_tokens` are the targets shifted right within each segment, starting from
    `DECODER_START_ID`; `decoder_loss_mask` (float32) is 1 on real target tokens.
    """
    out = {k: np.zeros(inputs_length if k.startswith("encoder") else targets_length,
                       np.float32 if k == "decoder_loss_mask" else np.int32) for k in T5_KEYS}
    e = d = 0
    for k, (inputs, targets) in enumerate(pieces):
        li, lt = len(inputs), len(targets)
        out["encoder_input_tokens"][e:e + li] = inputs
        out["encoder_segment_ids"][e:e + li] = k + 1
        out["encoder_positions"][e:e + li] = np.arange(li)
        out["decoder_target_tokens"][d:d + lt] = targets
        out["decoder_input_tokens"][d:d + lt] = np.concatenate([[DECODER_START_ID], targets[:-1]])
        out["decoder_segment_ids"][d:d + lt] = k + 1
        out["decoder_positions"][d:d + lt] = np.arange(lt)
        out["decoder_loss_mask"][d:d + lt] = 1.0
        e, d = e + li, d + lt
    return out


def pack_prefix_lm(pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Packs `(inputs, targets)` pairs as decoder-only prefix-LM rows (`PREFIX_LM_KEYS`, `[seq_len]`).

    Piece `k` is `inputs ++ targets` in segment `k + 1`; the row of `seq_len + 1` tokens is shifted
    by one as in `lm.to_model_inputs`. `prefix_mask` is 1 on input positions holding a corrupted-input
    token (bidirectional); `loss_mask` is 1 where the target is a target-side token of the same piece.
    """
    tokens = np.zeros(seq_len + 1, np.int32)
    seg = np.zeros(seq_len + 1, np.int32)
    pos = np.zeros(seq_len + 1, np.int32)
    is_target = np.zeros(seq_len + 1, bool)
    i = 0
    for k, (inputs, targets) in enumerate(pieces):
        n = len(inputs) + len(targets)
        tokens[i:i + n] = np.concatenate([inputs, targets])
        seg[i:i + n], pos[i:i + n] = k + 1, np.arange(n)
        is_target[i + len(inputs):i + n] = True
        i += n
    same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    return {
        "inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
        "loss_mask": (same & is_target[1:]).astype(np.float32),
        "prefix_mask": ((seg[:-1] > 0) & ~is_target[:-1]).astype(np.int32),
    }


def prefix_lm_attention_mask(segment_ids: np.ndarray, prefix_mask: np.ndarray) -> np.ndarray:
    """The attention a decoder-only model must use on `format="prefix_lm"` batches.

    `mask[b, i, j] = seg[b, i] == seg[b, j] and (j <= i or (prefix[b, i] and prefix[b, j]))`:
    bidirectional inside each piece's prefix (its corrupted inputs), causal elsewhere, never across
    pieces (Raffel et al. 2020, section 3.2.1, "causal with prefix"; UL2 section 3.1.2). Padding
    (segment 0) attends causally to padding. Works on NumPy or JAX arrays.

    Args:
      segment_ids: `[batch, length]` int.
      prefix_mask: `[batch, length]` int or bool.

    Returns:
      bool `[batch, length, length]`.
    """
    length = segment_ids.shape[-1]
    idx = np.arange(length)
    causal = idx[None, :] <= idx[:, None]
    prefix = prefix_mask.astype(bool)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & (causal[None] | (prefix[:, :, None] & prefix[:, None, :]))
