"""Command line: `jaxllm COMMAND --config=configs/FILE.py[:ARG] --config.key=value ...`.

Commands:
  pipeline    the whole recipe (tokenizer, pretrain, sft, reward, ppo, dpo, eval) in one run dir
  tokenizer   train (or load) the run's SentencePiece tokenizer
  pretrain    causal-LM pretraining (trains the tokenizer first if the run has none)
  sft         supervised fine-tuning on conversations, from the run's pretrain params
  reward      reward model on preference pairs or ranked groups, from the SFT params
  dpo         direct preference optimisation from the SFT params (reference = SFT)
  ppo         PPO with a KL penalty (and pretraining mix) against the reward model
  eval        write RUN_DIR/report.md and report.json: `jaxllm eval --run RUN_DIR [--config ...]`
  compile     ahead-of-time fitting: `jaxllm compile --config ... --topology v5p:4x4x4 [--suggest]`
  sample      print generations from a finished stage: `jaxllm sample --run RUN_DIR [--prompt TEXT]`
  generate    answer a JSONL prompt file: `jaxllm generate --run RUN_DIR --prompts FILE [--stage sft ...]`
  chat        interactive chat on stdin/stdout: `jaxllm chat --run RUN_DIR [--system TEXT]`
  score       reward-model scores of conversations / pairs: `jaxllm score --run RUN_DIR --input FILE`
  export      a finished stage as a Hugging Face folder: `jaxllm export --run RUN_DIR --stage sft --output DIR`
  lm-eval     lm-evaluation-harness's command line with the jaxllm backend: `jaxllm lm-eval --model_args
              model=gguf:FILE --tasks mmlu_cloze [--data_root DIR] [lm-eval options]` (`pip install -e .[eval]`)
  plot        PNG training curves of a run: `jaxllm plot --run RUN_DIR [--stage S] [--output DIR]`

sample, generate, chat and score take `--model SPEC` instead of `--run`: a published checkpoint,
`hf:DIR`, `hf:ORG/NAME[@REVISION]` or `gguf:FILE`. Training stages start from one with
`--config.init_from=SPEC`.

Errors in configs and data (unknown key, bad mesh, missing file, malformed line ...) print one
line naming the key, file or line, and exit with status 2.

Platform and console (`jaxllm.console`): on a Cloud TPU VM commands run on the TPU. On a machine
without TPU chips, where libtpu is installed for `compile`, JAX_PLATFORMS is set to "cpu" ("cuda,cpu"
with a JAX CUDA plugin) so libtpu never tries to start; a JAX_PLATFORMS you set is kept as it is.
`compile --topology` still compiles for TPU slices there, with libtpu as a compiler only. The
console shows jaxllm's own lines and progress; `--verbosity=debug` on any command (or
JAXLLM_VERBOSITY=debug) brings back the INFO lines of JAX, absl, orbax and grain and XLA's C++
logs; `--verbosity=warning` keeps warnings and errors only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from jaxllm import console, fs

STAGES = {"pretrain": "jaxllm.train.pretrain", "sft": "jaxllm.train.sft", "reward": "jaxllm.train.reward",
          "dpo": "jaxllm.train.dpo", "ppo": "jaxllm.train.ppo"}
COMMANDS = ("pipeline", "tokenizer", *STAGES, "eval", "sample", "compile", "generate", "chat", "score", "export",
            "plot", "lm-eval")
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the stage saved a checkpoint and can be resumed


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxllm import aot
    from jaxllm import config as config_lib
    from jaxllm import sharding
    from jaxllm.data import chat
    from jaxllm.data import sources
    from jaxllm.data import tokenizer
    from jaxllm.train import pretrain

    # ConfigError covers loop.NonFiniteError (a diverged run); MissingPieceError: a tokenizer
    # without jaxllm's role markers; ChatError: a chat template that cannot be built or used.
    return (config_lib.ConfigError, sharding.MeshError, sources.DataError, pretrain.VocabMismatchError,
            FileNotFoundError, aot.TopologyError, tokenizer.TokenizerError, tokenizer.MissingPieceError,
            chat.ChatError)


def _load(argv: Sequence[str], command: str):
    from jaxllm import config as config_lib

    spec, overrides, rest = config_lib.parse_overrides(argv)
    if rest:
        raise config_lib.ConfigError(f"unexpected arguments {rest}")
    if spec is None:
        raise config_lib.ConfigError(f"jaxllm {command} needs --config configs/FILE.py[:ARG]")
    config = config_lib.build(spec, overrides)
    return config


def cmd_tokenizer(argv: Sequence[str]) -> int:
    """Trains or loads the tokenizer of the run and prints its vocabulary layout."""
    from jaxllm.data import tokenizer as tokenizer_lib

    config = _load(argv, "tokenizer")
    tok = tokenizer_lib.load_or_train(config, config.run_dir)
    print(f"tokenizer {tok.path}: {tok.vocab_size} ids, pad={tok.pad_id} bos={tok.bos_id} "
          f"eos={tok.eos_id}, {tok.num_sentinels} sentinels")
    return 0


def cmd_stage(command: str, argv: Sequence[str]) -> int:
    """Runs a training stage to `train.steps`, resuming from its checkpoints."""
    import importlib

    from jaxllm import config as config_lib
    from jaxllm import sharding

    config = _load(argv, command)
    sharding.initialize_runtime(config)
    result = importlib.import_module(STAGES[command]).run(config)
    config_lib.save_json(config, os.path.join(config.run_dir, "config.json"))
    if result.preempted:
        return EXIT_PREEMPTED
    print(f"{command} finished at step {result.step}: " +
          ", ".join(f"{k}={v:.4f}" for k, v in result.eval_metrics.items()))
    return 0


def cmd_sample(argv: Sequence[str]) -> int:
    """Samples plain continuations (no chat template) from a finished stage or a published model.

    Span-corruption runs (T5, or a decoder-only prefix LM; `pretrain_t5.handles`) print the fill of
    each sentinel instead: a `--prompt` holding `<extra_id_k>` pieces is filled as written, other text
    is corrupted first (seeded by `--seed`); without `--prompt`, validation documents are.
    """
    from jaxllm import config as config_lib
    from jaxllm import inference
    from jaxllm import sampling
    from jaxllm.data import tokenizer as tokenizer_lib
    from jaxllm.train import pretrain_t5

    parser = argparse.ArgumentParser(prog="jaxllm sample")
    _model_flags(parser, stage="pretrain", stage_help="a finished stage")
    parser.add_argument("--prompt", action="append",
                        help="prompt text (repeatable); default: bos only (span corruption: validation documents)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default 0.8, or 0 for span-corruption runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.run and not args.model:
        config = config_lib.load_json(os.path.join(args.run, args.stage, "config.json"))
        if pretrain_t5.handles(config):
            tok = tokenizer_lib.load_tokenizer(config_lib.tokenizer_dir(args.run))
            params = pretrain_t5.load_params(config, os.path.join(args.run, args.stage, "params"))
            blocks = pretrain_t5.fill_sentinels(config, tok, params, args.prompt, max_new_tokens=args.max_new_tokens,
                                                temperature=args.temperature or 0.0, seed=args.seed)
            print("\n".join(blocks))
            return 0
    stage = inference.load(args.run, args.stage, args.model)
    tok = stage.template.tokenizer
    temperature = 0.8 if args.temperature is None else args.temperature
    inference.check_generation_args(max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                    beam_size=1, max_context=stage.max_context)
    prompts = args.prompt or [""]
    bos = [tok.bos_id] if getattr(tok, "add_bos", True) and tok.bos_id >= 0 else []
    ids = [bos + tok.encode(p) for p in prompts]
    if not all(ids):
        raise config_lib.ConfigError("an empty --prompt needs a tokenizer with a bos token; give some text")
    outs = sampling.generate(stage.model_config, stage.params, ids, max_new_tokens=args.max_new_tokens,
                             temperature=temperature, eos_id=tok.eos_id, seed=args.seed, max_context=stage.max_context)
    for prompt, out in zip(prompts, outs):
        print(f"--- prompt: {prompt!r}\n{prompt}{tok.decode(out)}")
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    """Writes a finished stage as a Hugging Face model folder (`jaxllm.hub.export`)."""
    from jaxllm.hub import export

    parser = argparse.ArgumentParser(prog="jaxllm export")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--stage", required=True, help="a finished stage (sft, dpo, ppo, reward, pretrain ...)")
    parser.add_argument("--output", required=True, help="the folder to write (replaced if it exists)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors files above this are sharded")
    args = parser.parse_args(argv)
    summary = export.export_stage(args.run, args.stage, args.output, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(summary)
    return 0


def cmd_plot(argv: Sequence[str]) -> int:
    """Writes the run's training curves as PNG files (`jaxllm.evaluation.plots`) and lists them;
    skipped lines of a damaged metrics.jsonl are reported on stderr, the valid rows still plotted."""
    from jaxllm.evaluation import plots

    parser = argparse.ArgumentParser(prog="jaxllm plot")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--stage", default=None, help="plot this stage only (default: every stage with metrics)")
    parser.add_argument("--output", default=None, help="folder for the PNG files (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    result = plots.plot_run(args.run, args.output, args.stage)
    for warning in result.warnings:
        print(f"jaxllm plot: warning: {warning}", file=sys.stderr)
    print(f"wrote {len(result.files)} plots: " + " ".join(str(f) for f in result.files))
    return 0


def cmd_pipeline(argv: Sequence[str]) -> int:
    """Runs every stage of the pipeline config, then the evaluation."""
    from jaxllm import pipeline
    from jaxllm import sharding

    config = _load(argv, "pipeline")
    sharding.initialize_runtime(config)
    if not pipeline.run(config):
        return EXIT_PREEMPTED
    print((fs.path(config.run_dir) / "report.md").read_text(encoding="utf-8"))
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    """Evaluates the finished stages of a run (`--run RUN_DIR`). Settings: the `eval` section of
    `--config` if given, else of the run's `pipeline_config.json`, else of `configs/pipeline.py:tiny`;
    `--config.eval.KEY=VALUE` overrides either."""
    from jaxllm import config as config_lib
    from jaxllm import evaluation
    from jaxllm import pipeline

    spec, overrides, rest = config_lib.parse_overrides(argv)
    parser = argparse.ArgumentParser(prog="jaxllm eval")
    parser.add_argument("--run", required=True, help="run directory")
    args = parser.parse_args(rest)
    saved = os.path.join(args.run, pipeline.CONFIG_FILE)
    if spec is None and fs.path(saved).exists():
        config = config_lib.load_json(saved)
        for key, raw in overrides:
            config_lib.apply_override(config, key, raw)
    else:
        config = config_lib.build(spec or "configs/pipeline.py:tiny", overrides)
    evaluation.evaluate_run(args.run, config.eval, None, config.data_root)
    print((fs.path(args.run) / "report.md").read_text(encoding="utf-8"))
    return 0


def cmd_compile(argv: Sequence[str]) -> int:
    """Compiles the train step for a TPU topology and prints per-chip memory and FLOPs."""
    from jaxllm import aot
    from jaxllm import config as config_lib

    spec, overrides, rest = config_lib.parse_overrides(argv)
    parser = argparse.ArgumentParser(prog="jaxllm compile")
    parser.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:4x4, v6e:2x4, v4:2x2x2")
    parser.add_argument("--suggest", action="store_true", help="find the smallest slice that fits")
    args = parser.parse_args(rest)
    if spec is None:
        raise config_lib.ConfigError("jaxllm compile needs --config configs/FILE.py[:ARG]")
    config = config_lib.build(spec, overrides)
    print(aot.HEADER)
    if args.suggest:
        fits = aot.suggest(config, aot.generation(args.topology))
        for fit in fits:
            print(fit.table_row())
        if fits and fits[-1].fits:
            print(f"smallest {aot.generation(args.topology)} slice that fits: {fits[-1].topology}")
            return 0
        print("no slice tried fits; try remat (--config.model.remat_policy=full), a smaller batch or tensor parallelism")
        return 1
    fit = aot.compile_step(config, aot.topology_devices(args.topology), args.topology)
    print(fit.table_row())
    return 0 if fit.fits else 1


def _model_flags(parser: argparse.ArgumentParser, *, stage: str, stage_help: str) -> None:
    parser.add_argument("--run", default="", help="run directory (with --stage), or give --model")
    parser.add_argument("--stage", default=stage, help=stage_help)
    parser.add_argument("--model", default="", help="instead of --run: a published checkpoint, hf:DIR, "
                        "hf:ORG/NAME[@REVISION] or gguf:FILE (its own tokenizer and chat template)")


def _sampling_flags(parser: argparse.ArgumentParser, *, temperature: float) -> None:
    _model_flags(parser, stage="sft", stage_help="a finished language-model stage (sft, dpo, ppo, pretrain)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)


def cmd_generate(argv: Sequence[str]) -> int:
    """Answers a JSONL file of chat prompts with a finished stage; prints the stop rate.

    Prompts: any record `chat.load_prompts` reads; MT-Bench records (`turns`) are asked their first
    turn only (the second refers to the model's first answer). Rows written, one per prompt:
    `id`, `prompt` (the messages), `response`, `tokens` (generated ids), `num_tokens`, `stopped`
    (the response ended with <|end|> or eos within --max_new_tokens), `prompt_tokens`,
    `prompt_truncated`. Batch `k` samples with `fold_in(key(seed), k)` (`jaxllm.inference`).
    """
    import pathlib

    import jax

    from jaxllm import config as config_lib
    from jaxllm import inference

    parser = argparse.ArgumentParser(prog="jaxllm generate")
    _sampling_flags(parser, temperature=0.0)
    parser.add_argument("--prompts", required=True, help="JSONL prompt file")
    parser.add_argument("--output", default="", help="default: RUN_DIR/<stage>/generations/<prompts stem>.jsonl")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--beam_size", type=int, default=1, help="> 1: beam search (deterministic)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="the first N prompts only (0 = all)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.limit < 0:
        raise config_lib.ConfigError(f"need --batch_size >= 1 and --limit >= 0, got {args.batch_size}, {args.limit}")
    records = inference.read_prompts(args.prompts, args.limit)
    stage = inference.load(args.run, args.stage, args.model)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, beam_size=args.beam_size)
    inference.check_generation_args(**settings, max_context=stage.max_context)
    stem = pathlib.Path(args.prompts).stem
    output = fs.path(args.output or stage.run_dir / stage.name / "generations" / f"{stem}.jsonl")
    rows = []
    for k, start in enumerate(range(0, len(records), args.batch_size)):
        batch = records[start:start + args.batch_size]
        outs = inference.generate(stage, [messages for _, messages in batch], rng=jax.random.fold_in(
            jax.random.key(args.seed), k), rows=args.batch_size, **settings)
        rows += [{"id": rid, "prompt": messages, "response": g.response, "tokens": g.tokens,
                  "num_tokens": len(g.tokens), "stopped": g.stopped, "prompt_tokens": g.prompt_tokens,
                  "prompt_truncated": g.prompt_truncated}
                 for (rid, messages), g in zip(batch, outs)]
        logging.info("generated %d/%d", len(rows), len(records))
    inference.write_jsonl(output, rows)
    stopped = sum(r["stopped"] for r in rows)
    print(f"wrote {len(rows)} generations to {output}")
    print(f"stop rate: {stopped / len(rows):.3f} ({stopped}/{len(rows)} responses ended with <|end|> or eos within "
          f"max_new_tokens={args.max_new_tokens}); mean length {sum(r['num_tokens'] for r in rows) / len(rows):.1f} "
          f"tokens; {sum(r['prompt_truncated'] for r in rows)} prompts truncated to the context of {stage.max_context}")
    return 0


def cmd_chat(argv: Sequence[str]) -> int:
    """Chats with a finished stage: one stdin line per user turn, the reply on stdout (pipes work).

    `/reset` clears the conversation (the --system message stays); `/exit` or end of input quits.
    Every reply answers the whole conversation, re-rendered with the chat template. When the prompt
    plus --max_new_tokens outgrow the model's context (its training seq_len), the oldest
    user/assistant exchanges are dropped for good (the system message and the new turn stay).
    `--transcript FILE` appends a JSON line per turn: the `messages` answered, `response`, `tokens`,
    `stopped`, `prompt_tokens`, `dropped_turns`. Turn `k` samples with `fold_in(key(seed), k)`.
    """
    import json

    import jax

    from jaxllm import inference

    parser = argparse.ArgumentParser(prog="jaxllm chat")
    _sampling_flags(parser, temperature=0.7)
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--transcript", default="", help="append each turn to this JSONL file")
    args = parser.parse_args(argv)
    stage = inference.load(args.run, args.stage, args.model)
    inference.check_generation_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0,
                                    top_p=1.0, beam_size=1, max_context=stage.max_context)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, turn = list(system), 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        text = line.rstrip("\r\n")
        if not line or text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages, dropped = inference.fit_conversation(stage.template, messages + [{"role": "user", "content": text}],
                                                       max(stage.max_context - args.max_new_tokens, 1))
        if dropped:
            print(f"(dropped the {dropped} oldest exchanges to fit the context of {stage.max_context} tokens)",
                  file=sys.stderr)
        (out,) = inference.generate(stage, [messages], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    rng=jax.random.fold_in(jax.random.key(args.seed), turn))
        print(out.response, flush=True)
        if args.transcript:
            with open(args.transcript, "a", encoding="utf-8") as f:
                f.write(json.dumps({"turn": turn, "messages": messages, "response": out.response, "tokens": out.tokens,
                                    "stopped": out.stopped, "prompt_tokens": out.prompt_tokens,
                                    "dropped_turns": dropped}, ensure_ascii=False) + "\n")
        messages, turn = messages + [{"role": "assistant", "content": out.response}], turn + 1


def cmd_score(argv: Sequence[str]) -> int:
    """Scores conversations and preference records with a reward model; prints the mean and accuracy.

    Input records (`inference.read_scoring_records`): conversations (`messages`, ShareGPT, Alpaca,
    `jaxllm generate` rows) get `reward`; pairs (`prompt` + `chosen`/`rejected`, HH transcripts)
    get `reward_chosen` and `reward_rejected`; ranking groups `rewards` and `ranks`, best first.
    With `--safety_stage`, the rewards are Llama-2's combination of two reward models
    (`objectives.combined_reward`): the safety stage's score on safety prompts (a record's
    `is_safety`, else `--safety_prompts` for the whole file) and wherever that score is below
    `logit(--safety_threshold)`, else `--stage`'s (the helpfulness model's) score.
    Every row has `id` and `truncated`: a group longer than the reward model's seq_len keeps bos
    and its end (the reward data's keep_end; counted). Preference records the reward data skips
    (identical responses, no user content, all ranks tied) are skipped and counted. Accuracy: pairs
    with reward_chosen > reward_rejected (a tie counts as wrong, as in the reward stage's metric).
    """
    import pathlib

    import numpy as np

    from jaxllm import config as config_lib
    from jaxllm import inference
    from jaxllm import objectives
    from jaxllm.data import preference_records

    parser = argparse.ArgumentParser(prog="jaxllm score")
    _model_flags(parser, stage="reward", stage_help="a finished reward-model stage")
    parser.add_argument("--input", required=True, help="JSONL conversations or preference records")
    parser.add_argument("--output", default="", help="default: RUN_DIR/<stage>/scores/<input stem>.jsonl")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--safety_stage", default="", help="a safety reward-model stage (or an hf: checkpoint): "
                        "combine it with --stage as Llama-2's R_c (Touvron et al. 2023, section 3.2.3)")
    parser.add_argument("--safety_prompts", action="store_true",
                        help="with --safety_stage: every prompt without its own `is_safety` is a safety prompt")
    parser.add_argument("--safety_threshold", type=float, default=0.15,
                        help="with --safety_stage: the safety score wins below this probability")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise config_lib.ConfigError(f"--batch_size={args.batch_size} must be >= 1")
    if not 0.0 < args.safety_threshold < 1.0:
        raise config_lib.ConfigError(f"--safety_threshold={args.safety_threshold} must be in (0, 1)")
    if (args.safety_prompts or args.safety_threshold != 0.15) and not args.safety_stage:
        raise config_lib.ConfigError("--safety_prompts and --safety_threshold need --safety_stage")
    stats = preference_records.PreferenceStats()
    records = inference.read_scoring_records(args.input, stats)
    groups = [g for *_, g in records]
    stage = inference.load(args.run, args.stage, args.model, head="scalar")
    rewards, truncated = inference.score_groups(stage, groups, batch_size=args.batch_size)
    if args.safety_stage:
        safety = (inference.load_model(args.safety_stage, head="scalar") if ":" in args.safety_stage
                  else inference.load_stage(args.run, args.safety_stage, head="scalar"))
        safety_rewards, safety_truncated = inference.score_groups(safety, groups, batch_size=args.batch_size)
        flags = [args.safety_prompts if g["is_safety"] is None else g["is_safety"] for g in groups]
        sizes = [len(r) for r in rewards]
        flat_safety = np.concatenate(safety_rewards) if groups else np.zeros(0, np.float32)
        flat = np.asarray(objectives.combined_reward(  # one call over every sequence, split back per group
            flat_safety, np.concatenate(rewards) if groups else flat_safety,
            np.repeat(np.asarray(flags, bool), sizes), safety_threshold=args.safety_threshold))
        combined = np.split(flat, np.cumsum(sizes)[:-1]) if groups else []
        from_safety = int(np.sum(flat == flat_safety))
        print(f"combined reward (Llama-2 R_c): {args.safety_stage} scored {from_safety} of "
              f"{sum(map(len, combined))} sequences ({sum(flags)} of {len(groups)} records are safety prompts)")
        rewards, truncated = combined, truncated | safety_truncated
        max_context = f"{stage.max_context} ({args.stage}) or {safety.max_context} ({args.safety_stage})"
    else:
        max_context = str(stage.max_context)
    rows, pairs = [], []
    for (rid, kind, group), r, cut in zip(records, rewards, truncated):
        row = {"id": rid}
        if kind != "group":
            row["reward"] = float(r[0])
        elif len(r) == 2:
            row.update(reward_chosen=float(r[0]), reward_rejected=float(r[1]))
            pairs.append(r)
        else:
            row.update(rewards=r.tolist(), ranks=group["ranks"])
        rows.append({**row, "truncated": bool(cut)})
    stem = pathlib.Path(args.input).stem
    output = fs.path(args.output or stage.run_dir / stage.name / "scores" / f"{stem}.jsonl")
    inference.write_jsonl(output, rows)
    print(f"wrote {len(rows)} rows to {output}")
    flat = np.concatenate(rewards) if rewards else np.zeros(0)
    if len(flat):
        print(f"mean reward {flat.mean():.4f} over {len(flat)} sequences ({len(rows)} records)")
    if pairs:
        rc, rr = np.asarray(pairs).T
        print(f"pairs: {len(pairs)}, accuracy {np.mean(rc > rr):.4f} (reward_chosen > reward_rejected), mean margin "
              f"{np.mean(rc - rr):.4f}, mean reward chosen {rc.mean():.4f}, rejected {rr.mean():.4f}")
    print(f"truncated to seq_len={max_context}: {int(truncated.sum())} of {len(rows)}; skipped preference "
          f"records: {stats.skipped_identical} identical, {stats.skipped_empty_prompt} empty prompt, "
          f"{stats.skipped_no_ordered_pair} without an ordered pair")
    return 0


def cmd_lm_eval(argv: Sequence[str]) -> int:
    """lm-evaluation-harness's own command line (`lm-eval [run|ls|validate] ...`, unchanged) with the
    `jaxllm` backend registered (`jaxllm.evaluation.harness`) and two defaults: `--model jaxllm`, and
    the offline tasks of `jaxllm/evaluation/tasks/` always included (before any `--include_path DIR`,
    which may override them). One option of jaxllm's own, `--data_root DIR`, sets the folder those
    tasks read (`JAXLLM_DATA_ROOT`; default ../shared/data). After a run, prints how many requests
    were truncated from the left to the model's context.
    """
    try:
        from lm_eval._cli.harness import HarnessCLI
    except ImportError as e:
        raise FileNotFoundError(f"jaxllm lm-eval needs lm-evaluation-harness: pip install -e '.[eval]' ({e})") from None
    from jaxllm import config as config_lib
    from jaxllm.evaluation import harness
    from jaxllm.evaluation import tasks
    from jaxllm.evaluation.tasks import offline

    argv = list(argv)
    for k, arg in enumerate(argv):
        if arg == "--data_root" or arg.startswith("--data_root="):
            value = arg.partition("=")[2] if "=" in arg else (argv[k + 1] if k + 1 < len(argv) else "")
            if not value:
                raise config_lib.ConfigError("--data_root needs a folder")
            os.environ[offline.ENV_DATA_ROOT] = os.path.abspath(value)
            del argv[k:k + (1 if "=" in arg else 2)]
            break
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli = HarnessCLI()
        args = cli.parse_args()  # inserts `run` when no subcommand is given, as `lm-eval` does
    finally:
        sys.argv = saved
    if getattr(args, "command", None) in ("run", "ls", "validate"):
        args.include_path = [str(tasks.TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    if getattr(args, "command", None) == "run" and args.model is None and not args.config:
        args.model = "jaxllm"
    try:
        cli.execute(args)
    except ValueError as e:  # the harness's own checks of its arguments and task names
        if type(e) is not ValueError or not str(e).startswith(("Tasks not found", "Specify --output_path",
                                                               "Need to specify task")):
            raise
        raise config_lib.ConfigError(str(e).split("\n")[0]) from None
    if harness.JaxLLM.last_instance is not None:
        print(harness.JaxLLM.last_instance.truncation_summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxllm` console script."""
    try:
        verbosity, argv = console.pop_verbosity(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    console.choose_platforms()  # before any command imports JAX
    console.setup_logging(verbosity)
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES:
            return cmd_stage(command, rest)
        handlers = {"pipeline": cmd_pipeline, "tokenizer": cmd_tokenizer, "eval": cmd_eval, "sample": cmd_sample,
                    "compile": cmd_compile, "generate": cmd_generate, "chat": cmd_chat, "score": cmd_score,
                    "export": cmd_export, "plot": cmd_plot, "lm-eval": cmd_lm_eval}
        return handlers[command](rest)
    except _user_errors() as e:
        print(f"jaxllm {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
