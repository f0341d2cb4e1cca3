"""The main job: `jaxllm pipeline --config configs/pipeline.py:ARG` runs tokenizer -> pretrain ->
SFT -> reward -> PPO and DPO -> evaluation in one run directory.

Each stage section of the pipeline config (`pretrain`, `sft`, `reward`, `ppo`, `dpo`) is a complete
stage config; the pipeline's `run_dir`, `data_root`, `seed`, `mesh` and `distributed` are copied
into every stage. A stage whose `RUN_DIR/<stage>/done.json` exists is skipped, a stage that was
interrupted resumes from its last checkpoint, so rerunning the command after a crash or `kill -9`
finishes the same run with the same report.
"""

from __future__ import annotations

import importlib
import logging

import ml_collections

from jaxllm import config as config_lib
from jaxllm import evaluation
from jaxllm import fs

STAGE_MODULES = {"pretrain": "jaxllm.train.pretrain", "sft": "jaxllm.train.sft", "reward": "jaxllm.train.reward",
                 "ppo": "jaxllm.train.ppo", "dpo": "jaxllm.train.dpo"}
SHARED_KEYS = ("run_dir", "data_root", "seed", "mesh", "distributed")
CONFIG_FILE = "pipeline_config.json"


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config of `stage` with the pipeline's shared keys copied in."""
    c = config[stage]
    with c.unlocked():
        for key in SHARED_KEYS:
            c[key] = config[key]
    return c


def run(config: ml_collections.ConfigDict) -> bool:
    """Runs the pipeline; returns False if a stage was preempted (SIGTERM) before the end.

    Raises:
      ConfigError: an unknown stage name in `config.stages`.
    """
    unknown = [s for s in config.stages if s not in STAGE_MODULES]
    if unknown:
        raise config_lib.ConfigError(f"pipeline stages {unknown} unknown; expected some of {list(STAGE_MODULES)}")
    run_dir = fs.path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # `jaxllm eval --run RUN_DIR` reads its settings from here.
    config_lib.save_json(config, run_dir / CONFIG_FILE)
    for stage in config.stages:
        if (run_dir / stage / "done.json").exists():
            logging.info("pipeline: %s already finished, skipping", stage)
            continue
        logging.info("pipeline: running %s", stage)
        result = importlib.import_module(STAGE_MODULES[stage]).run(stage_config(config, stage))
        if result.preempted:
            return False
    evaluation.evaluate_run(run_dir, config.eval, config.mesh, config.data_root)
    return True
