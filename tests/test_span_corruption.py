"""T5 span corruption and UL2 denoisers against T5's published cases, statistics and reconstruction."""

import collections
import itertools

import grain
import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.data import lm, packing, span_corruption as sc, tokenizer
from jaxllm.data.sources import DataError

VOCAB = 1000


class FakeTokenizer:
    """Sentinels counted down from the end of a 1000-id vocabulary, eos = 1, as T5's layout."""

    path, eos_id = "<fake>", 1

    def __init__(self, num_sentinels=100):
        self.num_sentinels = num_sentinels

    def sentinel_id(self, i):
        assert 0 <= i < self.num_sentinels
        return VOCAB - 1 - i


SENTINELS = np.arange(VOCAB - 1, VOCAB - 101, -1, dtype=np.int32)


def corpus_from_docs(docs):
    tokens = np.array([t for d in docs for t in d], np.uint16)
    starts = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    return lm.TokenizedCorpus(tokens, starts, stats={}, path="<memory>", cached=False)


def random_docs(rng, n, lo, hi):
    return [rng.integers(10, 500, rng.integers(lo, hi)).tolist() for _ in range(n)]


def runs(mask):
    """Lengths of the runs of True in a bool array."""
    return [len(list(g)) for k, g in itertools.groupby(mask.tolist()) if k]


# ---- T5's published cases ------------------------------------------------------------------------

def test_random_spans_helper_published_cases():
    # T5 paper / t5.data.preprocessors.span_corruption: inputs 512 -> 568 raw tokens, 114 targets.
    assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    # t5/data/preprocessors_test.py::test_random_spans_helper (inputs_length 64, noise_density 0.2).
    assert sc.random_spans_helper(64, 0.2, 2.0) == (70, 22)
    assert sc.random_spans_helper(64, 0.2, 1.0) == (63, 27)


def test_noise_span_to_unique_sentinel_published_case():
    # t5/data/preprocessors_test.py::test_noise_span_to_unique_sentinel (vocab 1000).
    tokens = np.array([10, 11, 12, 13, 14, 15])
    mask = np.array([True, True, False, False, True, False])
    inputs, targets = sc.span_corrupt(tokens, mask, SENTINELS, eos_id=1)
    np.testing.assert_array_equal(inputs, [999, 12, 13, 998, 15, 1])
    # nonnoise_span_to_unique_sentinel on the same mask: the non-noise runs become sentinels.
    np.testing.assert_array_equal(targets, [10, 11, 999, 14, 998, 1])


def test_random_spans_noise_mask_published_counts():
    # t5/data/preprocessors_test.py::test_random_spans_noise_mask: "4 noise spans with a total length of 8".
    assert sc.noise_counts(32, 0.25, 2.0) == (8, 4)
    for seed in range(20):
        mask = sc.random_spans_noise_mask(32, 0.25, 2.0, np.random.default_rng(seed))
        assert mask.sum() == 8 and len(runs(mask)) == 4
        assert not mask[0] and mask[-1]  # non-noise first; the last span is noise (random_roll=False)


def test_t5_float32_rounding():
    # T5's mask counts in float32: 190 * f32(0.15) = 28.500002 rounds to 29, where the float64
    # arithmetic of random_spans_helper gives 28.5 -> 28 (half to even).
    # By hand: f32(0.15) = 10066330 / 2**26 (0.15 * 2**26 = 10066329.6 rounds up), so
    # 190 * f32(0.15) = 28.5 + 76 / 2**26 > 28.5 -> 29, where the exact 28.5 would round to 28.
    assert sc.noise_counts(190, 0.15, 3.0) == (29, 10)
    assert sc.noise_counts(10, 0.25, 3.0) == (2, 1)  # 2.5 is exact in float32: half to even -> 2
    assert sc.noise_counts(10, 0.15, 3.0) == (2, 1)  # 1.5 rounds half to even -> 2
    assert sc.noise_counts(1, 0.15, 3.0) == (1, 1)  # computed on length 2 ...
    assert not sc.random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)).any()  # ... then cut


