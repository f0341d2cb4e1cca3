"""Tests of jaxllm.data.lm: token cache, packing, order, per-process slices, resume, eval."""

import collections
import json
import os

import grain
import numpy as np
import pytest

from jaxllm.data import lm, sources, tokenizer
from jaxllm.data.sources import DataError

DOCS_A = [
    "The first document.\nIt has two lines.",
    "def f(x):\n    return x + 1",
    "short",
    "Another document, somewhat longer than the others, to span rows.",
    "é ü ✓",
]
DOCS_B = ["q" * 40, "qq qq qq qq", "qqq\nqqq"]  # only B has "q"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A char model: one token per character keeps hand-made expectations simple."""
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "char.model"
    return tokenizer.train_tokenizer(config, DOCS_A + DOCS_B, path)


def write_corpus(directory, name, docs):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("\n\n".join(docs) + "\n")


def data_config(**overrides):
    config = lm.default_config()
    config.update(overrides)
    return config


def corpus_from_docs(docs: list[list[int]]) -> lm.TokenizedCorpus:
    tokens = np.array([t for d in docs for t in d], np.uint16)
    doc_starts = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    return lm.TokenizedCorpus(tokens, doc_starts, stats={}, path="<memory>", cached=False)


def reference_rows(docs: list[list[int]], seq_len: int, pad_tail: bool = False) -> list[dict]:
    """Slow, independent packing: walk the token stream with a Python loop."""
    stream = [(t, d) for d, doc in enumerate(docs) for t in doc]  # (token, document index)
    window = seq_len + 1
    rows = []
    for start in range(0, len(stream), window):
        chunk = stream[start : start + window]
        if len(chunk) < window and not pad_tail:
            break
        tokens, segs, pos = [], [], []
        for j, (t, d) in enumerate(chunk):
            new_piece = j == 0 or d != chunk[j - 1][1]
            segs.append(1 if j == 0 else segs[-1] + int(new_piece))
            pos.append(0 if new_piece else pos[-1] + 1)
            tokens.append(t)
        pad = window - len(chunk)
        tokens, segs, pos = tokens + [0] * pad, segs + [0] * pad, pos + [0] * pad
        rows.append(
            {
                "inputs": tokens[:-1],
                "targets": tokens[1:],
                "segment_ids": segs[:-1],
                "positions": pos[:-1],
                "loss_mask": [
                    float(segs[j] > 0 and segs[j] == segs[j + 1]) for j in range(seq_len)
                ],
            }
        )
    return rows


def rows_of(batch: dict) -> list[dict]:
    return [{k: v[i].tolist() for k, v in batch.items()} for i in range(len(batch["inputs"]))]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 4, 5, 11])
def test_packing_matches_python_reference(seq_len):
    docs = [[10 + 100 * d + k for k in range(n)] for d, n in enumerate([3, 7, 1, 12, 5, 2, 9, 1])]
    rows = lm.PackedRows(corpus_from_docs(docs), seq_len)
    expected = reference_rows(docs, seq_len)
    assert rows.num_rows == len(expected) == sum(map(len, docs)) // (seq_len + 1)
    for r, want in enumerate(expected):
        batch = lm.to_model_inputs({k: v[None] for k, v in rows[r].items()})
        assert rows_of(batch) == [want]
        assert {k: v.dtype for k, v in batch.items()} == {
            "inputs": np.int32,
            "targets": np.int32,
            "segment_ids": np.int32,
            "positions": np.int32,
            "loss_mask": np.float32,
        }


