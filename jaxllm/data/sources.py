"""Document sources: where the training text comes from.

A *source spec* names one collection of documents. A *mixture string* (config key `data.sources`)
joins specs with `;`, each optionally weighted with `@WEIGHT` (either every entry has a weight or
none does):

    "text:{data_root}/pretrain/botchan/train.txt@0.3; jsonl:corpus/*.jsonl#meta.body@0.7"

`{data_root}` is replaced by the `data_root` argument of `parse_sources`. The characters `@` and
`#` are reserved: the last `@` starts the weight and the last `#` starts the field, so paths must
not contain them. Kinds:

- `text:GLOB` - UTF-8 text files (sorted glob matches; `**` recurses; files named `*.index.jsonl`
  are never read as text). If `STEM.index.jsonl` lies beside `STEM.txt`, the documents are the byte
  ranges `{"byte_start", "byte_end"}` it lists (exact slices); otherwise documents are separated by
  one or more blank (empty or whitespace-only) lines, and line ends at a document's edges are
  dropped.
- `jsonl:GLOB[#field]` - one JSON object per line; the document is the string at `field` (default
  `text`; a dotted path `a.b` indexes nested objects). Blank lines are skipped and counted.
- `tfds:NAME[/CONFIG]:SPLIT[#field]` - records of `tfds.data_source(NAME, split=SPLIT,
  data_dir=...)` (array_record datasets, no TensorFlow needed); `data_dir` is the `tfds_data_dir`
  argument, else `$TFDS_DATA_DIR`, else tfds's default. Bytes values are decoded as UTF-8.
- `stdlib:[SPLIT]` - the embedded default corpus: every `.py` file of the running interpreter's
  standard library, one document per file, sorted by relative path. Directories named
  `site-packages`, `dist-packages`, `test`, `tests` and `idle_test` are left out: they hold
  third-party code and CPython's test suite, whose data files are deliberately malformed (bad
  encodings, invalid syntax). SPLIT is `train` (default) or `validation`: a file is in validation
  iff `int(sha1(relative_path).hexdigest()[:8], 16) % 50 == 0` (~2%), so adding files never moves
  another file between splits. Empty and non-UTF-8 files are skipped and counted here (only here).

Bad user input raises `DataError` naming the spec, file and line (or byte offset). Empty or
whitespace-only documents inside a non-empty file are skipped and counted in `SourceStats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from typing import Any

from jaxllm import fs

KINDS = ("text", "jsonl", "tfds", "stdlib")
STDLIB_SPLITS = ("train", "validation")
# One file in 50 (~2%) is held out; a hash of the path keeps the split stable as files come and go.
STDLIB_VALIDATION_MODULUS = 50
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
INDEX_SUFFIX = ".index.jsonl"

# A document separator: a line end followed by one or more blank (whitespace-only) lines.
_BLANK_LINES = re.compile(r"\r?\n(?:[^\S\n]*\n)+")


class DataError(ValueError):
    """Bad data or a bad source spec; the message names the spec, file and line or byte offset."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed entry of a mixture string.

    Attributes:
      kind: One of `KINDS`.
      location: The glob (`text`, `jsonl`, with `{data_root}` substituted), `NAME[/CONFIG]:SPLIT`
        (`tfds`) or the split (`stdlib`).
      field: Dotted path of the document string in each record (`jsonl`, `tfds`); None otherwise.
      weight: Mixture weight (> 0), or None when the mixture string has no weights.
      text: The entry as written in the mixture string (stripped), for error messages.
    """

    kind: str
    location: str
    field: str | None
    weight: float | None
    text: str


@dataclasses.dataclass
class SourceStats:
    """Counts accumulated while reading documents (all in documents or files, not bytes)."""

    documents: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    files: int = 0


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def parse_sources(spec: str, data_root: str = "") -> list[SourceSpec]:
    """Parses a mixture string into source specs.

    Args:
      spec: `SPEC[@WEIGHT]` entries joined by `;` (see the module docstring).
      data_root: Replaces `{data_root}` in each entry.

    Returns:
      One `SourceSpec` per entry, in order.

    Raises:
      DataError: empty string or entry, unknown kind, bad weight (not a finite number > 0), weights
        on some entries but not others, `{data_root}` used while `data_root` is empty, a field on a
        kind that has none, or a malformed `tfds`/`stdlib` location.
    """
    if not spec or not spec.strip():
        raise DataError("source mixture string is empty")
    parsed = []
    for raw in spec.split(";"):
        entry = raw.strip()
        if not entry:
            raise DataError(f"empty entry in source mixture {spec!r} (stray ';'?)")
        parsed.append(_parse_entry(entry, data_root))
    weighted = [s for s in parsed if s.weight is not None]
    if weighted and len(weighted) != len(parsed):
        unweighted = [s.text for s in parsed if s.weight is None]
        raise DataError(
            f"source mixture {spec!r} mixes weighted and unweighted entries: give every entry a "
            f"weight or none; unweighted: {unweighted}"
        )
    return parsed


def _parse_entry(entry: str, data_root: str) -> SourceSpec:
    body, weight = entry, None
    if "@" in entry:
        body, _, weight_text = entry.rpartition("@")
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(
                f"source {entry!r}: bad weight {weight_text!r}; expected a finite number > 0 "
                "('@' is reserved for the weight)"
            )
    kind, sep, rest = body.partition(":")
    kind = kind.strip()
    if kind == "stdlib" and not sep:  # `stdlib` alone means `stdlib:train`.
        sep = ":"
    if not sep or kind not in KINDS:
        raise DataError(
            f"source {entry!r}: unknown source kind {kind!r}; expected one of "
            + ", ".join(f"{k}:" for k in KINDS)
        )
    field = None
    if "#" in rest:
        rest, _, field = rest.rpartition("#")
        if not field:
            raise DataError(f"source {entry!r}: empty field after '#'")
        if kind in ("text", "stdlib"):
            raise DataError(f"source {entry!r}: {kind}: sources have no '#field'")
    if kind in ("jsonl", "tfds") and field is None:
        field = "text"
    if "{data_root}" in rest:
        if not data_root:
            raise DataError(f"source {entry!r} uses {{data_root}} but data_root is empty")
        rest = rest.replace("{data_root}", str(data_root))
    location = rest.strip()
    if kind in ("text", "jsonl") and not location:
        raise DataError(f"source {entry!r}: missing file glob after '{kind}:'")
    if kind == "tfds":
        name, sep, split = location.rpartition(":")
        if not sep or not name or not split:
            raise DataError(f"source {entry!r}: expected tfds:NAME[/CONFIG]:SPLIT[#field]")
    if kind == "stdlib":
        location = location or "train"
        if location not in STDLIB_SPLITS:
            raise DataError(
                f"source {entry!r}: unknown stdlib split {location!r}; expected one of "
                f"{STDLIB_SPLITS}"
            )
    return SourceSpec(kind=kind, location=location, field=field, weight=weight, text=entry)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_documents(
    source: SourceSpec, stats: SourceStats | None = None, *, tfds_data_dir: str | None = None
) -> Iterator[str]:
    """Yields the documents of one source, lazily, file by file.

    Args:
      source: A parsed source spec.
      stats: Updated in place: documents yielded, empty/undecodable skips, files opened.
      tfds_data_dir: tfds data directory for `tfds:` sources (default `$TFDS_DATA_DIR`).

    Yields:
      Each non-empty document as a `str`, in a deterministic order.

    Raises:
      DataError: a glob that matches no files, an empty file, a non-UTF-8 byte (file, byte offset,
        line), a malformed JSONL line or index entry (file:line), a record without the field or
        whose field is not a string, or a tfds dataset that cannot be opened.
    """
    stats = stats if stats is not None else SourceStats()
    if source.kind == "text":
        for path in resolve_files(source):
            yield from _text_documents(path, stats)
    elif source.kind == "jsonl":
        for path in resolve_files(source):
            yield from _jsonl_documents(path, source.field or "text", stats)
    elif source.kind == "tfds":
        yield from _tfds_documents(source, stats, tfds_data_dir)
    elif source.kind == "stdlib":
        yield from _stdlib_documents(source.location, stats)
    else:
        raise DataError(f"source {source.text!r}: unknown source kind {source.kind!r}")


def read_all_documents(
    sources: Iterable[SourceSpec], stats: SourceStats | None = None, **kwargs: Any
) -> Iterator[str]:
    """Yields the documents of several sources one after the other (see `read_documents`)."""
    for source in sources:
        yield from read_documents(source, stats, **kwargs)


def resolve_files(source: SourceSpec) -> list[pathlib.Path]:
    """Returns the sorted files a `text:` or `jsonl:` glob matches (local, or `gs://` with `*` per
    level: see `jaxllm.fs.glob`).

    Raises:
      DataError: the glob matches no regular file.
    """
    paths = fs.glob(source.location)
    if source.kind == "text":
        paths = [p for p in paths if not p.name.endswith(INDEX_SUFFIX)]
    if not paths:
        raise DataError(f"source {source.text!r}: glob {source.location!r} matches no files")
    return paths


def index_path(path: pathlib.Path) -> pathlib.Path:
    """The document index beside a text file: `train.txt` -> `train.index.jsonl`."""
    return path.with_name(path.stem + INDEX_SUFFIX)


def _decode_file(data: bytes, path: os.PathLike | str) -> str:
    """Decodes a whole file as strict UTF-8, or raises DataError with byte offset and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_bad_byte_message(path, data, e.start, e.reason)) from None


