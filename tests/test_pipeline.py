"""The main job end to end: `jaxllm pipeline` and `jaxllm eval` on `tests/configs/small_pipeline.py`.

Acceptance points of the pipeline issue pinned here:
- the pipeline runs tokenizer -> pretrain -> sft -> reward -> ppo and dpo -> eval in one run
  directory and writes `report.md` / `report.json` with every section;
- rerunning skips finished stages;
- killing the pipeline (`kill -9`) during each stage in turn and rerunning finishes with the same
  report, to the last digit, as an uninterrupted run;
- at the first PPO minibatch the importance ratio is exactly 1 and `policy/approxkl`,
  `policy/clipfrac` are exactly 0 (one epoch of one minibatch: every update is a first one).

Each command runs in a subprocess on one CPU device, sharing a persistent compilation cache.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import describe, subprocess_env
except ImportError:
    from test_cli import describe, subprocess_env

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "tests" / "configs" / "small_pipeline.py")
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")
PPO_METRICS = ("objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward",
               "objective/entropy", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
               "val/clipfrac", "val/var_explained", "completions/mean_length", "completions/missing_eos_rate")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


def command(run_dir: pathlib.Path, *overrides) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", "pipeline", "--config", CONFIG, f"--config.run_dir={run_dir}",
            *overrides]


def run_pipeline(env, run_dir: pathlib.Path, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, *overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, describe(proc)
    return proc


def ppo_rows(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


def read_report(run_dir: pathlib.Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted pipeline run: (run_dir, report)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_pipeline(env, run_dir)
    return run_dir, read_report(run_dir)


def test_report_has_every_section(reference):
    run_dir, report = reference
    assert set(report["stages"]) == set(STAGES)
    for stage in STAGES:
        assert (run_dir / stage / "params").is_dir() and (run_dir / stage / "done.json").exists()
        assert report["stages"][stage]["step"] > 0
    assert set(report["policies"]) == {"sft", "ppo", "dpo"}
    sft = report["policies"]["sft"]
    assert sft["win_rate_vs_sft"] == 0.5 and sft["kl_to_sft"] == 0.0  # SFT against itself: all ties
    for policy in report["policies"].values():
        assert policy["prompts"] == 8
        assert 0.0 <= policy["missing_eos_rate"] <= 1.0 and 0 < policy["mean_length"] <= 8
    assert 0.0 <= report["reward_model"]["held-out"] <= 1.0
    assert len(report["samples"]) == 2 and set(report["samples"][0]) == {"prompt", "sft", "ppo", "dpo"}
    md = (run_dir / "report.md").read_text()
    for policy in ("sft", "ppo", "dpo"):
        assert f"| {policy} | " in md
    rows = ppo_rows(run_dir)
    assert all(name in rows[-1] for name in PPO_METRICS), sorted(rows[-1])
    assert "loss/ptx" in rows[-1]  # the pretraining mix is on in this config


def test_rerun_skips_finished_stages(env, reference):
    run_dir, report = reference
    before = {stage: (run_dir / stage / "done.json").stat().st_mtime_ns for stage in STAGES}
    proc = run_pipeline(env, run_dir)
    for stage in STAGES:
        assert f"{stage} already finished" in proc.stderr
        assert (run_dir / stage / "done.json").stat().st_mtime_ns == before[stage]
    assert read_report(run_dir) == report


def train_steps(run_dir: pathlib.Path, stage: str) -> list[int]:
    path = run_dir / stage / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a half-written last line
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def kill_during(env, run_dir: pathlib.Path, stage: str, after_step: int, log) -> None:
    """Starts the pipeline and `kill -9`s it once `stage` has logged `after_step` (before it ends)."""
    proc = subprocess.Popen(command(run_dir), cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"pipeline ended (exit {proc.returncode}) before {stage} step {after_step}")
            if max(train_steps(run_dir, stage), default=0) >= after_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                assert not (run_dir / stage / "done.json").exists(), f"{stage} finished before the kill"
                return
            time.sleep(0.005)
        pytest.fail(f"{stage} did not reach step {after_step} in time")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill9_in_every_stage_then_rerun_gives_the_same_report(env, reference, tmp_path):
    """kill -9 after the first checkpoint of each stage (every 2 steps), rerun, repeat, finish."""
    _, expected = reference
    run_dir = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        for stage in STAGES:
            kill_during(env, run_dir, stage, after_step=3, log=log)
    run_pipeline(env, run_dir)
    assert read_report(run_dir) == expected


def test_first_ppo_minibatch_has_ratio_one(env, reference, tmp_path):
    """PPO with one epoch of one minibatch: every update's minibatch is the rollout batch under
    the rollout's own params, so the mean ratio is exactly 1 and clipfrac exactly 0.

    approxkl is 0 up to the last bit of float32: the training forward is compiled inside the
    gradient computation, where XLA picks other layouts and fusions than for the scoring pass, and
    about one token in ten differs by one ulp (measured: approxkl 2.5e-14, an RMS log-ratio of
    2.2e-7, one ulp of a log-prob near -6 being 4.8e-7). One ulp on every token of log-probs above
    -16 (ulp 1.9e-6) bounds approxkl = mean(log_ratio^2 / 2) by 1.8e-12.

    Old and new log-probs both come from `ppo.response_logprobs`, so this cannot see a misaligned
    token or a temperature mismatch; `test_ppo_rewards.py::
    test_response_logprobs_equal_the_samplers_and_a_float64_forward` pins those against the
    sampler's own log-probs and a float64 forward.
    """
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("ppo", "report.*"))
    run_pipeline(env, run_dir, "--config.stages=('ppo',)", "--config.ppo.ppo.epochs=1",
                 "--config.ppo.ppo.minibatches=1")
    rows = ppo_rows(run_dir)
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 4
    for row in rows:
        assert row["policy/ratio"] == 1.0, row
        assert row["policy/clipfrac"] == 0.0 and row["policy/approxkl"] < 1.8e-12, row


def test_ppo_with_llama2_combined_reward(env, reference, tmp_path):
    """Llama-2's R_c through the PPO stage: a second frozen reward model from its own stage, the
    prompts tagged as safety prompts by file. With the safety model a copy of the reward model, every
    row is scored by it and the first iteration (same params, same rollout) scores as the reference."""
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("ppo", "report.*"))
    shutil.copytree(run_dir / "reward", run_dir / "reward_safety")
    run_pipeline(env, run_dir, "--config.stages=('ppo',)", "--config.ppo.safety_reward_from=reward_safety",
                 "--config.ppo.prompts.safety_sources=jsonl:{run_dir}/data/stdlib/prompts/train.jsonl")
    rows, ref_rows = ([r for r in ppo_rows(d) if "loss" in r] for d in (run_dir, ref_dir))
    assert len(rows) == len(ref_rows) == 4
    assert all(r["objective/safety_reward_rate"] == 1.0 for r in rows), rows
    assert rows[0]["objective/scores"] == pytest.approx(ref_rows[0]["objective/scores"], rel=1e-5, abs=1e-6)


def test_eval_command_rewrites_the_report(env, reference, tmp_path):
    ref_dir, expected = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("report.*"))
    proc = subprocess.run([sys.executable, "-m", "jaxllm.cli", "eval", "--run", str(run_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert read_report(run_dir) == expected  # the run's own eval settings, from pipeline_config.json
    assert "| ppo | " in proc.stdout


def test_unknown_stage_is_one_clear_error(env, tmp_path):
    proc = subprocess.run(command(tmp_path / "run", "--config.stages=('pretrain','rlhf')"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, describe(proc)
    assert "rlhf" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "pretrain")


def test_stage_summary_keeps_the_step0_baseline(tmp_path):
    """`train.eval_at_start` rows (step 0) become the stage's `eval_at_start` and a report line."""
    from jaxllm import evaluation

    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/loss": 5.0}, {"step": 1, "loss": 4.5, "tokens_per_second": 9.0},
            {"step": 2, "loss": 4.0}, {"step": 2, "eval/loss": 4.25}]
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluation.stage_summary(stage_dir)
    assert summary == {"step": 2, "train": {"loss": 4.0}, "eval": {"eval/loss": 4.25},
                       "eval_at_start": {"eval/loss": 5.0}}
    evaluation.write_report({"stages": {"sft": summary}}, tmp_path / "run")
    text = (tmp_path / "run" / "report.md").read_text()
    assert "- **sft** (step 2): eval/loss=4.2500, loss=4.0000\n  - at step 0: eval/loss=5.0000" in text
    # Without a step-0 row there is no baseline line.
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert "eval_at_start" not in evaluation.stage_summary(stage_dir)
