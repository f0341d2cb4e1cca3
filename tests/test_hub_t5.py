"""T5 v1.1 / Flan-T5 checkpoints (jaxllm.hub.hf_t5): logit parity with `transformers` on random
models saved by `save_pretrained`, the HF -> jaxllm -> HF round trip, and refused inputs.

jaxllm's T5 takes segment ids and positions where HF takes attention masks: right padding with
segment 0 (and position 0) is HF's `attention_mask == 0`, and the real tokens' positions 0..n-1 are
HF's (which counts from the left). jaxllm's T5 has no `scan_layers` switch, so there is no scanned
variant to compare.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the T5 parity peer is torch: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the T5 parity peer is transformers: pip install -e '.[hf]'")
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxllm import sharding  # noqa: E402
from jaxllm.hub import HubError, hf_t5, safetensors_io  # noqa: E402
from jaxllm.models import t5  # noqa: E402

# Few buckets and a short max distance so 12-token inputs reach T5's log-spaced buckets.
HF_SHAPE = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                dropout_rate=0.0)
# The three LM heads HF T5 checkpoints come with (hf_t5's module docstring):
# "untied": T5 v1.1 / Flan-T5 as published (own lm_head.weight, transformers-4 config tie_word_embeddings=false);
# "tied_unscaled": what transformers 5 saves for tie_word_embeddings=False (no lm_head tensor, no scaling);
# "tied_scaled": the original T5 head (lm_head = shared, decoder output * d_model**-0.5).
HEADS = ("untied", "tied_unscaled", "tied_scaled")
APPLY = jax.jit(t5.apply, static_argnums=0)


def open_reader(directory):
    return safetensors_io.SafetensorsReader(directory)


def build_hf(directory: pathlib.Path, head: str, seed: int) -> pathlib.Path:
    """A random T5ForConditionalGeneration saved with save_pretrained (norm scales randomised too)."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**HF_SHAPE, tie_word_embeddings=head == "tied_scaled")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        if head == "untied":
            model.lm_head.weight = torch.nn.Parameter(torch.randn(HF_SHAPE["vocab_size"], HF_SHAPE["d_model"]))
    model.save_pretrained(directory)
    if head == "untied":  # a published v1.1 config.json (transformers 4 wrote no scale_decoder_outputs)
        config = json.loads((directory / "config.json").read_text())
        config.pop("scale_decoder_outputs")
        config["tie_word_embeddings"] = False
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_t5")
    return {head: build_hf(root / head, head, seed) for seed, head in enumerate(HEADS)}


def load_hf(directory):
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


def model_config(reader) -> t5.T5Config:
    c = t5.default_config()
    c.update(hf_t5.t5_model_overrides(reader.config, reader.path))
    return t5.T5Config.from_config(c)


def make_mesh(shape):
    c = sharding.default_config()
    c.shape = shape
    return sharding.make_mesh(c, jax.devices()[: int(np.prod(shape))])


def ragged_batch(rng, batch=4, enc_len=12, dec_len=8, vocab=256):
    """jaxllm's packed-format batch of right-padded rows plus HF's masks; row 0 is full length."""
    enc_n = rng.integers(3, enc_len + 1, batch)
    dec_n = rng.integers(2, dec_len + 1, batch)
    enc_n[0], dec_n[0] = enc_len, dec_len
    enc_mask = np.arange(enc_len)[None] < enc_n[:, None]
    dec_mask = np.arange(dec_len)[None] < dec_n[:, None]
    dec_tokens = rng.integers(2, vocab, (batch, dec_len))
    dec_tokens[:, 0] = 0  # HF's decoder_start_token_id (the pad id)
    i32 = lambda x: np.asarray(x, np.int32)
    return {
        "encoder_input_tokens": i32(np.where(enc_mask, rng.integers(2, vocab, (batch, enc_len)), 0)),
        "encoder_segment_ids": i32(enc_mask), "encoder_positions": i32(np.where(enc_mask, np.arange(enc_len), 0)),
        "decoder_input_tokens": i32(np.where(dec_mask, dec_tokens, 0)),
        "decoder_segment_ids": i32(dec_mask), "decoder_positions": i32(np.where(dec_mask, np.arange(dec_len), 0)),
    }


def torch_logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch["encoder_input_tokens"]).long(),
                    attention_mask=torch.from_numpy(batch["encoder_segment_ids"]).long(),
                    decoder_input_ids=torch.from_numpy(batch["decoder_input_tokens"]).long(),
                    decoder_attention_mask=torch.from_numpy(batch["decoder_segment_ids"]).long())
    return out.logits.numpy()


# ---- config ------------------------------------------------------------------------------------


def test_overrides_from_config(checkpoints):
    reader = open_reader(checkpoints["untied"])
    assert hf_t5.t5_model_overrides(reader.config, reader.path) == dict(
        family="t5", vocab_size=256, embed_dim=64, head_dim=16, mlp_dim=96, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        norm_eps=1e-6, tie_embeddings=False)
    for head, tied in (("tied_unscaled", False), ("tied_scaled", True)):
        config = open_reader(checkpoints[head]).config
        assert hf_t5.t5_model_overrides(config, "x")["tie_embeddings"] is tied


