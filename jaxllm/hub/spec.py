"""Model specs: where a stage or command takes its model from.

A spec is one string, accepted by every stage's `init_from` (and PPO's `reward_from`) and by the
`--model` flag of `jaxllm generate | chat | sample | score`:

| spec | model |
| --- | --- |
| `STAGE` (e.g. `sft`) | `params/` of that stage of this run (or of `init_run_dir`): jaxllm's own hand-off |
| `hf:DIR` | a Hugging Face folder: `config.json`, `model.safetensors` (or shards + index), tokenizer files |
| `hf:ORG/NAME[@REVISION]` | the same, downloaded by `huggingface_hub.snapshot_download` into its cache (`HF_HOME`) |
| `gguf:FILE` | a llama.cpp GGUF file: weights (dequantised), tokenizer and chat template from its metadata |

An external checkpoint brings its model shape (`model_overrides`): layers, heads, vocabulary,
rope settings ... are read from it, and a `model.*` key that the user set to another value is an
error naming both (`apply_model_overrides`). Its tokenizer and chat template become the run's
(`RUN_DIR/tokenizer/`, written once by `jaxllm.data.tokenizer.load_or_train`), so data, sampling
and export all use the model's own tokenizer. Params are read tensor by tensor straight into their
shardings (`jaxllm.hub.hf.load_llama_params`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Callable

import ml_collections

from jaxllm.hub import HubError

KINDS = ("stage", "hf", "gguf")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed spec.

    Attributes:
      kind: "stage" | "hf" | "gguf".
      value: the stage name, the folder or hub id (`hf`), or the file (`gguf`).
      revision: `hf:ORG/NAME@REVISION`'s revision, else None.
    """

    kind: str
    value: str
    revision: str | None = None

    @property
    def external(self) -> bool:
        """True for `hf:` and `gguf:` (a checkpoint from outside jaxllm)."""
        return self.kind != "stage"

    def __str__(self) -> str:
        if self.kind == "stage":
            return self.value
        return f"{self.kind}:{self.value}" + (f"@{self.revision}" if self.revision else "")


def parse(text: str) -> ModelSpec:
    """Parses a spec (see the module docstring).

    Raises:
      HubError: an empty `hf:` / `gguf:` target.
    """
    text = str(text).strip()
    for kind in ("hf", "gguf"):
        if text.startswith(kind + ":"):
            value = text[len(kind) + 1:]
            if not value:
                raise HubError(f"model spec {text!r} names no {'folder or hub id' if kind == 'hf' else 'file'}")
            revision = None
            if kind == "hf" and "@" in value and not os.path.exists(value):
                value, revision = value.rsplit("@", 1)
            return ModelSpec(kind, value, revision)
    return ModelSpec("stage", text)


def is_external(text: str) -> bool:
    """Whether `text` is an `hf:` or `gguf:` spec."""
    return bool(text) and parse(text).external


def local_path(spec: ModelSpec) -> pathlib.Path:
    """The local folder (`hf`) or file (`gguf`) of an external spec; downloads `hf:ORG/NAME`.

    A `hf:` value that exists on disk is a folder; otherwise one of the form `ORG/NAME` is a hub id,
    fetched with `huggingface_hub.snapshot_download` (cached; `HF_HOME` / `HF_HUB_OFFLINE` apply).

    Raises:
      HubError: no such file or folder, or a download that failed (no network, unknown repo).
    """
    path = pathlib.Path(spec.value).expanduser()
    if spec.kind == "gguf":
        if not path.is_file():
            raise HubError(f"{spec}: no such file {path}")
        return path
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{spec}: {path} is a file; hf: takes a Hugging Face model folder (gguf: takes a file)")
        return path
    if spec.revision is None and not HUB_ID.match(spec.value):
        raise HubError(f"{spec}: no folder {path}, and {spec.value!r} is not a hub id (ORG/NAME[@REVISION])")
    import huggingface_hub  # noqa: PLC0415

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            spec.value, revision=spec.revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - any failure of the download is the user's to fix
        reason = " ".join(str(e).split())[:300]
        raise HubError(f"{spec}: cannot download {spec.value} from the Hugging Face hub "
                       f"({type(e).__name__}: {reason})") from None


def open_checkpoint(spec: ModelSpec):
    """A `jaxllm.hub.CheckpointReader` over the external spec's weights.

    Raises:
      HubError: as `local_path`, and a folder or file the readers refuse (naming it).
    """
    path = local_path(spec)
    if spec.kind == "gguf":
        from jaxllm.hub import gguf  # noqa: PLC0415

        return gguf.GGUFCheckpoint(path)
    from jaxllm.hub import hf  # noqa: PLC0415

    return hf.SafetensorsReader(path)


