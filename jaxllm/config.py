"""Run configs: loading `configs/FILE.py[:ARG]`, `--config.a.b=value` overrides, the run directory.

A config file defines `get_config(arg=None)` returning a locked `ml_collections.ConfigDict`.
Overrides are parsed by the type of the value they replace, and an override of a key that does not
exist fails with the key's name (and the closest existing keys).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
from typing import Any, Sequence

import ml_collections
from etils import epath

from jaxllm import fs

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


def resolve_config_path(path: str) -> pathlib.Path:
    """Finds a config file relative to the working directory, else to the project root.

    Raises:
      ConfigError: if neither exists.
    """
    candidates = [pathlib.Path(path), PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked in {os.getcwd()} and {PROJECT_ROOT})")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `PATH[:ARG]` by calling the file's `get_config(ARG)`; the result is locked.

    Raises:
      ConfigError: missing file, no `get_config`, or `get_config` rejecting ARG.
    """
    path, _, arg = spec.partition(":")
    file = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"jaxllm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file} defines no get_config(arg)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except KeyError as e:
        raise ConfigError(f"{file}: {e.args[0] if e.args else e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config must return an ml_collections.ConfigDict")
    config.lock()
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of `config` as dotted paths."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def _parse_value(key: str, raw: str, current: Any, field_type: type | None) -> Any:
    target = field_type if current is None else type(current)
    if current is None and raw.strip() == "None":
        return None
    try:
        if target is bool:
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
        if target in (tuple, list):
            try:
                value = ast.literal_eval(raw) if raw.strip()[:1] in "([" else ast.literal_eval(f"({raw},)")
            except (ValueError, SyntaxError):
                if current and not all(isinstance(x, str) for x in current):
                    raise
                value = [part.strip() for part in raw.split(",")]  # a,b,c for a tuple of strings
            return target(value)
        if target is str or target is None:
            return raw
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--config.{key}={raw!r}: cannot parse as {target.__name__}: {e}") from None


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets `config.<key>` from the string `raw`, parsed by the type of the current value.

    Raises:
      ConfigError: if the key does not exist (naming it and close matches), names a whole
        section, or the value does not parse as the field's type.
    """
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            close = difflib.get_close_matches(key, flat_keys(config), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    field_type = node.get_ref(leaf).get_type() if current is None else None
    value = _parse_value(key, raw, current, field_type)
    with node.unlocked():
        node[leaf] = value


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Splits `argv` into the `--config` spec, `--config.key=value` overrides and other args.

    Both `--config.key=value` and `--config.key value` are accepted.
    """
    spec, overrides, rest = None, [], []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config.") or arg.startswith("--config="):
            name, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                value = args[i + 1]
                i += 1
            if name == "config":
                spec = value
            else:
                overrides.append((name[len("config."):], value))
        elif arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a value: configs/FILE.py[:ARG]")
            spec = args[i + 1]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


def build(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Loads the config file `spec` and applies `overrides` in order; returns a locked config."""
    config = load_config_file(spec)
    for key, raw in overrides:
        apply_override(config, key, raw)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-serialisable dict of `config` (tuples become lists)."""
    return json.loads(config.to_json())


def from_dict(data: dict) -> ml_collections.ConfigDict:
    """Rebuilds a locked ConfigDict from `to_dict` output (lists of pairs stay lists)."""
    return ml_collections.ConfigDict(data).lock()


def save_json(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Writes the resolved config as JSON atomically."""
    fs.write_atomic(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads a config written by `save_json`.

    Raises:
      ConfigError: if the file is missing (naming it).
    """
    path = fs.path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: is this a jaxllm run directory?")
    return from_dict(json.loads(path.read_text()))


def stage_dir(config: ml_collections.ConfigDict, stage: str | None = None) -> epath.Path:
    """`RUN_DIR/<stage>/`: checkpoints, params, metrics of one stage (local or `gs://`, see `fs`)."""
    return fs.path(config.run_dir) / (stage or config.stage)


def tokenizer_dir(run_dir: str | os.PathLike) -> epath.Path:
    """`RUN_DIR/tokenizer/`, shared by every stage of the run."""
    return fs.path(run_dir) / "tokenizer"


# Keys of the `model` section that fix parameter shapes and layout: a stage that starts from an
# earlier stage's params takes them from that stage's config; compute settings (dtype,
# remat_policy, attention_impl) stay the stage's own.
MODEL_SHAPE_KEYS = ("family", "vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias",
                    "scan_layers", "param_dtype", "architecture", "rope_scaling", "rope_scaling_factor",
                    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position")


def inherit_model_shape(config: ml_collections.ConfigDict, source_stage_dir: str | os.PathLike) -> None:
    """Copies `MODEL_SHAPE_KEYS` from the config of the stage in `source_stage_dir`.

    Raises:
      ConfigError: if that stage has no `config.json` (it has not run).
    """
    path = fs.path(source_stage_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the {path.parent.name} stage first")
    source = load_json(path).model
    with config.model.unlocked():
        for key in MODEL_SHAPE_KEYS:
            if key in source:
                config.model[key] = source[key]
