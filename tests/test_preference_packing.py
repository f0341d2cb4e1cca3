"""Packed preference rows (`data.groups_per_row > 1`, `jaxllm.data.preference` point 7).

- Every packed segment holds exactly the tokens, targets, positions, loss mask, ranks and margin
  of the same group's unpacked row; every group appears once; no row holds more than S groups or
  more than L tokens in a slot; packing needs fewer rows than groups.
- The packed train stream: each group once per epoch, a pure function of the index, picklable,
  the groups its first rows read (`visited_groups`), and the iterator state resumes exactly.
- `flat_groups` / `segments_to_groups` against a hand-written case; a bad `groups_per_row` fails
  naming the key.
"""

import json
import pickle
import random

import grain
import numpy as np
import pytest

from jaxllm.data import preference
from jaxllm.data.sources import DataError
from test_preference_data import bot, build, data_config, pair, tok, user, write_jsonl  # noqa: F401  (tok: fixture)


def mixed_groups(rng, n):
    """Pairs and 3-response ranking groups of varied lengths (char tokenizer)."""
    out = []
    for i in range(n):
        prompt = f"p{i}" + "q" * rng.randint(0, 12)
        if i % 3 == 2:
            out.append({"prompt": [user(prompt)], "responses": [[bot("a" * rng.randint(1, 9))] for _ in range(3)],
                        "ranks": [rng.randint(0, 2) for _ in range(3)]})
        else:
            out.append(pair(prompt, "c" * rng.randint(1, 15), "r" * rng.randint(1, 15),
                            **({"margin": float(i)} if i % 4 == 0 else {})))
    return out


