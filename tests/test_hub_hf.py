"""Hugging Face safetensors import/export of the LLaMA family against `transformers` itself.

Random `transformers` models (2 layers, hidden 64, vocab 256) are saved with `save_pretrained`,
loaded by `jaxllm.hub.hf` and compared in float32 on ragged (right-padded) batches: jaxllm gives
padding segment 0 and positions restarting at 0, torch gets the attention mask; only real
positions are compared. Then export round trips (bit-identical tensors, `from_pretrained` with no
missing or unexpected weights) and the bad inputs, each a HubError naming the file.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip(
    "transformers", reason="HF parity tests need transformers and torch (pip install -e '.[hf]')")
torch = pytest.importorskip("torch", reason="HF parity tests need torch (pip install -e '.[hf]')")

import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402

from jaxllm import sharding  # noqa: E402
from jaxllm.hub import HubError, hf  # noqa: E402
from jaxllm.models import layers, llama  # noqa: E402

VOCAB, EMBED, LAYERS, HEADS, MLP, LENGTH, BATCH = 256, 64, 2, 4, 96, 24, 4
RULES = sharding.DEFAULT_RULES
# original context 16 < LENGTH, so llama3 scaling (factor 8, wavelengths > 16 scaled) matters
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, transformers.LlamaForSequenceClassification),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                transformers.MistralForSequenceClassification),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, transformers.Qwen2ForSequenceClassification),
}
_apply = jax.jit(llama.apply, static_argnums=0, static_argnames="head")


def hf_model(kind="llama", *, kv_heads=2, tied=False, rope=None, head="lm", dtype=torch.float32, seed=0):
    """A random `transformers` model; norms and biases perturbed off their 1 / 0 init so they matter."""
    torch.manual_seed(seed)
    config_cls, lm_cls, score_cls = CLASSES[kind]
    config = config_cls(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                        rms_norm_eps=1e-6, max_position_embeddings=64, pad_token_id=0, num_labels=1,
                        rope_parameters={"rope_type": "default", "rope_theta": 500.0, **(rope or {})})
    model = (score_cls if head == "scalar" else lm_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def save(model, folder: pathlib.Path, **kwargs) -> pathlib.Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def one_device_mesh():
    mesh_config = sharding.default_config()
    mesh_config.shape = (1, 1, 1)
    return sharding.make_mesh(mesh_config, jax.devices()[:1])


def mesh_222():
    mesh_config = sharding.default_config()
    mesh_config.shape = (2, 2, 2)
    return sharding.make_mesh(mesh_config)


def load(folder, *, scan=False, mesh=None, head="lm", param_dtype="float32"):
    reader = hf.SafetensorsReader(folder)
    c = llama.default_config()
    c.update(hf.llama_model_overrides(reader.config, reader.path))
    c.update(scan_layers=scan, param_dtype=param_dtype)
    cfg = llama.LlamaConfig.from_config(c)
    mesh = mesh or one_device_mesh()
    return cfg, hf.load_llama_params(reader, cfg, mesh, RULES, head=head), mesh


def ragged_batches(seed, count=2):
    """`count` right-padded `[BATCH, LENGTH]` batches of rows with different lengths (row 0 full)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        lengths = rng.integers(LENGTH // 3, LENGTH + 1, BATCH)
        lengths[0] = LENGTH
        real = np.arange(LENGTH)[None] < lengths[:, None]
        yield np.where(real, rng.integers(1, VOCAB, (BATCH, LENGTH)), 0), real


def jax_outputs(cfg, params, mesh, ids, real, head="lm"):
    segment_ids = real.astype(np.int32)
    positions = np.where(real, np.arange(LENGTH)[None], 0).astype(np.int32)
    with sharding.activate(mesh, RULES):
        return np.asarray(_apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions),
                                 jnp.asarray(segment_ids), head=head))


def torch_outputs(model, ids, real, head="lm"):
    ids, mask = torch.tensor(ids), torch.tensor(real.astype(np.int64))
    with torch.no_grad():
        if head == "scalar":  # the score of every position (the HF class pools the last real one)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return model.score(hidden)[..., 0].float().numpy()
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def assert_parity(model, folder, head="lm", **load_kwargs):
    cfg, params, mesh = load(folder, head=head, **load_kwargs)
    for ids, real in ragged_batches(seed=0):
        got, want = jax_outputs(cfg, params, mesh, ids, real, head), torch_outputs(model, ids, real, head)
        assert np.abs(got[real] - want[real]).max() <= 1e-4
    return cfg, params