@pytest.mark.parametrize("change, message", [
    ({"feed_forward_proj": "relu"}, r"feed_forward_proj='relu' \(the original T5's feed-forward\) is not supported"),
    ({"feed_forward_proj": "gated-silu"}, r"feed_forward_proj='gated-silu'.*supported: 'gated-gelu'"),
    ({"architectures": ["T5EncoderModel"]}, r"architecture T5EncoderModel is not supported for T5; "
                                            r"supported: T5ForConditionalGeneration"),
    ({"model_type": "mt5"}, r"model_type 'mt5' is not supported for T5; supported: T5ForConditionalGeneration"),
    ({"d_kv": None}, r"missing d_kv"),
    ({"relative_attention_num_buckets": 7}, r"relative_attention_num_buckets=7 must be even"),
])
def test_unsupported_config(checkpoints, change, message):
    config = {**open_reader(checkpoints["untied"]).config, **change}
    with pytest.raises(HubError, match=str(checkpoints["untied"] / "config.json") + ".*" + message):
        hf_t5.t5_model_overrides(config, str(checkpoints["untied"]))


# ---- logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head, mesh_shape", [("untied", (1, 1, 1)), ("untied", (2, 2, 2)),
                                              ("tied_unscaled", (1, 1, 1)), ("tied_scaled", (2, 2, 2))])
def test_logits_match_transformers(checkpoints, head, mesh_shape):
    reader = open_reader(checkpoints[head])
    config = model_config(reader)
    mesh, rules = make_mesh(mesh_shape), sharding.DEFAULT_RULES
    params = hf_t5.load_t5_params(reader, config, mesh, rules)
    if mesh_shape == (2, 2, 2):  # really sharded: heads over 'tensor', embed over 'fsdp'
        q = params["encoder"]["layers_0"]["attention"]["query"]
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (32, 2, 16)
    model, info = load_hf(checkpoints[head])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = ragged_batch(rng)
        with sharding.activate(mesh, rules):
            ours = np.asarray(APPLY(config, params, batch))
        theirs = torch_logits(model, batch)
        real = batch["decoder_segment_ids"] > 0  # padding rows are garbage in both
        np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


# ---- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_round_trip_is_bit_identical(checkpoints, tmp_path, head):
    reader = open_reader(checkpoints[head])
    config = model_config(reader)
    params = hf_t5.load_t5_params(reader, config, make_mesh((2, 2, 2)), sharding.DEFAULT_RULES)
    out = hf_t5.export_t5(params, config, tmp_path / "export", max_shard_bytes=200_000)  # ~600 kB: sharded
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 2 and files == ["config.json", *shards, "model.safetensors.index.json"]
    assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert not list(tmp_path.glob(".export.tmp-*"))
    original = load_file(checkpoints[head] / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    exported = {}
    for file in sorted(set(index.values())):
        exported.update(load_file(out / file))
    assert set(index) == set(exported)
    # The unscaled head is untied in jaxllm, so a transformers-5 tied save comes back with lm_head.
    extra = {"lm_head.weight"} if head == "tied_unscaled" else set()
    assert set(exported) == set(original) | extra
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    if extra:
        assert np.array_equal(exported["lm_head.weight"], original["shared.weight"])
    # transformers loads it whole, with the same head, and computes the same logits.
    model, info = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source, _ = load_hf(checkpoints[head])
    assert model.config.scale_decoder_outputs == source.config.scale_decoder_outputs
    batch = ragged_batch(np.random.default_rng(1))
    np.testing.assert_array_equal(torch_logits(model, batch), torch_logits(source, batch))


def test_bfloat16_params_export_as_bf16(checkpoints, tmp_path):
    reader = open_reader(checkpoints["untied"])
    c = t5.default_config()
    c.update(hf_t5.t5_model_overrides(reader.config, reader.path), param_dtype="bfloat16")
    config = t5.T5Config.from_config(c)
    params = hf_t5.load_t5_params(reader, config, make_mesh((1, 1, 1)), sharding.DEFAULT_RULES)
    assert params["token_embedder"].dtype == jnp.bfloat16
    out = open_reader(hf_t5.export_t5(params, config, tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for name in reader.names():
        assert out.dtype(name) == "BF16"
        np.testing.assert_array_equal(out.read(name), reader.read(name).astype(jnp.bfloat16), err_msg=name)


def test_export_refuses_non_empty_folder(checkpoints, tmp_path):
    reader = open_reader(checkpoints["untied"])
    config = model_config(reader)
    params = hf_t5.load_t5_params(reader, config, make_mesh((1, 1, 1)), sharding.DEFAULT_RULES)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(HubError, match="exists and is not an empty folder"):
        hf_t5.export_t5(params, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# ---- bad checkpoints ---------------------------------------------------------------------------


def edited_copy(source: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def wrong_shape(t):
    t["decoder.block.1.layer.2.DenseReluDense.wo.weight"] = np.zeros((64, 95), np.float32)


def missing(t):
    del t["encoder.block.1.layer.0.SelfAttention.k.weight"]


def extra(t):
    t["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros((64, 64), np.float32)


def different_head(t):
    t["lm_head.weight"] = t["shared.weight"] + 1


@pytest.mark.parametrize("head, edit, message", [
    ("untied", wrong_shape, r"tensor decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight has shape \[64, 95\] "
                            r"but config\.json implies \[64, 96\]"),
    ("untied", missing, r"missing tensor encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight"),
    ("untied", extra, r"unexpected tensor encoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight"),
    ("tied_scaled", different_head, r"lm_head\.weight differs from shared\.weight"),
])
def test_bad_checkpoint(checkpoints, tmp_path, head, edit, message):
    bad = edited_copy(checkpoints[head], tmp_path / "bad", edit)
    reader = open_reader(bad)
    with pytest.raises(HubError, match=str(bad) + ".*" + message):
        hf_t5.load_t5_params(reader, model_config(reader), make_mesh((1, 1, 1)), sharding.DEFAULT_RULES)