# ---- Statistics --------------------------------------------------------------------------------

def test_noise_density_and_span_length_over_10k_examples():
    rng = np.random.default_rng(0)
    noise = spans = total = 0
    for length in rng.integers(100, 1000, 10_000):
        mask = sc.random_spans_noise_mask(int(length), 0.15, 3.0, rng)
        r = runs(mask)
        noise, spans, total = noise + sum(r), spans + len(r), total + length
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.05


def test_every_mask_with_the_counts_is_equally_likely():
    # Length 12, r=0.25, mu=1.5: 3 noise tokens in 2 spans (2 compositions) and 9 non-noise tokens
    # in 2 parts (8 compositions): 16 masks, each with probability 1/16.
    rng = np.random.default_rng(1)
    counts = collections.Counter(sc.random_spans_noise_mask(12, 0.25, 1.5, rng).tobytes() for _ in range(16_000))
    assert len(counts) == 16
    assert max(abs(c - 1000) for c in counts.values()) < 130  # ~4 standard deviations


# ---- Reconstruction ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, mu, r", [("R", 3.0, 0.15), ("R", 8.0, 0.15), ("X", 3.0, 0.5), ("X", 64.0, 0.5),
                                         ("R", 1.0, 0.3)])
def test_inputs_and_targets_reconstruct_the_text(kind, mu, r):
    rng = np.random.default_rng(2)
    d = sc.Denoiser(kind, r, mu)
    for n in [1, 2, 3, 7, 50, 300]:
        tokens = rng.integers(10, 500, n)
        inputs, targets = d.corrupt(tokens, rng, SENTINELS, -1, eos_id=1)
        assert (len(inputs), len(targets)) == d.lengths(n)  # lengths are deterministic
        assert inputs[-1] == 1 and targets[-1] == 1
        assert sum(sc.reconstruct(inputs, targets, SENTINELS, 1), []) == tokens.tolist()
        used = [t for t in inputs if t in SENTINELS]
        assert used == SENTINELS[: len(used)].tolist()  # <extra_id_0>, <extra_id_1>, ... in order


def test_sequential_denoiser_targets_are_the_continuation():
    d = sc.Denoiser("S", 0.25, mode_token=True)
    tokens = np.arange(10, 110)
    inputs, targets = d.corrupt(tokens, np.random.default_rng(0), SENTINELS, mode_id=900, eos_id=1)
    np.testing.assert_array_equal(inputs, [900, *range(10, 85), 1])
    np.testing.assert_array_equal(targets, [*range(85, 110), 1])


# ---- Errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("density, mu, message", [(0.0, 3.0, "noise_density"), (1.0, 3.0, "noise_density"),
                                                  (-0.1, 3.0, "noise_density"), (0.15, 0.5, "mean_noise_span_length")])
def test_bad_span_parameters(density, mu, message):
    with pytest.raises(ValueError, match=message):
        sc.random_spans_helper(512, density, mu)
    config = sc.default_config()
    config.update(noise_density=density, mean_noise_span_length=mu)
    with pytest.raises(ConfigError, match=f"data.{message}"):
        sc.denoisers_from_config(config)


@pytest.mark.parametrize("spec, message", [("R(3)", "needs 2"), ("S(3,0.2)", "needs 1"), ("Q(3,0.15)", "cannot parse"),
                                           ("R(3,0.15)@0", "rate"), ("X(3,1.5)", "noise_density"),
                                           ("R(0.5,0.15)", "mean_noise_span_length"), ("R(a,0.1)", "bad number")])
def test_bad_denoiser_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        sc.parse_denoisers(spec)


