"""Tests of jaxllm.data.preference: formats, HH split, OASST rankings, batches, skips, order."""

import collections
import json
import logging
import pickle
import random

import grain
import numpy as np
import pytest

from jaxllm.data import chat, lm, preference, preference_records, sft, tokenizer
from jaxllm.data.sources import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>/\n0123456789"
PREFERENCE_SETS = ("hh_rlhf_harmless_base", "oasst_en100_rankings", "gsm8k_model_solutions",
                   "llamafactory_dpo_en_demo")  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A char model: one token per character, so lengths are known by hand."""
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "char.model"
    return tokenizer.train_tokenizer(config, [ALPHABET], path)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def pair(prompt, chosen, rejected, **extra):
    return {"prompt": [user(prompt)], "chosen": [bot(chosen)], "rejected": [bot(rejected)], **extra}


def hh_render(messages):
    """An HH transcript of messages (the inverse of the bundle's split)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def data_config(**overrides):
    config = preference.default_config()
    config.update(overrides)
    return config


def build(config, tok, split="train", batch=4, seed=0, cache=None, **kwargs):
    return preference.preference_dataset(config, tok, split=split, global_batch_size=batch,
                                         seed=seed, cache_dir=cache or "", **kwargs)  # fmt: skip


def random_pairs(n, rng, letter="x"):
    """`n` distinct pairs (char model: at most 2 + 8 + 2 + 8 + 1 + 8 = 29 tokens each)."""
    return [pair(f"{letter}{i}{letter * rng.randint(0, 5)}", f"c{i}{'c' * rng.randint(0, 5)}",
                 f"r{i}{'r' * rng.randint(0, 5)}") for i in range(n)]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def test_every_format_gives_the_same_normalized_group(tmp_path):
    prompt = [{"role": "system", "content": "Be kind."}, user("Hi"), bot("Hello"), user("Joke?")]
    expected = {"prompt": prompt, "responses": [[bot("No.")], [bot("Knock knock.")]],
                "ranks": [0, 1], "margin": None}  # fmt: skip
    no_system = {**expected, "prompt": prompt[1:]}
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: "
    records = [
        {"prompt": prompt, "chosen": [bot("No.")], "rejected": [bot("Knock knock.")], "id": 1},
        {"prompt": prompt, "responses": ["Knock knock.", [bot("No.")]], "ranks": [7, 3]},
        {"chosen": transcript + "No.", "rejected": transcript + "Knock knock."},
        {"chosen_text": transcript + "No.", "rejected_text": transcript + "Knock knock."},
    ]
    stats = preference_records.PreferenceStats()
    groups = preference_records.load_groups(f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', records)}",
                                    stats=stats)  # fmt: skip
    assert groups == [expected, {**expected, "ranks": [3, 7]}, no_system, no_system]
    assert stats.formats == {"pairs": 1, "ranking": 1, "hh": 2}
    assert (stats.records, stats.groups, stats.responses) == (4, 4, 8)
    # Multi-message responses continue the conversation; a margin is kept.
    record = {"prompt": [user("Q")], "chosen": [bot("A"), user("More"), bot("B")],
              "rejected": [bot("C")], "margin": 2}  # fmt: skip
    (group,) = preference_records.load_groups(f"jsonl:{write_jsonl(tmp_path / 'b.jsonl', [record])}")
    assert group == {"prompt": [user("Q")], "responses": [record["chosen"], [bot("C")]],
                     "ranks": [0, 1], "margin": 2.0}  # fmt: skip


def test_hh_split_by_hand():
    text = "\n\nHuman: a\n\nAssistant:  b  Human: c\n\nAssistant: d\n\nHuman:e"
    messages = preference_records.hh_split(text)
    assert messages == [user("a"), bot(" b  Human: c"), bot("d"), user("e")]
    chosen = "\n\nHuman: q\n\nAssistant: x\n\nHuman: r\n\nAssistant: y"
    rejected = "\n\nHuman: q\n\nAssistant: x\n\nHuman: r\n\nAssistant: z\n\nHuman: s"
    assert preference_records.hh_pair(chosen, rejected) == (
        [user("q"), bot("x"), user("r")], [bot("y")], [bot("z"), user("s")]
    )
    # The shared prefix ends on an assistant turn: cut back to the user turn before it.
    short = "\n\nHuman: q\n\nAssistant: x"
    assert preference_records.hh_pair(short, short + "2") == ([user("q")], [bot("x")], [bot("x2")])
    assert hh_render(preference_records.hh_split(chosen)) == chosen
    with pytest.raises(DataError, match="f.jsonl:3: HH transcript starts with 'Human: q'"):
        preference_records.hh_split("Human: q", "f.jsonl:3")


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "hi", "chosen": [bot("a")], "rejected": [bot("b")]}, "prompt must be a list"),
        ({"prompt": [user("q")], "chosen": [user("a")], "rejected": [bot("b")]}, "response 0"),
        ({"prompt": [user("q"), bot("a")], "chosen": [bot("a")], "rejected": [bot("b")]},
         "ends on a assistant turn"),
        ({"prompt": [user("q")], "responses": ["a", "b"], "ranks": [0]}, "'ranks' must be"),
        ({"prompt": [user("q")], "responses": ["a", "b"], "ranks": [0, True]}, "'ranks' must be"),
        ({"prompt": [user("q")], "responses": [], "ranks": []}, "non-empty list"),
        ({"chosen": "no transcript", "rejected": "x"}, "HH transcript starts with"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "with a 'prompt'"),
        ({"chosen_text": "\n\nHuman: q\n\nAssistant: a"}, "rejected_text"),
        ({"question": "q"}, "none of 'responses', 'chosen', 'chosen_text'"),
        ({**pair("q", "a", "b"), "margin": "big"}, "'margin' must be a finite number"),
        ({**pair("q", "a", "b"), "margin": float("nan")}, "'margin' must be a finite number"),
    ],
)  # fmt: skip
def test_record_errors_name_file_and_line(tmp_path, record, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair("q", "a", "b"), record])
    with pytest.raises(DataError, match=match) as info:
        preference_records.load_groups(f"jsonl:{path}")
    assert f"{path}:2" in str(info.value)


