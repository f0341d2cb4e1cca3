"""Evaluation of a run: `jaxllm eval --run RUN_DIR` writes `report.md` and `report.json`.

The report has each finished stage's final metrics (the last train row and the final held-out
evaluation), the reward model's held-out accuracy per split, and for the SFT, PPO and DPO policies
on held-out prompts: the mean reward under the run's reward model, the win rate against SFT under
it (ties count half), the KL to SFT, the mean response length and the missing-eos rate, plus a few
generations side by side, and the training curves (`plots.py`, written to RUN_DIR/plots/).

Responses are sampled at `eval.temperature` with a fixed seed (prompt batch `k` with
`fold_in(key(eval.seed), k)`, so batches draw independent noise), so the report is a pure function
of the run's params: rerunning `jaxllm eval` (or a killed and resumed pipeline) gives the same
report. The KL to SFT is `mean over prompts of sum_t [log pi(y_t) - log pi_SFT(y_t)]` on the
policy's own samples (the k1 estimator, unbiased), both with logits divided by the temperature.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxllm import checkpoint as ckpt_lib
from jaxllm import config as config_lib
from jaxllm import fs
from jaxllm import sampling
from jaxllm import sharding
from jaxllm.data import chat
from jaxllm.data import prompts as prompt_data
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.evaluation import plots
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import ppo

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")
POLICIES = ("sft", "ppo", "dpo")


def default_config() -> ml_collections.ConfigDict:
    """The `eval` section."""
    c = ml_collections.ConfigDict()
    c.prompts = prompt_data.default_config()
    c.num_prompts = 64  # held-out prompts to generate for (0: all)
    c.batch_size = 16
    c.max_new_tokens = 64
    c.temperature = 1.0
    c.seed = 0
    c.samples_in_report = 3
    return c


def stage_summary(stage_dir: pathlib.Path) -> dict[str, Any]:
    """Final train row (without timings), final eval metrics and, with `train.eval_at_start`, the step-0 eval."""
    rows = metrics_lib.read_metrics(stage_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    drop = ("tokens_per_second", "mfu", "step")
    out = {"step": train[-1]["step"] if train else 0}
    if train:
        out["train"] = {k: v for k, v in train[-1].items() if k not in drop}
    if evals:
        out["eval"] = {k: v for k, v in evals[-1].items() if k != "step"}
    if len(evals) > 1 and evals[0]["step"] == 0:  # `train.eval_at_start`: the stage's baseline
        out["eval_at_start"] = {k: v for k, v in evals[0].items() if k != "step"}
    return out


def _policy_eval(model_config, policies: dict[str, Any], reward_params, prompts_ds, c, stop_ids, pad_id,
                 max_context, mesh, rules) -> dict[str, dict[str, np.ndarray]]:
    """Samples every policy on every prompt; returns per-policy arrays of rewards, KLs, lengths."""
    def score_fn(policy, sft_params, rm, tokens, lengths, responses, response_lengths):
        view, mask = ppo.response_view(tokens, lengths, responses, response_lengths)
        logp, _ = ppo.response_logprobs(model_config, policy, view, c.temperature)
        sft_logp, _ = ppo.response_logprobs(model_config, sft_params, view, c.temperature)
        reward = ppo.final_scores(model_config, rm, view, response_lengths)
        return reward, jnp.sum((logp - sft_logp) * mask, axis=1)

    score = jax.jit(score_fn, out_shardings=sharding.replicated(mesh))
    results: dict[str, dict[str, list]] = {name: {"reward": [], "kl": [], "length": [], "ended": [],
                                                 "tokens": []} for name in policies}
    prompt_tokens_all = []
    seen = 0
    for batch_index, batch in enumerate(prompts_ds):
        valid = batch["prompt_mask"] > 0
        if c.num_prompts:
            valid &= np.arange(len(valid)) + seen < c.num_prompts
        seen += len(valid)
        if not valid.any():
            break
        for i in np.flatnonzero(valid):
            prompt_tokens_all.append(batch["prompt_tokens"][i, -batch["prompt_lengths"][i]:])
        for name, params in policies.items():
            out = sampling.sample(model_config, params, batch["prompt_tokens"], batch["prompt_lengths"],
                                  jax.random.fold_in(jax.random.key(c.seed), batch_index),
                                  max_new_tokens=c.max_new_tokens,
                                  temperature=c.temperature, stop_ids=stop_ids, max_context=max_context,
                                  pad_id=pad_id)
            with sharding.activate(mesh, rules):
                reward, kl = score(params, policies["sft"], reward_params, jnp.asarray(batch["prompt_tokens"]),
                                   jnp.asarray(batch["prompt_lengths"]), out.tokens, out.lengths)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            ended = np.asarray(ppo.ended_with_stop(out.tokens, out.lengths, stop_ids))
            r = results[name]
            r["reward"].extend(np.asarray(reward)[valid])
            r["kl"].extend(np.asarray(kl)[valid])
            r["length"].extend(lengths[valid])
            r["ended"].extend(ended[valid])
            r["tokens"].extend(tokens[i, :lengths[i]] for i in np.flatnonzero(valid))
        if c.num_prompts and seen >= c.num_prompts:
            break
    out = {name: {k: (np.asarray(v) if k != "tokens" else v) for k, v in r.items()} for name, r in results.items()}
    out["_prompts"] = prompt_tokens_all
    return out


def evaluate_run(run_dir: str | pathlib.Path, c: ml_collections.ConfigDict, mesh_config=None,
                 data_root: str = "") -> dict[str, Any]:
    """Builds the report of the run in `run_dir` (see the module docstring) and writes it there.

    Raises:
      ConfigError: if the run has no finished SFT stage.
    """
    run_dir = fs.path(run_dir)
    report: dict[str, Any] = {"stages": {}}
    for stage in STAGES:
        if (run_dir / stage / "done.json").exists():
            report["stages"][stage] = stage_summary(run_dir / stage)
    if "sft" not in report["stages"]:
        raise config_lib.ConfigError(f"{run_dir} has no finished sft stage to evaluate")
    if "reward" in report["stages"]:
        ev = report["stages"]["reward"].get("eval", {})
        # `eval/accuracy` (one held-out set) or `eval/<split>/accuracy` (several).
        report["reward_model"] = {k[len("eval/"):-len("accuracy")].rstrip("/") or "held-out": v
                                  for k, v in ev.items() if k.endswith("accuracy")}

    sft_config = config_lib.load_json(run_dir / "sft" / "config.json")
    model_config = llama.LlamaConfig.from_config(sft_config.model)
    mesh_config = mesh_config or sft_config.mesh
    mesh = sharding.make_mesh(mesh_config)
    rules = mesh_config.rules
    tokenizer = tokenizer_lib.load_tokenizer(config_lib.tokenizer_dir(run_dir))
    template = chat.template_for(tokenizer)
    if "reward" in report["stages"]:
        lm_abstract = loop.abstract_params(lambda r: llama.init(model_config, r), mesh, rules)
        rm_abstract = loop.abstract_params(lambda r: llama.init(model_config, r, head="scalar"), mesh, rules)
        policies = {name: ckpt_lib.load_params(run_dir / name / "params", lm_abstract)
                    for name in POLICIES if name in report["stages"]}
        reward_params = ckpt_lib.load_params(run_dir / "reward" / "params", rm_abstract)
        prompts_ds = prompt_data.prompt_dataset(c.prompts, template, split="eval", global_batch_size=c.batch_size,
                                                seed=c.seed, data_root=data_root, run_dir=str(run_dir))
        max_context = c.prompts.max_prompt_len + c.max_new_tokens
        res = _policy_eval(model_config, policies, reward_params, prompts_ds, c, (template.end_id, template.eos_id),
                           tokenizer.pad_id, max_context, mesh, rules)
        prompt_tokens = res.pop("_prompts")
        report["policies"] = {name: policy_stats(r, res["sft"]["reward"]) for name, r in res.items()}
        report["samples"] = [
            {"prompt": tokenizer.decode(prompt_tokens[i]),
             **{name: template.decode_response(res[name]["tokens"][i].tolist()) for name in res}}
            for i in range(min(c.samples_in_report, len(prompt_tokens)))]
    write_report(report, run_dir)
    return report


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of `values` (`[n]`): sample standard deviation (ddof 1) / sqrt(n);
    NaN when n < 2."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def policy_stats(r: dict[str, np.ndarray], sft_reward: np.ndarray) -> dict[str, float]:
    """The report's row of one policy from its per-prompt arrays (`_policy_eval`): mean reward, win
    rate against SFT on the same prompts (a win scores 1, a tie 0.5, a loss 0) and KL to SFT, each
    with its standard error over prompts (`standard_error`), mean length, missing-eos rate."""
    wins = (r["reward"] > sft_reward) + 0.5 * (r["reward"] == sft_reward)
    return {"mean_reward": float(np.mean(r["reward"])), "mean_reward_se": standard_error(r["reward"]),
            "win_rate_vs_sft": float(np.mean(wins)), "win_rate_se": standard_error(wins),
            "kl_to_sft": float(np.mean(r["kl"])), "kl_to_sft_se": standard_error(r["kl"]),
            "mean_length": float(np.mean(r["length"])), "missing_eos_rate": float(1.0 - np.mean(r["ended"])),
            "prompts": int(len(r["reward"]))}


def _pm(mean: float, se: float | None, digits: int) -> str:
    """`mean ± se` (the se left out when it is not finite: one prompt)."""
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and np.isfinite(se) else "")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _curves(run_dir: pathlib.Path) -> list[str]:
    """A `## Training curves` section embedding the figures `plots.plot_run` writes into
    RUN_DIR/plots/ (links relative to report.md); nothing when the run has no metrics."""
    try:
        result = plots.plot_run(run_dir)
    except plots.PlotError:
        return []
    for warning in result.warnings:
        logging.warning("%s", warning)
    return ["", "## Training curves", ""] + [f"![{f.stem.replace('_', ' ')}](plots/{f.name})\n" for f in result.files]


def write_report(report: dict[str, Any], run_dir: pathlib.Path) -> None:
    """Writes `report.json` and a Markdown rendering `report.md` into `run_dir`, and the training
    curves it embeds into `run_dir/plots/` (`jaxllm.evaluation.plots`)."""
    # Each file is replaced atomically (a crash leaves the previous report); NaN is written as null.
    fs.write_atomic(run_dir / "report.json",
                            json.dumps(metrics_lib.finite_or_none(report), indent=2, sort_keys=True) + "\n")
    lines = [f"# jaxllm report: {run_dir.name}", ""]
    if "policies" in report:
        lines += ["## Policies on held-out prompts (judge: this run's reward model, the one PPO optimised)", "",
                  "| policy | mean reward | win rate vs SFT | KL to SFT (nats/response) | mean length (tokens) | missing eos |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, p in report["policies"].items():
            lines.append(f"| {name} | {_pm(p['mean_reward'], p.get('mean_reward_se'), 4)} | "
                         f"{_pm(p['win_rate_vs_sft'], p.get('win_rate_se'), 3)} | "
                         f"{_pm(p['kl_to_sft'], p.get('kl_to_sft_se'), 3)} | "
                         f"{p['mean_length']:.1f} | {p['missing_eos_rate']:.3f} |")
        lines += ["", f"{next(iter(report['policies'].values()))['prompts']} prompts; ± one standard error over "
                  "prompts. A policy trained against this judge can raise its score without getting better.", ""]
    if "reward_model" in report:
        # Chance: a scorer that ignores the text ranks a pair right half the time.
        lines += ["## Reward model held-out accuracy", "", "| split | accuracy | chance |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v:.4f} | 0.5 |" for k, v in report["reward_model"].items()]
        lines.append("")
    lines += ["## Stages", ""]
    for stage, s in report["stages"].items():
        metrics = {**s.get("train", {}), **s.get("eval", {})}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
        lines.append(f"- **{stage}** (step {s['step']}): {shown}")
        if "eval_at_start" in s:
            lines.append("  - at step 0: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(s["eval_at_start"].items())))
    lines += _curves(run_dir)
    if report.get("samples"):
        lines += ["", "## Samples", ""]
        for i, sample in enumerate(report["samples"]):
            lines.append(f"### Prompt {i + 1}\n\n```\n{sample['prompt']}\n```\n")
            for name, text in sample.items():
                if name != "prompt":
                    lines.append(f"**{name}**:\n\n```\n{text}\n```\n")
    fs.write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    logging.info("wrote %s", run_dir / "report.md")
