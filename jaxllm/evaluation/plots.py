"""Training curves of a run as PNG files: `jaxllm plot --run RUN_DIR [--stage S] [--output DIR]`.

Reads each stage's `RUN_DIR/<stage>/metrics.jsonl` (`jaxllm.train.metrics`; `null` is a non-finite
value and leaves a gap in its curve) and writes one figure per metric family into `DIR` (default
`RUN_DIR/plots/`), skipping a family no plotted stage logged:

  loss.png               train loss (solid) and held-out eval loss (dashed, dots) per stage, one panel
                         per unit: cross-entropy in nats/token (pretrain, SFT), -log sigmoid(margin) in
                         nats/pair (reward model, DPO), the PPO minibatch loss, other stage folders
  learning_rate.png      the learning rate at each logged step            } PPO in a panel of its
  grad_norm.png          global L2 norm of the gradient before clipping   } own: its step is an
                         (mean over the log window)                       } iteration, not an update
  tokens_per_second.png  training throughput in tokens/s (compilation and evaluation excluded)
  reward_model.png       reward model pairwise accuracy (train, held-out; chance 0.5) and margin
  ppo_reward.png         PPO reward-model score and the RLHF reward (score - kl_coef * KL)
  ppo_kl.png             PPO KL to the reference in nats/response, and the KL coefficient
  dpo.png                DPO implicit reward margins (nats) and accuracies (fraction of pairs)

The x axis is the stage's step: an optimizer step, for PPO one iteration (rollout, then
`ppo.epochs x ppo.minibatches` updates). The preference loss and accuracy panels draw chance (log 2
nats/pair, 0.5) as a grey line. Each stage has one colour in every figure. An axis whose
positive values span 100x or more is logarithmic. Figures are 1000 px wide (10 in at 100 dpi).

Bad input raises `PlotError` (a `ConfigError`: the CLI prints it as one line, exit status 2): no
metrics in the run, a stage without metrics. Lines of a `metrics.jsonl` that are not a JSON object
with an integer `step` (a line cut short by a crash, garbage) are skipped and reported in
`PlotResult.warnings`; the valid rows are still plotted.

Paths are `etils.epath` paths (as orbax's), so a run directory on Cloud Storage (`gs://...`) is
read and plotted into like a local one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import math
import os
from typing import Sequence

from etils import epath

from jaxllm import config as config_lib

KNOWN_STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")  # plotting order; other stage folders follow
# Colours by stage (matplotlib's tab10), the same in every figure.
STAGE_COLOURS = {"pretrain": "tab:blue", "sft": "tab:orange", "reward": "tab:green", "ppo": "tab:red",
                 "dpo": "tab:purple"}
EXTRA_COLOURS = ("tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LOG_SPAN = 100.0  # max/min of an axis's positive values from which it is logarithmic
WIDTH_IN, PANEL_HEIGHT_IN, DPI = 10.0, 4.2, 100


class PlotError(config_lib.ConfigError):
    """The run has nothing to plot: no metrics, or the requested stage has none."""


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes: `keys` (fnmatch patterns; `eval/...` drawn dashed with dots) from `stages` (None: any
    stage that logged one of them) but not `exclude`, y axis `ylabel` (from 0 with `from_zero`: a
    rate or a coefficient whose wiggles should not look large), a grey line at `chance`."""
    title: str
    ylabel: str
    keys: tuple[str, ...]
    stages: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    chance: float | None = None
    from_zero: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    """One figure, `<name>.png`: its panels stacked, those no plotted stage logged left out."""
    name: str  # file stem
    title: str
    panels: tuple[Panel, ...]


LM_STAGES, PAIR_STAGES, PPO = ("pretrain", "sft"), ("reward", "dpo"), ("ppo",)


def _per_step(title: str, ylabel: str, key: str, from_zero: bool = False) -> Family:
    """A metric every stage logs: PPO gets its own panel, its step (an iteration) is not an optimizer step."""
    return Family(key, title, (Panel("Every stage but PPO", ylabel, (key,), exclude=PPO, from_zero=from_zero),
                               Panel("PPO", ylabel, (key,), PPO, from_zero=from_zero)))


