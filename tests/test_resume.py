"""Preemption and crash recovery of `jaxllm pretrain` (the acceptance test of resuming):

"Stop a run at step k, and separately `kill -9` it between checkpoints; restarting reproduces the
uninterrupted loss trajectory exactly on CPU, with no example skipped or seen twice."

Every run is a subprocess on one CPU device with tests/configs/small.py (12 steps, a metrics row
per step, an evaluation every 3 steps, a checkpoint every 4). An uninterrupted reference run gives
the trajectory; interrupted runs are restarted to completion and compared row by row with `==`.
To land a signal mid-run despite ~10 ms steps, the watcher freezes the process with SIGSTOP as soon
as `metrics.jsonl` shows the wanted step, checks where it stands, then signals it.
"""

import hashlib
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import SMALL, describe, subprocess_env, write_corpus
except ImportError:
    from test_cli import SMALL, describe, subprocess_env, write_corpus

from jaxllm.cli import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

# Metrics that depend on wall time; every other value must be reproduced exactly.
TIMING_KEYS = ("tokens_per_second", "mfu")
POLL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def small_config():
    from jaxllm import config as config_lib

    c = config_lib.load_config_file(SMALL)
    # The windows these tests aim signals at.
    assert c.train.log_every == 1 and c.checkpoint.every_minutes == 0
    assert c.train.steps >= 3 * c.checkpoint.every_steps > 0
    return c


def command(corpus, run_dir, *overrides):
    return [sys.executable, "-m", "jaxllm.cli", "pretrain", "--config", SMALL,
            f"--config.data_root={corpus}", f"--config.run_dir={run_dir}", *overrides]


def run_to_completion(env, corpus, run_dir, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(corpus, run_dir, *overrides), cwd=run_dir.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    return proc


def read_rows(run_dir: pathlib.Path, stage: str = "pretrain", *, strict: bool = True) -> list[dict]:
    """Rows of `stage`'s metrics.jsonl; with `strict=False` a half-written last line is ignored."""
    path = run_dir / stage / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise
    return rows


def last_train_step(run_dir: pathlib.Path) -> int:
    steps = [r["step"] for r in read_rows(run_dir, strict=False) if "loss" in r]
    return max(steps, default=0)


def committed_checkpoints(run_dir: pathlib.Path) -> list[int]:
    """Steps of complete checkpoints (orbax renames `<step>.orbax-checkpoint-tmp*` when done)."""
    directory = run_dir / "pretrain" / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def trajectory(rows: list[dict]) -> list[dict]:
    """The rows without wall-time metrics."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def freeze_when(proc: subprocess.Popen, run_dir: pathlib.Path, wanted) -> int:
    """Stops `proc` (SIGSTOP) once `wanted(last_train_step)` holds; returns that step.

    The check is repeated after stopping, since the process may have moved on in between; if the
    step no longer qualifies the process is continued and the watch goes on.
    """
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before the wanted step; last step "
                        f"{last_train_step(run_dir)}\n{stderr_of(run_dir)[-4000:]}")
        if wanted(last_train_step(run_dir)):
            proc.send_signal(signal.SIGSTOP)
            wait_stopped(proc.pid)
            step = last_train_step(run_dir)
            if wanted(step):
                return step
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no wanted step within {POLL_TIMEOUT_S} s; last step {last_train_step(run_dir)}")


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Waits until the kernel reports `pid` stopped, so that it writes nothing more."""
    stat = pathlib.Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            time.sleep(0.05)  # no procfs: give the signal time to land
            return
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    pytest.fail(f"process {pid} did not stop within {timeout} s")


def start(env, corpus, run_dir, *overrides) -> subprocess.Popen:
    """Starts a run in the background; its output goes to `run_dir/../{stdout,stderr}.txt`
    (files, not pipes: nobody reads while it runs)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "stdout.txt", "w") as out, open(run_dir.parent / "stderr.txt", "w") as err:
        return subprocess.Popen(command(corpus, run_dir, *overrides), cwd=run_dir.parent, env=env,
                                stdout=out, stderr=err)


def stderr_of(run_dir: pathlib.Path) -> str:
    return (run_dir.parent / "stderr.txt").read_text()


def assert_one_row_per_step(rows: list[dict], config) -> None:
    tc = config.train
    train_steps = [r["step"] for r in rows if "loss" in r]
    eval_steps = [r["step"] for r in rows if "eval/loss" in r]
    assert train_steps == list(range(1, tc.steps + 1)), train_steps
    assert eval_steps == sorted(set(range(tc.eval_every, tc.steps, tc.eval_every)) | {tc.steps}), eval_steps


@pytest.fixture(scope="module")
def reference(env, corpus, small_config, tmp_path_factory):
    """The uninterrupted run: (run_dir, rows of metrics.jsonl)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_completion(env, corpus, run_dir)
    rows = read_rows(run_dir)
    assert_one_row_per_step(rows, small_config)
    losses = [r["loss"] for r in rows if "loss" in r]
    # Consecutive steps see different batches (and weights), so their losses differ: a resumed
    # run that skipped or repeated a batch could not reproduce the trajectory.
    assert all(a != b for a, b in zip(losses, losses[1:])), losses
    return run_dir, rows


# ---------------------------------------------------------------------------------------------
# Data: the iterator position saved in a checkpoint continues the stream exactly
# ---------------------------------------------------------------------------------------------


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode())
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()