def load_tokenizer(spec: ModelSpec):
    """The external spec's tokenizer (`jaxllm.data.hf_tokenizer.HFTokenizer`) with its chat template.

    Raises:
      HubError: no tokenizer files in the folder, or a GGUF without tokenizer metadata.
    """
    path = local_path(spec)
    if spec.kind == "gguf":
        from jaxllm.hub import gguf  # noqa: PLC0415

        return gguf.tokenizer_from_gguf(path)
    from jaxllm.data import hf_tokenizer  # noqa: PLC0415

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise HubError(f"{path}: no tokenizer.json or tokenizer.model: a model folder needs its tokenizer")
    return hf_tokenizer.HFTokenizer.load(path)


def family(reader) -> str:
    """"t5" for T5 checkpoints, else "llama" (the decoder-only family)."""
    return "t5" if str(reader.config.get("model_type", "")).startswith("t5") else "llama"


def model_overrides(reader) -> dict[str, Any]:
    """The `model.*` values fixed by the checkpoint of `reader` (shapes, rope, norm eps ...).

    Raises:
      HubError: an unsupported architecture or feature (naming the file and the supported set).
    """
    if family(reader) == "t5":
        from jaxllm.hub import hf_t5  # noqa: PLC0415

        return hf_t5.t5_model_overrides(reader.config, reader.path)
    from jaxllm.hub import hf  # noqa: PLC0415

    return hf.llama_model_overrides(reader.config, reader.path)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)), 1e-30)
        except (TypeError, ValueError):
            return False
    return a == b


def apply_model_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str,
                          defaults: ml_collections.ConfigDict) -> None:
    """Writes the checkpoint's `overrides` into `config.model`.

    A key whose current value differs from both its default (`defaults`: the stage's default
    model section, i.e. the user or a preset set it) and the checkpoint's value is a contradiction.

    Raises:
      HubError: naming the key, the configured value and the checkpoint's (`where`).
    """
    conflicts = [f"model.{k}={config.model[k]!r} but the checkpoint has {v!r}"
                 for k, v in overrides.items()
                 if k in config.model and k in defaults and not _same(config.model[k], defaults[k])
                 and not _same(config.model[k], v)]
    if conflicts:
        raise HubError(f"{where}: " + "; ".join(conflicts) + " (drop these overrides: the shape comes from the "
                       "checkpoint)")
    with config.model.unlocked():
        for key, value in overrides.items():
            config.model[key] = value


def configure_from(config: ml_collections.ConfigDict, text: str):
    """Sets `config.model` from the external spec `text`; returns its open checkpoint reader.

    Raises:
      HubError: as `open_checkpoint`, `model_overrides` and `apply_model_overrides`.
    """
    spec = parse(text)
    reader = open_checkpoint(spec)
    if family(reader) == "t5":
        from jaxllm.models import t5  # noqa: PLC0415

        defaults = t5.default_config()
    else:
        from jaxllm.models import llama  # noqa: PLC0415

        defaults = llama.default_config()
    apply_model_overrides(config, model_overrides(reader), str(spec), defaults)
    return reader


def params_loader(reader, model_config, mesh, rules, *, head: str = "lm") -> Callable[[Any], Any]:
    """`abstract_params -> params` reading the checkpoint of `reader` onto `mesh`.

    `model_config` is the `LlamaConfig` or `T5Config` built after `configure_from`; `head="scalar"`
    reads a sequence-classification checkpoint's `score` head (reward models).
    """
    from jaxllm.hub import hf  # noqa: PLC0415
    from jaxllm.hub import hf_t5  # noqa: PLC0415

    def load(abstract):
        del abstract  # the loaders build the same abstract tree from (model_config, mesh, rules)
        if family(reader) == "t5":
            return hf_t5.load_t5_params(reader, model_config, mesh, rules)
        return hf.load_llama_params(reader, model_config, mesh, rules, head=head)

    return load


PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello!"}]


def preflight(config: ml_collections.ConfigDict, text: str, *, head: str = "lm", tokenizer: bool = True) -> None:
    """Checks an external checkpoint before a stage writes anything: its config and architecture
    against `config.model` (on a copy), its tensors' names and shapes (no data read), and, with
    `tokenizer`, that its tokenizer loads and its chat template renders a conversation.

    Raises:
      HubError: as `configure_from`, a missing / extra / misshapen tensor, no tokenizer files.
      ChatError: a chat template that raises.
    """
    probe = config.copy_and_resolve_references()
    reader = configure_from(probe, text)
    if family(reader) == "llama":
        from jaxllm.hub import hf  # noqa: PLC0415
        from jaxllm.models import llama  # noqa: PLC0415

        hf.check_llama_checkpoint(reader, llama.LlamaConfig.from_config(probe.model), head=head)
    if tokenizer:
        from jaxllm.data import chat  # noqa: PLC0415

        tok = load_tokenizer(parse(text))
        if family(reader) == "llama":
            chat.template_for(tok).render(PROBE)
