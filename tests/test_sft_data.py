"""Tests of jaxllm.data.sft: sources, truncation, mixtures, packing, order, slices, eval."""

import collections
import json
import logging
import math
import pickle
import random

import grain
import numpy as np
import pytest

from jaxllm.data import chat, lm, packing, sft, tokenizer
from jaxllm.data.sources import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>/\n0123456789"
SFT_SETS = ("lima", "oasst_en100", "alpaca_en_demo", "self_instruct_seed")
SFT_SETS += ("fastchat_dummy_conversation",)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A char model: one token per character, so lengths are known by hand."""
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "char.model"
    return tokenizer.train_tokenizer(config, [ALPHABET], path)


def conversation(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for k, text in enumerate(turns):
        messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
    return messages


def num_tokens(messages):
    """Rendered length with a char model: bos + (marker + chars + end) per message + eos."""
    return 2 + sum(len(m["content"]) + 2 for m in messages)


def random_conversations(n, rng, letter="x", max_chars=5):
    """`n` distinct conversations of 1-3 pairs; every content is `letter`, index, letters.

    With n <= 100 and max_chars = 5, at most 2 + 6 * (8 + 2) = 62 tokens (char model).
    """
    convs = []
    for i in range(n):
        pairs = rng.randint(1, 3)
        turns = [f"{letter}{i}{letter * rng.randint(0, max_chars)}" for _ in range(2 * pairs)]
        convs.append(conversation(*turns))
    return convs


def write_jsonl(path, records, blank_after=()):
    lines = []
    for k, r in enumerate(records):
        lines.append(r if isinstance(r, str) else json.dumps(r))
        if k in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_convs(path, convs):
    return write_jsonl(path, [{"messages": c} for c in convs])


def data_config(**overrides):
    config = sft.default_config()
    config.update(overrides)
    return config


def build(config, tok, tmp_path=None, split="train", batch=4, seed=0, **kwargs):
    cache = str(tmp_path / "cache") if tmp_path is not None else ""
    return sft.sft_dataset(
        config, tok, split=split, global_batch_size=batch, seed=seed, cache_dir=cache, **kwargs
    )


def check_segment(inputs, loss_mask, tokens, target_mask):
    """A packed example's inputs and loss mask against the example rendered alone.

    Alone, `inputs = tokens[:-1]` and `loss_mask = target_mask[1:]`. Packed, the example's last
    token is an input too (unless the example ends the row) and predicts the next example's first
    token or padding, so it is masked.
    """
    n = len(tokens)
    np.testing.assert_array_equal(inputs[: n - 1], tokens[:-1])
    np.testing.assert_array_equal(loss_mask[: n - 1], target_mask[1:])
    assert len(inputs) == n - 1 or (inputs[-1] == tokens[-1] and loss_mask[-1] == 0)


def segments(rows):
    """Per packed example of batched model inputs: (input tokens, loss mask) in row order."""
    out = []
    for b in range(rows["inputs"].shape[0]):
        segs = rows["segment_ids"][b]
        for k in range(1, segs.max() + 1):
            idx = np.flatnonzero(segs == k)
            assert (np.diff(idx) == 1).all()  # contiguous
            assert rows["positions"][b, idx].tolist() == list(range(len(idx)))
            out.append((rows["inputs"][b, idx], rows["loss_mask"][b, idx]))
    return out


# ---------------------------------------------------------------------------------------------
# Records and sources
# ---------------------------------------------------------------------------------------------


def test_mixed_formats_in_one_file_and_stats(tmp_path):
    write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": conversation("Hi.", "Hello.")},
            {
                "conversations": [
                    {"from": "human", "value": "Hi."},
                    {"from": "gpt", "value": "Hello."},
                ]
            },
            {"instruction": "Hi.", "output": "Hello."},
            {"prompt": "Hi.", "completion": "Hello."},
            {"messages": conversation("a", "b", "c", "d")},
        ],
        blank_after=(1,),
    )
    stats = sft.SFTStats()
    convs = sft.load_conversations(f"jsonl:{tmp_path}/*.jsonl", stats=stats)
    assert convs[:4] == [conversation("Hi.", "Hello.")] * 4
    assert (stats.files, stats.records, stats.blank_lines, stats.multi_turn) == (1, 5, 1, 1)
    assert stats.formats == {"messages": 2, "sharegpt": 1, "alpaca": 1, "prompt_completion": 1}


@pytest.mark.parametrize(
    "record, line, match",
    [
        ("{oops", 3, "malformed JSON"),
        ({"prompt": "x"}, 3, "record has no field 'completion'"),
        ({"instruction": "x", "input": ""}, 3, "record has no field 'output'"),
        ({"messages": []}, 3, "empty messages"),
        ({"messages": conversation("x")}, 3, "ends on a user turn"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 3, "unknown role 'robot'"),
        ({"conversations": [{"from": "bard", "value": "x"}]}, 3, "unknown role 'bard'"),
        ({"messages": conversation("x", 7)}, 3, "content is int"),
    ],
)
def test_record_errors_name_file_and_line(tok, tmp_path, record, line, match):
    good = {"messages": conversation("q", "a")}
    path = write_jsonl(tmp_path / "d.jsonl", [good, record], blank_after=(0,))
    with pytest.raises(DataError, match=f"{path}:{line}: .*{match}"):
        sft.load_conversations(f"jsonl:{path}")
    config = data_config(sources=f"jsonl:{path}", seq_len=16)
    with pytest.raises(DataError, match=f"{path}:{line}:"):
        build(config, tok)


def test_source_spec_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation("q", "a")}])
    for spec, match in [
        (f"text:{path}", "expected jsonl:GLOB"),
        (f"jsonl:{path}#text", "no '#field'"),
        (f"jsonl:{tmp_path}/none*.jsonl", "matches no files"),
        (f"jsonl:{path}@1; jsonl:{path}", "mixes weighted and unweighted"),
        ("jsonl:{data_root}/x.jsonl", "data_root is empty"),
    ]:
        with pytest.raises(DataError, match=match):
            sft.load_conversations(spec)
    config = data_config(sources=f"jsonl:{path}", seq_len=16)
    for kwargs, match in [
        (dict(split="test"), "split='test'"),
        (dict(batch=3, process_count=2), "not divisible"),
        (dict(process_index=2, process_count=2), "bad batch layout"),
    ]:
        with pytest.raises(DataError, match=match):
            build(config, tok, **kwargs)
    for overrides, match in [
        (dict(truncation="cut"), "truncation='cut'"),
        (dict(seq_len=0), ">= 1"),
    ]:
        with pytest.raises(DataError, match=match):
            build(data_config(**{"sources": f"jsonl:{path}", "seq_len": 16, **overrides}), tok)
    assert sft.load_conversations("jsonl:{data_root}/d.jsonl", data_root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_three_turn_loss_mask_through_the_pipeline(tok, tmp_path):
    conv = conversation("hi", "yo", "ok", "fine", "q", "a", system="sys")
    assert num_tokens(conv) == 31
    path = write_jsonl(tmp_path / "one.jsonl", [{"messages": conv}])
    for split in ("train", "eval"):
        config = data_config(sources=f"jsonl:{path}", eval_sources=f"jsonl:{path}", seq_len=30)
        ds = build(config, tok, split=split, batch=1)
        batch = ds[0]
        assert batch["inputs"].shape == (1, 30)
        # Hand-written (see test_chat): the assistant marker and each response token predict the
        # next supervised token; the eos is the target at position 29.
        expected = [10, 11, 12, 18, 19, 20, 21, 22, 27, 28, 29]
        assert np.flatnonzero(batch["loss_mask"][0]).tolist() == expected
        assert batch["loss_mask"].dtype == np.float32
        assert batch["targets"][0, 29] == tok.eos_id
        assert batch["segment_ids"][0].tolist() == [1] * 30
        assert batch["positions"][0].tolist() == list(range(30))


def test_to_model_inputs_by_hand():
    # Two packed examples and padding; the second example's first token is marked supervised
    # (no jaxllm template does that) to pin the "same segment" half of the rule.
    rows = {
        "tokens": np.array([[2, 10, 11, 3, 2, 12, 3, 0]], np.int32),
        "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32),
        "positions": np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32),
        "target_mask": np.array([[0, 0, 1, 1, 1, 1, 1, 0]], np.float32),
    }
    out = sft.to_model_inputs(rows)
    assert out["inputs"].tolist() == [[2, 10, 11, 3, 2, 12, 3]]
    assert out["targets"].tolist() == [[10, 11, 3, 2, 12, 3, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 1, 0]]
    assert out["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert out["loss_mask"].dtype == np.float32 and out["inputs"].dtype == np.int32


def test_packed_loss_masks_equal_unpacked_example_by_example(tok, tmp_path):
    convs = random_conversations(40, random.Random(0))
    path = write_convs(tmp_path / "d.jsonl", convs)
    template = chat.ChatTemplate(tok)
    unpacked = {}  # first input token after the user marker (the example's index) -> render
    for c in convs:
        tokens, target_mask = template.render(c)
        unpacked[tuple(tokens[:5].tolist())] = (tokens, target_mask)
    assert len(unpacked) == len(convs)
    ds = build(data_config(sources=f"jsonl:{path}", seq_len=64), tok, batch=4, seed=1)
    seen = 0
    for s in range(12):
        for inputs, loss_mask in segments(ds[s]):
            check_segment(inputs, loss_mask, *unpacked[tuple(inputs[:5].tolist())])
            seen += 1
    assert seen > 40  # more than an epoch was checked


# ---------------------------------------------------------------------------------------------
# Packing and order
# ---------------------------------------------------------------------------------------------


def first_fit_reference(lengths, capacity, max_items=None):
    rows = []  # [free, [items]]
    for j, n in enumerate(lengths):
        for row in rows:
            if row[0] >= n and (max_items is None or len(row[1]) < max_items):
                row[0] -= n
                row[1].append(j)
                break
        else:
            rows.append([capacity - n, [j]])
    return [items for _, items in rows]


def test_pack_first_fit_by_hand_and_against_a_reference():
    row_starts, members = packing.pack_first_fit([5, 4, 3, 2, 1], 6)
    assert row_starts.tolist() == [0, 2, 4, 5] and members.tolist() == [0, 4, 1, 3, 2]
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.randint(1, 17) for _ in range(rng.randint(1, 60))]
        row_starts, members = packing.pack_first_fit(lengths, 17)
        got = [members[a:b].tolist() for a, b in zip(row_starts, row_starts[1:])]
        assert got == first_fit_reference(lengths, 17)
        row_starts, members = packing.pack_first_fit(lengths, 17, max_items=3)
        got = [members[a:b].tolist() for a, b in zip(row_starts, row_starts[1:])]
        assert got == first_fit_reference(lengths, 17, max_items=3) and max(map(len, got)) <= 3
    # max_items: [2, 2, 2] fits one row of 6 by length, but two items at most per row.
    assert packing.pack_first_fit([2, 2, 2], 6, max_items=2)[0].tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="lengths"):
        packing.pack_first_fit([3, 18], 17)
    with pytest.raises(ValueError, match="max_items"):
        packing.pack_first_fit([3], 17, max_items=0)


def test_every_example_once_per_epoch_and_never_split(tok, tmp_path):
    convs = random_conversations(50, random.Random(1))
    path = write_convs(tmp_path / "d.jsonl", convs)
    template = chat.ChatTemplate(tok)
    examples = sorted(tuple(template.render(c)[0].tolist()) for c in convs)
    spec = sft.parse_sft_sources(f"jsonl:{path}")[0]
    rows = sft.PackedExamples(sft.source_examples(spec, template), 64, seed=5)
    index = 0
    for epoch in range(3):
        row_starts, ids = rows.epoch_plan(epoch)
        assert sorted(ids.tolist()) == list(range(50))
        got = []
        for r in range(len(row_starts) - 1):
            assert rows.locate(index) == (epoch, r)
            row = rows[index]
            index += 1
            for k in range(1, row["segment_ids"].max() + 1):
                got.append(tuple(row["tokens"][row["segment_ids"] == k].tolist()))
            assert not row["tokens"][row["segment_ids"] == 0].any()
        assert sorted(got) == examples  # whole examples, each exactly once
    assert rows.epoch_plan(0)[1].tolist() != rows.epoch_plan(1)[1].tolist()  # reshuffled


def test_determinism_and_random_access(tok, tmp_path):
    convs = random_conversations(30, random.Random(2))
    path = write_convs(tmp_path / "d.jsonl", convs)
    config = data_config(sources=f"jsonl:{path}", seq_len=40)
    a, b, c = build(config, tok, seed=0), build(config, tok, seed=0), build(config, tok, seed=1)
    for s in range(12):
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k])
    assert any(not np.array_equal(a[s]["inputs"], c[s]["inputs"]) for s in range(12))
    fresh = build(config, tok, seed=0)  # jumps straight to a late index: epochs computed lazily
    for s in (11, 3, 7):
        np.testing.assert_array_equal(fresh[s]["inputs"], a[s]["inputs"])
    template = chat.ChatTemplate(tok)
    (spec,) = sft.parse_sft_sources(f"jsonl:{path}")
    rows = sft.PackedExamples(sft.source_examples(spec, template), 64, seed=0)
    rows.epoch_plan(0)
    clone = pickle.loads(pickle.dumps(rows))  # as sent to grain's worker processes
    for k in rows[9]:
        np.testing.assert_array_equal(clone[9][k], rows[9][k])


def test_iterator_state_resumes_exactly(tok, tmp_path):
    rng = random.Random(4)
    path_a = write_convs(tmp_path / "a.jsonl", random_conversations(20, rng))
    path_b = write_convs(tmp_path / "b.jsonl", random_conversations(7, rng, "b"))
    for spec in (f"jsonl:{path_a}", f"jsonl:{path_a}@1; jsonl:{path_b}@2"):
        config = data_config(sources=spec, seq_len=40)
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        it = iter(build(config, tok, tmp_path, seed=7).to_iter_dataset(options))
        for _ in range(9):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        expected = [next(it) for _ in range(8)]
        fresh = iter(build(config, tok, tmp_path, seed=7).to_iter_dataset(options))
        fresh.set_state(state)
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_slices_concatenate_to_the_global_batch(tok, tmp_path, process_count):
    rng = random.Random(5)
    path_a = write_convs(tmp_path / "a.jsonl", random_conversations(30, rng))
    path_b = write_convs(tmp_path / "b.jsonl", random_conversations(9, rng, "b"))
    for spec in (f"jsonl:{path_a}", f"jsonl:{path_a}@2; jsonl:{path_b}@1"):
        config = data_config(sources=spec, eval_sources=f"jsonl:{path_a}", seq_len=32)
        for split in ("train", "eval"):
            kwargs = dict(split=split, batch=8, seed=3)
            whole = build(config, tok, tmp_path, **kwargs)
            parts = [
                build(config, tok, tmp_path, process_index=p, process_count=process_count, **kwargs)
                for p in range(process_count)
            ]
            steps = 6 if split == "train" else lm.num_eval_batches(whole)
            assert split == "train" or all(len(p) == steps for p in parts)
            for s in range(steps):
                for k, v in whole[s].items():
                    assert v.shape == (8, 32)
                    np.testing.assert_array_equal(np.concatenate([p[s][k] for p in parts]), v)


def reference_epoch(sizes, weights, seed, epoch):
    """The documented epoch rule, one draw at a time."""
    total = sum(sizes)
    if weights is None:
        sizes, counts = [total], [total]
    else:
        counts = [math.floor(w / sum(weights) * total + 0.5) for w in weights]
    ids = []
    for i, (n, c) in enumerate(zip(sizes, counts)):
        for k in range(epoch * c, (epoch + 1) * c):
            q, j = divmod(k, n)  # pass q of source i, draw j
            perm = np.random.RandomState(lm.derive_seed(seed, 0, i, q)).permutation(n)
            ids.append(sum(sizes[:i]) + perm[j])
    shuffle = np.random.RandomState(lm.derive_seed(seed, 1, epoch)).permutation(len(ids))
    return [int(ids[k]) for k in shuffle]


@pytest.mark.parametrize("weights", [None, [1.0, 1.0], [0.2, 3.0, 1.0]])
def test_epoch_examples_follow_the_documented_rule(weights):
    sizes = [7, 3] if weights is None or len(weights) == 2 else [7, 3, 5]
    for epoch in range(4):
        got = sft.epoch_examples(sizes, weights, seed=11, epoch=epoch).tolist()
        assert got == reference_epoch(sizes, weights, 11, epoch)


def test_mixture_proportions_over_epochs(tok, tmp_path):
    rng = random.Random(6)
    path_a = write_convs(tmp_path / "a.jsonl", random_conversations(30, rng, "a", 4))
    path_b = write_convs(tmp_path / "b.jsonl", random_conversations(10, rng, "b", 4))
    # N = 40 examples, weights 1:1 -> 20 from each per epoch: B cycled twice, A subsampled.
    assert sft.mixture_counts([30, 10], [1.0, 1.0]) == [20, 20]
    assert sft.mixture_counts([30, 10], [3.0, 1.0]) == [30, 10]
    assert sft.mixture_counts([2, 1], [1.0, 1.0]) == [2, 2]  # 1.5 rounds half up
    seen = collections.Counter()
    for epoch in range(3):
        ids = sft.epoch_examples([30, 10], [1.0, 1.0], seed=0, epoch=epoch)
        assert len(ids) == 40 and (ids < 30).sum() == 20
        per_b = collections.Counter(ids[ids >= 30].tolist())
        assert sorted(per_b.values()) == [2] * 10  # B: two full passes per epoch
        seen.update(ids[ids < 30].tolist())
    assert sorted(seen.values()) == [2] * 30  # A: 60 draws over 3 epochs = two full passes
    # Packed rows of one epoch hold exactly 20 examples of each source.
    template = chat.ChatTemplate(tok)
    specs = sft.parse_sft_sources(f"jsonl:{path_a}; jsonl:{path_b}")
    examples = sft.concat_examples([sft.source_examples(s, template) for s in specs])
    rows = sft.PackedExamples(examples, 64, seed=0, sizes=[30, 10], weights=[1, 1])
    (a_id,), (b_id,) = tok.encode("a"), tok.encode("b")
    counts = collections.Counter()
    for index in range(len(rows.epoch_plan(0)[0]) - 1):
        row = rows[index]
        for k in range(1, row["segment_ids"].max() + 1):
            tokens = row["tokens"][row["segment_ids"] == k]
            assert (a_id in tokens) != (b_id in tokens)
            counts["a" if a_id in tokens else "b"] += 1
    assert counts == {"a": 20, "b": 20}
    # Through the pipeline over 40 batches (epoch boundaries fall anywhere): about half each.
    ds = build(data_config(sources=f"jsonl:{path_a}@1; jsonl:{path_b}@1", seq_len=48), tok)
    counts = collections.Counter()
    for s in range(40):
        for inputs, _ in segments(ds[s]):
            counts["b" if b_id in inputs else "a"] += 1
    assert 0.45 < counts["b"] / sum(counts.values()) < 0.55


def test_truncation_counts(tok, tmp_path, caplog):
    template = chat.ChatTemplate(tok)
    convs = [
        conversation("ab", "cd"),  # 10 tokens
        conversation("abcdefgh", "ijklmnop"),  # 22 tokens: too long for seq_len 15
        conversation("x" * 20, "y"),  # 27 tokens: nothing supervised in the first 16
        conversation("a", "b", "c", "d"),  # 14 tokens
    ]
    assert [num_tokens(c) for c in convs] == [10, 22, 27, 14]
    examples = sft.render_examples(convs, template)
    assert examples.lengths.tolist() == [10, 22, 27, 14]
    dropped = sft.truncate_examples(examples, 15, "drop")
    assert dropped.lengths.tolist() == [10, 14]
    assert (dropped.stats.dropped_long, dropped.stats.truncated) == (2, 0)
    kept = sft.truncate_examples(examples, 15, "keep_start")
    assert kept.lengths.tolist() == [10, 16, 14]
    s = kept.stats
    assert (s.truncated, s.dropped_unsupervised, s.dropped_long, s.examples) == (1, 1, 0, 3)
    np.testing.assert_array_equal(kept.tokens[10:26], examples.tokens[10:26])
    assert s.supervised_tokens == int(kept.target_mask.sum()) == 4 + 4 + 5
    path = write_convs(tmp_path / "d.jsonl", convs)
    with caplog.at_level(logging.INFO, logger="jaxllm.data.sft"):
        build(data_config(sources=f"jsonl:{path}", seq_len=15, truncation="drop"), tok)
    assert "2 dropped as too long" in caplog.text
    with pytest.raises(DataError, match="no SFT examples"):
        build(data_config(sources=f"jsonl:{path}", seq_len=8, truncation="drop"), tok)


def test_eval_is_finite_in_order_and_padded(tok, tmp_path):
    convs = random_conversations(20, random.Random(7))
    path = write_convs(tmp_path / "v.jsonl", convs)
    template = chat.ChatTemplate(tok)
    lengths = [len(template.render(c)[0]) for c in convs]
    row_starts, members = packing.pack_first_fit(lengths, 65)
    num_rows = len(row_starts) - 1
    ds = build(data_config(eval_sources=f"jsonl:{path}", seq_len=64), tok, split="eval", batch=4)
    assert lm.num_eval_batches(ds) == len(ds) == -(-num_rows // 4)
    assert num_rows % 4 != 0  # the case needs padding rows
    got = [seg for s in range(len(ds)) for seg in segments(ds[s])]
    assert len(got) == len(convs)
    for (inputs, loss_mask), j in zip(got, members.tolist()):  # first-fit in file order
        check_segment(inputs, loss_mask, *template.render(convs[j]))
    last = ds[len(ds) - 1]
    pad_rows = 4 * len(ds) - num_rows
    assert not last["segment_ids"][-pad_rows:].any() and not last["loss_mask"][-pad_rows:].any()


def test_cache_is_reused_and_invalidated(tok, tmp_path, monkeypatch):
    path = write_convs(tmp_path / "d.jsonl", random_conversations(5, random.Random(8)))
    config = data_config(sources=f"jsonl:{path}", seq_len=40)
    first = build(config, tok, tmp_path)[0]
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("read the source despite the cache")

    monkeypatch.setattr(chat, "read_records", fail)
    again = build(config, tok, tmp_path)[0]
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    monkeypatch.undo()
    write_jsonl(path, [{"messages": conversation("new", "data!")}])  # size changes: new entry
    build(config, tok, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---------------------------------------------------------------------------------------------
# Shared data
# ---------------------------------------------------------------------------------------------


def test_shared_sft_sets_load_without_errors(shared_data, tmp_path):
    specs = {name: f"jsonl:{{data_root}}/sft/{name}/*.jsonl" for name in SFT_SETS}
    conversations, stats = {}, {}
    for name, spec in specs.items():
        stats[name] = sft.SFTStats()
        conversations[name] = sft.load_conversations(spec, str(shared_data), stats[name])
    expected = {  # train + test records, multi-turn, from shared/data/README.md
        "lima": (1029, 29),
        "oasst_en100": (96, 46),
        "alpaca_en_demo": (999, 0),
        "self_instruct_seed": (175, 0),
        "fastchat_dummy_conversation": (500, 333),
    }
    for name, (records, multi) in expected.items():
        assert (stats[name].records, stats[name].multi_turn) == (records, multi), name
        assert stats[name].formats == {"messages": records} and stats[name].files == 2
    texts = [m["content"] for name in SFT_SETS for c in conversations[name][::8] for m in c]
    config = tokenizer.default_config()
    config.update(model_type="bpe", vocab_size=512, num_sentinels=0, input_sentence_size=20000)
    tok = tokenizer.train_tokenizer(config, texts, tmp_path / "bpe.model")
    data = data_config(
        sources="; ".join(f"{spec}@1" for spec in specs.values()),
        eval_sources=specs["oasst_en100"],
        seq_len=1024,
        truncation="drop",
    )
    template = chat.ChatTemplate(tok)
    report = {}
    for name, spec in specs.items():
        (source,) = sft.parse_sft_sources(spec, str(shared_data))
        examples = sft.truncate_examples(sft.source_examples(source, template), 1024, "drop")
        s = examples.stats
        report[name] = (s.records, s.examples, s.tokens, s.supervised_tokens, s.dropped_long)
        assert s.examples + s.dropped_long == s.records and s.examples > 0
    print("\nname: records, examples, tokens, supervised, dropped (bpe 512, seq_len 1024)")
    for name, row in report.items():
        print(f"{name}: {row}")
    ds = sft.sft_dataset(
        data, tok, split="train", global_batch_size=8, seed=0, data_root=str(shared_data)
    )
    batch = ds[0]
    assert batch["inputs"].shape == (8, 1024) and batch["loss_mask"].sum() > 0