def test_too_few_sentinels_names_the_key():
    denoisers = sc.parse_denoisers(sc.UL2_DENOISERS)
    layout = sc.make_layout(denoisers, inputs_length=512)  # X(3,0.5) reads 765 tokens: 128 spans
    with pytest.raises(ConfigError, match="tokenizer.num_sentinels"):
        sc.sentinel_layout(FakeTokenizer(100), denoisers, layout)
    sentinels, modes = sc.sentinel_layout(FakeTokenizer(131), denoisers, layout)
    assert len(sentinels) == 128 and modes == {"R": VOCAB - 131, "X": VOCAB - 130, "S": VOCAB - 129}
    with pytest.raises(ConfigError, match="data.targets_length"):
        sc.make_layout(denoisers, inputs_length=512, targets_length=114)


# ---- Packing -----------------------------------------------------------------------------------

def corrupted(docs, denoisers=(sc.Denoiser("R", 0.15, 3.0),), *, inputs_length=64, fmt="t5", seed=0, num_sentinels=100):
    layout = sc.make_layout(denoisers, format=fmt, inputs_length=inputs_length)
    sentinels, modes = sc.sentinel_layout(FakeTokenizer(num_sentinels), denoisers, layout)
    parts = [sc.CorruptedRows(lm.PackedRows(corpus_from_docs(docs), raw - 1), d, layout, seed=seed, stream=k,
                              sentinel_ids=sentinels, mode_ids=modes, eos_id=1)
             for k, (d, raw) in enumerate(zip(denoisers, layout.raw_lengths))]
    return parts, layout, sentinels, modes


def test_single_document_window_fills_t5_rows_exactly():
    rng = np.random.default_rng(3)
    (rows,), layout, _, _ = corrupted(random_docs(rng, 1, 5000, 5001), inputs_length=512)
    assert layout.raw_lengths == (568,) and layout.targets_length == 114
    for i in range(5):
        ex = rows[i]
        assert (ex["encoder_segment_ids"] == 1).all() and (ex["decoder_segment_ids"] == 1).all()


def test_packed_rows_reconstruct_each_document_piece():
    rng = np.random.default_rng(4)
    docs = random_docs(rng, 60, 1, 40)
    (rows,), layout, sentinels, _ = corrupted(docs, inputs_length=64)
    raw = lm.PackedRows(corpus_from_docs(docs), layout.raw_lengths[0] - 1)
    for i in range(len(rows)):
        ex, window = rows[i], raw[i]
        pieces = [window["tokens"][window["segment_ids"] == s] for s in np.unique(window["segment_ids"])]
        segs = np.unique(ex["encoder_segment_ids"][ex["encoder_segment_ids"] > 0])
        np.testing.assert_array_equal(segs, np.unique(ex["decoder_segment_ids"][ex["decoder_segment_ids"] > 0]))
        for s in segs:
            enc = ex["encoder_input_tokens"][ex["encoder_segment_ids"] == s]
            dec = ex["decoder_target_tokens"][ex["decoder_segment_ids"] == s]
            text = sum(sc.reconstruct(enc, dec, sentinels, 1), [])
            piece = pieces[s - 1].tolist()
            assert text == piece[: len(text)] and (len(text) == len(piece) or s == segs[-1])  # only the last is cut
            np.testing.assert_array_equal(ex["encoder_positions"][ex["encoder_segment_ids"] == s], np.arange(len(enc)))
            np.testing.assert_array_equal(ex["decoder_input_tokens"][ex["decoder_segment_ids"] == s],
                                          [0, *dec[:-1]])
        np.testing.assert_array_equal(ex["decoder_loss_mask"], ex["decoder_segment_ids"] > 0)
        assert 1 <= len(segs) <= len(pieces)