FAMILIES = (
    Family("loss", "Loss (solid: train, dashed with dots: held-out eval)", (
        Panel("Language modelling: pretrain, SFT", "cross-entropy (nats/token)", ("loss", "eval/loss"), LM_STAGES),
        Panel("Preference: reward model, DPO (grey line: chance, log 2)", "-log sigmoid(margin) (nats/pair)",
              ("loss", "eval/loss"), PAIR_STAGES, chance=math.log(2.0)),
        Panel("PPO", "policy + vf_coef x value loss", ("loss",), PPO),
        Panel("Other stages", "loss", ("loss", "eval/loss"), exclude=LM_STAGES + PAIR_STAGES + PPO),
    )),
    _per_step("Learning rate", "learning rate", "learning_rate"),
    _per_step("Gradient norm", "global L2 norm before clipping", "grad_norm"),
    _per_step("Training throughput (PPO: rollout and updates)", "tokens/s", "tokens_per_second", from_zero=True),
    Family("reward_model", "Reward model (solid: train, dashed with dots: held-out eval)", (
        Panel("Pairwise accuracy (grey line: chance)", "accuracy (fraction of pairs)", ("accuracy", "eval/*accuracy"),
              ("reward",), chance=0.5),
        Panel("Margin", "reward chosen - rejected (RM logits)", ("margin", "eval/*margin"), ("reward",)),
    )),
    Family("ppo_reward", "PPO reward", (
        Panel("", "reward per response (RM logits)", ("objective/scores", "objective/rlhf_reward")),)),
    Family("ppo_kl", "PPO KL penalty", (
        Panel("KL to the reference (SFT) policy", "KL (nats/response)", ("objective/kl",)),
        Panel("KL coefficient", "kl_coef (per nat)", ("objective/kl_coef",), from_zero=True),
    )),
    Family("dpo", "DPO implicit rewards (solid: train, dashed with dots: held-out eval)", (
        Panel("Reward margin", "beta x log-ratio margin (nats)", ("rewards/margins", "eval/rewards/margins")),
        Panel("Accuracy (grey line: chance)", "accuracy (fraction of pairs)",
              ("rewards/accuracies", "eval/rewards/accuracies"), chance=0.5),
    )),
)
LABELS = {"objective/scores": "RM score", "objective/rlhf_reward": "score - kl_coef x KL"}


@dataclasses.dataclass
class StageMetrics:
    """The valid rows of one `metrics.jsonl` and the line numbers (1-based) that were skipped."""
    name: str
    path: epath.Path
    rows: list[dict]
    skipped: list[int]
    lines: int


@dataclasses.dataclass
class PlotResult:
    """What `plot_run` did: the PNG files written and one warning per metrics file with skipped lines."""
    files: list[epath.Path]
    warnings: list[str]


def _path(p: str | os.PathLike) -> epath.Path:
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def read_stage(path: str | os.PathLike, name: str) -> StageMetrics:
    """Rows of `path` that are JSON objects with an integer `step`; other non-empty lines are skipped."""
    path = _path(path)
    rows, skipped, lines = [], [], 0
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            skipped.append(number)
    return StageMetrics(name, path, rows, skipped, lines)


def stage_names(run_dir: epath.Path) -> list[str]:
    """Folders of `run_dir` holding a `metrics.jsonl`: KNOWN_STAGES in pipeline order, then the others."""
    found = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl"))
    return [s for s in KNOWN_STAGES if s in found] + [s for s in found if s not in KNOWN_STAGES]


def load_run(run_dir: str | os.PathLike, stage: str | None = None) -> list[StageMetrics]:
    """The metrics of every stage of `run_dir` (or of `stage` only) that has at least one valid row.

    Raises:
      PlotError: `run_dir` is not a directory, has no stage with a valid metrics row, or `stage`
        has none.
    """
    run_dir = _path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a run directory")
    names = stage_names(run_dir)
    stages = [read_stage(run_dir / name / "metrics.jsonl", name) for name in names]
    with_rows = [s for s in stages if s.rows]
    if not with_rows:
        damaged = "".join(f"; {s.path} has {len(s.skipped)} lines that are not JSON metric rows"
                          for s in stages if s.skipped)
        raise PlotError(f"no metrics to plot in {run_dir}: no <stage>/metrics.jsonl with a valid row{damaged}")
    if stage is not None:
        chosen = [s for s in stages if s.name == stage and s.rows]
        if not chosen:
            raise PlotError(f"stage {stage!r} has no metrics in {run_dir}; stages with metrics: "
                            + ", ".join(s.name for s in with_rows))
        return chosen
    return stages


def skipped_warning(s: StageMetrics) -> str:
    """One line saying which lines of `s.path` were not plotted."""
    shown = ", ".join(map(str, s.skipped[:5])) + (", ..." if len(s.skipped) > 5 else "")
    return (f"{s.path}: skipped {len(s.skipped)} of {s.lines} lines that are not JSON metric rows "
            f"(line{'s' if len(s.skipped) > 1 else ''} {shown}); plotted the other {len(s.rows)}")