@pytest.mark.parametrize("kind, model_kwargs, scan, on_mesh", [
    ("llama", dict(kv_heads=1), False, False),
    ("llama", dict(kv_heads=2, tied=True), True, True),
    ("llama", dict(kv_heads=HEADS, rope=LLAMA3), False, True),
    ("llama", dict(kv_heads=2, tied=True, rope=LLAMA3), True, False),
    ("llama", dict(kv_heads=HEADS, rope=LINEAR), False, False),
    ("mistral", dict(kv_heads=2), True, True),
    ("qwen2", dict(kv_heads=2, tied=True), False, True),
    ("qwen2", dict(kv_heads=1), True, False),
])
def test_logits_match_transformers(tmp_path, kind, model_kwargs, scan, on_mesh):
    model = hf_model(kind, **model_kwargs)
    cfg, params = assert_parity(model, save(model, tmp_path / kind), scan=scan, mesh=mesh_222() if on_mesh else None)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == model_kwargs.get("tied", False)
    if on_mesh:  # each leaf sits in its NamedSharding (e.g. q_proj: embed over fsdp, heads over tensor)
        q = params["layers"]["attn"]["q_proj"] if scan else params["layers_0"]["attn"]["q_proj"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(*((None,) if scan else ()), "fsdp", "tensor", None)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reward_head_matches_sequence_classification(tmp_path, kind):
    model = hf_model(kind, head="scalar", tied=kind == "qwen2")
    assert_parity(model, save(model, tmp_path / kind), head="scalar", scan=kind == "qwen2")


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR])
def test_rope_scaling_matches_transformers_inv_freq(rope):
    config = transformers.LlamaConfig(hidden_size=EMBED * 2, num_attention_heads=HEADS,
                                      rope_parameters={"rope_theta": 500.0, **rope})
    want, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    c = llama.default_config()
    c.update(hf.llama_model_overrides({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}, "test"))
    cfg = llama.LlamaConfig.from_config(c)
    base = 1.0 / (500.0 ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    got = np.asarray(layers.scaled_inv_freq(base, cfg.rope_scaling))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert np.abs(got - np.asarray(base)).max() > 1e-3  # the scaling changes the frequencies


def test_classic_and_rope_parameters_configs_agree():
    new = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
           "rope_parameters": {"rope_theta": 5e5, **LLAMA3}}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=5e5, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"})
    got = hf.llama_model_overrides(new, "new")
    assert got == hf.llama_model_overrides(old, "old")
    assert got["rope_scaling"] == "llama3" and got["rope_original_max_position"] == 16 and got["head_dim"] == 8
    with pytest.raises(HubError, match="rope_parameters.rope_type='yarn'.*default, linear, llama3"):
        hf.llama_model_overrides({**new, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "f")
    with pytest.raises(HubError, match="attention_bias"):
        hf.llama_model_overrides({**new, "attention_bias": True}, "f")
    with pytest.raises(HubError, match="hidden_act='gelu'"):
        hf.llama_model_overrides({**new, "hidden_act": "gelu"}, "f")


def read_all(folder):
    reader = hf.SafetensorsReader(folder)
    return {name: reader.read(name) for name in reader.names()}


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("kind, head, tied, scan, on_mesh, dtype, shard_bytes", [
    ("llama", "lm", True, True, True, "float32", 60_000),
    ("qwen2", "scalar", False, False, False, "float32", hf.DEFAULT_MAX_SHARD_BYTES),
    ("mistral", "lm", False, False, True, "bfloat16", hf.DEFAULT_MAX_SHARD_BYTES),
])
def test_export_round_trip_is_bit_identical(tmp_path, kind, head, tied, scan, on_mesh, dtype, shard_bytes):
    model = hf_model(kind, head=head, tied=tied, rope=LLAMA3 if kind == "llama" else None,
                     dtype=getattr(torch, dtype))
    src = save(model, tmp_path / "src")
    cfg, params, _ = load(src, scan=scan, mesh=mesh_222() if on_mesh else None, head=head, param_dtype=dtype)
    out = hf.export_llama(params, cfg, tmp_path / "out", head=head, max_shard_bytes=shard_bytes)
    assert_bit_identical(read_all(src), read_all(out))
    files = sorted(p.name for p in out.iterdir())
    if shard_bytes < hf.DEFAULT_MAX_SHARD_BYTES:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len([f for f in files if f.startswith("model-")]) > 1
        assert index["metadata"]["total_size"] == sum(x.nbytes for x in read_all(out).values())
    else:
        assert files == ["config.json", "model.safetensors"]
    auto = transformers.AutoModelForSequenceClassification if head == "scalar" else transformers.AutoModelForCausalLM
    loaded, info = auto.from_pretrained(out, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ids, real = next(ragged_batches(0, 1))
    original = auto.from_pretrained(src)  # not `model`: its `.to(bfloat16)` also rounded the rotary inv_freq buffer
    np.testing.assert_array_equal(torch_outputs(loaded, ids, real, head), torch_outputs(original, ids, real, head))


def test_sharded_checkpoint_loads(tmp_path):
    model = hf_model("llama", kv_heads=2)
    folder = save(model, tmp_path / "sharded", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > 1
    assert_parity(model, folder)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save(hf_model("llama", kv_heads=2), tmp_path_factory.mktemp("base") / "llama")


def edited(base, tmp_path, *, config=None, tensors=None) -> pathlib.Path:
    """A copy of `base` with config.json keys replaced and `tensors(dict) -> dict` applied."""
    folder = tmp_path / "edited"
    shutil.copytree(base, folder)
    if config is not None:
        (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    if tensors is not None:
        path = folder / "model.safetensors"
        safetensors.numpy.save_file(tensors(safetensors.numpy.load_file(path)), path, metadata={"format": "pt"})
    return folder


def test_folder_without_config_json(tmp_path, base_folder):
    folder = edited(base_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(HubError, match=f"{folder}: no config.json"):
        hf.SafetensorsReader(folder)


def test_unsupported_architecture(tmp_path, base_folder):
    folder = edited(base_folder, tmp_path, config={"architectures": ["PhiForCausalLM"], "model_type": "phi"})
    reader = hf.SafetensorsReader(folder)
    with pytest.raises(HubError, match=f"{folder}: architecture 'PhiForCausalLM' is not supported; "
                                       "supported: LlamaForCausalLM, .*Qwen2ForSequenceClassification"):
        hf.llama_model_overrides(reader.config, reader.path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"},
     "tensor model.layers.1.mlp.up_proj.weight missing"),
    (lambda t: {**t, "model.layers.0.mlp.up_proj.bias": np.zeros(MLP, np.float32)},
     r"model.safetensors: tensor model.layers.0.mlp.up_proj.bias has no place"),
    (lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((8, EMBED), np.float32)},
     r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \[8, 64\], but config.json "
     r"implies \[32, 64\]"),
    (lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1}, "lm_head.weight differs"),
])
def test_bad_tensors_name_file_and_tensor(tmp_path, base_folder, edit, message):
    tie = {"tie_word_embeddings": True} if "differs" in message else None
    folder = edited(base_folder, tmp_path, config=tie, tensors=lambda t: edit(
        {k: v for k, v in t.items() if not (tie and k == "lm_head.weight")}))
    with pytest.raises(HubError, match=message):
        load(folder)


def test_tied_checkpoint_with_equal_lm_head_loads(tmp_path, base_folder):
    folder = edited(base_folder, tmp_path, config={"tie_word_embeddings": True},
                    tensors=lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"],
                                       "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    cfg, params, _ = load(folder)
    assert cfg.tie_embeddings and "lm_head" not in params


def test_wrong_head_hints_the_other(tmp_path, base_folder):
    with pytest.raises(HubError, match="score.weight missing.*causal-LM checkpoint has no score head"):
        load(base_folder, head="scalar")


def test_truncated_safetensors_names_the_file(tmp_path, base_folder):
    folder = edited(base_folder, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(HubError, match=f"{path}: not a readable safetensors file"):
        hf.SafetensorsReader(folder)


@pytest.mark.parametrize("bad, key", [
    ({"rope_scaling": "yarn"}, "model.rope_scaling"),
    ({"rope_scaling": "linear", "rope_scaling_factor": 0.0}, "model.rope_scaling_factor"),
    ({"rope_scaling": "llama3", "rope_high_freq_factor": 1.0}, "model.rope_high_freq_factor"),
    ({"architecture": "gpt2"}, "model.architecture"),
])
def test_bad_rope_or_architecture_key_is_named(bad, key):
    c = llama.default_config()
    c.update(vocab_size=VOCAB, **bad)
    with pytest.raises(ValueError, match=key):
        llama.LlamaConfig.from_config(c)


def test_export_refuses_unrepresentable_model_and_used_folder(tmp_path, base_folder):
    cfg, params, _ = load(base_folder)
    with pytest.raises(HubError, match="model.architecture='mistral' with model.qkv_bias=True"):
        hf.hf_config(llama.LlamaConfig(**{**vars(cfg), "architecture": "mistral", "qkv_bias": True}))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(HubError, match="used: exists and is not an empty folder"):
        hf.export_llama(params, cfg, tmp_path / "used")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing written