def test_packing_hand_checked_case():
    # docs [a a a] [b b b b b b b] [c]; seq_len 4 -> windows of 5: [a a a b b] [b b b b b]
    docs = [[1, 1, 1], [2, 2, 2, 2, 2, 2, 2], [3]]
    rows = lm.PackedRows(corpus_from_docs(docs), 4)
    first, second = (lm.to_model_inputs({k: v[None] for k, v in rows[r].items()}) for r in (0, 1))
    assert first["inputs"].tolist() == [[1, 1, 1, 2]] and first["targets"].tolist() == [
        [1, 1, 2, 2]
    ]
    assert first["segment_ids"].tolist() == [[1, 1, 1, 2]]
    assert first["positions"].tolist() == [[0, 1, 2, 0]]
    assert first["loss_mask"].tolist() == [[1, 1, 0, 1]]  # a -> b is never a target
    assert second["positions"].tolist() == [[0, 1, 2, 3]]  # row start restarts positions
    assert second["loss_mask"].tolist() == [[1, 1, 1, 1]]
    assert rows.num_rows == 2  # the tail [c] is dropped for training


def test_tokenize_corpus_adds_bos_eos_per_document(tok, tmp_path):
    write_corpus(tmp_path / "a", "a.txt", DOCS_A)
    specs = sources.parse_sources(f"text:{tmp_path}/a/a.txt")
    corpus = lm.tokenize_corpus(
        specs, tok, cache_dir=tmp_path / "cache", add_bos=True, add_eos=True
    )
    expected = []
    for doc in DOCS_A:
        expected += [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    assert corpus.tokens.dtype == np.uint16 and corpus.tokens.tolist() == expected
    lengths = [len(tok.encode(d)) + 2 for d in DOCS_A]
    assert corpus.doc_starts.tolist() == np.cumsum([0] + lengths).tolist()
    assert corpus.stats["documents"] == len(DOCS_A) and corpus.stats["tokens"] == len(expected)
    plain = lm.tokenize_corpus(
        specs, tok, cache_dir=tmp_path / "cache", add_bos=False, add_eos=True
    )
    assert plain.path != corpus.path and plain.num_tokens == corpus.num_tokens - len(DOCS_A)
    assert plain.tokens[plain.doc_starts[1] - 1] == tok.eos_id and plain.tokens[0] != tok.bos_id


def test_eos_placement_in_batches(tok, tmp_path):
    write_corpus(tmp_path, "a.txt", DOCS_A)
    config = data_config(eval_sources=f"text:{tmp_path}/a.txt", seq_len=16)
    ds = lm.lm_dataset(
        config, tok, split="eval", global_batch_size=2, seed=0, cache_dir=tmp_path / "c"
    )
    docs = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS_A]
    expected = reference_rows(docs, 16, pad_tail=True)
    got = [row for b in range(lm.num_eval_batches(ds)) for row in rows_of(ds[b])]
    assert got[: len(expected)] == expected
    for row in got:
        for j in range(16):
            if row["inputs"][j] == tok.eos_id:
                assert row["loss_mask"][j] == 0  # eos never predicts the next document's bos
            if row["targets"][j] == tok.eos_id:
                assert row["loss_mask"][j] == 1  # but eos itself is learned


# ---------------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------------


def test_every_row_once_per_epoch():
    docs = [[1 + (7 * d + k) % 500 for k in range(5 + d % 9)] for d in range(60)]
    corpus = corpus_from_docs(docs)
    ordered = lm.PackedRows(corpus, 7)
    shuffled = lm.PackedRows(corpus, 7, seed=123)
    n = ordered.num_rows
    assert len(shuffled) > 10**15 and len(ordered) == n
    key = lambda row: tuple(row["tokens"].tolist())  # noqa: E731
    want = collections.Counter(key(ordered[r]) for r in range(n))
    epochs = [[shuffled.row_index(i) for i in range(e * n, (e + 1) * n)] for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(n))
        assert collections.Counter(key(shuffled[i]) for i in range(e * n, (e + 1) * n)) == want
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))


