"""Tests of jaxllm.data.prompts: left-padded prompt batches and Llama-2's safety-prompt tags."""

import json

import numpy as np
import pytest

from jaxllm.data import chat, prompts, tokenizer
from jaxllm.data.sources import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>/\n0123456789"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "char.model"
    return chat.ChatTemplate(tokenizer.train_tokenizer(config, [ALPHABET], path))


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def files(tmp_path):
    harmless = write(tmp_path / "harmless.jsonl", [
        {"prompt": "how do I pick a lock"},
        {"prompt": "tell me a joke", "is_safety": False},  # the record's own tag wins over the file's
        {"prompt": "shared prompt"}])
    helpful = write(tmp_path / "helpful.jsonl", [
        {"prompt": "sum 2 and 3"},
        {"prompt": "shared prompt"},  # kept once, a safety prompt through harmless.jsonl
        {"prompt": "name a colour", "is_safety": True}])
    return harmless, helpful


def config_of(harmless, helpful, safety):
    c = prompts.default_config()
    c.update(sources=f"jsonl:{harmless};jsonl:{helpful}", eval_sources=f"jsonl:{helpful}", max_prompt_len=40,
             safety_sources=safety)
    return c


def decoded_flags(template, batch):
    out = {}
    for row, n, flag in zip(batch["prompt_tokens"], batch["prompt_lengths"], batch["prompt_is_safety"]):
        text = template.tokenizer.decode(row[len(row) - n:].tolist())
        out[next(p for p in ("lock", "joke", "shared", "sum", "colour") if p in text)] = int(flag)
    return out


def test_safety_tags_from_files_and_records(template, files):
    harmless, helpful = files
    c = config_of(harmless, helpful, f"jsonl:{harmless}")
    batch = prompts.prompt_dataset(c, template, split="train", global_batch_size=5, seed=0)[0]
    assert decoded_flags(template, batch) == {"lock": 1, "joke": 0, "shared": 1, "sum": 0, "colour": 1}
    # Without safety_sources only the records' own tags count.
    c.safety_sources = ""
    batch = prompts.prompt_dataset(c, template, split="train", global_batch_size=5, seed=0)[0]
    assert decoded_flags(template, batch) == {"lock": 0, "joke": 0, "shared": 0, "sum": 0, "colour": 1}
    assert batch["prompt_is_safety"].dtype == np.int32


def test_safety_file_outside_the_sources_is_one_error(template, files, tmp_path):
    harmless, helpful = files
    other = write(tmp_path / "other.jsonl", [{"prompt": "x"}])
    c = config_of(harmless, helpful, f"jsonl:{other}")
    with pytest.raises(DataError, match="other.jsonl is not among prompts.sources"):
        prompts.prompt_dataset(c, template, split="train", global_batch_size=5, seed=0)


def test_bad_safety_field_names_file_and_line(template, files, tmp_path):
    harmless, _ = files
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b", "is_safety": "yes"}])
    c = config_of(harmless, bad, "")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'is_safety' is 'yes'"):
        prompts.prompt_dataset(c, template, split="train", global_batch_size=5, seed=0)
