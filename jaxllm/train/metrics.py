"""Metric writers (metrics.jsonl, TensorBoard) and model-FLOPs utilisation.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step, e.g.
`{"step": 100, "loss": 2.31, "learning_rate": 0.001, "grad_norm": 0.8, "nonfinite_steps": 0.0,
"tokens_per_second": 9.1e3, "mfu": 0.41}`; evaluation rows carry `eval/loss`, `eval/perplexity`.
The file is strict JSON: a NaN or infinite value is written as `null` (TensorBoard gets the float).
`nonfinite_steps` counts the steps of the row's window that were skipped (see `jaxllm.train.loop`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from jaxllm import fs

# Dense bf16 peak FLOP/s per chip from the vendors' datasheets (no sparsity).
PUBLISHED_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e / Trillium
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peak_flops(size: int = 2048, repeats: int = 3) -> float:
    """Best float32 matmul throughput of this machine (FLOP/s), measured with NumPy's BLAS.

    ../shared/docs/cpu-notes.md: on the 2-core CI machines NumPy ~275 GFLOP/s, torch/MKL ~282 and
    XLA ~242 at 2048^2; the best library's number is the machine's peak.
    """
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a @ a  # warm up the BLAS threads
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of all devices of this job and where the number comes from.

    `override` (config `train.peak_flops_per_device`) wins; on CPU the machine's measured matmul
    peak is used once for all (fake) devices, which share the same cores; accelerators use
    `PUBLISHED_PEAK_FLOPS` times the device count.
    """
    devices = jax.devices()
    if override > 0:
        return override * len(devices), "config"
    if devices[0].platform == "cpu":
        return measured_cpu_peak_flops(), "measured numpy f32 matmul"
    kind = devices[0].device_kind
    for name, flops in PUBLISHED_PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * len(devices), f"published {name}"
    return 0.0, f"unknown device {kind}"


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float (in nested dicts and lists) replaced by None, so
    `json.dumps` writes strict JSON (`null`) instead of the bare `NaN` / `Infinity` it allows."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class MetricWriter:
    """Writes scalar metrics to `metrics.jsonl` and TensorBoard event files in `directory`."""

    def __init__(self, directory: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.directory = fs.path(directory)
        self._tb = None
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(self.directory), flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (floats) at `step`: one line appended to `metrics.jsonl` (on Cloud
        Storage, which cannot append, the object is rewritten: see `fs.append_text`)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in scalars.items():
            value = float(value)
            row[key] = value
            self._tb.add_scalar(key, value, step)
        fs.append_text(self.directory / "metrics.jsonl", json.dumps(finite_or_none(row), allow_nan=False) + "\n")

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self.enabled:
            self._tb.close()


def truncate_metrics(directory: str | os.PathLike, last_step: int) -> None:
    """Drops rows after `last_step` from `metrics.jsonl` (a resumed run rewrites them).

    After a crash between checkpoints the file holds steps that will be trained again; removing
    them keeps one row per step, so the file shows the trajectory of the finished run. The file is
    replaced atomically: a crash during the rewrite leaves the old one.
    """
    path = fs.path(directory) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            logging.warning("dropping a damaged line from %s", path)
    fs.write_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(directory: str | os.PathLike) -> list[dict]:
    """All rows of `directory/metrics.jsonl`."""
    path = fs.path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
