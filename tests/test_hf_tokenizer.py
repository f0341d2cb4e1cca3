"""HFTokenizer against transformers' AutoTokenizer (the independent peer) on real tokenizers:
a byte-level BPE trained here with `tokenizers` and a Llama-2 style SentencePiece tokenizer.model."""

import json
import shutil

import numpy as np
import pytest

import hf_tokenizer_fixture as fx
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.hf_tokenizer import HFTokenizer, generate_merges
from jaxllm.hub import HubError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
          "message['content'].strip() + ' [/INST]' }}{% else %}{{ ' ' + message['content'].strip() + ' ' + "
          "eos_token }}{% endif %}{% endfor %}")
# Folder variants: (builder, tokenizer_config.json).
VARIANTS = {
    # No add_*_token keys: the flags come from tokenizer.json's ByteLevel post-processor (none added).
    "bpe": ("bpe", {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                    "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}),
    # The post-processor of tokenizer.json adds bos and eos (transformers 5 ignores add_*_token then).
    "bpe_bos_eos": ("bpe", {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                            "eos_token": {"content": "<|end_of_text|>", "__type": "AddedToken"},
                            "add_bos_token": False}),
    "sp": ("sp", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
                  "chat_template": LLAMA2}),
    "sp_legacy": ("sp", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": True}),
    # What `jaxllm export` writes beside a jaxllm SentencePiece model.
    "sp_no_prefix": ("sp", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                            "legacy": False, "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>",
                            "unk_token": "<unk>"}),
}
TEXTS = ["Hello world", "", " ", "  two leading spaces", "trailing  ", "\n\nnewlines first\n", "a\tb\r\nc",
         "<|im_start|>user\nhi<|im_end|>\n", "<s>[INST] hi [/INST] ok </s>", "x<|user|>y</s>z", "<s>",
         "Grüße, naïve café: déjà vu", "日本語 🙂 emoji", "numbers 12345 3.14159", "unseen ʘ‿ʘ ⟨q⟩ ſ"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    bpe = fx.byte_level_bpe(root / "bpe_base", {})
    sp = fx.sentencepiece_llama(root / "sp_base", {})
    out = {}
    for name, (kind, config) in VARIANTS.items():
        d = root / name
        d.mkdir()
        src = bpe if kind == "bpe" else sp
        for f in ("tokenizer.json", "tokenizer.model"):
            if (src / f).exists():
                shutil.copy(src / f, d / f)
        if name == "bpe_bos_eos":
            backend = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
            backend["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]}
                                   for t, i in (("<|begin_of_text|>", 3), ("<|end_of_text|>", 4))}}
            (d / "tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[name] = d
    return out


def _check_same(ours, theirs, texts):
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text, add_special_tokens=True), text
    batch = ours.encode_batch(texts)
    assert batch == [theirs.encode(t, add_special_tokens=False) for t in texts]
    arrays = ours.encode_batch_arrays(texts)
    assert all(a.dtype == np.int32 and a.tolist() == b for a, b in zip(arrays, batch))
    for ids in batch + [theirs.encode(t, add_special_tokens=True) for t in texts]:
        assert ours.decode(ids) == theirs.decode(ids), ids


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ids_and_decode_match_transformers(transformers, folders, name):
    ours = HFTokenizer.load(folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(str(folders[name]))
    _check_same(ours, theirs, TEXTS)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id if theirs.bos_token else -1,
                                          theirs.eos_token_id if theirs.eos_token else -1)
    assert ours.chat_template == theirs.chat_template
    assert ours.add_bos == (theirs.encode("a")[0] == theirs.bos_token_id)


@pytest.mark.parametrize("name", ["bpe", "sp"])
def test_ids_match_transformers_on_eval_prompts(transformers, folders, shared_data, name):
    texts = []
    for line in (shared_data / "eval" / "mt_bench.jsonl").read_text(encoding="utf-8").splitlines():
        texts += json.loads(line)["turns"]
    for line in (shared_data / "eval" / "alpaca_eval.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["instruction"])
    assert len(texts) >= 800
    ours = HFTokenizer.load(folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(str(folders[name]))
    assert ours.encode_batch(texts) == theirs(texts, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(texts, add_special_tokens=True) == theirs(texts)["input_ids"]
    for ids in ours.encode_batch(texts[::20]):
        assert ours.decode(ids) == theirs.decode(ids)


def test_sentencepiece_backend_equals_transformers_conversion(transformers, folders):
    """The converted tokenizer.model is transformers' LlamaTokenizer backend, piece for piece."""
    ours = json.loads(HFTokenizer.load(folders["sp"]).tok.to_str())
    theirs = json.loads(transformers.AutoTokenizer.from_pretrained(str(folders["sp"])).backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "model"):
        assert ours[key] == theirs[key], key
    strip = lambda tokens: sorted((t["id"], t["content"], t["special"]) for t in tokens)  # noqa: E731
    assert strip(ours["added_tokens"]) == strip(theirs["added_tokens"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_round_trip_loads_in_transformers(transformers, folders, tmp_path, name):
    ours = HFTokenizer.load(folders[name])
    ours.save(tmp_path / "out")
    # An exported model folder also has config.json: AutoTokenizer must still use tokenizer.json as is.
    (tmp_path / "out" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    again = HFTokenizer.load(tmp_path / "out")
    assert again.fingerprint == ours.fingerprint
    assert again.chat_template == ours.chat_template
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    reference = transformers.AutoTokenizer.from_pretrained(str(folders[name]))
    _check_same(again, theirs, TEXTS)
    for text in TEXTS:
        assert theirs.encode(text) == reference.encode(text)
    assert theirs.chat_template == reference.chat_template


def test_special_ids_flags_and_fingerprint(folders):
    bpe = HFTokenizer.load(folders["bpe"])
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id) == (1, 2, 0, -1)
    assert (bpe.add_bos, bpe.add_eos) == (False, False)
    assert bpe.special_tokens_map == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                      "pad_token": "<|endoftext|>"}
    both = HFTokenizer.load(folders["bpe_bos_eos"])
    assert (both.add_bos, both.add_eos) == (True, True)
    assert both.pad_id == both.eos_id == 4  # no pad token: falls back to eos
    assert both.encode("hi", add_special_tokens=True) == [3, *both.encode("hi"), 4]
    assert bpe.fingerprint != both.fingerprint  # same vocabulary, other special settings
    sp = HFTokenizer.load(folders["sp"])
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.model_type, sp.markers) == (0, 1, 2, "hf", {})
    assert sp.num_sentinels == 0
    with pytest.raises(KeyError, match="no jaxllm assistant marker"):
        sp.role_id("assistant")
    with pytest.raises(IndexError):
        sp.sentinel_id(0)
    assert sp.decode([1, 5, -1, 10**9]) == sp.decode([1, 5])  # out-of-range ids dropped


def test_sentinels(folders):
    import tokenizers  # noqa: PLC0415

    tok = tokenizers.Tokenizer.from_file(str(folders["bpe"] / "tokenizer.json"))
    tok.add_special_tokens([f"<extra_id_{i}>" for i in range(3)])
    t = HFTokenizer(tok, path="mem", bos_token=None, eos_token="<|im_end|>", pad_token=None, unk_token=None,
                    add_bos=False, add_eos=False, chat_template=None)
    assert t.num_sentinels == 3 and t.encode("<extra_id_2>") == [t.sentinel_id(2)]
    assert t.bos_id == -1 and t.pad_id == t.eos_id


def test_flags_without_token_are_an_error(folders):
    tok = HFTokenizer.load(folders["bpe"]).tok
    with pytest.raises(HubError, match="add_bos_token is set but the tokenizer has no bos"):
        HFTokenizer(tok, path="mem", bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                    add_bos=True, add_eos=False, chat_template=None)


def test_generate_merges_orders_by_merged_piece(transformers, folders):
    # By the merged piece's id, then the left and right lengths.
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    assert generate_merges(vocab) == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]
    from transformers.tokenization_utils_base import generate_merges as theirs  # noqa: PLC0415

    vocab = json.loads(HFTokenizer.load(folders["sp"]).tok.to_str())["model"]["vocab"]
    assert generate_merges(vocab) == theirs(vocab)


def test_load_tokenizer_dispatch(folders, tmp_path):
    assert isinstance(tokenizer_lib.load_tokenizer(folders["bpe"]), HFTokenizer)
    assert isinstance(tokenizer_lib.load_tokenizer(folders["sp"]), HFTokenizer)
    (tmp_path / "plain").mkdir()
    shutil.copy(folders["sp"] / "tokenizer.model", tmp_path / "plain" / "tokenizer.model")
    plain = tokenizer_lib.load_tokenizer(tmp_path / "plain")
    assert isinstance(plain, tokenizer_lib.Tokenizer)
    assert isinstance(tokenizer_lib.load_tokenizer(tmp_path / "plain" / "tokenizer.model"), tokenizer_lib.Tokenizer)


def test_bad_folders_are_hub_errors(folders, tmp_path):
    with pytest.raises(HubError, match="tokenizer folder not found"):
        HFTokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="no tokenizer.json or tokenizer.model"):
        HFTokenizer.load(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(folders["bpe"], bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(HubError, match=r"tokenizer_config.json: malformed JSON"):
        HFTokenizer.load(bad)
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(HubError, match=r"tokenizer.json: not a tokenizers file"):
        HFTokenizer.load(bad)
    t5 = tmp_path / "t5"
    shutil.copytree(folders["sp"], t5)
    (t5 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(HubError, match="only Llama-style tokenizer.model"):
        HFTokenizer.load(t5)
    (t5 / "tokenizer_config.json").write_text("{}")
    (t5 / "tokenizer.model").write_bytes(b"\xff\x00garbage")
    with pytest.raises(HubError, match="not a SentencePiece model"):
        HFTokenizer.load(t5)
