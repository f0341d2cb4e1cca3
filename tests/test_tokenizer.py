"""Tests of jaxllm.data.tokenizer: id layout, atomic specials, lossless round trips, loading."""

import hashlib

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from jaxllm.data import sources, tokenizer
from jaxllm.data.sources import DataError

SHAKESPEARE_LIKE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\n"
    "Resolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\nAll:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and "
    "we'll have corn at our own price.\nIs't a verdict?\n"
)
ROUND_TRIP_TEXTS = [
    "  two leading spaces, three trailing   ",
    "\ttab first\tand inside\t",
    "\n\nblank lines first\n\n\nand inside\n\n",
    "def f(x):\n    if x:\n        return [x, 'ok']  # indented\n\treturn None\n",
    "ünïcode: naïve café, 日本語, emoji 🙂, math ∑∫\n",
    "Windows line\r\nend\r\n",
    " ",
    "\n",
    SHAKESPEARE_LIKE,
]
# Corpus for the small models: hand-written text plus a few real stdlib modules.
STDLIB_FILES = ("argparse.py", "textwrap.py", "shlex.py", "string.py", "fnmatch.py", "glob.py")


def small_corpus() -> list[str]:
    root = sources.stdlib_root()
    return [SHAKESPEARE_LIKE * 3] + [(root / name).read_text() for name in STDLIB_FILES]


def make_config(**overrides) -> ml_collections.ConfigDict:
    config = tokenizer.default_config()
    config.update(overrides)
    return config


