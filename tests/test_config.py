"""Tests of jaxllm.config: loading config files, `--config.key=value` overrides, JSON round trip."""

import json
import pathlib

import ml_collections
import pytest

from jaxllm import config as config_lib
from jaxllm.config import ConfigError
from jaxllm.models import llama

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "configs" / "pretrain.py")
SMALL = str(REPO / "tests" / "configs" / "small.py")


def build(*overrides, spec=PRETRAIN + ":tiny"):
    return config_lib.build(spec, [tuple(o.split("=", 1)) for o in overrides])


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_tiny():
    c = config_lib.load_config_file(PRETRAIN + ":tiny")
    assert isinstance(c, ml_collections.ConfigDict)
    assert c.run_dir == "runs/tiny"
    for key, value in llama.PRESETS["tiny"].items():
        assert c.model[key] == value, key
    # The keys every run config shares (architecture.md, "Configs").
    for key in ("run_dir", "data_root", "seed", "mesh.shape", "data.sources", "train.steps",
                "train.batch_size", "train.eval_every", "optimizer.lr"):
        assert key in config_lib.flat_keys(c)


def test_load_shakespeare_char():
    c = config_lib.load_config_file(PRETRAIN + ":shakespeare_char")
    assert c.run_dir == "runs/shakespeare_char"
    assert c.tokenizer.model_type == "char"
    assert "{data_root}" in c.data.sources and "tinyshakespeare" in c.data.sources
    for key, value in llama.PRESETS["baby_gpt"].items():
        assert c.model[key] == value, key
    # Different presets really are different configs.
    assert config_lib.to_dict(c) != config_lib.to_dict(config_lib.load_config_file(PRETRAIN + ":tiny"))


def test_default_arg_is_tiny():
    assert config_lib.to_dict(config_lib.load_config_file(PRETRAIN)) == config_lib.to_dict(
        config_lib.load_config_file(PRETRAIN + ":tiny"))


def test_relative_path_resolves_against_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repo: the file is found relative to the project root
    c = config_lib.load_config_file("configs/pretrain.py:tiny")
    assert c.run_dir == "runs/tiny"


def test_small_test_config_loads():
    c = config_lib.load_config_file(SMALL)
    assert c.model.num_layers == 2 and c.train.log_every == 1
    noeval = config_lib.load_config_file(SMALL + ":noeval")
    assert noeval.data.eval_sources == "" and noeval.train.eval_every == 0


def test_loaded_config_is_locked():
    c = config_lib.load_config_file(PRETRAIN + ":tiny")
    with pytest.raises(AttributeError):
        c.train.stepz = 3
    with pytest.raises(AttributeError):
        c.new_section = ml_collections.ConfigDict()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError) as e:
        config_lib.load_config_file(PRETRAIN + ":no_such_preset")
    msg = str(e.value)
    assert "no_such_preset" in msg
    for known in ["tiny", "shakespeare_char", "shared", *llama.PRESETS]:
        assert known in msg, known


def test_missing_config_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nope/missing.py"):
        config_lib.load_config_file("nope/missing.py:tiny")


def test_config_file_without_get_config(tmp_path):
    path = tmp_path / "empty_config.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        config_lib.load_config_file(str(path))


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def test_override_int_float_bool_str():
    base = build()
    c = build("train.steps=7", "optimizer.lr=1e-2", "train.progress_bar=false", "run_dir=/tmp/x=y",
              "checkpoint.async_save=True", "optimizer.min_lr=3")
    assert c.train.steps == 7 and type(c.train.steps) is int
    assert c.optimizer.lr == 1e-2 and type(c.optimizer.lr) is float
    assert c.optimizer.min_lr == 3.0 and type(c.optimizer.min_lr) is float  # int text, float field
    assert c.train.progress_bar is False
    assert c.checkpoint.async_save is True
    assert c.run_dir == "/tmp/x=y"  # only the first '=' separates key and value
    # Nothing else changed.
    changed = {k for k in config_lib.flat_keys(c) if _get(c, k) != _get(base, k)}
    assert changed == {"train.steps", "optimizer.lr", "train.progress_bar", "run_dir", "optimizer.min_lr"}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("raw", ["(2,2,2)", "2,2,2", "[2, 2, 2]", " (2, 2, 2) "])
def test_override_tuple(raw):
    c = build(f"mesh.shape={raw}")
    assert c.mesh.shape == (2, 2, 2)
    assert isinstance(c.mesh.shape, tuple)