@pytest.fixture()
def groups(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", mixed_groups(random.Random(0), 40))
    config = data_config(sources=f"jsonl:{path}", eval_sources=f"jsonl:{path}", seq_len=64, max_responses=3)
    return config, preference.preference_groups(config, tok, split="eval", seed=0)


def check_row_against_unpacked(row, groups, S):
    """Asserts every segment of a packed row equals its group's unpacked row; returns the groups."""
    L = groups.seq_len
    seen = []
    for j in range(S):
        if not row["response_mask"][j].any():
            assert not (row["segment_ids"] == j + 1).any()
            continue
        k = int(row["group_index"][j])
        seen.append(k)
        want = groups.row(k)
        for slot in range(groups.max_responses):
            where = np.flatnonzero(row["segment_ids"][slot] == j + 1)
            n = int(want["lengths"][slot])
            assert len(where) == n == row["lengths"][j, slot]
            if not n:
                continue
            assert (np.diff(where) == 1).all() and where[-1] < L  # contiguous, inside the row
            for key in ("inputs", "positions"):
                np.testing.assert_array_equal(row[key][slot, where], want[key][slot, :n])
            # Targets and their mask stay inside the segment: its last token predicts nothing.
            np.testing.assert_array_equal(row["targets"][slot, where[:-1]], want["targets"][slot, : n - 1])
            np.testing.assert_array_equal(row["loss_mask"][slot, where], want["loss_mask"][slot, :n])
            assert row["targets"][slot, where[-1]] == 0 and row["loss_mask"][slot, where[-1]] == 0
        for key in ("ranks", "response_mask"):
            np.testing.assert_array_equal(row[key][j], want[key])
        for key in ("margin", "has_margin", "group_index"):
            assert row[key][j] == want[key]
    assert set(np.unique(row["segment_ids"])) <= set(range(S + 1))
    return seen


def test_packed_rows_hold_the_unpacked_groups(groups):
    _, view = groups
    S = 4
    packed = preference.PackedPreferenceGroups(view, S)
    seen = []
    for r in range(len(packed)):
        row = packed[r]
        assert row["inputs"].shape == (3, 64) and row["ranks"].shape == (S, 3) and row["margin"].shape == (S,)
        seen += check_row_against_unpacked(row, view, S)
    assert sorted(seen) == list(range(view.num_groups))  # every group once
    assert len(packed) < view.num_groups / 2  # short groups: more than two per row on average
    margins = [float(view.row(k)["margin"]) for k in range(view.num_groups)]
    assert any(margins) and any(view.row(k)["response_mask"].sum() == 3 for k in range(view.num_groups))


def test_packed_train_stream_epochs_random_access_and_resume(groups, tok):
    config, view = groups
    train = preference.preference_groups(config, tok, split="train", seed=3)
    S = 3
    packed = preference.PackedPreferenceGroups(train, S)
    row_starts, ids = packed.epoch_plan(0)
    assert sorted(ids.tolist()) == list(range(train.num_groups))  # each group once per epoch
    assert ids.tolist() != sorted(ids.tolist())  # in the shuffled epoch order
    rows0 = len(row_starts) - 1
    for index in (0, rows0 - 1, rows0, rows0 + 5):  # the last row of epoch 0, rows of epoch 1
        epoch, r = packed.locate(index)
        assert (epoch, r) == ((0, index) if index < rows0 else (1, index - rows0))
        seen = check_row_against_unpacked(packed[index], view, S)
        starts, plan = packed.epoch_plan(epoch)
        assert seen == plan[starts[r] : starts[r + 1]].tolist()
    # The groups the first rows read (DPO's reference set), across the epoch boundary.
    read = {int(row["group_index"][j]) for row in (packed[i] for i in range(rows0 + 3))
            for j in range(S) if row["response_mask"][j].any()}  # fmt: skip
    assert preference.visited_groups(train, rows0 + 3, S).tolist() == sorted(read)
    assert preference.visited_groups(train, 2, S).tolist() == sorted(ids[: row_starts[2]].tolist())
    clone = pickle.loads(pickle.dumps(packed))  # as sent to grain's worker processes
    for key, value in packed[rows0 + 2].items():
        np.testing.assert_array_equal(clone[rows0 + 2][key], value)

    config.groups_per_row = S
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    it = iter(build(config, tok, seed=3, batch=2).to_iter_dataset(options))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    fresh = iter(build(config, tok, seed=3, batch=2).to_iter_dataset(options))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_packed_batches_and_flat_groups(groups, tok):
    config, view = groups
    config.groups_per_row = 4
    batches = build(config, tok, split="eval", batch=2)
    batch = batches[0]
    assert batch["inputs"].shape == (2, 3, 64) and batch["response_mask"].shape == (2, 4, 3)
    flat = preference.flat_groups(batch)
    assert flat["response_mask"].shape == (8, 3) and flat["margin"].shape == (8,)
    np.testing.assert_array_equal(flat["ranks"][5], batch["ranks"][1, 1])
    assert flat["group_index"][6] == batch["group_index"][1, 2]
    total = sum(int(preference.flat_groups(batches[s])["response_mask"].any(axis=1).sum())
                for s in range(len(batches)))
    assert total == view.num_groups  # the zero-padded last batch adds no group
    # Unpacked batches pass through unchanged.
    config.groups_per_row = 1
    plain = build(config, tok, split="eval", batch=2)[0]
    assert preference.flat_groups(plain)["ranks"] is plain["ranks"]


def test_segments_to_groups_by_hand():
    # b = 2 rows, K = 2 slots, S = 3 segments: value 100*b + 10*k + s.
    per_segment = np.array([[100 * b + 10 * k + s for s in range(3)] for b in range(2) for k in range(2)])
    got = preference.segments_to_groups(per_segment, 2, 2)
    assert got.tolist() == [[0, 10], [1, 11], [2, 12], [100, 110], [101, 111], [102, 112]]


def test_bad_groups_per_row_names_the_key(groups, tok):
    config, view = groups
    config.groups_per_row = 0
    with pytest.raises(DataError, match="data.groups_per_row=0"):
        build(config, tok, split="eval", batch=2)
    with pytest.raises(DataError, match="groups_per_row=0"):
        preference.PackedPreferenceGroups(view, 0)