SMALL = {
    "bpe": make_config(model_type="bpe", vocab_size=900, num_sentinels=16),
    "unigram": make_config(model_type="unigram", vocab_size=900, num_sentinels=16),
    "char": make_config(model_type="char", vocab_size=900, num_sentinels=16),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small model per type, trained once for the module."""
    out = tmp_path_factory.mktemp("tok")
    return {
        name: tokenizer.train_tokenizer(config, small_corpus(), out / f"{name}.model")
        for name, config in SMALL.items()
    }


def test_padded_vocab_size():
    cases = [(0, 128, 0), (1, 128, 128), (128, 128, 128), (129, 128, 256), (300, 64, 320)]
    for n, multiple, expected in cases:
        assert tokenizer.padded_vocab_size(n, multiple) == expected
    with pytest.raises(ValueError):
        tokenizer.padded_vocab_size(-1)


@pytest.mark.parametrize("model_type", list(SMALL))
def test_id_layout(trained, model_type):
    tok = trained[model_type]
    n = SMALL[model_type].num_sentinels
    assert tok.vocab_size % 128 == 0
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.pad_id != tok.eos_id
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert [tok.role_id(r) for r in tokenizer.ROLES] == [4, 5, 6, 7]
    # Read the file's proto directly: unused padding, then sentinels counted down from the end.
    model = model_pb2.ModelProto()
    model.ParseFromString(open(tok.path, "rb").read())
    assert len(model.pieces) == tok.vocab_size
    tail = model.pieces[tok.vocab_size - n :]
    assert [p.piece for p in tail] == [f"<extra_id_{i}>" for i in range(n - 1, -1, -1)]
    assert all(p.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED for p in tail)
    types = [p.type for p in model.pieces[: tok.vocab_size - n]]
    unused = types.count(model_pb2.ModelProto.SentencePiece.UNUSED)
    assert (
        unused < 128
        and types[len(types) - unused :] == [model_pb2.ModelProto.SentencePiece.UNUSED] * unused
    )
    assert tok.num_sentinels == n
    for i in range(n):
        assert tok.sentinel_id(i) == tok.vocab_size - 1 - i
    with pytest.raises(IndexError):
        tok.sentinel_id(n)


@pytest.mark.parametrize("model_type", list(SMALL))
def test_specials_are_atomic_in_text(trained, model_type):
    tok = trained[model_type]
    ids = tok.encode("fill <extra_id_3> the gap<extra_id_0>")
    assert ids.count(tok.vocab_size - 4) == 1 and ids[-1] == tok.vocab_size - 1
    ids = tok.encode("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>")
    roles = [i for i in ids if 4 <= i <= 7]
    assert roles == [4, 7, 5, 7, 6, 7]
    assert tok.decode(ids) == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>"


@pytest.mark.parametrize("model_type", list(SMALL))
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_exact_round_trip(trained, model_type, text):
    tok = trained[model_type]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("model_type", list(SMALL))
def test_encodings_concatenate_and_newline_is_one_token(trained, model_type):
    tok = trained[model_type]
    a, b = "    return x\n", "  y = 'z'\n"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b  # no dummy-prefix spaces
    newline = tok.encode("\n")
    assert len(newline) == 1 and tok.sp.id_to_piece(newline[0]) == "<0x0A>"
    assert tok.encode("a\n\nb").count(newline[0]) == 2


def test_char_model_gives_one_token_per_character(trained):
    tok = trained["char"]
    ids = tok.encode(SHAKESPEARE_LIKE)
    assert len(ids) == len(SHAKESPEARE_LIKE)
    assert [tok.decode([i]) for i in ids] == list(SHAKESPEARE_LIKE)
    assert tok.unk_id not in ids


def test_char_model_without_byte_fallback_keeps_newlines(tmp_path):
    config = make_config(model_type="char", byte_fallback=False, num_sentinels=0)
    tok = tokenizer.train_tokenizer(config, [SHAKESPEARE_LIKE], tmp_path / "c.model")
    ids = tok.encode(SHAKESPEARE_LIKE)
    assert len(ids) == len(SHAKESPEARE_LIKE) and tok.unk_id not in ids
    assert tok.decode(ids) == SHAKESPEARE_LIKE
    assert tok.sp.id_to_piece(tok.encode("\n")[0]) == "\n"
    # pad, unk, bos, eos, 4 roles, "\n", then one piece per other character; padded to 128.
    assert tok.vocab_size == tokenizer.padded_vocab_size(9 + len(set(SHAKESPEARE_LIKE) - {"\n"}))


def test_encode_batch_and_decode_drops_padding(trained):
    tok = trained["bpe"]
    texts = ROUND_TRIP_TEXTS[:4]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert [a.tolist() for a in tok.encode_batch_arrays(texts)] == [tok.encode(t) for t in texts]
    ids = tok.encode(texts[3])
    assert (
        tok.decode([tok.pad_id] + ids + [tok.pad_id, tok.vocab_size, tok.vocab_size + 7])
        == texts[3]
    )


def test_fingerprint_and_deterministic_training(trained, tmp_path):
    tok = trained["bpe"]
    assert tok.fingerprint == hashlib.sha256(open(tok.path, "rb").read()).hexdigest()
    again = tokenizer.train_tokenizer(SMALL["bpe"], small_corpus(), tmp_path / "again.model")
    assert again.fingerprint == tok.fingerprint
    assert again.fingerprint != trained["unigram"].fingerprint


def test_sampled_training_is_reproducible(tmp_path):
    # More lines than input_sentence_size: SentencePiece's own sampling gave a different model on
    # every run; jaxllm samples the lines itself with a fixed seed.
    config = make_config(model_type="bpe", vocab_size=900, num_sentinels=16, input_sentence_size=300)
    first = tokenizer.train_tokenizer(config, small_corpus(), tmp_path / "a.model")
    second = tokenizer.train_tokenizer(config, small_corpus(), tmp_path / "b.model")
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint != tokenizer.train_tokenizer(
        make_config(model_type="bpe", vocab_size=900, num_sentinels=16, input_sentence_size=301),
        small_corpus(), tmp_path / "c.model").fingerprint


def test_sample_lines_is_a_seeded_uniform_sample():
    lines = [f"line {i}" for i in range(50)]
    assert tokenizer.sample_lines(lines, 0) == lines
    assert tokenizer.sample_lines(lines, 80) == lines
    sample = tokenizer.sample_lines(lines, 10, seed=3)
    assert len(set(sample)) == 10 and sample == sorted(sample, key=lines.index)  # corpus order kept
    assert tokenizer.sample_lines(lines, 10, seed=3) == sample
    # Every line is kept with probability k/n = 0.2: over 2000 seeds each count is Binomial(2000, 0.2)
    # (mean 400, sd 17.9); 6 sd either side.
    counts = np.zeros(50)
    for seed in range(2000):
        for line in tokenizer.sample_lines(lines, 10, seed=seed):
            counts[lines.index(line)] += 1
    assert counts.sum() == 20000 and np.all(np.abs(counts - 400) < 6 * 17.9)


def plain_spm_model(path_prefix) -> str:
    """A model written by plain SentencePieceTrainer with its default settings (no pad, roles)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SHAKESPEARE_LIKE.splitlines() * 5),
        model_prefix=str(path_prefix),
        vocab_size=60,
        minloglevel=2,
    )
    return f"{path_prefix}.model"