def test_same_seed_same_batches_different_seed_different(tok, tmp_path):
    write_corpus(tmp_path, "a.txt", DOCS_A * 8)
    config = data_config(sources=f"text:{tmp_path}/a.txt", seq_len=8)
    build = lambda seed: lm.lm_dataset(  # noqa: E731
        config, tok, split="train", global_batch_size=4, seed=seed, cache_dir=tmp_path / "c"
    )
    a, b, c = build(0), build(0), build(1)
    for s in range(6):
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k])
    assert any(not np.array_equal(a[s]["inputs"], c[s]["inputs"]) for s in range(6))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(tok, tmp_path, process_count):
    write_corpus(tmp_path, "a.txt", DOCS_A * 6)
    write_corpus(tmp_path, "b.txt", DOCS_B * 6)
    for spec in (f"text:{tmp_path}/a.txt", f"text:{tmp_path}/a.txt@2; text:{tmp_path}/b.txt@1"):
        config = data_config(sources=spec, eval_sources=f"text:{tmp_path}/b.txt", seq_len=8)
        for split in ("train", "eval"):
            kwargs = dict(split=split, global_batch_size=8, seed=3, cache_dir=tmp_path / "c")
            whole = lm.lm_dataset(config, tok, **kwargs)
            parts = [
                lm.lm_dataset(config, tok, process_index=p, process_count=process_count, **kwargs)
                for p in range(process_count)
            ]
            steps = 5 if split == "train" else lm.num_eval_batches(whole)
            assert split == "train" or all(len(p) == steps for p in parts)
            for s in range(steps):
                for k, v in whole[s].items():
                    assert v.shape == (8, 8)
                    np.testing.assert_array_equal(np.concatenate([p[s][k] for p in parts]), v)


def test_weighted_mixture_proportions(tok, tmp_path):
    write_corpus(tmp_path, "a.txt", DOCS_A * 10)
    write_corpus(tmp_path, "b.txt", DOCS_B * 10)
    config = data_config(sources=f"text:{tmp_path}/a.txt@3; text:{tmp_path}/b.txt@1", seq_len=4)
    ds = lm.lm_dataset(
        config, tok, split="train", global_batch_size=4, seed=0, cache_dir=tmp_path / "c"
    )
    (q,) = tok.encode("q")
    # Every window of 5 tokens of B holds a "q" (B has at most 2 other tokens in a row: eos, bos).
    from_b = sum(q in row for s in range(100) for row in ds[s]["inputs"].tolist())
    assert 95 <= from_b <= 105  # 400 rows at 3:1 -> 100 from b (grain mixes deterministically)


def test_iterator_state_resumes_exactly(tok, tmp_path):
    write_corpus(tmp_path, "a.txt", DOCS_A * 8)
    write_corpus(tmp_path, "b.txt", DOCS_B * 8)
    for spec in (f"text:{tmp_path}/a.txt", f"text:{tmp_path}/a.txt@1; text:{tmp_path}/b.txt@1"):
        config = data_config(sources=spec, seq_len=8)
        ds = lm.lm_dataset(
            config, tok, split="train", global_batch_size=4, seed=7, cache_dir=tmp_path / "c"
        )
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        it = iter(ds.to_iter_dataset(options))
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        expected = [next(it) for _ in range(6)]
        fresh = iter(
            lm.lm_dataset(
                config, tok, split="train", global_batch_size=4, seed=7, cache_dir=tmp_path / "c"
            ).to_iter_dataset(options)
        )
        fresh.set_state(state)
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        assert not np.array_equal(expected[0]["inputs"], ds[0]["inputs"])  # resumed, not restarted


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------


