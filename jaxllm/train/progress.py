"""The training loop's progress display: a tqdm bar on a terminal or in a notebook, plain lines in logs.

A bar redrawn with a carriage return at every step is right on a terminal and wrong in a log file
(a Cloud TPU pod's or a SLURM job's captured stderr), where every redraw piles up on one line.
`progress_bar` picks, for the stream it draws on (default stderr):

- in a Jupyter notebook (an IPython kernel with ipywidgets): tqdm's widget bar (`tqdm.auto`);
- on a terminal: tqdm's text bar;
- otherwise: `LineProgress`, one plain line per log interval (`train.log_every` steps), e.g.
  `sft: step 20/80 (25%) loss=4.623 tokens_per_second=6118 | 12 s, 1.58 steps/s, ~38 s left`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

import tqdm.auto
import tqdm.autonotebook
import tqdm.std


class LineProgress:
    """The part of tqdm's interface the training loop uses, printed as plain lines.

    `set_postfix` (the loop calls it once per `train.log_every` steps, with the row's loss and
    tokens/s) prints one line to the stream; `update` only counts steps. No carriage returns.
    """

    def __init__(self, total: int, initial: int, desc: str, stream: TextIO):
        self.n, self.total, self.desc, self.stream = initial, total, desc, stream
        self._start, self._start_n = time.perf_counter(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        """Prints `desc: step n/total (p%) key=value ... | elapsed s, steps/s, ~s left`."""
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        left = f", ~{(self.total - self.n) / rate:.0f} s left" if rate > 0 and self.n < self.total else ""
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        print(f"{self.desc}: step {self.n}/{self.total}{percent} {shown} | {elapsed:.0f} s, {rate:.2f} steps/s{left}",
              file=self.stream, flush=True)

    @staticmethod
    def write(text: str) -> None:
        """A line of its own on stdout, where `tqdm.write` prints it."""
        print(text, flush=True)

    def close(self) -> None:
        self.stream.flush()


def progress_bar(*, total: int, initial: int, desc: str, disable: bool = False, stream: TextIO | None = None):
    """A progress display of `total` steps starting at `initial` (see the module docstring).

    Returns:
      A `tqdm.auto.tqdm` (also when `disable`: tqdm's no-op) or a `LineProgress`; both have
      `update`, `set_postfix`, `write` and `close`.
    """
    stream = sys.stderr if stream is None else stream
    in_notebook = tqdm.autonotebook.tqdm is not tqdm.std.tqdm  # an IPython kernel with ipywidgets
    isatty = getattr(stream, "isatty", None)
    if disable or in_notebook or (isatty is not None and isatty()):
        file = {} if stream is sys.stderr else {"file": stream}  # the notebook bar chooses its own default
        return tqdm.auto.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=disable, **file)
    return LineProgress(total, initial, desc, stream)
