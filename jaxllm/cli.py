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

Errors in configs and data (unknown key, bad mesh, missing file, malformed line ...) print one
line naming the key, file or line, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

STAGES = {"pretrain": "jaxllm.train.pretrain", "sft": "jaxllm.train.sft", "reward": "jaxllm.train.reward",
          "dpo": "jaxllm.train.dpo", "ppo": "jaxllm.train.ppo"}
COMMANDS = ("pipeline", "tokenizer", *STAGES, "eval", "sample", "compile")
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the stage saved a checkpoint and can be resumed


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "etils", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxllm import aot
    from jaxllm import config as config_lib
    from jaxllm import sharding
    from jaxllm.data import sources
    from jaxllm.train import pretrain

    return (config_lib.ConfigError, sharding.MeshError, sources.DataError, pretrain.VocabMismatchError,
            FileNotFoundError, aot.TopologyError)


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
    """Samples from the exported params of a stage of a run."""
    import jax
    import flax.linen as nn

    from jaxllm import checkpoint as ckpt_lib
    from jaxllm import config as config_lib
    from jaxllm import sampling
    from jaxllm.data import tokenizer as tokenizer_lib
    from jaxllm.models import llama

    parser = argparse.ArgumentParser(prog="jaxllm sample")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable); default: bos only")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = config_lib.load_json(os.path.join(args.run, args.stage, "config.json"))
    tok = tokenizer_lib.Tokenizer.load(config_lib.tokenizer_dir(args.run) / "tokenizer.model")
    model_config = llama.LlamaConfig.from_config(config.model)
    abstract = nn.unbox(jax.eval_shape(lambda: llama.init(model_config, jax.random.key(0))))
    params = ckpt_lib.load_params(os.path.join(args.run, args.stage, "params"), abstract)
    prompts = args.prompt or [""]
    outs = sampling.generate(model_config, params, [[tok.bos_id] + tok.encode(p) for p in prompts],
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             eos_id=tok.eos_id, seed=args.seed, max_context=config.data.seq_len)
    for prompt, out in zip(prompts, outs):
        print(f"--- prompt: {prompt!r}\n{prompt}{tok.decode(out)}")
    return 0


def cmd_pipeline(argv: Sequence[str]) -> int:
    """Runs every stage of the pipeline config, then the evaluation."""
    from jaxllm import config as config_lib
    from jaxllm import pipeline
    from jaxllm import sharding

    config = _load(argv, "pipeline")
    sharding.initialize_runtime(config)
    if not pipeline.run(config):
        return EXIT_PREEMPTED
    config_lib.save_json(config, os.path.join(config.run_dir, "pipeline_config.json"))
    print(open(os.path.join(config.run_dir, "report.md"), encoding="utf-8").read())
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    """Evaluates the finished stages of a run (`--run RUN_DIR`); settings from `--config` (a
    pipeline config's `eval` section, default `configs/pipeline.py:tiny`)."""
    from jaxllm import config as config_lib
    from jaxllm import evaluation

    spec, overrides, rest = config_lib.parse_overrides(argv)
    parser = argparse.ArgumentParser(prog="jaxllm eval")
    parser.add_argument("--run", required=True, help="run directory")
    args = parser.parse_args(rest)
    config = config_lib.build(spec or "configs/pipeline.py:tiny", overrides)
    evaluation.evaluate_run(args.run, config.eval, None, config.data_root)
    print(open(os.path.join(args.run, "report.md"), encoding="utf-8").read())
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxllm` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    _setup_logging()
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES:
            return cmd_stage(command, rest)
        handlers = {"pipeline": cmd_pipeline, "tokenizer": cmd_tokenizer, "eval": cmd_eval, "sample": cmd_sample,
                    "compile": cmd_compile}
        return handlers[command](rest)
    except _user_errors() as e:
        print(f"jaxllm {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
