"""`jaxllm plot` and the report's training curves (`jaxllm.evaluation.plots`) on a hand-written run."""

import json
import math
import pathlib
import re

import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from jaxllm import cli
from jaxllm import evaluation
from jaxllm.evaluation import plots

ALL_FAMILIES = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "reward_model", "ppo_reward", "ppo_kl",
                "dpo"]


def lm_rows(steps, lr_peak):
    rows = []
    for s in steps:
        rows.append({"step": s, "loss": 8.0 / (1 + 0.05 * s), "learning_rate": lr_peak * min(1.0, s / 20) * 0.99 ** s,
                     "grad_norm": 3.0 / (1 + 0.1 * s), "nonfinite_steps": 0.0, "tokens_per_second": 5000.0 + 10 * s})
        if s % 50 == 0:
            rows.append({"step": s, "eval/loss": 8.2 / (1 + 0.05 * s), "eval/perplexity": 100.0})
    return rows


def run_rows() -> dict[str, list[dict]]:
    """Rows of each stage as `metrics.jsonl` holds them (names of the stage modules; null = non-finite)."""
    pretrain = lm_rows(range(10, 210, 10), 2e-3)
    pretrain[3]["loss"] = None  # a window of skipped steps: a gap in the curve
    reward = [{"step": s, "loss": 0.69 - 0.001 * s, "accuracy": 0.5 + 0.004 * s, "margin": 0.01 * s,
               "learning_rate": 1e-4, "grad_norm": 1.0, "tokens_per_second": 7000.0} for s in range(10, 90, 10)]
    reward.append({"step": 80, "eval/loss": 0.6, "eval/accuracy": 0.8, "eval/margin": 0.7})
    ppo = [{"step": s, "loss": 0.01 - 0.001 * s, "learning_rate": 2e-5 * s / 12, "grad_norm": 1.4,
            "objective/kl": 0.02 * s, "objective/kl_coef": 0.05 + 0.001 * s, "objective/scores": -0.9 + 0.05 * s,
            "objective/rlhf_reward": -0.9 + 0.04 * s, **({"tokens_per_second": 1800.0} if s > 1 else {})}
           for s in range(1, 13)]
    dpo = [{"step": s, "loss": 0.69 - 0.002 * s, "rewards/margins": 0.01 * s, "rewards/accuracies": 0.5 + 0.005 * s,
            "rewards/chosen": 0.0, "rewards/rejected": -0.01 * s, "learning_rate": 5e-5, "grad_norm": 7.0,
            "tokens_per_second": 6000.0} for s in range(10, 70, 10)]
    dpo.append({"step": 60, "eval/loss": 0.6, "eval/rewards/margins": 0.5, "eval/rewards/accuracies": 0.7})
    return {"pretrain": pretrain, "sft": lm_rows(range(10, 90, 10), 5e-4), "reward": reward, "ppo": ppo, "dpo": dpo}


def write_run(root: pathlib.Path, rows=None) -> pathlib.Path:
    for stage, stage_rows in (rows or run_rows()).items():
        (root / stage).mkdir(parents=True)
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage_rows))
    return root


@pytest.fixture
def run(tmp_path) -> pathlib.Path:
    return write_run(tmp_path / "run")


