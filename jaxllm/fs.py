"""Run-directory files on a local disk or on Cloud Storage (`gs://`), through `etils.epath`.

A Cloud TPU pod's VMs, and their disks, are deleted on preemption, so a pod run keeps its run
directory in a bucket: `--config.run_dir=gs://BUCKET/runs/NAME`. Every file jaxllm writes under a
run directory (checkpoints, `params/`, `metrics.jsonl`, TensorBoard events, token caches, the DPO
reference table, `tokenizer/`, `config.json`, `done.json`, reports) goes through `path()`, an
`epath.Path` (what orbax uses): local paths behave as `pathlib` paths, `gs://` ones go through
`gcsfs`. Cloud Storage differs from a POSIX disk in three ways, hidden here:

- **No append.** `append_text` appends to a local file and rewrites a remote object with the new
  text added (the files appended to, `metrics.jsonl` and `samples.jsonl`, are small).
- **No atomic directory rename.** `atomic_path` renames a local temporary directory into place
  (`os.rename`); on Cloud Storage it copies the files one by one and then writes a `COMPLETE`
  marker object, and `dir_complete` is true only once the marker exists. A file is written as a
  temporary object and copied over the final name server-side (an object appears whole or not at
  all; an upload interrupted by an exception would otherwise be finalised by the file's close).
- **No memory mapping.** `load_npy` maps a local `.npy` file and reads a remote one into memory.

Tests run these paths against a local Cloud Storage emulator (tests/test_gcs.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from typing import Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike
COMPLETE = "COMPLETE"  # marker object of a directory committed to Cloud Storage


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path`: a local path (relative paths stay relative) or a `gs://` URI."""
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def is_local(p: PathLike) -> bool:
    """True unless `p` is a URI such as `gs://bucket/dir`."""
    return "://" not in os.fspath(p)


def absolute(p: PathLike) -> epath.Path:
    """`p` made absolute when local (orbax needs absolute directories); a URI as it is."""
    p = path(p)
    return p.absolute() if is_local(p) else p


@contextlib.contextmanager
def atomic_path(p: PathLike) -> Iterator[epath.Path]:
    """Yields a temporary path beside `p` to write a file or a directory to; moves it to `p` when
    the block succeeds and removes it when the block raises, so readers see the old content or the
    new, never a part, and a failure leaves no temporary behind.

    The temporary name is `.tmp-<random>-<name>`: unique per writer (every host of a multi-host run
    may write the same file) and ending like `p`, so `np.save` adds no suffix. A file replaces the
    old one. A directory cannot replace a complete one: when `p` already is one (a concurrent writer
    of the same cache entry finished first), it is kept and the new one discarded. On Cloud Storage
    a directory's files (one level, no subdirectories) are copied to `p`, then its `COMPLETE` marker
    is written: check it with `dir_complete`, not `exists`.

    Raises:
      IsADirectoryError: a remote temporary directory holding a subdirectory.
    """
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".tmp-{uuid.uuid4().hex[:8]}-{p.name}"
    try:
        yield tmp
        if not tmp.is_dir():
            if is_local(p):
                tmp.replace(p)
            else:  # a server-side copy: the object appears whole (a rename is a copy and a delete)
                tmp.copy(p, overwrite=True)
        elif is_local(p):
            try:
                os.rename(tmp, p)
            except OSError:
                if not p.is_dir():
                    raise
        elif not dir_complete(p):
            for child in sorted(tmp.iterdir()):
                if child.is_dir():
                    raise IsADirectoryError(f"{child}: atomic_path copies one level of files to Cloud Storage")
                child.copy(p / child.name, overwrite=True)
            (p / COMPLETE).write_text("")
    finally:
        if tmp.is_dir():
            if is_local(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rmtree(missing_ok=True)
        elif tmp.exists():
            tmp.unlink()


def dir_complete(p: PathLike) -> bool:
    """Whether the directory `p` was committed whole by `atomic_path` (local: it exists)."""
    p = path(p)
    return p.is_dir() if is_local(p) else (p / COMPLETE).exists()


def write_atomic(p: PathLike, data: str | bytes) -> None:
    """Writes `data` (str as UTF-8) to `p` atomically, creating parent directories (`atomic_path`)."""
    with atomic_path(p) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def append_text(p: PathLike, text: str) -> None:
    """Appends `text` (UTF-8) to the file `p`, creating it and its parent directories.

    A remote object cannot be appended to: it is rewritten with `text` added (one object write, so
    a reader sees the old content or the new).
    """
    p = path(p)
    if is_local(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
    else:
        old = p.read_text(encoding="utf-8") if p.exists() else ""
        p.write_text(old + text, encoding="utf-8")


def load_npy(p: PathLike, mmap: bool = True) -> np.ndarray:
    """Reads a `.npy` file: memory-mapped (read-only) when local and `mmap`, else into memory."""
    p = path(p)
    if is_local(p):
        return np.load(os.fspath(p), mmap_mode="r" if mmap else None, allow_pickle=False)
    with p.open("rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def save_npy(p: PathLike, array: np.ndarray) -> None:
    """Writes `array` as a `.npy` file at `p` (local or remote)."""
    with path(p).open("wb") as f:
        np.save(f, array)


def glob(pattern: str) -> list[epath.Path]:
    """Sorted paths of the files matching `pattern`: a local glob (`**` recurses) or a `gs://` one
    (`*` and `?` per level; `**` is refused by epath on Cloud Storage)."""
    if is_local(pattern):
        import glob as glob_lib

        return sorted(path(m) for m in glob_lib.glob(pattern, recursive=True) if os.path.isfile(m))
    scheme, rest = pattern.split("://", 1)
    bucket, _, key = rest.partition("/")
    root = path(f"{scheme}://{bucket}")
    return sorted(m for m in root.glob(key) if m.is_file())
