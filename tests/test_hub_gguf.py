"""GGUF checkpoints (`jaxllm.hub.gguf`): tensors, config, tokenizer and errors.

- Tiny synthetic files written with `gguf.GGUFWriter` (llama with llama.cpp's q/k row permutation
  applied as its converter does, qwen2 without) read back to the values written, in Hugging Face
  names and layouts, for F32 / F16 / BF16 / Q8_0 / Q4_1 / a K-quant.
- Config from metadata: shapes, tied embeddings, qkv bias, Mistral-as-llama, linear and llama3
  (`rope_freqs`) rope scaling.
- Bad files: unsupported tensor type, truncated, not GGUF, unsupported architecture -> HubError
  naming the file.
- `transformers` as the parity peer (skips without it): the tiny files' tensors and tokenizers
  (SentencePiece and byte-level), and the real SmolLM2-135M-Instruct Q4_1 GGUF of ../shared/models:
  every tensor, the config, tokenizer ids on every MT-Bench / AlpacaEval prompt, the chat template,
  and float32 logits of jaxllm against torch on ragged batches.
"""

import copy
import json
import math
import pathlib

import gguf
import numpy as np
import pytest

from jaxllm.hub import HubError
from jaxllm.hub import gguf as hub_gguf

Q = gguf.GGMLQuantizationType
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tiny shapes: hidden 64, 4 query heads / 2 kv heads of 16, MLP 256 (a multiple of the 256-wide
# K-quant blocks and of the 32-wide legacy blocks).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 64, 4, 2, 16, 256, 2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (rotate-half pairs -> adjacent rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_vocab():
    """A SentencePiece-style vocabulary: unk, bos, eos, 256 byte pieces, scored pieces, a user token."""
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "▁he", "▁hell", "▁hello", "or",
              "▁wor", "▁world", "ld", "el", "▁hel"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return dict(model="llama", tokens=tokens, types=types, scores=scores)


def byte_level_vocab():
    """A byte-level BPE vocabulary (GPT-2 byte alphabet, a few merges, ChatML control tokens)."""
    pytest.importorskip("transformers", reason="the parity peer needs transformers (pip install -e '.[hf]')")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "e a", "Ġw ea", "t h", "e r", "th er", "Ġwea ther", "1 2", "Ġ Ġ"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return dict(model="gpt2", pre="qwen2", tokens=tokens, types=types, merges=merges)


def write_gguf(path, arch="llama", *, weight_type="Q8_0", bias=False, tied=True, name="tiny", vocab=None,
               rope=None, rope_freqs=None, tensors_only=None):
    """Writes a tiny GGUF as llama.cpp's converter would; returns the HF tensors a reader must yield.

    q/k rows (and biases) are permuted with llama.cpp's `permute` for `arch="llama"` only; every
    expected tensor is the written one after the storage type's round trip (quantise, dequantise).
    """
    rng = np.random.default_rng(0)
    vocab = vocab or spm_vocab()
    n_vocab = len(vocab["tokens"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(MLP)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if rope is not None:
        w.add_rope_scaling_type(rope[0])
        w.add_rope_scaling_factor(rope[1])
    w.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    expected = {}

    def add(gguf_name, hf_name, value, qtype, permute_heads=None):
        stored = llama_cpp_permute(value, permute_heads) if permute_heads and arch == "llama" else value
        if qtype == Q.F32:
            data, back = stored, value
        elif qtype == Q.F16:
            data, back = stored.astype(np.float16), value.astype(np.float16).astype(np.float32)
        elif qtype != Q.Q4_K:
            data = gguf.quants.quantize(stored, qtype)
            # quantisation works on rows, so it commutes with the row permutation
            back = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        else:  # a type gguf-py cannot write: raw bytes; the reader must hand them to dequantize
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 256, (value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
            data.reshape(-1, size)[:, :4] = np.array([0.01, 0.002], np.float16).view(np.uint8)  # Q4_K's d, dmin
            back = gguf.quants.dequantize(data, qtype)
        if tensors_only is None or gguf_name in tensors_only:
            w.add_tensor(gguf_name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        expected[hf_name] = back

    wt = Q[weight_type]
    dense = Q.Q8_0 if wt == Q.Q4_K else wt  # gguf-py cannot quantise K-quants: raw bytes on down_proj
    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(n_vocab, HIDDEN)).astype(np.float32), Q.F16)
    for i in range(LAYERS):
        p, hf = f"blk.{i}.", f"model.layers.{i}."
        norm = lambda: (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32)  # noqa: E731
        add(p + "attn_norm.weight", hf + "input_layernorm.weight", norm(), Q.F32)
        add(p + "attn_q.weight", hf + "self_attn.q_proj.weight",
            rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)).astype(np.float32), dense, HEADS)
        add(p + "attn_k.weight", hf + "self_attn.k_proj.weight",
            rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32), dense, KV_HEADS)
        add(p + "attn_v.weight", hf + "self_attn.v_proj.weight",
            rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32), dense)
        if bias:
            for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", None)):
                add(p + f"attn_{proj}.bias", hf + f"self_attn.{proj}_proj.bias",
                    rng.normal(size=((heads or KV_HEADS) * HEAD_DIM,)).astype(np.float32), Q.F32, heads)
        add(p + "attn_output.weight", hf + "self_attn.o_proj.weight",
            rng.normal(size=(HIDDEN, HEADS * HEAD_DIM)).astype(np.float32), dense)
        add(p + "ffn_norm.weight", hf + "post_attention_layernorm.weight", norm(), Q.F32)
        for proj, shape, qtype in (("gate", (MLP, HIDDEN), dense), ("up", (MLP, HIDDEN), dense),
                                   ("down", (HIDDEN, MLP), wt)):
            add(p + f"ffn_{proj}.weight", hf + f"mlp.{proj}_proj.weight", rng.normal(size=shape).astype(np.float32),
                qtype)
    add("output_norm.weight", "model.norm.weight", (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(size=(n_vocab, HIDDEN)).astype(np.float32), Q.BF16)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# --- synthetic files -------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_type", ["Q8_0", "F16", "Q4_1", "BF16", "Q4_K"])  # Q4_K: down_proj only
def test_llama_file_reads_back_unpermuted(tmp_path, weight_type):
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, weight_type=weight_type)
    ck = hub_gguf.GGUFCheckpoint(path)
    layers = sorted(n for n in expected if ".layers." in n)
    assert ck.names() == ["model.embed_tokens.weight", *layers, "model.norm.weight"]
    for name, value in expected.items():
        assert ck.shape(name) == value.shape, name
        got = ck.read(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, value, err_msg=name)
    # the permutation is not a no-op on these shapes: the stored rows differ from HF's
    raw = gguf.GGUFReader(path).tensors
    stored_k = next(t for t in raw if t.name == "blk.0.attn_k.weight")
    assert not np.array_equal(gguf.quants.dequantize(stored_k.data, stored_k.tensor_type),
                              expected["model.layers.0.self_attn.k_proj.weight"])
    c = ck.config
    assert (c["model_type"], c["architectures"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]) == (
        "llama", ["LlamaForCausalLM"], HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, len(spm_vocab()["tokens"]))
    assert c["tie_word_embeddings"] and not c["attention_bias"] and c["rope_scaling"] is None
    assert c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 10000.0 and c["max_position_embeddings"] == 512


