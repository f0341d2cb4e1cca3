"""lm-evaluation-harness task configs that read the local JSONL bundle instead of the hub.

`jaxllm lm-eval` adds this folder to the harness's `--include_path`. The YAML files are ordinary
harness task configs; their `custom_dataset` is a function of `offline.py`, which reads the files
under the data root (see `offline.resolve_root`).
"""

import pathlib

TASKS_DIR = pathlib.Path(__file__).resolve().parent
