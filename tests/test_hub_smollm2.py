"""The real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, ../shared/models) against `transformers`.

- Greedy generation of 32 new tokens in the model's chat template, from `jaxllm.inference`, equals
  `transformers`' `generate(do_sample=False)` on the same GGUF token for token, on 10 MT-Bench
  prompts (transformers dequantises the same file: an independent implementation of the loader,
  the tokenizer, the chat template and the model).
- `jaxllm chat --model gguf:...` answers "What is the capital of France?" with Paris.
- `jaxllm sft --config.init_from=gguf:...` trains a few steps on shared SFT conversations;
  `jaxllm export` writes a Hugging Face folder that `AutoModelForCausalLM` / `AutoTokenizer` load
  with no missing or unexpected weights, whose logits equal jaxllm's on the run's own params
  (<= 1e-4 in float64; in float32 to the model's float32 resolution, see test_hub_gguf.py).

Skips with a reason without the model file, the data bundle, or the `hf` extra (torch, transformers).
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_cli import jaxllm, subprocess_env

torch = pytest.importorskip("torch", reason="the parity peer needs torch (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="the parity peer needs transformers (pip install -e '.[hf]')")

from jaxllm import inference  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.models import llama  # noqa: E402

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> pathlib.Path:
    """A folder holding (a link to) the GGUF, as `from_pretrained(folder, gguf_file=...)` needs."""
    source = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / GGUF
    if not source.is_file():
        pytest.skip(f"{source} not found (the shared model bundle)")
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / GGUF).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def hf_model(gguf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    return model.eval(), tokenizer


def one_device_mesh():
    return sharding.make_mesh(sharding.default_config(), devices=jax.devices()[:1])


def test_greedy_generation_matches_transformers(gguf_dir, hf_model, shared_data):
    model, hf_tok = hf_model
    records = [json.loads(line) for line in (shared_data / "eval" / "mt_bench.jsonl").read_text().splitlines()[:10]]
    conversations = [[{"role": "user", "content": r["turns"][0]}] for r in records]
    stage = inference.load_model(f"gguf:{gguf_dir / GGUF}", mesh=one_device_mesh())
    ours = inference.generate(stage, conversations, max_new_tokens=32, temperature=0.0, rng=jax.random.key(0))
    for messages, got in zip(conversations, ours):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        assert stage.template.prompt(messages).tolist() == ids["input_ids"][0].tolist()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=hf_tok.convert_tokens_to_ids(
                "<|im_end|>"), pad_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"))
        expected = out[0, ids["input_ids"].shape[1]:].tolist()
        assert got.tokens == expected, (messages[0]["content"][:60], hf_tok.decode(got.tokens), hf_tok.decode(expected))


def test_chat_answers_from_the_gguf(gguf_dir, tmp_path):
    env = subprocess_env(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "jaxllm.cli", "chat", "--model", f"gguf:{gguf_dir / GGUF}",
                           "--temperature", "0", "--max_new_tokens", "24"],
                          input="What is the capital of France?\n", cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout, proc.stdout


def test_sft_from_gguf_exports_to_transformers(gguf_dir, shared_data, tmp_path):
    env = subprocess_env(tmp_path / "cache")
    run = tmp_path / "run"
    sources = f"jsonl:{shared_data}/sft/oasst_en100/train.jsonl"
    proc = jaxllm(env, "sft", "--config", "configs/sft.py:real", f"--config.run_dir={run}",
                  f"--config.init_from=gguf:{gguf_dir / GGUF}", f"--config.data.sources={sources}",
                  f"--config.data.eval_sources=jsonl:{shared_data}/sft/oasst_en100/test.jsonl",
                  "--config.data.seq_len=128", "--config.train.steps=2", "--config.train.batch_size=2",
                  "--config.train.eval_batches=1", "--config.train.eval_at_start=false", "--config.sample.prompts=()",
                  "--config.checkpoint.every_steps=0", "--config.optimizer.warmup_steps=1",
                  cwd=pathlib.Path(__file__).resolve().parents[1], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "hf"
    proc = jaxllm(env, "export", "--run", run, "--stage", "sft", "--output", out, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Name three primary colours."}]
    stage = inference.load_stage(run, "sft", mesh=one_device_mesh())
    ids = stage.template.prompt(messages)
    assert ids.tolist() == hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"]
    tokens = np.asarray(ids, np.int32)[None]
    positions, segments = np.arange(tokens.shape[1])[None], np.ones_like(tokens)
    ours = np.asarray(llama.apply(stage.model_config, stage.params, tokens, positions, segments))
    config64 = dataclasses.replace(stage.model_config, dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        ours64 = np.asarray(llama.apply(config64, jax.tree.map(lambda x: np.asarray(x, np.float64), stage.params),
                                        tokens, positions, segments))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        theirs64 = model.double()(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    # Exact in float64; in float32 equal to this model's float32 resolution (see
    # tests/test_hub_gguf.py::test_smollm2_logits_match_transformers for why 1e-4 is below it).
    assert np.max(np.abs(ours64 - theirs64)) <= 1e-4
    assert np.max(np.abs(ours - theirs)) <= 1e-3 and np.mean(np.abs(ours - theirs)) <= 2e-5
