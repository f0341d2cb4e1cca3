"""Datasets of the offline task configs, read from the local JSONL bundle (`../shared/data`).

The YAML files beside this module name these functions as their `custom_dataset`; the harness
calls them with the task's `metadata` and `dataset_kwargs` as keyword arguments, and the merged
`--model_args` / `--metadata` of the command line land in `metadata` too.

**Data root.** The folder holding `eval/` and `sft/` (the bundle's layout, see
`../shared/data/README.md`) is, by the first rule that applies:
1. `data_root` in the task metadata: `jaxllm lm-eval --data_root DIR` (or lm-eval's own
   `--metadata '{"data_root": "DIR"}'`, or `TaskManager(metadata={"data_root": DIR})` in Python);
2. the environment variable `JAXLLM_DATA_ROOT`;
3. `../shared/data`, relative to the working directory (the project's default, as
   `--config.data_root=../shared/data`).

Files read (fields as the bundle writes them):
- `eval/mmlu_test.jsonl`, `eval/mmlu_dev.jsonl`: `subject`, `question`, `choices` (4 strings),
  `answer` (a letter A-D). Rows gain `subject_name` (`subject` with spaces) and `answer` becomes
  the index 0-3 (the harness's `doc_to_target` of a multiple-choice task).
- `eval/gsm8k_test.jsonl`: `question`, `answer` (solution ending `#### N`).
- `sft/gsm8k/train.jsonl` (the few-shot pool of `gsm8k`): `messages` [user question, assistant
  solution], turned into `question`, `answer`.

Every malformed input raises `jaxllm.data.sources.DataError` naming the file and line.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Any

import datasets

from jaxllm.data import chat
from jaxllm.data.sources import DataError

DEFAULT_DATA_ROOT = "../shared/data"
ENV_DATA_ROOT = "JAXLLM_DATA_ROOT"
LETTERS = "ABCD"


class _CustomDatasetNotice(logging.Filter):
    """Drops the harness's per-task advice on `custom_dataset` kwargs (one warning per MMLU subject)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_task_logger = logging.getLogger("lm_eval.api.task")
if not any(type(f).__name__ == _CustomDatasetNotice.__name__ for f in _task_logger.filters):
    _task_logger.addFilter(_CustomDatasetNotice())


def resolve_root(value: str | None = None) -> pathlib.Path:
    """The data root (module docstring): `value`, else `$JAXLLM_DATA_ROOT`, else `../shared/data`."""
    return pathlib.Path(value or os.environ.get(ENV_DATA_ROOT) or DEFAULT_DATA_ROOT).expanduser()


@functools.lru_cache(maxsize=8)
def _records(path: str, mtime_ns: int) -> tuple[tuple[int, dict], ...]:
    del mtime_ns  # part of the cache key only: an edited file is read again
    return tuple(chat.read_records(path))


def read_jsonl(root: pathlib.Path, relative: str) -> list[tuple[str, dict]]:
    """`(where, record)` of every record of `root/relative`, `where` = "file:line".

    Raises:
      DataError: a missing file (saying how to set the data root), or a malformed line (file:line).
    """
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path}: file not found (data root {root}; set it with `jaxllm lm-eval --data_root DIR`, "
                        f"--metadata '{{\"data_root\": \"DIR\"}}' or {ENV_DATA_ROOT}=DIR)")
    return [(f"{path}:{lineno}", record) for lineno, record in _records(str(path), path.stat().st_mtime_ns)]


def _field(record: dict, key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        got = "missing" if key not in record else type(value).__name__
        raise DataError(f"{where}: field {key!r} must be a {kind.__name__} ({got})")
    return value


def mmlu_row(record: dict, where: str) -> dict:
    """One MMLU record as a harness doc: `subject`, `subject_name`, `question`, `choices`, `answer` (0-3).

    Raises:
      DataError: a missing field, not 4 string choices, or an answer that is not A-D (file:line).
    """
    choices = _field(record, "choices", list, where)
    if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must hold 4 strings (got {len(choices)} items)")
    answer = _field(record, "answer", str, where)
    if answer not in LETTERS:
        raise DataError(f"{where}: field 'answer' must be one of A, B, C, D (got {answer!r})")
    subject = _field(record, "subject", str, where)
    return {"subject": subject, "subject_name": subject.replace("_", " "),
            "question": _field(record, "question", str, where), "choices": choices,
            "answer": LETTERS.index(answer)}


def mmlu(subject: str, data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """`test` and `dev` splits of one MMLU subject (`eval/mmlu_test.jsonl`, `eval/mmlu_dev.jsonl`).

    Raises:
      DataError: as `read_jsonl` and `mmlu_row`, or a subject with no test question.
    """
    root = resolve_root(data_root)
    splits = {}
    for split in ("test", "dev"):
        rows = [mmlu_row(r, where) for where, r in read_jsonl(root, f"eval/mmlu_{split}.jsonl")
                if r.get("subject") == subject]
        if not rows:
            raise DataError(f"{root / f'eval/mmlu_{split}.jsonl'}: no question of subject {subject!r}")
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def gsm8k_row(record: dict, where: str) -> dict:
    """A GSM8K record as a harness doc `{question, answer}`: `question`/`answer` fields, or
    `messages` [user question, assistant solution] (the SFT copy of the train split).

    Raises:
      DataError: neither form, naming file and line.
    """
    if "messages" in record:
        messages = _field(record, "messages", list, where)
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be one user question and one assistant solution")
        return {"question": messages[0]["content"], "answer": messages[1]["content"]}
    return {"question": _field(record, "question", str, where), "answer": _field(record, "answer", str, where)}


def gsm8k(data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """`test` (`eval/gsm8k_test.jsonl`) and `train` (`sft/gsm8k/train.jsonl`, few-shot pool) splits.

    Raises:
      DataError: as `read_jsonl` and `gsm8k_row`.
    """
    root = resolve_root(data_root)
    files = {"test": "eval/gsm8k_test.jsonl", "train": "sft/gsm8k/train.jsonl"}
    return datasets.DatasetDict({split: datasets.Dataset.from_list([gsm8k_row(r, w) for w, r in read_jsonl(root, f)])
                                 for split, f in files.items()})