def stage_colours(names: Sequence[str]) -> dict[str, str]:
    """`STAGE_COLOURS`, and the `EXTRA_COLOURS` in turn for other stage folders."""
    extra = iter(EXTRA_COLOURS * (len(names) // len(EXTRA_COLOURS) + 1))
    return {n: STAGE_COLOURS[n] if n in STAGE_COLOURS else next(extra) for n in names}


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have `key`; null becomes NaN, a gap in the line."""
    steps, values = [], []
    for row in rows:
        if key in row:
            value = row[key]
            steps.append(row["step"])
            values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return steps, values


def _panel_curves(panel: Panel, stages: Sequence[StageMetrics]):
    """[(stage, key, steps, values)] of `panel`, in stage order then key-pattern order."""
    curves = []
    for s in stages:
        if (panel.stages is not None and s.name not in panel.stages) or s.name in panel.exclude:
            continue
        keys = sorted({k for row in s.rows for k in row})
        for pattern in panel.keys:
            for key in (k for k in keys if fnmatch.fnmatchcase(k, pattern)):
                steps, values = series(s.rows, key)
                if any(math.isfinite(v) for v in values):
                    curves.append((s.name, key, steps, values))
    return curves


def _use_log(curves) -> bool:
    """Whether no value is negative and the positive ones span `LOG_SPAN` or more."""
    positive = [v for *_, values in curves for v in values if math.isfinite(v) and v > 0]
    negative = any(math.isfinite(v) and v < 0 for *_, values in curves for v in values)
    return bool(positive) and not negative and max(positive) / min(positive) >= LOG_SPAN


def _label(stage: str, key: str, train_keys: Sequence[str], panel_keys: Sequence[str]) -> str:
    """`ppo: RM score` when a panel has several train keys, `sft` when it has no eval key, else
    `sft train`, `sft eval`, `reward eval (hh)` (`eval/hh/accuracy`: one of several held-out sets)."""
    if len(train_keys) > 1:
        return f"{stage}: {LABELS.get(key, key)}"
    if len(train_keys) == len(panel_keys):
        return stage
    if not key.startswith("eval/"):
        return f"{stage} train"
    split, base = key[len("eval/"):], train_keys[0] if train_keys else ""
    split = split[:-len(base)].rstrip("/") if base and split.endswith(base) else ""  # eval/<split>/accuracy
    return f"{stage} eval" + (f" ({split})" if split else "")


def _draw_panel(ax, panel: Panel, curves, colours: dict[str, str]) -> None:
    styles = ("-", ":", "-.")  # several train keys of one stage in one panel
    train_keys = [p for p in panel.keys if not p.startswith("eval/")]
    for stage, key, steps, values in curves:
        is_eval = key.startswith("eval/")
        label = _label(stage, key, train_keys, panel.keys)
        style = "--" if is_eval else styles[next((i for i, p in enumerate(train_keys)
                                                  if fnmatch.fnmatchcase(key, p)), 0) % len(styles)]
        ax.plot(steps, values, style, color=colours[stage], label=label, linewidth=2.0,
                marker="o" if is_eval or len(steps) < 3 else None, markersize=6)
    if panel.chance is not None:
        ax.axhline(panel.chance, color="0.5", linewidth=1.2, zorder=0)
    if _use_log(curves):
        ax.set_yscale("log", nonpositive="mask")  # a zero (PPO's first learning rate) is left out
    elif panel.from_zero:
        top = max(v for *_, values in curves for v in values if math.isfinite(v))
        ax.set_ylim(0.0, top * 1.1 if top > 0 else None)
    is_ppo = [stage in PPO for stage, *_ in curves]
    if all(is_ppo):
        xlabel = "PPO iteration (epochs x minibatches optimizer steps)"
    else:
        xlabel = "step (PPO: iteration)" if any(is_ppo) else "optimizer step"
    ax.set_xlabel(xlabel, fontsize=12)
    ax.set_ylabel(panel.ylabel, fontsize=12)
    if panel.title:
        ax.set_title(panel.title, fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=11, loc="best", framealpha=0.85)


def plot_family(family: Family, stages: Sequence[StageMetrics], colours: dict[str, str],
                path: epath.Path) -> bool:
    """Writes `family`'s figure of `stages` to `path`; False (nothing written) if none logged it."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers, CI and TPU VMs
    from matplotlib import pyplot as plt

    panels = [(p, c) for p in family.panels if (c := _panel_curves(p, stages))]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(panels) + 0.6), dpi=DPI,
                             squeeze=False, layout="constrained")
    for ax, (panel, curves) in zip(axes[:, 0], panels):
        _draw_panel(ax, panel, curves, colours)
    fig.suptitle(family.title, fontsize=14)
    png = io.BytesIO()  # rendered in memory, then written once: a local file or a Cloud Storage object
    fig.savefig(png, format="png", dpi=DPI)
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return True


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None,
             stage: str | None = None) -> PlotResult:
    """Writes the figures of `run_dir` (see the module docstring) into `output` (default RUN_DIR/plots).

    Returns:
      The PNG files written, in `FAMILIES` order, and one warning per metrics file with skipped lines.

    Raises:
      PlotError: see `load_run`.
    """
    stages = load_run(run_dir, stage)
    out = _path(output) if output is not None else _path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    colours = stage_colours(stage_names(_path(run_dir)))
    plotted = [s for s in stages if s.rows]
    files = [out / f"{f.name}.png" for f in FAMILIES if plot_family(f, plotted, colours, out / f"{f.name}.png")]
    return PlotResult(files, [skipped_warning(s) for s in stages if s.skipped])
