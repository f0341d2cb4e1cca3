"""Model specs (`jaxllm.hub.spec`): parsing, hub downloads that fail, and config keys that
contradict a checkpoint."""

import pytest

from jaxllm.hub import HubError
from jaxllm.hub import spec as hub_spec
from jaxllm.models import llama
from jaxllm.train import sft


def test_parse_kinds(tmp_path):
    assert hub_spec.parse("sft") == hub_spec.ModelSpec("stage", "sft")
    assert hub_spec.parse("hf:Org/Name@v1.0") == hub_spec.ModelSpec("hf", "Org/Name", "v1.0")
    assert hub_spec.parse("gguf:/m/model.gguf") == hub_spec.ModelSpec("gguf", "/m/model.gguf")
    odd = tmp_path / "a@b"
    odd.mkdir()
    assert hub_spec.parse(f"hf:{odd}") == hub_spec.ModelSpec("hf", str(odd))  # an existing folder keeps its '@'
    assert str(hub_spec.parse("hf:Org/Name@v1.0")) == "hf:Org/Name@v1.0"
    assert not hub_spec.is_external("sft") and hub_spec.is_external("gguf:x.gguf")
    for empty in ("hf:", "gguf:"):
        with pytest.raises(HubError, match="names no"):
            hub_spec.parse(empty)


def test_local_paths_name_what_is_missing(tmp_path):
    with pytest.raises(HubError, match="no such file"):
        hub_spec.local_path(hub_spec.parse(f"gguf:{tmp_path / 'missing.gguf'}"))
    (tmp_path / "file.gguf").write_bytes(b"x")
    with pytest.raises(HubError, match="is a file"):
        hub_spec.local_path(hub_spec.parse(f"hf:{tmp_path / 'file.gguf'}"))
    with pytest.raises(HubError, match="not a hub id"):
        hub_spec.local_path(hub_spec.parse(f"hf:{tmp_path / 'no' / 'such' / 'dir'}"))


def test_hub_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    # A closed local port stands for "no network": the download fails at once.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError, match=r"hf:HuggingFaceTB/SmolLM2-135M-Instruct: cannot download"):
        hub_spec.local_path(hub_spec.parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct"))


def sft_config():
    c = sft.default_config()
    c.init_from = "gguf:model.gguf"
    return c


def test_checkpoint_shape_replaces_defaults():
    c = sft_config()
    hub_spec.apply_model_overrides(c, {"num_layers": 30, "embed_dim": 576, "rope_theta": 100000.0}, "gguf:model.gguf",
                                   llama.default_config())
    assert (c.model.num_layers, c.model.embed_dim, c.model.rope_theta) == (30, 576, 100000.0)


def test_a_key_set_against_the_checkpoint_is_an_error_naming_both_values():
    c = sft_config()
    c.model.num_layers = 7  # set by the user (not the default)
    c.model.embed_dim = 576  # set, and agreeing with the checkpoint: fine
    with pytest.raises(HubError, match=r"gguf:model.gguf: model.num_layers=7 but the checkpoint has 30"):
        hub_spec.apply_model_overrides(c, {"num_layers": 30, "embed_dim": 576}, "gguf:model.gguf",
                                       llama.default_config())
    assert c.model.num_layers == 7  # nothing was changed
