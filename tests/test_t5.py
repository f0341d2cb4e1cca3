"""T5 v1.1 against an independent float64 NumPy implementation, and its invariances."""

import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sharding
from jaxllm.config import ConfigError
from jaxllm.models import t5, t5_generate
from jaxllm.train import loop, pretrain_t5


def make_config(**overrides):
    c = t5.default_config()
    # Few buckets and a short max distance so short test sequences reach the log-spaced buckets.
    c.update(dict(vocab_size=97, embed_dim=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4, head_dim=8,
                  mlp_dim=48, relative_attention_num_buckets=8, relative_attention_max_distance=20))
    c.update(overrides)
    return t5.T5Config.from_config(c)


# Jitted once per config and shape: eager (op-by-op) Flax calls compile every op separately.
apply = jax.jit(t5.apply, static_argnums=0)
init = jax.jit(lambda cfg, key: nn.unbox(t5.init(cfg, key)), static_argnums=0)


def np_params(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(params))


# ---- float64 NumPy reference (from the paper and mesh-tensorflow's description, not the JAX code) --

def ref_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucket of one relative position (key - query), Python ints and float64 logs."""
    n, ret = -relative_position, 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


def ref_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_attention(xq, xkv, a, table, bidirectional, causal, cfg):
    """One sequence, explicit loops; `table` None for cross-attention (no position bias)."""
    q = np.einsum("le,ehd->lhd", xq, a["query"])
    k = np.einsum("le,ehd->lhd", xkv, a["key"])
    v = np.einsum("le,ehd->lhd", xkv, a["value"])
    out = np.zeros_like(q)
    for h in range(cfg.num_heads):
        for i in range(len(xq)):
            keys = range(i + 1) if causal else range(len(xkv))
            scores = np.array([q[i, h] @ k[j, h] + (0.0 if table is None else table[ref_bucket(
                j - i, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance), h])
                for j in keys])
            w = np.exp(scores - scores.max())
            out[i, h] = sum(wj * v[j, h] for wj, j in zip(w / w.sum(), keys))
    return np.einsum("lhd,hde->le", out, a["out"])


def ref_mlp(x, m):
    return (ref_gelu_tanh(x @ m["wi_0"]) * (x @ m["wi_1"])) @ m["wo"]


def ref_forward(cfg, p, enc_tokens, dec_tokens):
    """Decoder logits `[dec_len, vocab]` of one unpacked example."""
    e, eps = p["encoder"], cfg.norm_eps
    x = p["token_embedder"][enc_tokens]
    for i in range(cfg.num_encoder_layers):
        lp = e[f"layers_{i}"]
        h = ref_rmsnorm(x, lp["pre_attention_layer_norm"]["scale"], eps)
        x = x + ref_attention(h, h, lp["attention"], e["relpos_bias"]["rel_embedding"], True, False, cfg)
        x = x + ref_mlp(ref_rmsnorm(x, lp["pre_mlp_layer_norm"]["scale"], eps), lp["mlp"])
    encoded = ref_rmsnorm(x, e["encoder_norm"]["scale"], eps)
    d = p["decoder"]
    y = p["token_embedder"][dec_tokens]
    for i in range(cfg.num_decoder_layers):
        lp = d[f"layers_{i}"]
        h = ref_rmsnorm(y, lp["pre_self_attention_layer_norm"]["scale"], eps)
        y = y + ref_attention(h, h, lp["self_attention"], d["relpos_bias"]["rel_embedding"], False, True, cfg)
        h = ref_rmsnorm(y, lp["pre_cross_attention_layer_norm"]["scale"], eps)
        y = y + ref_attention(h, encoded, lp["encoder_decoder_attention"], None, False, False, cfg)
        y = y + ref_mlp(ref_rmsnorm(y, lp["pre_mlp_layer_norm"]["scale"], eps), lp["mlp"])
    y = ref_rmsnorm(y, d["decoder_norm"]["scale"], eps)
    if cfg.tie_embeddings:
        return (y / np.sqrt(cfg.embed_dim)) @ p["token_embedder"].T
    return y @ d["logits_dense"]


# ---- Batches -----------------------------------------------------------------------------------

def pack(examples, enc_len, dec_len):
    """Packs `(encoder_tokens, decoder_targets)` lists per row like packing.pack_t5."""
    rows = []
    for row in examples:
        b = {k: np.zeros(enc_len if k.startswith("encoder") else dec_len, np.int32) for k in t5.BATCH_KEYS}
        e = d = 0
        for s, (enc, tgt) in enumerate(row, start=1):
            b["encoder_input_tokens"][e:e + len(enc)], b["encoder_segment_ids"][e:e + len(enc)] = enc, s
            b["encoder_positions"][e:e + len(enc)] = np.arange(len(enc))
            b["decoder_target_tokens"][d:d + len(tgt)], b["decoder_segment_ids"][d:d + len(tgt)] = tgt, s
            b["decoder_input_tokens"][d:d + len(tgt)] = [0, *tgt[:-1]]
            b["decoder_positions"][d:d + len(tgt)] = np.arange(len(tgt))
            e, d = e + len(enc), d + len(tgt)
        rows.append(b)
    batch = {k: np.stack([r[k] for r in rows]) for k in t5.BATCH_KEYS}
    batch["decoder_loss_mask"] = (batch["decoder_segment_ids"] > 0).astype(np.float32)
    return batch


def random_examples(rng, lengths, vocab):
    return [[(rng.integers(1, vocab, e).tolist(), rng.integers(1, vocab, d).tolist()) for e, d in row]
            for row in lengths]


LENGTHS = [[(5, 4), (7, 3)], [(11, 6)]]  # row 0 packs two examples; both rows have padding


SMALL = dict(tie_embeddings=True, num_encoder_layers=1, num_decoder_layers=1)  # cheaper to compile


@pytest.mark.parametrize("overrides", [{}, SMALL])
def test_forward_matches_float64_reference_per_packed_segment(overrides):
    cfg = make_config(**overrides)
    params = init(cfg, jax.random.key(1))
    examples = random_examples(np.random.default_rng(0), LENGTHS, cfg.vocab_size)
    batch = pack(examples, enc_len=14, dec_len=9)
    logits = np.asarray(apply(cfg, params, batch))
    p = np_params(params)
    for r, row in enumerate(examples):
        offset = 0
        for enc, tgt in row:
            want = ref_forward(cfg, p, np.array(enc), np.array([0, *tgt[:-1]]))
            np.testing.assert_allclose(logits[r, offset:offset + len(tgt)], want, rtol=2e-5, atol=2e-5)
            offset += len(tgt)
    assert np.isfinite(logits).all()  # padding rows too


def test_relative_position_buckets_match_t5s_function():
    rel = np.arange(-300, 301)
    for nb, md in [(32, 128), (8, 20), (64, 256)]:
        for bidirectional in (True, False):
            got = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                                         num_buckets=nb, max_distance=md))
            want = [ref_bucket(int(r), bidirectional, nb, md) for r in rel]
            np.testing.assert_array_equal(got, want)
    # Hand-checked values of T5's default (32 buckets, 128): 16 per direction, 8 exact.
    b = lambda r, bi: int(t5.relative_position_bucket(jnp.array(r), bidirectional=bi))
    assert [b(-7, True), b(-8, True), b(-16, True), b(-200, True), b(3, True)] == [7, 8, 10, 15, 19]
    assert [b(-15, False), b(-16, False), b(-31, False), b(-128, False), b(5, False)] == [15, 16, 21, 31, 0]


def test_packed_and_unpacked_give_identical_logits():
    cfg = make_config()
    params = init(cfg, jax.random.key(1))
    examples = random_examples(np.random.default_rng(1), [[(5, 4), (7, 3), (2, 2)]], cfg.vocab_size)[0]
    packed = np.asarray(apply(cfg, params, pack([examples, [], []], 16, 10)))[0]  # same shapes: one compile
    alone = np.asarray(apply(cfg, params, pack([[ex] for ex in examples], 16, 10)))
    offset = 0
    for k, (_, tgt) in enumerate(examples):
        np.testing.assert_allclose(packed[offset:offset + len(tgt)], alone[k, :len(tgt)], rtol=1e-5, atol=1e-5)
        offset += len(tgt)


@jax.jit
def _encode_and_cache(params, batch):
    cfg = make_config()
    encoded = t5.encode(cfg, params, batch["encoder_input_tokens"], batch["encoder_segment_ids"],
                        batch["encoder_positions"])
    return t5.init_cache(cfg, params, encoded, batch["encoder_segment_ids"], max_len=9)


def test_cached_decoding_equals_full_decoder():
    cfg = make_config()
    params = init(cfg, jax.random.key(1))
    batch = pack(random_examples(np.random.default_rng(2), LENGTHS, cfg.vocab_size), 14, 9)
    want = np.asarray(apply(cfg, params, batch))
    cache = _encode_and_cache(params, batch)
    step = jax.jit(lambda p, t, pos, seg, c: t5.decode_step(cfg, p, t, pos, seg, c))
    got, start = [], 0
    for n in [4, 1, 4]:  # a prefill chunk, a one-token step, another chunk
        sl = slice(start, start + n)
        logits, cache = step(params, batch["decoder_input_tokens"][:, sl], batch["decoder_positions"][:, sl],
                             batch["decoder_segment_ids"][:, sl], cache)
        got.append(np.asarray(logits))
        start += n
    assert int(cache["index"]) == 9
    real = batch["decoder_segment_ids"] > 0
    np.testing.assert_allclose(np.concatenate(got, axis=1)[real], want[real], rtol=1e-5, atol=1e-5)


def test_generate_is_greedy_under_the_full_forward():
    cfg = make_config()
    params = init(cfg, jax.random.key(1))
    inputs = [[5, 6, 7, 8, 9, 3], [11, 12, 3]]
    outs = t5_generate.generate(cfg, params, inputs, 6, eos_id=-1)
    assert [len(o) for o in outs] == [6, 6]
    batch = pack([[(x, o)] for x, o in zip(inputs, outs)], 14, 9)
    logits = np.asarray(apply(cfg, params, batch))
    np.testing.assert_array_equal(logits.argmax(-1)[:, :6], np.array(outs))
    stop = outs[0][2]
    cut = t5_generate.generate(cfg, params, inputs[:1], 6, eos_id=stop)[0]
    assert cut == outs[0][: outs[0].index(stop) + 1]


def test_dropout_only_with_an_rng():
    cfg = make_config(dropout_rate=0.3, **SMALL)
    params = init(make_config(**SMALL), jax.random.key(1))  # dropout adds no parameters
    batch = pack(random_examples(np.random.default_rng(3), LENGTHS, cfg.vocab_size), 14, 9)
    base = np.asarray(apply(make_config(**SMALL), params, batch))
    np.testing.assert_array_equal(np.asarray(apply(cfg, params, batch)), base)  # no rng: deterministic
    a = np.asarray(apply(cfg, params, batch, rng=jax.random.key(0)))
    b = np.asarray(apply(cfg, params, batch, rng=jax.random.key(0)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - base).max() > 1e-2


def test_parameter_counts_of_the_t5_v1_1_checkpoints():
    # Hugging Face `num_parameters()` of google/t5-v1_1-{small,base,large}.
    published = {"t5_v1_1_small": 76_961_152, "t5_v1_1_base": 247_577_856, "t5_v1_1_large": 783_150_080}
    for name, count in published.items():
        c = t5.default_config()
        c.update(t5.PRESETS[name])
        assert t5.count_params(t5.T5Config.from_config(c)) == count
    cfg = make_config()
    assert t5.count_params(cfg) == sum(x.size for x in jax.tree.leaves(jax.eval_shape(init, cfg, jax.random.key(0))))


@pytest.mark.parametrize("key, value, message", [
    ("vocab_size", 0, "model.vocab_size"), ("num_heads", 0, "model.num_heads"),
    ("relative_attention_num_buckets", 7, "relative_attention_num_buckets"),
    ("relative_attention_max_distance", 4, "relative_attention_max_distance"),
    ("dropout_rate", 1.0, "model.dropout_rate"), ("dtype", "float64", "model.dtype"),
    ("family", "llama", "model.family"),
])
def test_bad_model_config_names_the_key(key, value, message):
    c = t5.default_config()
    c.update(vocab_size=97)
    c[key] = value
    with pytest.raises(ConfigError, match=message):
        t5.T5Config.from_config(c)


# ---- Sharding ----------------------------------------------------------------------------------

def mesh_config(mesh_shape):
    c = pretrain_t5.default_config()
    # 8 heads (and mlp, vocab) divide the 8 tensor shards; one layer per stack keeps compiles short.
    c.model.update(vocab_size=256, embed_dim=64, num_heads=8, head_dim=8, mlp_dim=128, num_encoder_layers=1,
                   num_decoder_layers=1)
    c.mesh.shape = mesh_shape
    c.train.update(steps=3, batch_size=8)
    c.optimizer.update(lr=1e-2, warmup_steps=1, eps=1e-3)  # see tests/test_sharding.py on eps
    return c


def train(config, params, batches, devices):
    """Three train steps from `params` on a mesh over `devices`: (initial logits of the first batch,
    losses, final state)."""
    model = t5.T5Config.from_config(config.model)
    stage = loop.Stage(name="pretrain", init_params=lambda rng: t5.init(model, rng),
                       loss_fn=pretrain_t5.t5_loss_fn(model), train_data=None)
    mesh = sharding.make_mesh(config.mesh, devices)
    compiled = loop.compile_stage(config, stage, mesh)
    losses = []
    with sharding.activate(mesh, config.mesh.rules):
        state = compiled.state_from_params(params)  # one host init shared by all meshes
        logits = np.asarray(jax.jit(lambda p, b: t5.apply(model, p, b))(
            state.params, sharding.global_batch(batches[0], mesh, config.mesh.rules)))
        for batch in batches:
            state, metrics = compiled.train_step(state, sharding.global_batch(batch, mesh, config.mesh.rules))
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return logits, losses, state


@pytest.fixture(scope="module")
def single_device_run():
    rng = np.random.default_rng(4)
    batches = [pack(random_examples(rng, [[(9, 4), (6, 3)], [(16, 8)]] * 4, 256), 16, 8) for _ in range(3)]
    config = mesh_config((1, 1, 1))
    params = jax.device_get(init(t5.T5Config.from_config(config.model), jax.random.key(0)))
    return params, batches, train(config, params, batches, jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_mesh_does_not_change_logits_or_training(mesh_shape, single_device_run):
    params, batches, (want_logits, want_losses, want_state) = single_device_run
    logits, losses, state = train(mesh_config(mesh_shape), params, batches, jax.devices())
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 state.params, want_state.params)
    if mesh_shape == (1, 1, 8):  # heads, mlp and vocab really split over 'tensor'
        layer = state.params["encoder"]["layers_0"]
        assert layer["attention"]["query"].addressable_shards[0].data.shape == (64, 1, 8)
        assert layer["mlp"]["wi_0"].addressable_shards[0].data.shape == (64, 16)


# ---- Samples and the command line --------------------------------------------------------------

@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    from jaxllm.data import tokenizer

    config = tokenizer.default_config()
    config.update(model_type="char", byte_fallback=False, vocab_size=256, num_sentinels=100)
    text = ["the quick brown fox jumps over a lazy dog. THE END\n" * 3]
    return tokenizer.train_tokenizer(config, text, tmp_path_factory.mktemp("tok") / "char.model")


def filler_config(denoisers=""):
    c = pretrain_t5.default_config()
    c.data.update(inputs_length=64, denoisers=denoisers)
    return c


def test_sentinel_filler_corrupts_and_renders_text(char_tok):
    text = "the quick brown fox jumps over a lazy dog"
    for denoisers in ("", "X(4,0.5) S(0.25)"):
        filler = pretrain_t5.SentinelFiller(filler_config(denoisers), char_tok)
        inputs, targets = filler.from_text(text, np.random.default_rng(0))
        if denoisers:  # the first span denoiser, with its [NLG] mode token (<extra_id_98>)
            assert filler.denoiser.kind == "X" and inputs[0] == char_tok.sentinel_id(98)
        rendered = filler.render(inputs, targets)
        assert rendered.replace("[[", "").replace("]]", "") == text
        fills = filler.fills(inputs, targets)
        assert [piece for piece, _ in fills] == [f"<extra_id_{k}>" for k in range(len(fills))] and fills
        assert re.findall(r"\[\[(.*?)\]\]", rendered, re.S) == [fill for _, fill in fills]
    # Text that already holds sentinels is filled as written (+ eos); a generated span fills it.
    filler = pretrain_t5.SentinelFiller(filler_config(), char_tok)
    inputs, targets = filler.from_text("the <extra_id_0> fox", np.random.default_rng(0))
    assert targets is None
    assert inputs.tolist() == char_tok.encode("the <extra_id_0> fox") + [char_tok.eos_id]
    generated = [char_tok.sentinel_id(0)] + char_tok.encode("quick") + [char_tok.eos_id]
    assert filler.render(inputs, generated) == "the [[quick]] fox"
    assert filler.fills(inputs, generated) == [("<extra_id_0>", "quick")]
    with pytest.raises(ConfigError, match="at least 2"):
        filler.from_text("t", np.random.default_rng(0))


def test_family_and_format_must_match():
    c = pretrain_t5.default_config()
    c.model.vocab_size = 128
    c.data.format = "prefix_lm"
    with pytest.raises(ConfigError, match="data.format"):
        pretrain_t5.build_model(c)
    llama_run = pretrain_t5.default_config("llama")
    assert llama_run.data.format == "prefix_lm" and pretrain_t5.handles(llama_run)
    from jaxllm.train import pretrain

    assert pretrain_t5.handles(c) and not pretrain_t5.handles(pretrain.default_config())


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["t5", "prefix_lm"])
def test_pretrain_and_sample_commands(arg, tmp_path):
    # `jaxllm pretrain` routes span-corruption configs to pretrain_t5; `jaxllm sample` fills sentinels.
    from test_cli import describe, jaxllm, read_rows, subprocess_env, write_corpus

    env = subprocess_env(tmp_path / "jax_cache")
    corpus, run_dir = write_corpus(tmp_path / "corpus"), tmp_path / "run"
    config = f"{pathlib.Path(__file__).parent / 'configs' / 'small_t5.py'}:{arg}"
    proc = jaxllm(env, "pretrain", "--config", config, f"--config.data_root={corpus}",
                  f"--config.run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    evals = [r["eval/loss"] for r in read_rows(run_dir / "pretrain" / "metrics.jsonl") if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    samples = read_rows(run_dir / "pretrain" / "samples.jsonl")
    assert samples and "[[" in samples[0]["text"] and "||| truth:" in samples[0]["text"]
    prompts = ["the quick <extra_id_0> fox jumps over <extra_id_1> dog", "seven wizards quietly judge boxing matches"]
    proc = jaxllm(env, "sample", "--run", run_dir, "--prompt", prompts[0], "--prompt", prompts[1],
                  "--max_new_tokens", "12", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    blocks = proc.stdout.split("--- prompt: ")[1:]
    assert [b.partition("\n")[0] for b in blocks] == [repr(p) for p in prompts]
    lines = blocks[0].splitlines()
    assert lines[1] == f"input:  {prompts[0]}"
    assert lines[2].startswith("<extra_id_0> -> ") and lines[3].startswith("<extra_id_1> -> ")
    assert lines[4].startswith("filled: the quick [[") and "truth:" not in blocks[0]
    truth = [line for line in blocks[1].splitlines() if line.startswith("truth:  ")]
    assert len(truth) == 1 and truth[0][8:].replace("[[", "").replace("]]", "") == prompts[1]


@pytest.mark.slow
def test_bad_span_settings_fail_with_one_clear_line(tmp_path):
    from test_cli import EXIT_USAGE, describe, jaxllm, subprocess_env, write_corpus

    env = subprocess_env(tmp_path / "jax_cache")
    corpus = write_corpus(tmp_path / "corpus")
    config = str(pathlib.Path(__file__).parent / "configs" / "small_t5.py")
    for override, message in [("--config.data.noise_density=1.5", "data.noise_density=1.5 must be in (0, 1)"),
                              ("--config.tokenizer.num_sentinels=1", "tokenizer.num_sentinels")]:
        proc = jaxllm(env, "pretrain", "--config", config, f"--config.data_root={corpus}",
                      f"--config.run_dir={tmp_path / override[-4:]}", override, cwd=tmp_path)
        assert proc.returncode == EXIT_USAGE, describe(proc)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxllm pretrain: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, describe(proc)
