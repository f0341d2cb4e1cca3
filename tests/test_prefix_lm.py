"""The decoder-only prefix LM: `llama.apply(..., prefix_mask=...)` attention and its sampler."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxllm import sampling
from jaxllm.data import lm, packing, span_corruption as sc
from jaxllm.models import llama
from jaxllm.train import pretrain_t5


def make_config(**overrides):
    c = llama.default_config()
    c.update(dict(vocab_size=97, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=48))
    c.update(overrides)
    return llama.LlamaConfig.from_config(c)


apply = jax.jit(llama.apply, static_argnums=(0, 5))


def params_of(cfg, seed=0):
    params = nn.unbox(llama.init(cfg, jax.random.key(seed)))
    # Larger than the 0.02 init so every attention weight visibly moves the logits.
    return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), params)


# Two packed pieces (prefix 3 then targets 2; prefix 2 then targets 1), padding, and a row whose
# prefix is not contiguous (the mask formula holds for any prefix_mask).
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
PREFIX = np.array([[1, 1, 1, 0, 0, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 0, 0, 1]], np.int32)
# Written out by hand (row i: the keys query i may attend to): a prefix query sees its whole
# piece's prefix and everything before it; a target query is causal; nothing crosses a segment;
# padding (segment 0) attends causally among itself.
HAND_MASKS = np.array([[[int(c) for c in r] for r in rows.split()] for rows in [
    """1110000000 1110000000 1110000000 1111000000 1111100000
       0000011000 0000011000 0000011100 0000000010 0000000011""",
    """1011001001 1100000000 1111001001 1111001001 1111100000
       1111110000 1111111001 1111111100 1111111110 1111111111""",
]], bool)


def test_one_layer_dependencies_are_the_prefix_lm_mask():
    # With one layer, output i depends on input j exactly when query i may attend to key j (the
    # residual covers j == i), so perturbing each token in turn reads the mask off the logits.
    cfg = make_config()
    params = params_of(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, SEGMENTS.shape).astype(np.int32)
    positions = np.zeros_like(SEGMENTS)
    for b in range(2):
        for s in np.unique(SEGMENTS[b]):
            positions[b, SEGMENTS[b] == s] = np.arange((SEGMENTS[b] == s).sum())
    base = np.asarray(apply(cfg, params, tokens, positions, SEGMENTS, "lm", PREFIX))
    n = SEGMENTS.shape[1]
    depends = np.zeros((2, n, n), bool)
    for j in range(n):
        changed = tokens.copy()
        changed[:, j] = (changed[:, j] + 1 + rng.integers(1, cfg.vocab_size - 2)) % cfg.vocab_size
        logits = np.asarray(apply(cfg, params, changed, positions, SEGMENTS, "lm", PREFIX))
        depends[:, :, j] = np.abs(logits - base).max(-1) > 1e-6
    for b in range(2):
        want = HAND_MASKS[b]
        np.testing.assert_array_equal(depends[b], want)
        # The data pipeline documents the same mask.
        np.testing.assert_array_equal(packing.prefix_lm_attention_mask(SEGMENTS, PREFIX)[b], want)
    assert depends[0, 0, 2] and not depends[0, 3, 4] and not depends[0, 5, 4]  # prefix sees ahead; targets do not


def test_zero_prefix_is_the_causal_model():
    cfg = make_config(num_layers=2)
    params = params_of(cfg)
    tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, SEGMENTS.shape).astype(np.int32)
    positions = np.tile(np.arange(SEGMENTS.shape[1], dtype=np.int32), (2, 1))
    causal = np.asarray(apply(cfg, params, tokens, positions, SEGMENTS, "lm", None))
    zero = np.asarray(apply(cfg, params, tokens, positions, SEGMENTS, "lm", np.zeros_like(PREFIX)))
    np.testing.assert_array_equal(zero, causal)
    prefixed = np.asarray(apply(cfg, params, tokens, positions, SEGMENTS, "lm", PREFIX))
    assert np.abs(prefixed - causal).max() > 1e-3


def test_cached_prefix_prefill_then_causal_steps_equal_the_full_forward():
    # A left-padded prompt prefilled with its prefix mask, then two one-token steps: every logit
    # equals the uncached forward of the whole row under the prefix-LM mask.
    cfg = make_config(num_layers=2)
    params = params_of(cfg)
    rng = np.random.default_rng(3)
    pad, prompt_len, steps = np.array([2, 0]), 6, 2
    tokens = rng.integers(1, cfg.vocab_size, (2, prompt_len + steps)).astype(np.int32)
    seg = (np.arange(prompt_len + steps)[None] >= pad[:, None]).astype(np.int32)
    pos = np.maximum(np.arange(prompt_len + steps)[None] - pad[:, None], 0).astype(np.int32) * seg
    prefix = (seg * (np.arange(prompt_len + steps)[None] < prompt_len)).astype(np.int32)
    full = np.asarray(apply(cfg, params, tokens, pos, seg, "lm", prefix))

    decode = jax.jit(llama.decode, static_argnums=0)
    cache = llama.init_cache(cfg, 2, prompt_len + steps)
    p = slice(0, prompt_len)
    got, cache = decode(cfg, params, tokens[:, p], pos[:, p], seg[:, p], cache, prefix_mask=prefix[:, p])
    chunks = [np.asarray(got)]
    for t in range(prompt_len, prompt_len + steps):
        s = slice(t, t + 1)
        got, cache = decode(cfg, params, tokens[:, s], pos[:, s], seg[:, s], cache)
        chunks.append(np.asarray(got))
    cached = np.concatenate(chunks, axis=1)
    real = seg > 0
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=1e-5)
    # The prefix block matters: a causal prefill differs on the prompt's real tokens.
    causal, _ = decode(cfg, params, tokens[:, p], pos[:, p], seg[:, p], llama.init_cache(cfg, 2, prompt_len + steps))
    assert np.abs(np.asarray(causal)[real[:, p]] - full[:, p][real[:, p]]).max() > 1e-3


def test_prefix_lm_generate_is_greedy_under_the_full_forward():
    cfg = make_config(num_layers=2)
    params = params_of(cfg)
    prompts = [[5, 6, 7, 8, 9, 3], [11, 12, 3]]
    outs = pretrain_t5.prefix_lm_generate(cfg, params, prompts, 5)
    assert [len(o) for o in outs] == [5, 5]
    for prompt, out in zip(prompts, outs):
        seq = np.array([prompt + out], np.int32)
        n = seq.shape[1]
        prefix = (np.arange(n) < len(prompt)).astype(np.int32)[None]
        logits = np.asarray(llama.apply(cfg, params, seq, np.arange(n, dtype=np.int32)[None], np.ones_like(seq),
                                        prefix_mask=prefix))
        np.testing.assert_array_equal(logits[0, len(prompt) - 1:-1].argmax(-1), out)
    stop = outs[0][1]
    cut = pretrain_t5.prefix_lm_generate(cfg, params, prompts[:1], 5, eos_id=stop)[0]
    assert cut == outs[0][: outs[0].index(stop) + 1]
    with pytest.raises(ValueError, match="max_new_tokens"):
        pretrain_t5.prefix_lm_generate(cfg, params, prompts, 0)


def test_prefix_lm_sampling_must_fit_max_context():
    cfg = make_config()
    params = params_of(cfg)
    with pytest.raises(ValueError, match="max_context"):
        sampling.generate(cfg, params, [[5, 6, 7, 8]], max_new_tokens=8, max_context=8, prefix_lm=True)
    assert len(sampling.generate(cfg, params, [[5, 6, 7, 8]], max_new_tokens=5, max_context=16,
                                 prefix_lm=True)[0]) == 5


def test_prefix_lm_loss_covers_only_the_targets():
    # A prefix-LM row of the data pipeline: changing the targets of prefix positions (never
    # predicted) leaves the loss alone; changing a target-side label changes it.
    cfg = make_config()
    params = params_of(cfg)
    docs = [list(range(10, 40)), list(range(50, 70))]
    tokens = np.array([t for d in docs for t in d], np.uint16)
    corpus = lm.TokenizedCorpus(tokens, np.cumsum([0] + [len(d) for d in docs]).astype(np.int64), stats={},
                                   path="<memory>", cached=False)
    denoisers = [sc.Denoiser("R", 0.3, 2.0)]
    layout = sc.make_layout(denoisers, format="prefix_lm", inputs_length=24)
    sentinels = np.arange(96, 76, -1, dtype=np.int32)
    rows = sc.CorruptedRows(lm.PackedRows(corpus, layout.raw_lengths[0] - 1), denoisers[0], layout, seed=0, stream=0,
                            sentinel_ids=sentinels, mode_ids={}, eos_id=1)
    batch = {k: v[None] for k, v in rows[0].items()}
    loss_fn = jax.jit(pretrain_t5.prefix_lm_loss_fn(cfg))
    loss, sums = loss_fn(params, batch, jax.random.key(0))
    mask = batch["loss_mask"][0] > 0
    assert 0 < sums["count"] == mask.sum() < mask.size
    inside = ~mask & (batch["prefix_mask"][0] > 0)
    moved = dict(batch, targets=np.where(inside[None], 2, batch["targets"]))
    np.testing.assert_array_equal(loss_fn(params, moved, jax.random.key(0))[0], loss)
    k = int(np.flatnonzero(mask)[0])
    moved = dict(batch, targets=batch["targets"].copy())
    moved["targets"][0, k] = (moved["targets"][0, k] + 1) % cfg.vocab_size
    assert float(loss_fn(params, moved, jax.random.key(0))[0]) != float(loss)