def test_short_documents_get_more_noise_than_noise_density():
    """Each packed piece is corrupted on its own (module docstring, unlike t5x, which concatenates
    documents first), with at least one noise token: short pieces get far more noise than
    `noise_density`. Counted from the rows: noise = decoder targets that are neither sentinel nor
    eos, non-noise = encoder inputs that are neither."""
    rng = np.random.default_rng(8)
    docs = [rng.integers(10, 500, n).tolist() for n in rng.integers(2, 6, 1000)]  # 2 to 5 tokens
    (rows,), _, sentinels, _ = corrupted(docs, inputs_length=64)
    # By hand, r = 0.15: round(n r) is 0 for n <= 3 and 1 for n = 4, 5 (0.6, 0.75); at least 1.
    want_noise = {2: 1, 3: 1, 4: 1, 5: 1}
    special = set(sentinels.tolist()) | {1}
    noise = total = pieces = 0
    for i in range(min(len(rows), 40)):
        ex = rows[i]
        segs = np.unique(ex["encoder_segment_ids"][ex["encoder_segment_ids"] > 0])
        for s in segs[:-1]:  # the last piece of a row may be cut
            enc = ex["encoder_input_tokens"][ex["encoder_segment_ids"] == s]
            dec = ex["decoder_target_tokens"][ex["decoder_segment_ids"] == s]
            n_noise = sum(t not in special for t in dec.tolist())
            n = n_noise + sum(t not in special for t in enc.tolist())
            if n in want_noise:
                assert n_noise == want_noise[n], (n, enc, dec)
                noise, total, pieces = noise + n_noise, total + n, pieces + 1
    assert pieces > 100
    assert noise / total > 0.25  # vs noise_density = 0.15 (e.g. 2-token pieces: 0.5)


def test_corruption_is_a_pure_function_of_seed_and_index():
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 30, 50, 200)
    (a,), *_ = corrupted(docs, seed=0)
    (b,), *_ = corrupted(docs, seed=0)
    (c,), *_ = corrupted(docs, seed=1)
    for k in packing.T5_KEYS:
        np.testing.assert_array_equal(a[3][k], b[3][k])
    assert any((a[3][k] != c[3][k]).any() for k in packing.T5_KEYS)
    assert any((a[3][k] != a[4][k]).any() for k in packing.T5_KEYS)


def test_ul2_mixture_rates_mode_tokens_and_reconstruction():
    rng = np.random.default_rng(6)
    docs = random_docs(rng, 20, 400, 900)
    denoisers = sc.parse_denoisers("R(3,0.15)@2 X(8,0.5) S(0.25)")
    parts, layout, sentinels, modes = corrupted(docs, denoisers, inputs_length=96)
    assert set(modes.values()).isdisjoint(sentinels)
    mixed = grain.MapDataset.mix(parts, [d.rate for d in denoisers])
    firsts = collections.Counter(int(mixed[i]["encoder_input_tokens"][0]) for i in range(400))
    assert firsts == {modes["R"]: 200, modes["X"]: 100, modes["S"]: 100}
    for d, part in zip(denoisers, parts):
        ex = part[0]
        enc = ex["encoder_input_tokens"][ex["encoder_segment_ids"] == 1]
        dec = ex["decoder_target_tokens"][ex["decoder_segment_ids"] == 1]
        assert enc[0] == modes[d.kind] and len(ex["encoder_input_tokens"]) == 96
        text = enc[1:-1].tolist() + dec[:-1].tolist() if d.kind == "S" else sum(
            sc.reconstruct(enc[1:], dec, sentinels, 1), [])
        window = lm.PackedRows(corpus_from_docs(docs), layout.raw_lengths[denoisers.index(d)] - 1)[0]
        assert text == window["tokens"][window["segment_ids"] == 1][: len(text)].tolist()