def test_qwen2_file_is_not_unpermuted(tmp_path):
    path = tmp_path / "qwen.gguf"
    expected = write_gguf(path, "qwen2", weight_type="F32", bias=True, tied=False)
    ck = hub_gguf.GGUFCheckpoint(path)
    assert set(ck.names()) == set(expected) and ck.names()[-1] == "lm_head.weight"
    for name, value in expected.items():
        np.testing.assert_array_equal(ck.read(name), value, err_msg=name)
    c = ck.config
    assert c["model_type"] == "qwen2" and c["architectures"] == ["Qwen2ForCausalLM"]
    assert c["attention_bias"] and not c["tie_word_embeddings"]


def test_mistral_and_rope_scaling_config(tmp_path):
    c = hub_gguf.GGUFCheckpoint(_written(tmp_path / "m.gguf", name="Mistral 7B Instruct")).config
    assert c["model_type"] == "mistral" and c["architectures"] == ["MistralForCausalLM"]
    c = hub_gguf.GGUFCheckpoint(_written(tmp_path / "lin.gguf", rope=(gguf.RopeScalingType.LINEAR, 4.0))).config
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    # llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) for Llama 3.1 scaling:
    factor, low, high, old_context = 8.0, 1.0, 4.0, 8192
    freqs = [1.0 / (10000.0 ** (i / HEAD_DIM)) for i in range(0, HEAD_DIM, 2)]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < min(f for f in factors if f > 1) < factor  # the smooth band is exercised
    ck = hub_gguf.GGUFCheckpoint(_written(tmp_path / "l3.gguf", rope_freqs=factors))
    assert ck.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs" not in " ".join(ck.names())
    bad = tmp_path / "bad_freqs.gguf"
    with pytest.raises(HubError, match=rf"{bad}: rope_freqs.weight: .* not Llama 3 scaling"):
        hub_gguf.GGUFCheckpoint(_written(bad, rope_freqs=np.linspace(1, 3, HEAD_DIM // 2)))


def _written(path, **kwargs):
    write_gguf(path, weight_type="F16", **kwargs)
    return path


# --- errors ------------------------------------------------------------------------------------------

def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(HIDDEN)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((8, HIDDEN // block * size), np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HubError, match=rf"{path}: tensor token_embd.weight has type Q8_1, which gguf cannot "
                                       r"dequantise \(supported: .*Q4_1.*Q8_0"):
        hub_gguf.GGUFCheckpoint(path)


def test_truncated_and_foreign_files(tmp_path):
    whole = tmp_path / "whole.gguf"
    write_gguf(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(HubError, match=rf"{cut}: truncated GGUF file: tensor output_norm.weight \(F32\) needs bytes "
                                       rf"up to {len(data)} but the file has {len(data) - 100}"):
        hub_gguf.GGUFCheckpoint(cut)
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(HubError, match=rf"{cut}: truncated or corrupt GGUF file \(200 bytes\)"):
        hub_gguf.GGUFCheckpoint(cut)
    with pytest.raises(HubError, match=rf"{cut}: truncated or corrupt GGUF file"):
        hub_gguf.tokenizer_from_gguf(cut)
    text = tmp_path / "model.safetensors"
    text.write_text("not a gguf")
    with pytest.raises(HubError, match=rf"{text}: not a GGUF file \(starts with b'not ', not b'GGUF'\)"):
        hub_gguf.GGUFCheckpoint(text)
    with pytest.raises(HubError, match=rf"{tmp_path / 'absent.gguf'}: no such GGUF file"):
        hub_gguf.GGUFCheckpoint(tmp_path / "absent.gguf")


def test_unsupported_architecture_and_tensor(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "falcon")
    with pytest.raises(HubError, match=rf"{path}: GGUF architecture 'falcon' is not supported "
                                       r"\(supported: llama, qwen2"):
        hub_gguf.GGUFCheckpoint(path)
    odd = tmp_path / "odd.gguf"  # a tensor llama has no place for
    w = gguf.GGUFWriter(str(odd), "llama")
    w.add_tensor("blk.0.attn_output.bias", np.zeros(HIDDEN, np.float32))
    w.add_tensor("token_embd.weight", np.zeros((4, HIDDEN), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HubError, match=rf"{odd}: GGUF tensor blk.0.attn_output.bias has no Hugging Face counterpart"):
        hub_gguf.GGUFCheckpoint(odd)


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "t5.gguf"
    write_gguf(path, vocab=dict(spm_vocab(), model="t5"))
    with pytest.raises(HubError, match=rf"{path}: tokenizer.ggml.model 't5' is not supported \(supported: gpt2"):
        hub_gguf.gguf_tokenizer(path)


# --- transformers as the parity peer -------------------------------------------------------------

@pytest.fixture(scope="module")
def peer():
    torch = pytest.importorskip("torch", reason="the parity peer needs torch (pip install -e '.[hf]')")
    transformers = pytest.importorskip("transformers",
                                       reason="the parity peer needs transformers (pip install -e '.[hf]')")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    return torch, transformers


def _linked(folder: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """`folder` with a link to `source`: transformers takes a GGUF as (folder, file name)."""
    folder.mkdir(exist_ok=True)
    if not (folder / source.name).exists():
        (folder / source.name).symlink_to(source)
    return folder


@pytest.mark.parametrize("arch,vocab", [("llama", "spm"), ("qwen2", "byte_level")])
def test_tiny_files_match_transformers(tmp_path, peer, arch, vocab):
    torch, transformers = peer
    path = tmp_path / "tiny.gguf"
    vocab = spm_vocab() if vocab == "spm" else byte_level_vocab()
    write_gguf(path, arch, vocab=vocab, bias=arch == "qwen2", tied=arch == "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    ck = hub_gguf.GGUFCheckpoint(path)
    for name in ck.names():
        np.testing.assert_array_equal(ck.read(name), state[name].numpy(), err_msg=name)
    assert set(state) - set(ck.names()) <= {"lm_head.weight"}

    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok, settings = hub_gguf.gguf_tokenizer(path)
    texts = ["hello world", " hello  world\n", "Hello wörld <|user|> hi", "hh", "", "the weather 12345!!\n\n  x",
             "<|im_start|>user\nthe weather<|im_end|>", "你好 🤗"]
    for text in texts:
        assert tok.encode(text).ids == ref.encode(text, add_special_tokens=False), text
    assert settings["add_bos"] == (arch == "llama") == ref.add_bos_token
    assert settings["chat_template"] == ref.chat_template
    ours = hub_gguf.tokenizer_from_gguf(path)
    for text in texts:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)


@pytest.fixture(scope="module")
def smollm2(shared_models, peer, tmp_path_factory):
    """(GGUF path, transformers model, transformers tokenizer) for the shared SmolLM2 GGUF."""
    torch, transformers = peer
    folder = _linked(tmp_path_factory.mktemp("smollm2"), shared_models / SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2)
    return shared_models / SMOLLM2, model.eval(), tokenizer


@pytest.mark.slow
def test_smollm2_tensors_and_config_match_transformers(smollm2):
    path, model, _ = smollm2
    ck = hub_gguf.GGUFCheckpoint(path)
    c = ck.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["intermediate_size"], c["vocab_size"], c["rope_theta"], c["rms_norm_eps"],
            c["tie_word_embeddings"], c["attention_bias"], c["rope_scaling"]) == (
        576, 30, 9, 3, 64, 1536, 49152, 100000.0, 1e-5, True, False, None)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert c[key] == getattr(model.config, key), key
    state = model.state_dict()
    assert len(ck.names()) == 272 and set(state) - set(ck.names()) == {"lm_head.weight"}
    for name in ck.names():
        np.testing.assert_array_equal(ck.read(name), state[name].numpy(), err_msg=name)


def _eval_texts(shared_data) -> list[str]:
    texts = []
    with open(shared_data / "eval" / "mt_bench.jsonl") as f:
        texts += [turn for line in f for turn in json.loads(line)["turns"]]
    with open(shared_data / "eval" / "alpaca_eval.jsonl") as f:
        texts += [json.loads(line)["instruction"] for line in f]
    return texts


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, shared_data):
    path, _, ref = smollm2
    texts = _eval_texts(shared_data)
    assert len(texts) == 80 * 2 + 805
    ours = hub_gguf.tokenizer_from_gguf(path)
    for text, ids in zip(texts, ours.encode_batch(texts, add_special_tokens=True)):
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.chat_template == ref.chat_template
    assert "You are a helpful AI assistant named SmolLM" in ours.chat_template
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.vocab_size) == (1, 2, 2, 0, 49152)
    assert (ours.add_bos, ours.add_eos) == (ref.add_bos_token, ref.add_eos_token) == (False, False)
    assert ours.encode("<|im_start|>user\nHi<|im_end|>") == ref.encode("<|im_start|>user\nHi<|im_end|>")
    assert ours.encode("<|im_start|>")[:1] == [1]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    """Logits of jaxllm on the GGUF's params equal transformers' on ragged batches.

    In float64 (jaxllm with `dtype=param_dtype=float64` under `jax.enable_x64`, transformers
    `.double()`; both keep RoPE tables, RMSNorm and softmax in float32) the two agree to max
    |diff| <= 1e-4 (measured 5e-5): the conversion is exact. In float32 they agree to float32's
    resolution of this model only: its residual stream carries massive activations (~2.6e4 at a
    row's first position from layer 11 on, where one float32 ulp is 2e-3), each float32 forward is
    1e-4 to 2.3e-4 from the float64 one (transformers' and jaxllm's alike; layer by layer jaxllm's
    hidden states are as close to float64 as transformers'), and the two float32 forwards differ
    by up to 2.7e-4 (mean 2e-5). The float32 bounds (max 1e-3, mean 2e-5) therefore catch a wrong
    compute dtype or a lost cast (bfloat16 somewhere gives ~1e-1), not rounding.
    """
    import dataclasses

    hf = pytest.importorskip("jaxllm.hub.hf")
    import jax
    import jax.numpy as jnp

    from jaxllm import sharding
    from jaxllm.models import llama

    path, model, _ = smollm2
    torch = pytest.importorskip("torch")
    model64 = copy.deepcopy(model).double()
    ck = hub_gguf.GGUFCheckpoint(path)
    model_cfg = llama.default_config()
    model_cfg.update(hf.llama_model_overrides(ck.config, str(path)))
    config = llama.LlamaConfig.from_config(model_cfg)
    mesh_cfg = sharding.default_config()
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1])
    params = hf.load_llama_params(ck, config, mesh, mesh_cfg.rules)
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    config64 = dataclasses.replace(config, dtype=jnp.float64, param_dtype=jnp.float64)
    rng = np.random.default_rng(0)
    for lengths in ([12, 7, 3], [5, 16]):
        batch, length = len(lengths), max(lengths)
        inputs = np.zeros((batch, length), np.int32)
        mask = np.zeros((batch, length), np.int32)
        for row, n in enumerate(lengths):
            inputs[row, :n] = rng.integers(3, 49152, n)
            mask[row, :n] = 1
        positions = np.where(mask, np.arange(length)[None], 0).astype(np.int32)
        real = mask.astype(bool)
        ours = np.asarray(llama.apply(config, params, inputs, positions, mask), np.float64)[real]
        with jax.enable_x64(True):
            ours64 = np.asarray(llama.apply(config64, params64, inputs, positions, mask))[real]
        with torch.no_grad():
            ids, attention = torch.tensor(inputs, dtype=torch.long), torch.tensor(mask)
            theirs = model(input_ids=ids, attention_mask=attention).logits.double().numpy()[real]
            theirs64 = model64(input_ids=ids, attention_mask=attention).logits.numpy()[real]
        f64, f32 = np.abs(ours64 - theirs64).max(), np.abs(ours - theirs)
        ours_err, their_err = np.abs(ours - theirs64).max(), np.abs(theirs - theirs64).max()
        print(f"lengths {lengths}: float64 max |diff| {f64:.3g}; float32 max {f32.max():.3g}, mean {f32.mean():.3g}; "
              f"distance to float64: jaxllm {ours_err:.3g}, transformers {their_err:.3g}")
        assert f64 <= 1e-4
        assert f32.max() <= 1e-3 and f32.mean() <= 2e-5