def train_dataset(run_dir: pathlib.Path):
    """The run's training dataset, rebuilt from its saved config and tokenizer."""
    from jaxllm import config as config_lib
    from jaxllm.data import lm
    from jaxllm.data import tokenizer as tokenizer_lib

    config = config_lib.load_json(run_dir / "pretrain" / "config.json")
    tok = tokenizer_lib.Tokenizer.load(config_lib.tokenizer_dir(run_dir) / "tokenizer.model")
    return lm.lm_dataset(config.data, tok, split="train", global_batch_size=config.train.batch_size,
                         seed=config.seed, cache_dir=lm.resolve_cache_dir(config.data, run_dir),
                         data_root=config.data_root)


def assert_data_resumes_exactly(run_dir: pathlib.Path, step: int, total_steps: int) -> None:
    """Batches read before checkpoint `step` + batches after restoring its saved iterator state
    == the batches of an uninterrupted pass: none skipped, none repeated."""
    import grain

    dataset = train_dataset(run_dir)
    reference = [batch_digest(dataset[i]) for i in range(total_steps)]
    assert len(set(reference)) == total_steps  # every step has its own batch

    state_file = run_dir / "pretrain" / "checkpoints" / str(step) / "data" / "process_0-of-1.json"
    state = json.loads(state_file.read_text())
    before = iter(dataset.to_iter_dataset())
    consumed = [batch_digest(next(before)) for _ in range(step)]
    resumed = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    resumed.set_state(state)
    consumed += [batch_digest(next(resumed)) for _ in range(total_steps - step)]
    assert consumed == reference, f"checkpoint {step}: saved iterator state {state}"


# ---------------------------------------------------------------------------------------------
# SIGTERM: preemption saves the step reached and exits 143
# ---------------------------------------------------------------------------------------------


def test_sigterm_then_resume_reproduces_trajectory(env, corpus, small_config, reference, tmp_path):
    _, ref_rows = reference
    total, every = small_config.train.steps, small_config.checkpoint.every_steps
    run_dir = tmp_path / "run"
    proc = start(env, corpus, run_dir)
    try:
        # Past the first checkpoint and well before the end.
        reached = freeze_when(proc, run_dir, lambda s: every < s < total - 2)
        proc.send_signal(signal.SIGTERM)  # delivered when the process continues
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr_of(run_dir)
    assert EXIT_PREEMPTED == 128 + signal.SIGTERM  # the shell's convention for "killed by SIGTERM"
    assert proc.returncode == EXIT_PREEMPTED, f"exit {proc.returncode}\n{err[-6000:]}"
    assert "Traceback" not in err

    # It saved a checkpoint at the step it stopped at (the step in progress when signalled).
    rows = read_rows(run_dir)
    stopped = max(r["step"] for r in rows if "loss" in r)
    assert reached <= stopped < total
    checkpoints = committed_checkpoints(run_dir)
    assert checkpoints[-1] == stopped, (checkpoints, stopped)
    assert f"stopped by SIGTERM at step {stopped}" in err
    assert not (run_dir / "pretrain" / "params").exists()  # unfinished: nothing handed on

    assert_data_resumes_exactly(run_dir, stopped, total)

    run_to_completion(env, corpus, run_dir)
    resumed = read_rows(run_dir)
    assert_one_row_per_step(resumed, small_config)
    assert trajectory(resumed) == trajectory(ref_rows)
    assert (run_dir / "pretrain" / "params").is_dir()