def test_load_external_model_without_specials(tmp_path):
    tok = tokenizer.Tokenizer.load(plain_spm_model(tmp_path / "plain"))
    assert tok.num_sentinels == 0
    assert tok.pad_id == -1 and tok.eos_id == 2  # sentencepiece defaults: no pad, eos = 2
    with pytest.raises(KeyError, match="no piece for the user marker '<|user|>'"):
        tok.role_id("user")
    with pytest.raises(IndexError):
        tok.sentinel_id(0)
    with pytest.raises(ValueError, match="unknown role"):
        tok.role_id("moderator")
    assert tok.decode(tok.encode("Speak, speak.")) == "Speak, speak."


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokenizer.Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tokenizer.Tokenizer.load(tmp_path / "junk.model")


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type='wordpiece'"):
        tokenizer.train_tokenizer(make_config(model_type="wordpiece"), ["x"], tmp_path / "a.model")
    with pytest.raises(ValueError, match="leaves no room"):
        tokenizer.train_tokenizer(make_config(vocab_size=300), ["x"], tmp_path / "a.model")
    with pytest.raises(ValueError, match="no non-blank lines"):
        tokenizer.train_tokenizer(make_config(), ["", "  \n\n"], tmp_path / "a.model")

    def failing_documents():
        yield "some text"
        raise DataError("corpus.txt: byte offset 9 (line 2): not valid UTF-8")

    with pytest.raises(DataError, match="byte offset 9"):
        tokenizer.train_tokenizer(make_config(), failing_documents(), tmp_path / "a.model")
    assert not (tmp_path / "a.model").exists()


def test_long_lines_are_cut_to_max_sentence_length():
    counts = {"lines": 0, "cut": 0}
    long_line = "é" * 3000  # 6000 bytes
    lines = list(tokenizer._training_lines(["short\n" + long_line + "\n\n  \n"], counts))
    assert lines[0] == "short" and "".join(lines[1:]) == long_line
    assert all(len(line.encode()) <= tokenizer.MAX_SENTENCE_BYTES for line in lines)
    assert counts == {"lines": len(lines), "cut": 1}


def run_config(tmp_path, **tok_overrides) -> ml_collections.ConfigDict:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    for i, text in enumerate(small_corpus()):
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    config = ml_collections.ConfigDict()
    config.data_root = str(tmp_path)
    config.data = ml_collections.ConfigDict({"sources": "text:{data_root}/corpus/*.txt"})
    config.tokenizer = make_config(vocab_size=700, num_sentinels=4, **tok_overrides)
    return config


def test_load_or_train_trains_once_then_reuses(tmp_path):
    config = run_config(tmp_path)
    run_dir = tmp_path / "run"
    tok = tokenizer.load_or_train(config, run_dir)
    path = run_dir / "tokenizer" / "tokenizer.model"
    assert tok.path == str(path) and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temporary left
    config.tokenizer.vocab_size = 1024  # a changed config does not retrain a run's tokenizer
    config.tokenizer.model_type = "unigram"
    again = tokenizer.load_or_train(config, run_dir)
    assert again.fingerprint == tok.fingerprint and again.vocab_size == tok.vocab_size == 768


def test_load_or_train_copies_model_path(tmp_path):
    external = plain_spm_model(tmp_path / "plain")
    config = run_config(tmp_path, model_path=external)
    tok = tokenizer.load_or_train(config, tmp_path / "run")
    assert tok.path == str(tmp_path / "run" / "tokenizer" / "tokenizer.model")
    assert tok.fingerprint == hashlib.sha256(open(external, "rb").read()).hexdigest()
    assert tok.num_sentinels == 0


def test_load_or_train_uses_tokenizer_sources_and_reports_bad_ones(tmp_path):
    config = run_config(tmp_path, sources="text:{data_root}/nothing/*.txt")
    with pytest.raises(DataError, match="matches no files"):
        tokenizer.load_or_train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "tokenizer" / "tokenizer.model").exists()


def test_model_writer_keeps_disk_clean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer.train_tokenizer(SMALL["bpe"], [SHAKESPEARE_LIKE] * 20, tmp_path / "out" / "m.model")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out",
        "out/m.model",
    ]
