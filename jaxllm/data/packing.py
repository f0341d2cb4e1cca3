"""First-fit packing of variable-length items into fixed rows, as an endless, resumable stream.

Used by SFT (examples into `seq_len + 1`-token rows, `jaxllm.data.sft`) and by reward/DPO data
(preference groups into `[K, seq_len]` rows, `jaxllm.data.preference`).

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