def test_override_one_element_tuple():
    assert build("mesh.shape=4").mesh.shape == (4,)


def test_override_typed_none_field(tmp_path):
    path = tmp_path / "typed_none.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.maybe = ml_collections.FieldReference(None, field_type=int)\n"
        "    return c\n")
    c = config_lib.build(str(path), [("maybe", "3")])
    assert c.maybe == 3 and type(c.maybe) is int
    with pytest.raises(ConfigError, match="maybe"):
        config_lib.build(str(path), [("maybe", "three")])


def test_overrides_apply_in_order():
    assert build("train.steps=5", "train.steps=9").train.steps == 9


def test_override_keeps_config_locked():
    c = build("train.steps=5")
    with pytest.raises(AttributeError):
        c.train.stepz = 3


def test_parse_overrides_both_forms():
    argv = ["--config", "configs/pretrain.py:tiny", "--config.train.steps=5", "--config.optimizer.lr",
            "0.5", "--config.mesh.shape", "1,1,1", "positional", "--other"]
    spec, overrides, rest = config_lib.parse_overrides(argv)
    assert spec == "configs/pretrain.py:tiny"
    assert overrides == [("train.steps", "5"), ("optimizer.lr", "0.5"), ("mesh.shape", "1,1,1")]
    assert rest == ["positional", "--other"]
    c = config_lib.build(PRETRAIN + ":tiny", overrides)
    assert (c.train.steps, c.optimizer.lr, c.mesh.shape) == (5, 0.5, (1, 1, 1))


def test_parse_overrides_equals_spec():
    spec, overrides, rest = config_lib.parse_overrides(["--config=configs/pretrain.py:shakespeare_char"])
    assert (spec, overrides, rest) == ("configs/pretrain.py:shakespeare_char", [], [])


@pytest.mark.parametrize("argv", [["--config.train.steps"], ["--config"]])
def test_parse_overrides_missing_value(argv):
    with pytest.raises(ConfigError, match="needs a value"):
        config_lib.parse_overrides(argv)


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError) as e:
        build("train.step=3")
    msg = str(e.value)
    assert "'train.step'" in msg
    assert "did you mean" in msg and "train.steps" in msg


@pytest.mark.parametrize("key", ["nosuchsection.x", "train.steps.x", "model.embed_dimm", "zzz"])
def test_unknown_key_variants(key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        build(f"{key}=1")


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        build("qqqqqqqq=1")
    assert "did you mean" not in str(e.value)


def test_section_override_is_rejected():
    with pytest.raises(ConfigError) as e:
        build("model=3")
    assert "'model'" in str(e.value) and "section" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=3.5", "train.steps"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("train.progress_bar=maybe", "train.progress_bar"),
    ("mesh.shape=(2,2", "mesh.shape"),
])
def test_bad_value_is_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build(override)
    assert f"--config.{key}=" in str(e.value)


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def test_save_load_json_round_trip(tmp_path):
    c = build("train.steps=17", "mesh.shape=(1,2,4)", "run_dir=somewhere")
    path = tmp_path / "nested" / "config.json"
    config_lib.save_json(c, path)
    assert json.loads(path.read_text())["train"]["steps"] == 17
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # written atomically, no leftovers
    loaded = config_lib.load_json(path)
    assert config_lib.to_dict(loaded) == config_lib.to_dict(c)
    assert loaded.train.steps == 17 and list(loaded.mesh.shape) == [1, 2, 4]
    assert loaded.run_dir == "somewhere"
    with pytest.raises(AttributeError):
        loaded.train.stepz = 1  # locked like a built config
    # A loaded config still takes overrides (the sample command and later stages use it).
    config_lib.apply_override(loaded, "train.steps", "3")
    assert loaded.train.steps == 3


def test_save_json_overwrites(tmp_path):
    path = tmp_path / "config.json"
    config_lib.save_json(build("train.steps=1"), path)
    config_lib.save_json(build("train.steps=2"), path)
    assert config_lib.load_json(path).train.steps == 2


def test_load_json_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        config_lib.load_json(tmp_path / "run" / "pretrain" / "config.json")


def test_run_dir_layout(tmp_path):
    c = build(f"run_dir={tmp_path}")
    assert config_lib.stage_dir(c) == tmp_path / "pretrain"
    assert config_lib.stage_dir(c, "sft") == tmp_path / "sft"
    assert config_lib.tokenizer_dir(tmp_path) == tmp_path / "tokenizer"