def _bad_byte_message(path, data: bytes, offset: int, reason: str) -> str:
    line = data.count(b"\n", 0, offset) + 1
    return (
        f"{path}: byte offset {offset} (line {line}): not valid UTF-8: byte "
        f"0x{data[offset]:02x} ({reason})"
    )


def _read_nonempty(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty ({len(data)} bytes, nothing but whitespace)")
    return data


def _text_documents(path: pathlib.Path, stats: SourceStats) -> Iterator[str]:
    data = _read_nonempty(path)
    text = _decode_file(data, path)
    stats.files += 1
    index = index_path(path)
    if index.exists():
        pieces = (_index_slice(data, path, index, lineno, entry) for lineno, entry in _index(index))
    else:
        pieces = (p.strip("\r\n") for p in _BLANK_LINES.split(text))
    for doc in pieces:
        if not doc.strip():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        yield doc


def _index(index: pathlib.Path) -> Iterator[tuple[int, dict]]:
    count = 0
    with index.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{index}:{lineno}: malformed index entry: {e}") from None
            count += 1
            yield lineno, entry
    if not count:
        raise DataError(f"{index}: index lists no documents")


def _index_slice(data: bytes, path, index, lineno: int, entry: Any) -> str:
    where = f"{index}:{lineno}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: index entry is not a JSON object")
    bounds = []
    for key in ("byte_start", "byte_end"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{where}: index entry needs an integer {key!r}, got {value!r}")
        bounds.append(value)
    start, end = bounds
    if not 0 <= start <= end <= len(data):
        raise DataError(
            f"{where}: byte range [{start}, {end}) is out of range for {path} ({len(data)} bytes)"
        )
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        # The whole file decoded, so the range cuts a multi-byte character.
        raise DataError(
            f"{where}: byte range [{start}, {end}) of {path} splits a UTF-8 character"
        ) from None


def _jsonl_documents(path: pathlib.Path, field: str, stats: SourceStats) -> Iterator[str]:
    if _size(path) == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    stats.files += 1
    offset, records = 0, 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: byte offset {offset + e.start} (line {lineno}): not valid UTF-8: "
                    f"byte 0x{raw[e.start]:02x} ({e.reason})"
                ) from None
            offset += len(raw)
            if not line.strip():
                stats.skipped_empty += 1
                continue
            records += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {e}") from None
            doc = get_field(record, field, f"{path}:{lineno}")
            if not doc.strip():
                stats.skipped_empty += 1
                continue
            stats.documents += 1
            yield doc
    if not records:
        raise DataError(f"{path}: file is empty (nothing but whitespace)")


