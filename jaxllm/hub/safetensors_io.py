"""Safetensors files, one tensor at a time: a reader over a Hugging Face model folder and a
streaming writer.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length `N`,
`N` bytes of JSON mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
(byte offsets into the data that follows the header; `"__metadata__"` holds string metadata),
then the raw little-endian data. Reading goes through `safetensors.safe_open` (memory-mapped);
writing is done here so that a file is written tensor by tensor with only one tensor in host
memory (`safetensors.numpy.save_file` needs the whole file's tensors at once).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Any, Callable, Iterable

import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy, so safe_open can return BF16 tensors
import numpy as np

from jaxllm.hub import HubError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# NumPy dtype name -> safetensors dtype tag (the formats' own names).
DTYPE_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HubError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HubError(f"{path}: cannot be read ({e})") from None
    if not isinstance(value, dict):
        raise HubError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


class SafetensorsReader:
    """A `jaxllm.hub.CheckpointReader` over a Hugging Face model folder.

    The folder holds `config.json` and either `model.safetensors` or the shards named by
    `model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Every file's header is
    read when the reader is made (names, shapes, dtypes; a truncated or corrupt file fails here);
    tensors are read one at a time, memory-mapped.

    Attributes:
      path: the folder.
      config: `config.json` as a dict.

    Raises (constructor):
      HubError: no such folder, no `config.json` (or not JSON), no safetensors weights (PyTorch
        `.bin` checkpoints are not read), a shard named by the index that is missing or does not
        hold the tensors the index says, or a file safetensors cannot parse (naming the file).
    """

    def __init__(self, directory: str | pathlib.Path):
        from safetensors import safe_open  # noqa: PLC0415

        self._safe_open = safe_open
        folder = pathlib.Path(directory)
        self.path = str(folder)
        if not folder.is_dir():
            raise HubError(f"{folder}: no such folder")
        if not (folder / "config.json").is_file():
            raise HubError(f"{folder}: no config.json (a Hugging Face model folder has config.json and "
                           f"model.safetensors or sharded model-*.safetensors with {INDEX_FILE})")
        self.config = _read_json(folder / "config.json")
        index_path = folder / INDEX_FILE
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HubError(f"{index_path}: no weight_map (tensor name -> shard file)")
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            hint = f"; found {other[:3]}: convert them to safetensors first" if other else ""
            raise HubError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._tensors: dict[str, tuple[pathlib.Path, tuple[int, ...], str]] = {}
        for name in files:
            file = folder / name
            if not file.is_file():
                raise HubError(f"{index_path}: shard {name} is missing from {folder}")
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self._tensors[key] = (file, tuple(s.get_shape()), s.get_dtype())
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is unusable
                raise HubError(f"{file}: not a readable safetensors file ({_first_line(e)}; truncated?)") from None
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._tensors or self._tensors[key][0].name != name:
                    raise HubError(f"{index_path}: tensor {key} is mapped to {name}, which does not hold it")

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensors)

    def file_of(self, name: str) -> str:
        """The file holding tensor `name` (for messages)."""
        return str(self._entry(name)[0])

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (Hugging Face layout), from the header."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        """Safetensors dtype tag of tensor `name` ("F32", "BF16", ...)."""
        return self._entry(name)[2]

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as stored (BF16 as `ml_dtypes.bfloat16`), Hugging Face layout.

        Raises:
          HubError: unknown name, or a file that cannot be read any more (naming file and tensor).
        """
        file = self._entry(name)[0]
        try:
            with self._safe_open(str(file), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise HubError(f"{file}: cannot read tensor {name} ({_first_line(e)})") from None

    def _entry(self, name: str):
        if name not in self._tensors:
            raise HubError(f"{self.path}: no tensor {name}")
        return self._tensors[name]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names for `count` shards: `model.safetensors` or
    `model-00001-of-0000N.safetensors` ..."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_shards(sizes: Iterable[int], max_shard_bytes: int) -> list[int]:
    """Shard number of each tensor (in order) when tensors fill shards of at most `max_shard_bytes`
    bytes in turn (a tensor larger than the limit gets a shard of its own), as `save_pretrained`."""
    shard, used, out = 0, 0, []
    for size in sizes:
        if used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out


def write_safetensors(path: pathlib.Path | None, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Writes one safetensors file tensor by tensor; returns its data size in bytes.

    Args:
      path: the file; None fetches every tensor without writing (the other processes of a
        multi-host export, whose `fetch` takes part in collective gathers).
      entries: `(name, shape, dtype)` of each tensor, in file order.
      fetch: `name -> array` of that shape and dtype, called once per entry in order.
      metadata: string metadata (`{"format": "pt"}` for `transformers`).

    Raises:
      ValueError: `fetch` returned another shape or dtype than its entry.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_TAGS[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    f = open(path, "wb") if path is not None else None
    try:
        if f is not None:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(fetch(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: got {array.shape} {array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
            if f is not None:
                f.write(array.reshape(-1).view(np.uint8).data)
    finally:
        if f is not None:
            f.close()
    return offset
