"""`jaxllm export`: a finished stage of a run as a Hugging Face model folder.

The folder holds the weights (`model.safetensors`, or shards with `model.safetensors.index.json`
above the size limit), `config.json` of the model's architecture (the `model.architecture` the run
started from: Llama, Mistral, Qwen2; jaxllm's own models export as Llama, or as Qwen2 with
q/k/v biases), the run's tokenizer's bos/eos/pad ids, and the run's tokenizer
with its chat template, so `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it. A reward-model stage (scalar head) exports as
`LlamaForSequenceClassification` (`score.weight`, `num_labels=1`); a T5 stage as
`T5ForConditionalGeneration` (`jaxllm.hub.hf_t5`).

The run's tokenizer is copied as it is when it came from a Hugging Face or GGUF checkpoint. A
tokenizer that jaxllm trained (SentencePiece, `tokenizer.model`) is copied with a
`tokenizer_config.json` naming its special tokens and jaxllm's chat template as jinja
(`chat.JAXLLM_CHAT_TEMPLATE`); transformers' slow SentencePiece tokenizer class adds a dummy prefix
space that jaxllm's tokenizers do not use, so such a folder's ids are not guaranteed to match
jaxllm's: load it with `jaxllm.data.hf_tokenizer.HFTokenizer.load` for exact ids.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from jaxllm import config as config_lib
from jaxllm.hub import HubError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")


def export_stage(run_dir: str | os.PathLike, stage: str, output: str | os.PathLike, *,
                 max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes `RUN_DIR/<stage>` to the Hugging Face folder `output` (replaced if it exists).

    Returns:
      A one-line summary of what was written.

    Raises:
      ConfigError / HubError: no such finished stage, or a model family export does not support.
    """
    from jaxllm import inference  # noqa: PLC0415
    from jaxllm.hub import hf  # noqa: PLC0415

    run_dir, output = pathlib.Path(run_dir), pathlib.Path(output)
    stage_dir = run_dir / stage
    stage_config = config_lib.load_json(stage_dir / "config.json") if (stage_dir / "config.json").is_file() else None
    t5_stage = stage_config is not None and stage_config.model.get("family", "llama") == "t5"
    head = "scalar" if _is_scalar_stage(stage_dir / "params") else "lm"
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if t5_stage:
            from jaxllm.hub import hf_t5  # noqa: PLC0415
            from jaxllm.models import t5  # noqa: PLC0415
            from jaxllm.train import pretrain_t5  # noqa: PLC0415

            if not (stage_dir / "done.json").is_file():
                raise HubError(f"{stage_dir} has not finished (no done.json)")
            params = pretrain_t5.load_params(stage_config, stage_dir / "params")
            hf_t5.export_t5(params, t5.T5Config.from_config(stage_config.model), tmp, max_shard_bytes=max_shard_bytes)
        else:
            loaded = inference.load_stage(run_dir, stage, head=head)
            tok = loaded.template.tokenizer
            ids = {f"{name}_token_id": int(getattr(tok, f"{name}_id")) for name in ("bos", "eos", "pad")
                   if getattr(tok, f"{name}_id", -1) >= 0}
            hf.export_llama(loaded.params, loaded.model_config, tmp, head=head, max_shard_bytes=max_shard_bytes,
                            extra_config=ids)
        copied = _write_tokenizer(config_lib.tokenizer_dir(run_dir), tmp)
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weights = sorted(p.name for p in output.glob("*.safetensors"))
    kind = ("T5 encoder-decoder" if t5_stage else
            "reward model (sequence classification)" if head == "scalar" else "causal LM")
    return (f"exported {run_dir / stage} as a Hugging Face {kind} to {output}: {', '.join(weights)}, config.json, "
            f"{', '.join(copied)}")


def _is_scalar_stage(params_dir: pathlib.Path) -> bool:
    """Whether the exported params hold a `score_head` (a reward model), from orbax's metadata."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    if not params_dir.is_dir():
        return False
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir.absolute())
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return isinstance(tree, dict) and "score_head" in tree


def _write_tokenizer(tokenizer_dir: pathlib.Path, output: pathlib.Path) -> list[str]:
    """Copies the run's tokenizer files into `output`; returns their names."""
    from jaxllm.data import chat  # noqa: PLC0415
    from jaxllm.data import tokenizer as tokenizer_lib  # noqa: PLC0415

    present = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not present:
        raise HubError(f"{tokenizer_dir}: the run has no tokenizer to export")
    for name in present:
        shutil.copyfile(tokenizer_dir / name, output / name)
    if tokenizer_lib.is_hf_tokenizer_dir(tokenizer_dir):
        return present
    tok = tokenizer_lib.Tokenizer.load(tokenizer_dir / tokenizer_lib.TOKENIZER_FILE)
    piece = tok.sp.id_to_piece
    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id),
               "pad_token": piece(tok.pad_id)}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "add_prefix_space": False, "model_max_length": 1 << 30, **special,
              "chat_template": chat.jinja_template(tok)}
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return present + ["tokenizer_config.json"]