# ---------------------------------------------------------------------------------------------
# kill -9 between checkpoints
# ---------------------------------------------------------------------------------------------


def in_flight_checkpoints(run_dir: pathlib.Path) -> list[str]:
    directory = run_dir / "pretrain" / "checkpoints"
    return sorted(p.name for p in directory.iterdir() if not p.name.isdigit()) if directory.is_dir() else []


def test_kill9_between_checkpoints_then_resume(env, corpus, small_config, reference, tmp_path):
    _, ref_rows = reference
    total, every = small_config.train.steps, small_config.checkpoint.every_steps
    assert small_config.checkpoint.async_save  # the default: saves finish in the background
    run_dir = tmp_path / "run"
    proc = start(env, corpus, run_dir)
    try:
        # A step past the second checkpoint step that is not itself a checkpoint step. The save
        # at `2 * every` waited for the one at `every`, so at least that one is complete; the
        # later one may still be in flight (then the restart goes back to `every`).
        killed_at = freeze_when(proc, run_dir, lambda s: 2 * every < s < total and s % every)
        checkpoints = committed_checkpoints(run_dir)
        in_flight = in_flight_checkpoints(run_dir)
        proc.kill()  # SIGKILL: no handler, no final save
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # Rows killed_at - checkpoints[-1] steps past the latest complete checkpoint must go.
    assert checkpoints and every in checkpoints and checkpoints[-1] < killed_at, (checkpoints, in_flight)

    proc = run_to_completion(env, corpus, run_dir)
    assert f"resuming pretrain from step {checkpoints[-1]}" in proc.stderr, (checkpoints, in_flight)
    resumed = read_rows(run_dir)
    assert_one_row_per_step(resumed, small_config)  # the stale rows were truncated
    assert trajectory(resumed) == trajectory(ref_rows)
    assert in_flight_checkpoints(run_dir) == []  # a half-written save was cleaned up
    for step in committed_checkpoints(run_dir):
        assert_data_resumes_exactly(run_dir, step, total)


def test_kill9_before_first_checkpoint_then_restart(env, corpus, small_config, reference, tmp_path):
    """No checkpoint yet: the restart begins at step 0 and the killed run's rows are dropped.

    With `train.eval_at_start` both runs evaluate the initial params; the file keeps one step-0 row.
    """
    _, ref_rows = reference
    total = small_config.train.steps
    run_dir = tmp_path / "run"
    # Step-based saves off: the only checkpoint is the final one, so any kill lands before it.
    overrides = ("--config.checkpoint.every_steps=0", "--config.train.eval_at_start=True")
    proc = start(env, corpus, run_dir, *overrides)
    try:
        freeze_when(proc, run_dir, lambda s: 2 <= s < total)
        assert committed_checkpoints(run_dir) == []
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    run_to_completion(env, corpus, run_dir, *overrides)
    resumed = read_rows(run_dir)
    start_rows = [r for r in resumed if r["step"] == 0]
    assert len(start_rows) == 1 and set(start_rows[0]) >= {"eval/loss", "eval/perplexity"}, start_rows
    # Random init: the initial held-out loss is above the trained model's.
    assert start_rows[0]["eval/loss"] > [r for r in resumed if "eval/loss" in r][-1]["eval/loss"]
    resumed = [r for r in resumed if r["step"] > 0]
    assert_one_row_per_step(resumed, small_config)
    assert trajectory(resumed) == trajectory(ref_rows)
    assert committed_checkpoints(run_dir) == [total]
