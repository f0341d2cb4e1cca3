"""Atomic writes: a failure in the middle of writing leaves the old file and no temporary behind.

The failure is injected where the bytes go to disk: `pathlib.Path.write_text` / `write_bytes`,
`np.save` and `np.savez` write half of their data and raise `OSError` (a full disk). Files that
are rewritten (`metrics.jsonl` on resume, `report.*`, any `config.write_atomic` target) must
keep their old content; caches that fail to write must leave no `.tmp-*` file or folder, and the
next attempt must succeed.
"""

import contextlib
import json
import os
import pathlib

import numpy as np
import pytest
from etils.epath import backend as epath_backend

from jaxllm import evaluation
from jaxllm import fs
from jaxllm.data import chat, lm, preference, sources
from jaxllm.data import sft as sft_data
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.train import metrics as metrics_lib


class _HalfWriter:
    """A file whose first `write` stores half of its data, then raises OSError (a full disk)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device", self._f.name)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def full_disk():
    """Inside the block, file writes fail half-way (a full disk): through `pathlib`, through
    `etils.epath` (`jaxllm.fs`, local files) and through `np.save`/`np.savez` given a file name."""
    write_bytes, save, savez = pathlib.Path.write_bytes, np.save, np.savez
    epath_open = epath_backend._OsPathBackend.open

    def half_bytes(self, data):
        write_bytes(self, data[:len(data) // 2])
        raise OSError(28, "No space left on device", str(self))

    def half_text(self, data, encoding=None, errors=None, newline=None):
        half_bytes(self, data.encode(encoding or "utf-8"))

    def failing_open(self, path, mode):
        f = epath_open(self, path, mode)
        return _HalfWriter(f) if any(m in mode for m in "wax") else f

    def truncated(original, suffix):
        def write(file, *args, **kwargs):
            original(file, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)):  # np.save(name) adds the suffix when missing
                name = os.fspath(file)
                name = name if os.path.exists(name) else name + suffix
                os.truncate(name, os.path.getsize(name) // 2)
            raise OSError(28, "No space left on device", str(file))
        return write

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pathlib.Path, "write_text", half_text)
        m.setattr(pathlib.Path, "write_bytes", half_bytes)
        m.setattr(epath_backend._OsPathBackend, "open", failing_open)
        m.setattr(np, "save", truncated(save, ".npy"))
        m.setattr(np, "savez", truncated(savez, ".npz"))
        yield


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "done.json"
    fs.write_atomic(path, '{"step": 1}\n')
    with full_disk(), pytest.raises(OSError):
        fs.write_atomic(path, '{"step": 2, "eval": {}}\n')
    assert path.read_text() == '{"step": 1}\n' and listing(tmp_path) == ["done.json"]


def test_truncate_metrics_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    path.write_text(text)
    with full_disk(), pytest.raises(OSError):
        metrics_lib.truncate_metrics(tmp_path, 3)
    assert path.read_text() == text and listing(tmp_path) == ["metrics.jsonl"]
    metrics_lib.truncate_metrics(tmp_path, 3)
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3]
    assert listing(tmp_path) == ["metrics.jsonl"]


def test_report_failure_keeps_the_old_report(tmp_path):
    evaluation.write_report({"stages": {"sft": {"step": 3, "train": {"loss": 1.5}}}}, tmp_path)
    old = {name: (tmp_path / name).read_text() for name in ("report.json", "report.md")}
    with full_disk(), pytest.raises(OSError):
        evaluation.write_report({"stages": {"sft": {"step": 9, "train": {"loss": 0.5}}}}, tmp_path)
    assert {name: (tmp_path / name).read_text() for name in old} == old
    assert listing(tmp_path) == ["report.json", "report.md"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A char tokenizer with jaxllm's role markers."""
    c = tokenizer_lib.default_config()
    c.update(model_type="char", byte_fallback=False, num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return tokenizer_lib.train_tokenizer(c, ["the quick brown fox jumps over a lazy dog? yes, no. 0123456789"] * 3,
                                         path)


def write_inputs(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "docs.txt"
    text.write_bytes(b"the quick brown fox\n\njumps over a lazy dog\n")
    convs = directory / "sft.jsonl"
    convs.write_bytes("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}?"},
                                                       {"role": "assistant", "content": "yes" * i}]}) + "\n"
                              for i in range(1, 4)).encode())
    pairs = directory / "pairs.jsonl"
    pairs.write_bytes("".join(json.dumps({"prompt": [{"role": "user", "content": f"q {i}?"}],
                                          "chosen": [{"role": "assistant", "content": "yes"}],
                                          "rejected": [{"role": "assistant", "content": "no" * i}]}) + "\n"
                              for i in range(1, 4)).encode())
    return {"text": text, "sft": convs, "preference": pairs}


def build_cache(kind: str, tok, files, cache_dir):
    if kind == "tokens":
        specs = sources.parse_sources(f"text:{files['text']}")
        return lm.tokenize_corpus(specs, tok, cache_dir=cache_dir, add_bos=True, add_eos=True, num_threads=1).num_docs
    template = chat.ChatTemplate(tok)
    if kind == "sft":
        (spec,) = sft_data.parse_sft_sources(f"jsonl:{files['sft']}")
        return len(sft_data.source_examples(spec, template, cache_dir).starts)
    (spec,) = preference.parse_preference_sources(f"jsonl:{files['preference']}")
    return preference.source_groups(spec, template, cache_dir).num_groups


@pytest.mark.parametrize("kind", ["tokens", "sft", "preference"])
def test_failed_cache_write_leaves_no_temporary(tmp_path, tokenizer, kind):
    files = write_inputs(tmp_path / "inputs")
    cache_dir = tmp_path / "cache"
    with full_disk(), pytest.raises(OSError):
        build_cache(kind, tokenizer, files, cache_dir)
    assert listing(cache_dir) == []
    size = build_cache(kind, tokenizer, files, cache_dir)
    assert size > 0 and not [p for p in listing(cache_dir) if ".tmp" in p]
    assert build_cache(kind, tokenizer, files, cache_dir) == size  # a cache hit reads the same
