"""SFT, preference and prompt sets built from the Python standard library (the embedded default).

Every stage of the main job takes real, human-written examples from the running interpreter's
standard library, so `jaxllm pipeline --config configs/pipeline.py:tiny` needs no download:

- SFT: the user turn is a function's signature and docstring, the assistant turn its real body.
- Preference pairs: the same prompt; `chosen` is the real body, `rejected` the body of a different
  function of similar length (a deterministic, seeded pairing).
- Prompts (PPO, evaluation): signatures and docstrings of held-out functions: for training
  (`prompts/train`), the train-file functions left out of the capped SFT and preference sets;
  for evaluation (`prompts/test`), the functions of the held-out files.

Functions come from the same train/validation split of files as `stdlib:` pretraining text
(`sources.stdlib_split`), so held-out prompts are from files the model never saw. The sets are
written as JSONL in the formats of `../shared/data` (`messages`; `prompt`/`chosen`/`rejected`).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib
import random
import textwrap
from typing import Iterator

from jaxllm import fs
from jaxllm.data import sources

logger = logging.getLogger(__name__)

INSTRUCTION = "Complete the body of this Python function."


def _functions(split: str, max_body_chars: int, min_body_lines: int) -> Iterator[dict]:
    """Yields `{"id", "header", "body"}` for documented functions of the split's files."""
    for rel, path in sources.stdlib_files(split):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)) or len(node.body) < 2:
                continue
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            header = textwrap.dedent("\n".join(lines[start - 1: doc.end_lineno]))
            body_lines = lines[doc.end_lineno: node.end_lineno]
            body = textwrap.dedent("\n".join(body_lines)).strip("\n")
            if len(body_lines) < min_body_lines or len(body) > max_body_chars or not body.strip():
                continue
            yield {"id": f"{rel}:{node.lineno}:{node.name}", "header": header, "body": body}


def _messages(header: str) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{header}"}]


def build(out_dir: str | os.PathLike, *, seed: int = 0, max_body_chars: int = 1200,
          min_body_lines: int = 2, max_examples: int = 0) -> dict[str, int]:
    """Writes the stdlib task sets under `out_dir` and returns their sizes.

    Files: `sft/{train,test}.jsonl` (`messages`), `preference/{train,test}.jsonl` (`prompt`,
    `chosen`, `rejected`), `prompts/{train,test}.jsonl` (`messages` ending with the user turn).
    `train` comes from the stdlib train files, `test` from the held-out validation files.
    Writing is atomic per file and skipped when the files exist (the sets are deterministic).

    Args:
      out_dir: directory to write to.
      seed: seeds the pairing of rejected bodies and the order of examples.
      max_body_chars: functions with longer bodies are left out (they would not fit small models).
      min_body_lines: functions with shorter bodies are left out.
      max_examples: cap on the train split's SFT and preference sets (0 = all); the train
        functions beyond it become the PPO prompts. The held-out split is always whole.
    """
    out = fs.path(out_dir)
    sizes: dict[str, int] = {}
    for split, name in (("train", "train"), ("validation", "test")):
        funcs = sorted(_functions(split, max_body_chars, min_body_lines), key=lambda f: f["id"])
        rng = random.Random(f"{seed}:{split}")
        rng.shuffle(funcs)
        rl = funcs
        if max_examples and split == "train":
            # PPO prompts: functions the SFT and preference sets leave out (held out from them).
            funcs, rl = funcs[:max_examples], funcs[max_examples:] or funcs
        by_length = sorted(range(len(funcs)), key=lambda i: len(funcs[i]["body"]))
        rank = {i: r for r, i in enumerate(by_length)}
        sft, prefs = [], []
        prompts = [{"id": f["id"], "messages": _messages(f["header"])} for f in rl]
        for i, f in enumerate(funcs):
            prompt = _messages(f["header"])
            sft.append({"id": f["id"], "messages": prompt + [{"role": "assistant", "content": f["body"]}]})
            # A different function of similar length: a neighbour in length order.
            r = rank[i]
            neighbours = [by_length[j] for j in (r - 2, r - 1, r + 1, r + 2) if 0 <= j < len(funcs)]
            other = funcs[rng.choice(neighbours)] if neighbours else None
            if other is not None and other["body"] != f["body"]:
                prefs.append({"id": f["id"], "prompt": prompt,
                              "chosen": [{"role": "assistant", "content": f["body"]}],
                              "rejected": [{"role": "assistant", "content": other["body"]}],
                              "meta": {"rejected_from": other["id"]}})
        for kind, rows in (("sft", sft), ("preference", prefs), ("prompts", prompts)):
            _write_jsonl(out / kind / f"{name}.jsonl", rows)
            sizes[f"{kind}/{name}"] = len(rows)
    logger.info("stdlib task sets in %s: %s", out, sizes)
    return sizes


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    if path.exists():
        return
    fs.write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