def get_field(record: Any, field: str, where: str, allow_bytes: bool = False) -> str:
    """Returns the string at dotted path `field` of a record.

    Args:
      record: A decoded JSON object or tfds example (nested dicts).
      field: Dotted path, e.g. `text` or `meta.body`.
      where: Location for error messages (`file:line`, or a tfds record).
      allow_bytes: Accept `bytes` values and decode them as UTF-8 (tfds `Text` features).

    Raises:
      DataError: the record is not an object, a key is missing, or the value is not a string
        (or not valid UTF-8 bytes).
    """
    value = record
    for part in field.split("."):
        if not isinstance(value, dict):
            raise DataError(f"{where}: record has no field {field!r} (not a JSON object)")
        if part not in value:
            raise DataError(f"{where}: record has no field {field!r}")
        value = value[part]
    if allow_bytes and isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}: field {field!r}: byte offset {e.start}: not valid UTF-8 ({e.reason})"
            ) from None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


# ---------------------------------------------------------------------------------------------
# stdlib
# ---------------------------------------------------------------------------------------------


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(relative_path: str) -> str:
    """`validation` for ~2% of paths (stable hash of the relative path), else `train`."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()
    return "validation" if int(digest[:8], 16) % STDLIB_VALIDATION_MODULUS == 0 else "train"


def stdlib_files(split: str) -> list[tuple[str, pathlib.Path]]:
    """Returns `(relative_posix_path, path)` of the split's `.py` files, sorted by relative path."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                if stdlib_split(rel) == split:
                    files.append((rel, path))
    files.sort()
    return files


