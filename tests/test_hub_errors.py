"""Bad published checkpoints through the command line: one `jaxllm COMMAND: error: ...` line naming
the file and the problem, exit status 2, nothing written.

A tiny but complete Hugging Face folder is built without `transformers`: a random jaxllm model
exported with `jaxllm.hub.hf.export_llama` and a byte-level BPE tokenizer with a ChatML template
(tests/hf_tokenizer_fixture.py); each case breaks one thing in a copy. `jaxllm sft
--config.init_from=SPEC` must fail before its run directory exists, `jaxllm generate --model SPEC`
before its output file does. The commands run in-process (`jaxllm.cli.main`), as their errors come
before any computation.
"""

import json
import pathlib
import shutil

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_tokenizer_fixture
from jaxllm import cli
from jaxllm import sharding
from jaxllm.hub import hf
from jaxllm.models import llama
from test_hub_gguf import write_gguf

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("good") / "model"
    c = llama.default_config()
    c.update(vocab_size=768, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, tie_embeddings=True)
    config = llama.LlamaConfig.from_config(c)
    mesh = sharding.make_mesh(sharding.default_config(), devices=jax.devices()[:1])
    import flax.linen as nn

    params = nn.unbox(llama.init(config, jax.random.key(0)))
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        hf.export_llama(params, config, folder)
    hf_tokenizer_fixture.byte_level_bpe(folder, {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": None,
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"})
    return folder


@pytest.fixture
def bad(good_folder, tmp_path) -> pathlib.Path:
    """A fresh copy of the good folder to break."""
    return pathlib.Path(shutil.copytree(good_folder, tmp_path / "model"))


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and " INFO " not in line
                  and " WARNING " not in line]


def sft_fails(capsys, tmp_path, spec: str) -> str:
    """Runs `jaxllm sft --config.init_from=spec`; checks exit 2, one error line, no run dir; returns the line."""
    run = tmp_path / "run"
    code, lines = run_cli(capsys, "sft", "--config", REPO / "configs" / "sft.py:real", f"--config.run_dir={run}",
                          f"--config.init_from={spec}")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("jaxllm sft: error: "), lines
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))
    return lines[0]


def generate_fails(capsys, tmp_path, spec: str) -> str:
    """Runs `jaxllm generate --model spec`; checks exit 2, one error line, no output; returns the line."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "turns": ["Hi?"]}) + "\n")
    output = tmp_path / "out.jsonl"
    code, lines = run_cli(capsys, "generate", "--model", spec, "--prompts", prompts, "--output", output)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("jaxllm generate: error: "), lines
    assert not output.exists()
    return lines[0]


def rewrite_weights(folder: pathlib.Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_the_good_folder_passes_the_checks(good_folder):
    """The baseline of every case below: the same folder, unbroken, is accepted."""
    from jaxllm.hub import spec as hub_spec
    from jaxllm.train import sft

    config = sft.default_config()
    hub_spec.preflight(config, f"hf:{good_folder}")  # raises on any problem
    hub_spec.configure_from(config, f"hf:{good_folder}")
    assert (config.model.vocab_size, config.model.embed_dim, config.model.num_layers) == (768, 32, 2)


def test_folder_without_config(capsys, tmp_path, bad):
    (bad / "config.json").unlink()
    line = sft_fails(capsys, tmp_path, f"hf:{bad}")
    assert all(p in line for p in (str(bad), "config.json")), line


def test_unsupported_architecture(capsys, tmp_path, bad):
    config = json.loads((bad / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(config))
    line = sft_fails(capsys, tmp_path, f"hf:{bad}")
    assert all(p in line for p in ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")), line


def test_missing_extra_and_misshapen_tensors(capsys, tmp_path, bad):
    original = load_file(bad / "model.safetensors")
    rewrite_weights(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = sft_fails(capsys, tmp_path, f"hf:{bad}")
    assert all(p in line for p in ("model.layers.1.mlp.up_proj.weight", "missing")), line
    save_file({**original, "model.layers.2.mlp.up_proj.weight": original["model.layers.1.mlp.up_proj.weight"]},
              bad / "model.safetensors")
    line = sft_fails(capsys, tmp_path, f"hf:{bad}")
    assert all(p in line for p in ("model.layers.2.mlp.up_proj.weight", "no place")), line
    save_file({**original, "model.norm.weight": np.ones(31, np.float32)}, bad / "model.safetensors")
    line = generate_fails(capsys, tmp_path, f"hf:{bad}")
    assert all(p in line for p in ("model.safetensors", "model.norm.weight", "[31]", "[32]")), line


def test_truncated_files(capsys, tmp_path, bad):
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    line = generate_fails(capsys, tmp_path, f"hf:{bad}")
    assert str(path) in line, line
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path)
    gguf_path.write_bytes(gguf_path.read_bytes()[:gguf_path.stat().st_size * 2 // 3])
    line = generate_fails(capsys, tmp_path, f"gguf:{gguf_path}")
    assert all(p in line for p in (str(gguf_path), "truncated")), line


def test_unsupported_gguf_type(capsys, tmp_path):
    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((8, 64 // block * size), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = generate_fails(capsys, tmp_path, f"gguf:{path}")
    assert all(p in line for p in (str(path), "token_embd.weight", "Q8_1")), line


def test_chat_template_that_raises(capsys, tmp_path, bad):
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('this template needs a system message') }}"
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    line = sft_fails(capsys, tmp_path, f"hf:{bad}")
    assert "this template needs a system message" in line, line


def test_hub_id_without_network(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    line = generate_fails(capsys, tmp_path, "hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert all(p in line for p in ("HuggingFaceTB/SmolLM2-135M-Instruct", "cannot download")), line