def test_source_spec_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [pair("q", "a", "b")])
    with pytest.raises(DataError, match="only '#' option is '#rankings'"):
        preference_records.load_groups(f"jsonl:{path}#chosen")
    with pytest.raises(DataError, match="expected jsonl:GLOB"):
        preference_records.load_groups(f"text:{path}")
    with pytest.raises(DataError, match="matches no files"):
        preference_records.load_groups(f"jsonl:{tmp_path}/none*.jsonl")
    with pytest.raises(DataError, match=f"{path}:1: #rankings needs 'meta'"):
        preference_records.load_groups(f"jsonl:{path}#rankings")


def test_counted_skips_and_flagged_records(tmp_path):
    records = [
        pair("q", "same", "same"),  # identical
        {"prompt": [], "chosen": [bot("a")], "rejected": [bot("b")]},  # empty prompt
        pair("  \n ", "a", "b"),  # blank user content
        {"prompt": [user("q")], "responses": ["a", "b", "c"], "ranks": [2, 2, 2]},  # all tied
        {"prompt": [user("q")], "responses": ["a"], "ranks": [0]},  # one response
        {"prompt": [user("q")], "responses": ["a", "a", "a"], "ranks": [0, 1, 2]},  # identical
        {"prompt": [user("q")], "responses": ["a", "b", "a"], "ranks": [0, 0, 1]},  # kept
        {"chosen": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: y\n\nHuman: r\n\nAssistant: c",
         "rejected": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: y\n\nHuman: r\n\nAssistant: d",
         "flags": ["repeated_role_in_prompt"]},  # kept, turns merged
    ]  # fmt: skip
    stats = preference_records.PreferenceStats()
    groups = preference_records.load_groups(f"jsonl:{write_jsonl(tmp_path / 's.jsonl', records)}",
                                    stats=stats)  # fmt: skip
    assert (stats.skipped_identical, stats.skipped_empty_prompt) == (2, 2)
    assert (stats.skipped_no_ordered_pair, stats.groups) == (2, 2)
    assert (stats.flagged, stats.merged_turns, stats.records) == (1, 1, 8)
    assert groups[0]["ranks"] == [0, 0, 1] and len(groups[0]["responses"]) == 3
    assert groups[1]["prompt"] == [user("q"), bot("x\n\ny"), user("r")]


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_batch_fields_by_hand(tok, tmp_path):
    records = [
        pair("ab", "cde", "f", margin=1.5),
        {"prompt": [user("g")], "responses": [[bot("x"), user("y"), bot("z")], "w"],
         "ranks": [4, 1]},  # fmt: skip
    ]
    path = write_jsonl(tmp_path / "h.jsonl", records)
    L = 14  # the longest sequence has 13 tokens
    config = data_config(eval_sources=f"jsonl:{path}", seq_len=L, max_responses=3)
    batch = build(config, tok, split="eval", batch=2)[0]
    c = {ch: tok.encode(ch)[0] for ch in "abcdefgwxyz"}
    bos, end = tok.bos_id, tok.role_id("end_of_turn")
    u, a = tok.role_id("user"), tok.role_id("assistant")
    prompt0 = [bos, u, c["a"], c["b"], end, a]
    prompt1 = [bos, u, c["g"], end, a]
    sequences = [  # (tokens, indices of scored tokens)
        [(prompt0 + [c["c"], c["d"], c["e"], end], {6, 7, 8, 9}),
         (prompt0 + [c["f"], end], {6, 7})],
        [(prompt1 + [c["w"], end], {5, 6}),  # rank 1 first
         (prompt1 + [c["x"], end, u, c["y"], end, a, c["z"], end], {5, 6, 11, 12})],
    ]  # fmt: skip
    for b, group in enumerate(sequences):
        for k in range(3):
            tokens, scored = group[k] if k < len(group) else ([], set())
            n = len(tokens)
            assert batch["inputs"][b, k].tolist() == tokens + [0] * (L - n)
            assert batch["targets"][b, k].tolist() == tokens[1:] + [0] * (L + 1 - n if n else L)
            assert batch["positions"][b, k].tolist() == list(range(n)) + [0] * (L - n)
            assert batch["segment_ids"][b, k].tolist() == [1] * n + [0] * (L - n)
            assert batch["loss_mask"][b, k].tolist() == [float(t + 1 in scored) for t in range(L)]
            assert batch["lengths"][b, k] == n
    assert batch["ranks"].tolist() == [[0, 1, 0], [1, 4, 0]]
    assert batch["response_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["has_margin"].tolist() == [1, 0]
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    # The reward is read at lengths - 1: every sequence's last input is <|end|>.
    last = np.take_along_axis(batch["inputs"], np.maximum(batch["lengths"] - 1, 0)[..., None], -1)
    assert (last[..., 0][batch["response_mask"] > 0] == end).all()


def test_truncation_by_hand(tok, tmp_path, caplog):
    template = chat.ChatTemplate(tok)
    records = [
        pair("abcdefgh", "xy", "zzzzz"),  # prompt 12 tokens; responses 3 and 6 tokens
        {"prompt": [user("q")], "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},  # K = 3
        pair("q", "a", "b"),  # 7 tokens
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    (spec,) = preference_records.parse_preference_sources(f"jsonl:{path}")
    groups = preference.source_groups(spec, template)
    prompt = template.prompt([user("abcdefgh")])
    assert len(prompt) == 12 and np.diff(groups.response_starts).tolist()[:2] == [3, 6]
    for seq_len, truncation, ids, cuts, counts in [
        (18, "drop", [0, 2], [0, 0], (0, 0, 0, 1)),
        (17, "drop", [2], [0], (0, 1, 0, 1)),
        (14, "keep_end", [0, 2], [4, 0], (1, 0, 0, 1)),
        (8, "keep_end", [0, 2], [10, 0], (1, 0, 0, 1)),  # only bos and <|assistant|> are left
        (7, "keep_end", [2], [0], (0, 0, 1, 1)),
    ]:
        got_ids, got_cuts, s = preference.fit_groups(groups, seq_len, truncation, 2)
        assert (got_ids.tolist(), got_cuts.tolist()) == (ids, cuts), (seq_len, truncation)
        got = (s.truncated, s.dropped_long, s.dropped_response_too_long,
               s.dropped_too_many_responses)  # fmt: skip
        assert got == counts and s.examples == len(ids)
    config = data_config(eval_sources=f"jsonl:{path}", seq_len=14)
    with caplog.at_level(logging.INFO, logger="jaxllm.data.preference"):
        batch = build(config, tok, split="eval", batch=2)[0]
    assert "truncated=1" in caplog.text and "dropped_too_many_responses=1" in caplog.text
    kept = [prompt[0]] + prompt[5:].tolist()  # bos + the prompt's last 7 tokens
    rejected = kept + tok.encode("zzzzz") + [tok.role_id("end_of_turn")]
    assert batch["inputs"][0, 1].tolist() == rejected and batch["lengths"][0].tolist() == [11, 14]
    assert batch["inputs"][0, 0, :8].tolist() == kept  # one cut shared by the group
    assert batch["loss_mask"][0, 1].tolist() == [0.0] * 7 + [1.0] * 6 + [0.0]
    with pytest.raises(DataError, match="no preference groups"):
        build(data_config(eval_sources=f"jsonl:{path}", seq_len=3), tok, split="eval")


# ---------------------------------------------------------------------------------------------
# Order, resume, processes
# ---------------------------------------------------------------------------------------------


def test_epochs_determinism_and_random_access(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", random_pairs(30, random.Random(1)))
    config = data_config(sources=f"jsonl:{path}", seq_len=32)
    a, b, c = build(config, tok, seed=0), build(config, tok, seed=0), build(config, tok, seed=1)
    for s in (0, 5, 11, 20):  # crossing epochs (30 groups = 7.5 batches of 4)
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k])
    assert any(not np.array_equal(a[s]["inputs"], c[s]["inputs"]) for s in range(8))
    template = chat.ChatTemplate(tok)
    (spec,) = preference_records.parse_preference_sources(f"jsonl:{path}")
    groups = preference.source_groups(spec, template)
    ds = preference.PreferenceGroups([groups], [preference.fit_groups(groups, 32, "keep_end", 2)],
                                     32, 2, seed=0)  # fmt: skip
    seen = [ds[i]["inputs"].tobytes() for i in range(30)]
    assert len(set(seen)) == 30  # every group once per epoch
    assert sorted(ds.epoch(1).tolist()) == list(range(30))
    flat = [a[s]["inputs"][j].tobytes() for s in range(8) for j in range(4)]
    assert flat[:30] == seen  # the batched pipeline is the same stream
    assert all(np.array_equal(ds[30 + i]["inputs"], ds.row(int(ds.epoch(1)[i]))["inputs"])
               for i in range(30))  # fmt: skip
    clone = pickle.loads(pickle.dumps(ds))  # as sent to grain's worker processes
    for k in ds[41]:
        np.testing.assert_array_equal(clone[41][k], ds[41][k])


def test_visited_groups_and_in_order_views(tok, tmp_path):
    rng = random.Random(6)
    path_a = write_jsonl(tmp_path / "a.jsonl", random_pairs(12, rng, "a"))
    path_b = write_jsonl(tmp_path / "b.jsonl", random_pairs(5, rng, "b"))
    for spec in (f"jsonl:{path_a}", f"jsonl:{path_a}@1; jsonl:{path_b}@2"):
        config = data_config(sources=spec, seq_len=32)
        ds = preference.preference_groups(config, tok, split="train", seed=3)
        assert ds.num_groups == (12 if "@" not in spec else 17)
        for n in (0, 1, 7, ds.epoch_length, 2 * ds.epoch_length + 3):
            want = sorted({int(ds[i]["group_index"]) for i in range(n)})
            assert ds.visited(n).tolist() == want, (spec, n)
        every, only = ds.view(), np.asarray([5, 0, 9])
        assert len(every) == ds.num_groups
        assert [int(every[k]["group_index"]) for k in range(len(every))] == list(range(ds.num_groups))
        view = ds.view(only)
        assert len(view) == 3
        for i, k in enumerate(only):
            for key, value in every[int(k)].items():
                np.testing.assert_array_equal(view[i][key], value)
        batched = preference.batch_groups(view, global_batch_size=2)
        assert len(batched) == 2 and batched[1]["group_index"].tolist() == [9, 0]  # padded to 2 x 2
        assert batched[1]["response_mask"].tolist() == [[1, 1], [0, 0]]
        # The in-order view of the train groups is the eval split of the same sources.
        ordered = config.copy_and_resolve_references()
        ordered.eval_sources = config.sources
        as_eval = preference.preference_groups(ordered, tok, split="eval", seed=0)
        for k in (0, 4, ds.num_groups - 1):
            for key, value in as_eval[k].items():
                np.testing.assert_array_equal(every[k][key], value)


def test_iterator_state_resumes_exactly(tok, tmp_path):
    rng = random.Random(2)
    path_a = write_jsonl(tmp_path / "a.jsonl", random_pairs(20, rng))
    path_b = write_jsonl(tmp_path / "b.jsonl", random_pairs(7, rng, "b"))
    for spec in (f"jsonl:{path_a}", f"jsonl:{path_a}@1; jsonl:{path_b}@2"):
        config = data_config(sources=spec, seq_len=32)
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        it = iter(build(config, tok, seed=7).to_iter_dataset(options))
        for _ in range(9):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        expected = [next(it) for _ in range(6)]
        fresh = iter(build(config, tok, seed=7).to_iter_dataset(options))
        fresh.set_state(state)
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(tok, tmp_path, process_count):
    rng = random.Random(3)
    path_a = write_jsonl(tmp_path / "a.jsonl", random_pairs(30, rng))
    path_b = write_jsonl(tmp_path / "b.jsonl", random_pairs(9, rng, "b"))
    for spec in (f"jsonl:{path_a}", f"jsonl:{path_a}@2; jsonl:{path_b}@1"):
        config = data_config(sources=spec, eval_sources=f"jsonl:{path_a}", seq_len=32)
        for split in ("train", "eval"):
            whole = build(config, tok, split=split, batch=8, seed=3)
            parts = [build(config, tok, split=split, batch=8, seed=3, process_index=p,
                           process_count=process_count) for p in range(process_count)]  # fmt: skip
            steps = 6 if split == "train" else lm.num_eval_batches(whole)
            for s in range(steps):
                for k, v in whole[s].items():
                    assert v.shape[0] == 8
                    np.testing.assert_array_equal(np.concatenate([p[s][k] for p in parts]), v)


def test_mixture_counts_per_epoch(tok, tmp_path):
    rng = random.Random(4)
    path_a = write_jsonl(tmp_path / "a.jsonl", random_pairs(20, rng, "a"))
    path_b = write_jsonl(tmp_path / "b.jsonl", random_pairs(5, rng, "b"))
    config = data_config(sources=f"jsonl:{path_a}@1; jsonl:{path_b}@1", seq_len=32)
    ds = build(config, tok, batch=1)
    assert sft.mixture_counts([20, 5], [1, 1]) == [13, 13]
    b_id = tok.encode("b")[0]
    from_b = [b_id in ds[i]["inputs"][0, 0, :4] for i in range(26)]  # bos, <|user|>, letter
    assert sum(from_b) == 13  # B cycled 2.6 times, A subsampled, within one epoch


def test_eval_is_finite_in_order_and_padded(tok, tmp_path):
    records = random_pairs(10, random.Random(5))
    path = write_jsonl(tmp_path / "v.jsonl", records)
    ds = build(data_config(eval_sources=f"jsonl:{path}", seq_len=32), tok, split="eval", batch=4)
    assert lm.num_eval_batches(ds) == len(ds) == 3
    template = chat.ChatTemplate(tok)
    for i, r in enumerate(records):
        batch = ds[i // 4]
        n = int(batch["lengths"][i % 4, 0])
        want = template.render(r["prompt"] + r["chosen"])[0][:-1]  # without eos
        assert batch["inputs"][i % 4, 0, :n].tolist() == want.tolist()
    assert ds[2]["response_mask"].tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
    assert not ds[2]["segment_ids"][2:].any() and not ds[2]["loss_mask"][2:].any()


def test_cache_is_reused_and_invalidated(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", random_pairs(5, random.Random(6)))
    config = data_config(sources=f"jsonl:{path}", seq_len=32)
    cache = str(tmp_path / "cache")
    first = build(config, tok, cache=cache)[0]
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("read the source despite the cache")

    monkeypatch.setattr(chat, "read_records", fail)
    again = build(config, tok, cache=cache)[0]
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    monkeypatch.undo()
    write_jsonl(path, [pair("new", "data", "here!")])  # size changes: a new entry
    build(config, tok, cache=cache)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---------------------------------------------------------------------------------------------
# Shared data
# ---------------------------------------------------------------------------------------------


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shared_hh_split_reproduces_the_bundle(shared_data, tmp_path):
    base = shared_data / "preference" / "hh_rlhf_harmless_base"
    for split in ("train", "test"):
        records = read(base / f"{split}.jsonl")
        for r in records:
            for key in ("chosen_text", "rejected_text"):
                assert hh_render(preference_records.hh_split(r[key])) == r[key], r["id"]
            got = preference_records.hh_pair(r["chosen_text"], r["rejected_text"])
            assert got == (r["prompt"], r["chosen"], r["rejected"]), r["id"]
        # The raw transcripts alone load to the same groups as the messages.
        raw = [{"chosen": r["chosen_text"], "rejected": r["rejected_text"]} for r in records]
        raw_path = write_jsonl(tmp_path / f"{split}.jsonl", raw)
        assert preference_records.load_groups(f"jsonl:{raw_path}") == preference_records.load_groups(
            f"jsonl:{base}/{split}.jsonl"
        )
    assert sum("flags" in r for s in ("train", "test") for r in read(base / f"{s}.jsonl")) == 4


def test_shared_oasst_rankings_rebuild(shared_data):
    base = shared_data / "preference" / "oasst_en100_rankings"
    sizes = {  # replies per prompt, counted from the files' meta (tree id + prompt)
        "train": {2: 45, 3: 106, 4: 22, 5: 3, 6: 6, 8: 1, 9: 1},
        "test": {2: 11, 3: 10, 4: 2},
    }
    for split, expected in sizes.items():
        records = read(base / f"{split}.jsonl")
        rankings = preference_records.build_rankings(records)
        assert collections.Counter(len(r["ranks"]) for r in rankings) == expected
        # Each group of k replies yields k(k-1)/2 pairs, and every pair is in some group.
        assert sum(k * (k - 1) // 2 * n for k, n in expected.items()) == len(records)
        by_id = {}
        for g in rankings:
            for mid, rank, messages in zip(g["meta"]["message_ids"], g["ranks"], g["responses"]):
                by_id[mid] = (id(g), rank, messages)
        for r in records:
            m = r["meta"]
            (g1, better, chosen), (g2, worse, rejected) = (
                by_id[m["chosen_message_id"]], by_id[m["rejected_message_id"]]
            )
            assert g1 == g2 and better == m["rank_chosen"] < worse == m["rank_rejected"]
            assert (chosen, rejected) == (r["chosen"], r["rejected"])
        groups = preference_records.load_groups(f"jsonl:{base}/{split}.jsonl#rankings")
        assert [g["ranks"] for g in groups] == [r["ranks"] for r in rankings]
        assert all(g["ranks"] == sorted(g["ranks"]) for g in groups)


def test_shared_preference_sets_load_without_errors(shared_data, tmp_path):
    specs = {name: f"jsonl:{{data_root}}/preference/{name}/{{split}}.jsonl"
             for name in PREFERENCE_SETS}  # fmt: skip
    specs["oasst_en100_rankings#rankings"] = specs["oasst_en100_rankings"] + "#rankings"
    texts = []
    for name in PREFERENCE_SETS:
        for r in read(shared_data / "preference" / name / "train.jsonl")[::10]:
            texts += [m["content"] for m in r["prompt"] + r["chosen"] + r["rejected"]]
    config = tokenizer.default_config()
    config.update(model_type="bpe", vocab_size=512, num_sentinels=0, input_sentence_size=20000)
    tok = tokenizer.train_tokenizer(config, texts, tmp_path / "bpe.model")
    template = chat.ChatTemplate(tok)
    report = {}
    for name, spec in specs.items():
        for split in ("train", "test"):
            (source,) = preference_records.parse_preference_sources(spec.format(data_root=shared_data,
                                                                        split=split))
            groups = preference.source_groups(source, template)
            K = 9 if name.endswith("#rankings") else 2
            ids, cuts, s = preference.fit_groups(groups, 512, "keep_end", K)
            assert s.groups == groups.num_groups > 0 and s.examples == len(ids) > 0
            skipped = s.skipped_empty_prompt + s.skipped_identical + s.skipped_no_ordered_pair
            assert s.records == s.groups + skipped or name.endswith("#rankings")
            dropped = s.dropped_long + s.dropped_response_too_long + s.dropped_too_many_responses
            assert s.examples + dropped == s.groups
            report[f"{name} {split}"] = (
                s.records, s.groups, s.responses, s.skipped_empty_prompt, s.skipped_identical,
                s.skipped_no_ordered_pair, s.flagged, s.merged_turns, s.truncated,
                s.dropped_response_too_long, s.examples,
            )  # fmt: skip
    print("\nset split: records, groups, responses, skipped (empty prompt, identical, no "
          "ordered pair), flagged, merged, truncated, dropped (response too long), examples "
          "(bpe 512, seq_len 512, keep_end)")  # fmt: skip
    for name, row in report.items():
        print(f"{name}: {row}")
    mixture = "; ".join(f"{spec.replace('{split}', 'train')}@1" for spec in specs.values())
    data = data_config(sources=mixture, max_responses=9)
    ds = build(data, tok, batch=8, data_root=str(shared_data))
    batch = ds[0]
    assert batch["inputs"].shape == (8, 9, 512) and batch["ranks"].shape == (8, 9)
    assert (batch["response_mask"].sum(1) >= 2).all() and batch["loss_mask"].sum() > 0