def _stdlib_documents(split: str, stats: SourceStats) -> Iterator[str]:
    for _, path in stdlib_files(split):
        data = path.read_bytes()
        stats.files += 1
        if not data.strip():
            stats.skipped_empty += 1
            continue
        try:
            doc = data.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_undecodable += 1
            continue
        stats.documents += 1
        yield doc


# ---------------------------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------------------------


def _tfds_data_dir(tfds_data_dir: str | None) -> str | None:
    return tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _open_tfds(source: SourceSpec, tfds_data_dir: str | None):
    """Returns `(name, split, data_source)`; imports tfds lazily (it takes ~1 s)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    name, _, split = source.location.rpartition(":")
    try:
        ds = tfds.data_source(name, split=split, data_dir=_tfds_data_dir(tfds_data_dir))
    except Exception as e:  # tfds raises many types; report them all at this boundary.
        raise DataError(
            f"source {source.text!r}: cannot open tfds dataset {name!r} split {split!r} "
            f"(data_dir={_tfds_data_dir(tfds_data_dir)!r}): {type(e).__name__}: {e}"
        ) from None
    return name, split, ds


def _tfds_documents(
    source: SourceSpec, stats: SourceStats, tfds_data_dir: str | None
) -> Iterator[str]:
    name, split, ds = _open_tfds(source, tfds_data_dir)
    stats.files += 1
    for i in range(len(ds)):
        doc = get_field(
            ds[i], source.field or "text", f"tfds {name} split {split} record {i}", allow_bytes=True
        )
        if not doc.strip():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        yield doc


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def fingerprint(source: SourceSpec, *, tfds_data_dir: str | None = None) -> str:
    """A stable hash of the resolved inputs of a source.

    Covers kind, location and field plus, per file, its absolute path, size (bytes) and mtime
    (ns) - for `text:` also the index beside it; for `stdlib:` the interpreter version; for `tfds:`
    the dataset's full name (name/config/version), split, data_dir and number of records. Any edit
    to a file changes its size or mtime and so the fingerprint. The weight is not included.

    Returns:
      64 hex characters (sha256).

    Raises:
      DataError: as `resolve_files`, or a tfds dataset that cannot be opened.
    """
    parts: list[Any] = [source.kind, source.location, source.field]
    if source.kind in ("text", "jsonl"):
        for path in resolve_files(source):
            parts.append(_stat(path))
            if source.kind == "text":
                index = index_path(path)
                parts.append(_stat(index) if index.exists() else None)
    elif source.kind == "stdlib":
        parts.append(sys.version)
        parts.extend(_stat(path) for _, path in stdlib_files(source.location))
    elif source.kind == "tfds":
        _, split, ds = _open_tfds(source, tfds_data_dir)
        parts.extend([ds.dataset_info.full_name, split, _tfds_data_dir(tfds_data_dir), len(ds)])
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def _stat(path: pathlib.Path) -> list[Any]:
    if not fs.is_local(path):  # Cloud Storage: seconds, not nanoseconds
        st = path.stat()
        return [os.fspath(path), st.length, st.mtime]
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def _size(path: pathlib.Path) -> int:
    return os.path.getsize(path) if fs.is_local(path) else path.stat().length