def test_eval_is_finite_in_order_and_padded(tok, tmp_path):
    write_corpus(tmp_path, "v.txt", DOCS_A)
    config = data_config(eval_sources=f"text:{tmp_path}/v.txt", seq_len=8)
    docs = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS_A]
    num_tokens = sum(map(len, docs))
    num_rows = -(-num_tokens // 9)
    ds = lm.lm_dataset(
        config, tok, split="eval", global_batch_size=4, seed=0, cache_dir=tmp_path / "c"
    )
    assert lm.num_eval_batches(ds) == len(ds) == -(-num_rows // 4)
    got = [row for b in range(len(ds)) for row in rows_of(ds[b])]
    assert got[:num_rows] == reference_rows(docs, 8, pad_tail=True)
    assert num_rows % 4 != 0  # the case needs padding rows
    for row in got[num_rows:]:
        assert row == {k: [0] * 8 for k in ("inputs", "targets", "segment_ids", "positions")} | {
            "loss_mask": [0.0] * 8
        }
    total_targets = sum(sum(r["loss_mask"]) for r in got)
    # Every in-document next-token pair is scored once except those crossing a row boundary.
    crossings = sum(
        1 for r in range(1, num_rows) if r * 9 not in np.cumsum([0] + list(map(len, docs)))
    )
    assert total_targets == sum(len(d) - 1 for d in docs) - crossings
    with pytest.raises(ValueError, match="infinite"):
        lm.num_eval_batches(
            lm.lm_dataset(
                data_config(sources=f"text:{tmp_path}/v.txt", seq_len=8),
                tok,
                split="train",
                global_batch_size=4,
                seed=0,
                cache_dir=tmp_path / "c",
            )
        )


def test_lm_dataset_errors(tok, tmp_path):
    write_corpus(tmp_path, "a.txt", ["tiny"])
    config = data_config(sources=f"text:{tmp_path}/a.txt", seq_len=8)
    kwargs = dict(seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        lm.lm_dataset(config, tok, split="train", global_batch_size=8, process_count=3, **kwargs)
    with pytest.raises(DataError, match="split='test'"):
        lm.lm_dataset(config, tok, split="test", global_batch_size=8, **kwargs)
    with pytest.raises(DataError, match="fewer than one row"):
        lm.lm_dataset(config, tok, split="train", global_batch_size=8, **kwargs)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_is_reused_and_invalidated(tok, tmp_path, monkeypatch):
    calls = []
    original = tokenizer.Tokenizer.encode_batch_arrays

    def counting(self, texts, num_threads=0):
        calls.append(len(texts))
        return original(self, texts, num_threads)

    monkeypatch.setattr(tokenizer.Tokenizer, "encode_batch_arrays", counting)
    write_corpus(tmp_path / "d", "a.txt", DOCS_A)
    specs = sources.parse_sources(f"text:{tmp_path}/d/a.txt")
    build = lambda: lm.tokenize_corpus(  # noqa: E731
        specs, tok, cache_dir=tmp_path / "cache", add_bos=True, add_eos=True
    )
    first = build()
    assert not first.cached and calls == [len(DOCS_A)]
    second = build()
    assert second.cached and second.path == first.path and calls == [len(DOCS_A)]
    assert isinstance(second.tokens, np.memmap)
    np.testing.assert_array_equal(second.tokens, first.tokens)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first.path)]

    path = tmp_path / "d" / "a.txt"
    mtime = path.stat().st_mtime_ns
    path.write_text("\n\n".join(DOCS_A + ["one more document"]) + "\n")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    third = build()
    assert not third.cached and third.path != first.path and len(calls) == 2
    assert third.num_docs == len(DOCS_A) + 1


def test_tinyshakespeare_char_batches_are_real_text(shared_data, tmp_path):
    text = (shared_data / "pretrain/tinyshakespeare/train.txt").read_text()
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    tok = tokenizer.train_tokenizer(config, [text], tmp_path / "char.model")
    assert tok.vocab_size == 384  # 4 specials + 4 roles + 256 bytes + 64 characters, padded
    assert len(tok.encode(text[:2000])) == 2000  # one token per character, newline included
    data = data_config(sources="text:{data_root}/pretrain/tinyshakespeare/train.txt", seq_len=64)
    ds = lm.lm_dataset(
        data,
        tok,
        split="train",
        global_batch_size=4,
        seed=0,
        cache_dir=tmp_path / "c",
        data_root=str(shared_data),
    )
    for s in range(3):
        batch = ds[s]
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            piece = tok.decode(inputs.tolist() + targets[-1:].tolist())
            assert len(piece) >= 64 and piece in text  # contiguous original text