def test_prefix_lm_rows_and_attention_mask():
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 40, 5, 60)
    denoisers = sc.parse_denoisers("R(3,0.15) S(0.25)")
    parts, layout, sentinels, modes = corrupted(docs, denoisers, inputs_length=64, fmt="prefix_lm")
    for d, part in zip(denoisers, parts):
        ex = part[1]
        assert all(ex[k].shape == (64,) for k in packing.PREFIX_LM_KEYS)
        np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
        for s in np.unique(ex["segment_ids"][ex["segment_ids"] > 0]):
            sel = ex["segment_ids"] == s
            prefix = ex["prefix_mask"][sel].astype(bool)
            assert prefix.any() and prefix[: prefix.sum()].all()  # the prefix comes first
            assert ex["inputs"][sel][0] == modes[d.kind]
            loss = ex["loss_mask"][sel].astype(bool)
            # Loss on every target-side token predicted from the last prefix token onwards.
            assert not loss[: prefix.sum() - 1].any() and loss[prefix.sum() - 1:-1].all()
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    prefix = np.array([[1, 1, 0, 0, 1, 0, 0, 0]])
    mask = packing.prefix_lm_attention_mask(seg, prefix)
    # By hand: row i lists the keys query i may attend to. Prefix queries 0, 1 see the prefix {0, 1};
    # targets 2, 3 are causal; piece 2's prefix query 4 sees only itself; padding 7 only itself.
    want = np.array([[int(c) for c in r] for r in
                     "11000000 11000000 11100000 11110000 00001000 00001100 00001110 00000001".split()], bool)
    np.testing.assert_array_equal(mask[0], want)
    assert mask[0, 0, 1] and not mask[0, 1, 2] and not mask[0, 4, 3]


# ---- The pipeline -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=100)
    text = ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,\n" * 3]
    return tokenizer.train_tokenizer(config, text, tmp_path_factory.mktemp("tok") / "char.model")


def test_t5_dataset_batches_process_slices_and_eval(char_tok, tmp_path):
    rng = np.random.default_rng(8)
    words = ["alpha", "beta", "Gamma", "delta", "epsilon."]
    docs = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(80)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "eval.txt").write_text("\n\n".join(docs[:9]) + "\n")
    config = sc.default_config()
    config.update(sources=f"text:{tmp_path}/train.txt", eval_sources=f"text:{tmp_path}/eval.txt", inputs_length=64)
    kw = dict(seed=3, cache_dir=tmp_path / "cache")
    full = sc.t5_dataset(config, char_tok, split="train", global_batch_size=4, **kw)
    halves = [sc.t5_dataset(config, char_tok, split="train", global_batch_size=4, process_index=p, process_count=2,
                            **kw) for p in (0, 1)]
    batch = full[2]
    assert batch["encoder_input_tokens"].shape == (4, 64) and batch["decoder_target_tokens"].shape == (4, 14)
    assert batch["decoder_loss_mask"].dtype == np.float32 and batch["encoder_segment_ids"].dtype == np.int32
    for k in packing.T5_KEYS:
        np.testing.assert_array_equal(np.concatenate([halves[0][2][k], halves[1][2][k]]), batch[k])
    sentinels = [char_tok.sentinel_id(i) for i in range(100)]
    row = 0
    enc = batch["encoder_input_tokens"][row][batch["encoder_segment_ids"][row] == 1]
    dec = batch["decoder_target_tokens"][row][batch["decoder_segment_ids"][row] == 1]
    text = char_tok.decode(sum(sc.reconstruct(enc, dec, sentinels, char_tok.eos_id), []))
    assert len(text) > 10 and any(text in doc for doc in docs)  # real text of one document
    evals = sc.t5_dataset(config, char_tok, split="eval", global_batch_size=4, **kw)
    assert 0 < len(evals) < 100
    last = evals[len(evals) - 1]  # padded with empty rows to the batch size
    assert last["encoder_input_tokens"].shape == (4, 64)
    assert all(row.any() or not loss.any() for row, loss in zip(last["encoder_segment_ids"], last["decoder_loss_mask"]))
    lm_batch = sc.t5_dataset(config, char_tok, split="train", global_batch_size=4, format="prefix_lm", **kw)[0]
    assert set(lm_batch) == set(packing.PREFIX_LM_KEYS) and lm_batch["inputs"].shape == (4, 64)
    with pytest.raises(DataError, match="split"):
        sc.t5_dataset(config, char_tok, split="test", global_batch_size=4, **kw)
