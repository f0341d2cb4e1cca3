"""KV-cache decoding against full forward passes, filters against NumPy, beam search against enumeration."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sampling, sharding
from jaxllm.models import llama


def make_config(**overrides):
    c = llama.default_config()
    # Grouped-query attention: 8 query heads over 4 kv heads (which split over a 4-way tensor axis).
    c.update(dict(vocab_size=96, embed_dim=32, num_layers=2, num_heads=8, num_kv_heads=4, mlp_dim=48,
                  rope_theta=500.0, norm_eps=1e-6))
    c.update(overrides)
    return llama.LlamaConfig.from_config(c)


@functools.lru_cache(maxsize=None)
def make_params(cfg):
    """Random parameters of `cfg`'s shapes, from NumPy (compiling `llama.init` costs seconds).

    Standard deviation 0.2 spreads logits over a few nats, so greedy choices are not near-ties.
    """
    abstract = nn.unbox(jax.eval_shape(lambda: llama.init(cfg, jax.random.key(0))))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((path[-1].key == "scale") + 0.2 * rng.standard_normal(x.shape), jnp.float32),
        abstract)


forward = jax.jit(llama.apply, static_argnums=0)
decode = jax.jit(llama.decode, static_argnums=0, static_argnames="last_logits_only")


def full_logits(cfg, params, tokens, positions=None, segment_ids=None, shape=(4, 32)):
    """Float64 logits `[batch, length, vocab]` by one full forward pass (the training path).

    Rows are padded to `shape` (one compilation for every test): extra rows are dropped, and
    padding after a row is causal-masked out of its real tokens' logits.
    """
    tokens = np.atleast_2d(tokens)
    batch, length = tokens.shape
    positions = np.broadcast_to(np.arange(length), tokens.shape) if positions is None else positions
    segment_ids = np.ones_like(tokens) if segment_ids is None else segment_ids
    arrays = [np.zeros(shape, np.int32) for _ in range(3)]
    for a, x in zip(arrays, (tokens, positions, segment_ids)):
        a[:batch, :length] = x
    return np.asarray(forward(cfg, params, *map(jnp.asarray, arrays)), np.float64)[:batch, :length]


def row_logits(cfg, params, tokens):
    """Float64 logits `[len, vocab]` of one unpadded row."""
    return full_logits(cfg, params, np.asarray(tokens, np.int32))[0]


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- NumPy references of the filters (float64, written from their definitions) -------------------

def ref_top_k(logits, k):
    if k >= logits.shape[-1]:
        return logits.copy()
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    return np.where(logits >= kth, logits, -np.inf)


def ref_top_p(logits, p):
    """Keep token i iff the mass of strictly more probable tokens is < p (Holtzman et al. 2020)."""
    probs = np.exp(log_softmax64(logits))
    out = np.full_like(logits, -np.inf, dtype=np.float64)
    for idx in np.ndindex(logits.shape[:-1]):
        row = probs[idx]
        for i, pi in enumerate(row):
            if row[row > pi].sum() < p:
                out[idx + (i,)] = logits[idx + (i,)]
    return out


# ---- The cache ------------------------------------------------------------------------------------

def padded_layout(prompts, new, padding):
    """Tokens, positions, segment ids `[batch, P + T]` of prompts padded to P, then T new tokens each."""
    width = max(len(p) for p in prompts)
    rows = []
    for p, n in zip(prompts, new):
        pad = width - len(p)
        real = np.arange(len(p) + len(n))
        if padding == "left":
            zeros = np.zeros(pad)
            rows.append((np.r_[zeros, p, n], np.r_[zeros, real], np.r_[zeros, np.ones(len(real))]))
        else:  # right: a hole of padding between each prompt and its continuation
            pos = np.r_[real[: len(p)], np.zeros(pad), real[len(p):]]
            seg = np.r_[np.ones(len(p)), np.zeros(pad), np.ones(len(n))]
            rows.append((np.r_[p, np.zeros(pad), n], pos, seg))
    return [np.stack(a).astype(np.int32) for a in zip(*rows)], width


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_decoding_equals_full_forward_at_every_step(scan, padding):
    cfg = make_config(scan_layers=scan)
    params = make_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n) for n in (5, 2, 7)]
    new = [rng.integers(0, 96, 6) for _ in prompts]
    (tokens, positions, segment_ids), width = padded_layout(prompts, new, padding)
    full = full_logits(cfg, params, tokens, positions, segment_ids)

    cache = llama.init_cache(cfg, 3, tokens.shape[1] + 2)
    chunks = [(0, width), (width, width + 2)] + [(s, s + 1) for s in range(width + 2, tokens.shape[1])]
    got = []
    for lo, hi in chunks:  # prefill, a 2-token chunk, then one token at a time
        chunk = (jnp.asarray(a[:, lo:hi]) for a in (tokens, positions, segment_ids))
        logits, cache = decode(cfg, params, *chunk, cache)
        got.append(np.asarray(logits))
        assert int(cache["index"]) == hi
    got = np.concatenate(got, axis=1)
    real = segment_ids > 0
    np.testing.assert_allclose(got[real], full[real], rtol=1e-5, atol=1e-5)
    # Padding changes nothing: each row alone, unpadded, gives the same logits.
    for b, (p, n) in enumerate(zip(prompts, new)):
        np.testing.assert_allclose(got[b][real[b]], row_logits(cfg, params, np.r_[p, n]), rtol=1e-5, atol=1e-5)


def test_cache_layout_and_sharding():
    cfg, scan_cfg = make_config(), make_config(scan_layers=True)
    cache = llama.init_cache(cfg, 2, 5)
    assert cache["layers_1"]["k"].shape == (2, 5, 4, 4) and cache["segment_ids"].shape == (2, 5)
    assert llama.init_cache(scan_cfg, 2, 5)["layers"]["v"].shape == (2, 2, 5, 4, 4)
    mesh_config = sharding.default_config()
    mesh_config.shape = (2, 2, 2)
    mesh = sharding.make_mesh(mesh_config)
    with sharding.activate(mesh, mesh_config.rules):
        for c, key in ((cfg, "layers_0"), (scan_cfg, "layers")):
            k = jax.jit(llama.init_cache, static_argnums=(0, 1, 2))(c, 4, 6)[key]["k"]
            lead = (None,) if c.scan_layers else ()
            assert k.sharding.spec == jax.sharding.PartitionSpec(*lead, ("data", "fsdp"), None, "tensor")


# ---- Filters and the sampling distribution -------------------------------------------------------

def filter_cases():
    rng = np.random.default_rng(0)
    random = rng.standard_normal((4, 50)) * 2
    ties = np.round(rng.standard_normal((4, 30)), 1)  # many exactly equal logits
    boundary_tie = np.array([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])  # probs ~ (.76, .10, .10, .10, .04, .01)
    flat = np.zeros((1, 7))
    return {"random": random, "ties": ties, "boundary_tie": boundary_tie, "flat": flat}


@pytest.mark.parametrize("case", ["random", "ties", "boundary_tie", "flat"])
@pytest.mark.parametrize("k", [1, 2, 5, 60])
def test_top_k_matches_numpy(case, k):
    logits = filter_cases()[case]
    got = np.asarray(sampling.top_k_logits(jnp.asarray(logits, jnp.float32), k))
    want = ref_top_k(logits.astype(np.float32).astype(np.float64), k)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert (np.isfinite(got).sum(-1) >= min(k, logits.shape[-1])).all()


@pytest.mark.parametrize("case", ["random", "ties", "boundary_tie", "flat"])
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.8, 0.95])
def test_top_p_matches_numpy(case, p):
    logits = filter_cases()[case]
    got = np.asarray(sampling.top_p_logits(jnp.asarray(logits, jnp.float32), p))
    want = ref_top_p(logits.astype(np.float32).astype(np.float64), p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits.astype(np.float32)[np.isfinite(got)])
    assert (np.isfinite(got).sum(-1) >= 1).all()  # the most probable token always survives
    if case == "boundary_tie" and p == 0.8:  # .76 < .8: all three tied .10 tokens join the nucleus
        assert np.isfinite(got).sum() == 4


def test_top_k_then_top_p_matches_numpy():
    logits = filter_cases()["random"].astype(np.float32)
    got = sampling.top_p_logits(sampling.top_k_logits(jnp.asarray(logits), 10), 0.7)
    want = ref_top_p(ref_top_k(logits.astype(np.float64), 10), 0.7)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), np.isfinite(want))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (4, 0.8)])
def test_sampled_frequencies_match_the_filtered_softmax(top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0], np.float32)
    temperature, n = 0.7, 40_000
    probs = np.exp(log_softmax64(ref_top_p(ref_top_k(logits / np.float64(temperature), top_k or 99), top_p)))
    tokens, logprobs = jax.jit(sampling.sample_logits, static_argnames=("temperature", "top_k", "top_p"))(
        jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), temperature=temperature,
        top_k=top_k, top_p=top_p)
    freq = np.bincount(np.asarray(tokens), minlength=len(logits)) / n
    # Each frequency is a mean of n Bernoulli(p) draws: 5 standard errors (+ a count) of slack.
    tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1.0 / n
    np.testing.assert_array_less(np.abs(freq - probs), tol)
    assert np.any(np.abs(np.exp(log_softmax64(logits)) - probs) > 5 * tol)  # T=1 would fail: the test has power
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax64(logits / temperature)[np.asarray(tokens)], atol=1e-5)


# ---- The sampler ---------------------------------------------------------------------------------

PROMPTS = [[1, 5, 7, 2, 9], [3], [4, 4, 8], [7, 7]]  # 4 rows: they divide the batch shards of the meshes
SAMPLING = dict(temperature=0.8, top_k=8, top_p=0.9)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_stepwise_argmax_of_full_forward(scan):
    cfg = make_config(scan_layers=scan)
    params = make_params(cfg)
    tokens, lengths = sampling.left_pad(PROMPTS)
    out = sampling.sample(cfg, params, tokens, lengths, jax.random.key(0), max_new_tokens=8, temperature=0.0,
                          stop_ids=(17,))
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        while len(seq) < len(prompt) + 8 and (seq[-1] != 17 or len(seq) == len(prompt)):
            seq.append(int(np.argmax(row_logits(cfg, params, seq)[-1])))
        assert np.asarray(out.tokens[b, : out.lengths[b]]).tolist() == seq[len(prompt):]


def test_logprobs_are_the_unfiltered_tempered_policy_of_a_full_forward():
    cfg = make_config()
    params = make_params(cfg)
    tokens, lengths = sampling.left_pad(PROMPTS)
    temperature, top_k, top_p = SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"]
    out = sampling.sample(cfg, params, tokens, lengths, jax.random.key(3), max_new_tokens=8, **SAMPLING)
    assert out.tokens.shape == out.logprobs.shape == (4, 8) and (np.asarray(out.lengths) == 8).all()
    for b, prompt in enumerate(PROMPTS):
        new = np.asarray(out.tokens[b]).tolist()
        scaled = row_logits(cfg, params, prompt + new)[len(prompt) - 1: -1] / temperature  # predicts each new token
        want = log_softmax64(scaled)[np.arange(8), new]
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), want, rtol=1e-5, atol=1e-5)
        allowed = np.isfinite(ref_top_p(ref_top_k(scaled, top_k), top_p))
        assert allowed[np.arange(8), new].all()


def test_stop_ids_and_max_new_tokens():
    cfg = make_config()
    params = make_params(cfg)
    tokens, lengths = sampling.left_pad(PROMPTS)
    run = lambda stops: sampling.sample(cfg, params, tokens, lengths, jax.random.key(0), max_new_tokens=8,
                                        temperature=0.0, stop_ids=stops, pad_id=0)
    free = run(())
    free_tokens = np.asarray(free.tokens)
    assert free_tokens.shape == (4, 8) and (np.asarray(free.lengths) == 8).all()  # max_new_tokens, no more
    # Stop row 0 at its 3rd token and row 1 at its 5th (plus ids nobody emits, like end-of-turn).
    stops = (int(free_tokens[0, 2]), int(free_tokens[1, 4]), 95, 94, 93)
    out = run(stops)
    assert int(np.asarray(out.lengths).min()) < 8
    for b in range(4):
        hits = [i for i, t in enumerate(free_tokens[b]) if t in stops]
        n = hits[0] + 1 if hits else 8
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(out.tokens[b, :n]), free_tokens[b, :n])
        assert (np.asarray(out.tokens[b, n:]) == 0).all() and (np.asarray(out.logprobs[b, n:]) == 0).all()
        np.testing.assert_allclose(np.asarray(out.logprobs[b, :n]), np.asarray(free.logprobs[b, :n]), atol=1e-6)
    # Every row stopped: the loop ends early with the same outputs.
    all_stop = run(tuple(int(free_tokens[b, 1]) for b in range(4)))
    assert (np.asarray(all_stop.lengths) <= 2).all() and (np.asarray(all_stop.tokens[:, 2:]) == 0).all()


def test_generation_past_max_context_reencodes_the_latest_half():
    """Past `max_context` slots the latest `max_context // 2` are re-encoded from position 0."""
    cfg = make_config()
    params = make_params(cfg)
    prompts, n, window = [[1, 5, 7, 2, 9, 3], [3, 8, 8]], 12, 8
    outs = sampling.generate(cfg, params, prompts, max_new_tokens=n, max_context=window)
    width, keep = 6, window // 2  # generate left-pads to the longest prompt when the window binds
    for prompt, out in zip(prompts, outs):
        slots = [None] * (width - len(prompt)) + list(prompt)  # the row's timeline of cache slots
        start, filled = 0, width
        for t in range(n):
            if t and filled == window:
                start, filled = len(slots) - keep, keep
            elif t:
                filled += 1
            context = [s for s in slots[start:] if s is not None]
            assert len(context) <= window
            slots.append(int(np.argmax(row_logits(cfg, params, context)[-1])))
        assert out == slots[width:]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_with_one_beam_is_greedy(alpha):
    cfg = make_config()
    params = make_params(cfg)
    tokens, lengths = sampling.left_pad(PROMPTS)
    greedy = sampling.sample(cfg, params, tokens, lengths, jax.random.key(0), max_new_tokens=8, temperature=0.0)
    stops = (int(greedy.tokens[0, 3]), int(greedy.tokens[2, 6]))
    greedy = sampling.sample(cfg, params, tokens, lengths, jax.random.key(0), max_new_tokens=8, temperature=0.0,
                             stop_ids=stops)
    beam = sampling.beam_search(cfg, params, tokens, lengths, beam_size=1, max_new_tokens=8, alpha=alpha,
                                stop_ids=stops)
    np.testing.assert_array_equal(np.asarray(beam.tokens[:, 0]), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(beam.lengths[:, 0]), np.asarray(greedy.lengths))
    np.testing.assert_allclose(np.asarray(beam.logprobs[:, 0]), np.asarray(greedy.logprobs).sum(1), rtol=1e-5)


def test_wide_beam_search_equals_exhaustive_enumeration():
    """With beam = vocab^2 and 3 new tokens nothing is pruned: the beams are the exact top hypotheses."""
    cfg = make_config(vocab_size=6)
    params = make_params(cfg)
    prompts, stop, alpha, n = [[1, 2, 3], [4]], 5, 0.6, 3
    tokens, lengths = sampling.left_pad(prompts)
    out = sampling.beam_search(cfg, params, tokens, lengths, beam_size=36, max_new_tokens=n, alpha=alpha,
                               stop_ids=(stop,))
    seqs = [seq for length in range(1, n + 1) for seq in itertools.product(range(6), repeat=length)
            if stop not in seq[:-1] and (length == n or seq[-1] == stop)]  # ends at its first stop or at n
    for b, prompt in enumerate(prompts):
        # All continuations (right-padded, causal) of the prompt in one full forward pass.
        ids = np.array([list(prompt) + list(s) + [0] * (n - len(s)) for s in seqs], np.int32)
        lp = log_softmax64(full_logits(cfg, params, ids, shape=(len(seqs), 8)))
        hyps = []
        for row, seq in enumerate(seqs):
            logprob = sum(lp[row, len(prompt) - 1 + i, s] for i, s in enumerate(seq))
            hyps.append((logprob / ((5 + len(seq)) / 6) ** alpha, logprob, seq))  # GNMT eq. 14
        hyps.sort(reverse=True)
        np.testing.assert_allclose(np.asarray(out.scores[b]), [h[0] for h in hyps[:36]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), [h[1] for h in hyps[:36]], rtol=1e-5, atol=1e-5)
        for j in range(5):
            seq = hyps[j][2]
            assert int(out.lengths[b, j]) == len(seq)
            assert np.asarray(out.tokens[b, j]).tolist() == list(seq) + [0] * (n - len(seq))


# ---- Sharded == single device -------------------------------------------------------------------

@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_generation_equals_single_device(mesh_shape):
    cfg = make_config()
    params = make_params(cfg)
    mesh_config = sharding.default_config()
    mesh_config.shape = mesh_shape
    mesh = sharding.make_mesh(mesh_config)
    specs = nn.get_partition_spec(jax.eval_shape(lambda: llama.init(cfg, jax.random.key(0))))
    sharded = jax.device_put(params, sharding.logical_to_sharding(specs, mesh, mesh_config.rules))
    assert sharded["layers_0"]["attn"]["k_proj"].addressable_shards[0].data.shape[1] == 4 // mesh_shape[2]
    tokens, lengths = sampling.left_pad(PROMPTS)

    def run(p):
        if mesh_shape == (2, 2, 2):
            return sampling.sample(cfg, p, tokens, lengths, jax.random.key(3), max_new_tokens=8, **SAMPLING)
        return sampling.beam_search(cfg, p, tokens[:3], lengths[:3], beam_size=2, max_new_tokens=5)  # 3 rows: padded

    want = run(params)
    with sharding.activate(mesh, mesh_config.rules):
        got = run(sharded)
    for g, w in zip(got, want):
        if jnp.issubdtype(g.dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lengths=[5, 0, 3]), "prompt_lengths"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_tokens=np.full((4, 5), 96)), "vocab_size"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    cfg = make_config()
    tokens, lengths = sampling.left_pad(PROMPTS)
    args = {**dict(prompt_tokens=tokens, prompt_lengths=lengths, max_new_tokens=4), **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling.sample(cfg, None, rng=jax.random.key(0), **args)
    with pytest.raises(ValueError, match="at least one token"):
        sampling.generate(cfg, None, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_context"):
        sampling.beam_search(cfg, None, tokens, lengths, beam_size=2, max_new_tokens=9, max_context=8)