def plot_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """`jaxllm plot ARGS` in this process: exit status, stdout, stderr lines (log lines left out)."""
    code = cli.main(["plot", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip() and " INFO " not in line]


def has_colour(image: np.ndarray, colour: str, min_pixels: int = 200) -> bool:
    """Whether `image` (RGBA floats) has at least `min_pixels` pixels of `colour` (a line of that stage)."""
    rgb = np.asarray(mcolors.to_rgb(colour))
    return int(np.sum(np.all(np.abs(image[..., :3] - rgb) < 0.02, axis=-1))) >= min_pixels


def test_plot_writes_one_readable_png_per_family(run, capsys):
    code, out, err = plot_cli(capsys, "--run", run)
    assert code == 0 and err == [], err
    files = [run / "plots" / f"{name}.png" for name in ALL_FAMILIES]
    assert out == "wrote 8 plots: " + " ".join(map(str, files)) + "\n"
    for path in files:
        image = mimage.imread(path)
        assert image.shape[1] >= 800, (path, image.shape)
        ink = np.any(image[..., :3] < 0.9, axis=-1).mean()  # not a blank page: axes, labels and curves
        assert 0.01 < ink < 0.5, (path, ink)
    # Each stage keeps its colour, so stages are told apart in every figure.
    loss = mimage.imread(run / "plots" / "loss.png")
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
        assert has_colour(loss, plots.STAGE_COLOURS[stage]), stage
    assert not has_colour(mimage.imread(run / "plots" / "dpo.png"), plots.STAGE_COLOURS["pretrain"])


def test_stage_and_output_select_what_is_drawn_and_where(run, tmp_path, capsys):
    out_dir = tmp_path / "figures"
    code, out, err = plot_cli(capsys, "--run", run, "--stage", "sft", "--output", out_dir)
    assert code == 0 and err == [], err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{n}.png" for n in ("loss", "learning_rate", "grad_norm", "tokens_per_second"))
    assert not (run / "plots").exists()
    loss = mimage.imread(out_dir / "loss.png")
    assert has_colour(loss, plots.STAGE_COLOURS["sft"]) and not has_colour(loss, plots.STAGE_COLOURS["pretrain"])


def test_report_embeds_every_plot_with_links_that_resolve(run):
    evaluation.write_report({"stages": {"sft": {"step": 80, "train": {"loss": 4.0}}}}, run)
    text = (run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert links == [f"plots/{name}.png" for name in ALL_FAMILIES]
    assert all((run / link).is_file() for link in links)
    assert "## Training curves" in text


def test_report_without_metrics_has_no_curves(tmp_path):
    evaluation.write_report({"stages": {}}, tmp_path)
    assert "](plots/" not in (tmp_path / "report.md").read_text() and not (tmp_path / "plots").exists()


def test_run_without_metrics_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run" / "sft").mkdir(parents=True)  # a stage folder, no metrics.jsonl
    code, out, err = plot_cli(capsys, "--run", tmp_path / "run")
    assert code == 2 and out == ""
    assert err == [f"jaxllm plot: error: no metrics to plot in {tmp_path / 'run'}: "
                   "no <stage>/metrics.jsonl with a valid row"]
    code, _, err = plot_cli(capsys, "--run", tmp_path / "missing")
    assert code == 2 and err == [f"jaxllm plot: error: {tmp_path / 'missing'} is not a run directory"]


def test_unknown_stage_is_one_error_line(run, capsys):
    code, out, err = plot_cli(capsys, "--run", run, "--stage", "grpo")
    assert code == 2 and out == ""
    assert err == [f"jaxllm plot: error: stage 'grpo' has no metrics in {run}; "
                   "stages with metrics: pretrain, sft, reward, ppo, dpo"]
    assert not (run / "plots").exists()


def test_truncated_last_line_is_skipped_and_reported(run, capsys):
    path = run / "sft" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # a crash mid-write
    code, out, err = plot_cli(capsys, "--run", run, "--stage", "sft")
    assert code == 0 and out.startswith("wrote 4 plots: ")
    n = len(lines)
    assert err == [f"jaxllm plot: warning: {path}: skipped 1 of {n} lines that are not JSON metric rows "
                   f"(line {n}); plotted the other {n - 1}"]
    assert [r["step"] for r in plots.read_stage(path, "sft").rows] == [r["step"] for r in run_rows()["sft"][:-1]]


def test_only_garbled_lines_is_the_no_metrics_error(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"sft": []})
    (run / "sft" / "metrics.jsonl").write_text('{"step": 10, "lo\n[1, 2]\n{"loss": 1.0}\n')
    code, _, err = plot_cli(capsys, "--run", run)
    assert code == 2
    assert err == [f"jaxllm plot: error: no metrics to plot in {run}: no <stage>/metrics.jsonl with a valid row; "
                   f"{run / 'sft' / 'metrics.jsonl'} has 3 lines that are not JSON metric rows"]


def test_null_is_a_gap_and_wide_ranges_get_a_log_axis():
    steps, values = plots.series([{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}, {"step": 3}], "loss")
    assert steps == [1, 2] and values[0] == 2.0 and math.isnan(values[1])
    curve = lambda *v: ("sft", "k", list(range(len(v))), list(v))  # noqa: E731
    assert plots._use_log([curve(0.0, 2e-3), curve(1e-5, math.nan)])  # learning rates over 2 decades
    assert not plots._use_log([curve(0.69, 0.70), curve(0.6, 7.0)])  # < 100x
    assert not plots._use_log([curve(-1e-3, 1.0)])  # a sign change cannot go on a log axis


def test_a_stage_folder_of_another_name_is_drawn_in_a_colour_of_its_own(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"sft": run_rows()["sft"], "grpo": run_rows()["dpo"]})
    code, out, err = plot_cli(capsys, "--run", run)
    assert code == 0 and err == [], err
    assert out.startswith("wrote 5 plots: ")  # loss, learning rate, grad norm, tokens/s, dpo
    loss = mimage.imread(run / "plots" / "loss.png")
    assert has_colour(loss, plots.EXTRA_COLOURS[0]) and has_colour(loss, plots.STAGE_COLOURS["sft"])
