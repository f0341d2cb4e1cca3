"""Chunked LM log-probs (`objectives.chunked_token_logprobs`, `model.loss_chunk_size`): the same
values and gradients as the whole logits, a float64 reference, and less compiled memory."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxllm import objectives
from jaxllm import scoring
from jaxllm.config import ConfigError
from jaxllm.models import llama
from jaxllm.train import dpo
from jaxllm.train import pretrain
from jaxllm.train import pretrain_t5

LENGTH = 10
CHUNKS = (1, 3, 4, 10, 16)  # dividing the length, not dividing it, one chunk, longer than it


try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_model import make_config
except ImportError:
    from test_model import make_config


def make_batch(batch=3, length=LENGTH, vocab=97, seed=0):
    """Two packed documents in row 0, padding at the end of row 1, and a ragged loss mask."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[0, 6:] = 2
    segment_ids[1, 7:] = 0
    positions = np.zeros_like(inputs)
    for b in range(batch):
        for s in np.unique(segment_ids[b]):
            where = segment_ids[b] == s
            positions[b, where] = np.arange(where.sum())
    loss_mask = ((rng.random((batch, length)) > 0.3) & (segment_ids > 0)).astype(np.float32)
    loss_mask[2] = 0.0
    loss_mask[2, 4] = 1.0  # one real target in the row
    targets = np.roll(inputs, -1, axis=1)
    return {k: jnp.asarray(v) for k, v in dict(inputs=inputs, positions=positions, segment_ids=segment_ids,
                                                targets=targets, loss_mask=loss_mask).items()}


def params_of(cfg, seed=0):
    params = nn.unbox(llama.init(cfg, jax.random.key(seed)))
    # Larger head weights than init's 0.02 so the log-softmax is far from uniform (a wrong target
    # or a shifted chunk changes the values by much more than the tolerance).
    key = "embed_tokens" if cfg.tie_embeddings else "lm_head"
    return {**params, key: params[key] * 10.0}


def with_hits(cfg, params, batch):
    """`batch` with every third target set to the model's argmax, so the accuracy counts are not 0."""
    logits = llama.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    hit = (jnp.arange(batch["targets"].shape[1]) % 3 == 0)[None]
    return {**batch, "targets": jnp.where(hit, jnp.argmax(logits, axis=-1), batch["targets"]).astype(jnp.int32)}


def logprobs(cfg, params, batch, chunk_size):
    cfg = dataclasses.replace(cfg, loss_chunk_size=chunk_size)
    return scoring.target_logprobs(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                   batch["targets"])


def np_log_softmax_at(hidden, head, targets):
    """float64 `log softmax(hidden @ head)[targets]` and argmax hits, written independently."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return picked - log_z, logits.argmax(axis=-1) == np.asarray(targets)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_logprobs_equal_unchunked_and_float64_reference(tie):
    cfg = make_config(tie_embeddings=tie)
    params = params_of(cfg)
    batch = with_hits(cfg, params, make_batch())
    full, full_correct = jax.jit(lambda p: logprobs(cfg, p, batch, 0))(params)
    hidden, head = llama.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                               return_hidden=True)
    # return_hidden is the same forward pass: its product is apply's logits.
    np.testing.assert_array_equal(
        (hidden @ head).astype(jnp.float32),
        llama.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"]))
    want, want_correct = np_log_softmax_at(hidden, head, batch["targets"])
    assert want.min() < -3.0 and want_correct.sum() >= 8  # far from uniform, some hits: a mix-up shows
    # float32 log-softmax over 97 logits of size ~10: rounding ~1e-6 of the float64 value.
    np.testing.assert_allclose(full, want, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(full_correct, want_correct)
    for chunk_size in CHUNKS:
        got, correct = jax.jit(lambda p: logprobs(cfg, p, batch, chunk_size))(params)
        assert got.shape == (3, LENGTH) and got.dtype == jnp.float32 and correct.dtype == jnp.bool_
        # The same float32 ops on the same rows of logits: equal up to the matmul's reassociation.
        np.testing.assert_allclose(got, full, rtol=0, atol=1e-6, err_msg=f"chunk_size={chunk_size}")
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"chunk_size={chunk_size}")
        np.testing.assert_array_equal(correct, full_correct)


def test_chunked_logprobs_in_bfloat16_compute_match_the_model_head():
    """In bfloat16 compute, the chunks' logits are llama's head expression on the same bfloat16
    hidden states: a 2-D matmul over flattened tokens, then a float32 cast (XLA's CPU compiler folds
    that cast into the dot; a 3-D `[batch, chunk, embed]` dot instead rounds the logits to bfloat16
    first, 4e-3 off here). Compared on the same hidden states, because XLA rounds the bfloat16
    backbone differently in different programs (~4e-3 between two jitted models)."""
    cfg = make_config(dtype="bfloat16")
    params, batch = params_of(cfg), make_batch()
    hidden, head = llama.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                               return_hidden=True)
    assert hidden.dtype == head.dtype == jnp.bfloat16
    targets = batch["targets"]

    def model_head(h, w):  # llama.Decoder._head: `x @ head` on [batch * length, embed], then float32
        return (h.reshape(-1, cfg.embed_dim) @ w).astype(jnp.float32).reshape(*targets.shape, -1)

    want = jax.jit(lambda h, w: objectives.token_logprobs(model_head(h, w), targets))(hidden, head)
    for chunk_size in (3, 16):
        got, _ = jax.jit(lambda h, w: objectives.chunked_token_logprobs(h, w, targets, chunk_size=chunk_size))(
            hidden, head)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_gradient_equals_unchunked(tie):
    cfg = make_config(tie_embeddings=tie)
    params = params_of(cfg)
    batch = with_hits(cfg, params, make_batch())

    def loss(p, chunk_size):
        lp, correct = logprobs(cfg, p, batch, chunk_size)
        loss_sum, sums = objectives.lm_loss_from_logprobs(lp, correct, batch["loss_mask"])
        return loss_sum / sums["num_tokens"], sums

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (want, want_sums), want_grads = grad(params, 0)
    for chunk_size in (3, 16):  # several padded chunks; one chunk longer than the row
        (got, sums), grads = grad(params, chunk_size)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert float(sums["correct"]) == float(want_sums["correct"]) > 0
        # The chunked backward sums the head gradient over chunks instead of in one matmul over all
        # positions: float32 reassociation, ~1e-7 relative per term, over <= 30 tokens. The entries
        # are O(1e-2..1), so 1e-5 relative with a 1e-7 floor would miss no real error (a dropped or
        # shifted chunk changes the gradient by O(1)).
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
            name = f"{jax.tree_util.keystr(path)} chunk_size={chunk_size}"
            assert np.abs(np.asarray(w)).max() > 0, name  # every parameter gets a gradient
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=name)


def test_chunked_loss_compiles_to_less_memory_than_one_logits_array():
    """loss+grad of a 32768-vocab model at 2 x 256 tokens: the unchunked program keeps the float32
    logits (and their gradient) alive, the chunked one only a chunk's (`memory_analysis` of XLA)."""
    cfg = make_config(vocab_size=32768, embed_dim=64, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=128)
    params = jax.eval_shape(lambda: nn.unbox(llama.init(cfg, jax.random.key(0))))
    batch, length = 2, 256
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    loss_fn = pretrain.lm_loss_fn

    def temp_bytes(chunk_size):
        fn = loss_fn(dataclasses.replace(cfg, loss_chunk_size=chunk_size))
        step = jax.jit(jax.grad(lambda p, b: fn(p, b, None)[0]))
        b = dict(inputs=ids, positions=ids, segment_ids=ids, targets=ids,
                 loss_mask=jax.ShapeDtypeStruct((batch, length), jnp.float32))
        return step.lower(params, b).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = batch * length * cfg.vocab_size * 4
    unchunked, chunked = temp_bytes(0), temp_bytes(16)
    assert unchunked > logits_bytes, (unchunked, logits_bytes)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)


def test_stage_losses_equal_with_and_without_chunks():
    """pretrain/SFT (`pretrain.lm_loss_fn`), the prefix LM and DPO (plain and packed rows)."""
    cfg = make_config()
    params = params_of(cfg)
    batch = with_hits(cfg, params, make_batch(batch=4))
    chunked = dataclasses.replace(cfg, loss_chunk_size=3)

    want_sum, want = pretrain.lm_loss_fn(cfg)(params, batch, None)
    got_sum, got = pretrain.lm_loss_fn(chunked)(params, batch, None)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
    assert got == {k: pytest.approx(float(v)) for k, v in want.items()} and float(want["count"]) > 10 and float(want["correct"]) > 0

    prefix = {**batch, "prefix_mask": (batch["positions"] < 3).astype(jnp.int32)}
    want_sum, _ = pretrain_t5.prefix_lm_loss_fn(cfg)(params, prefix, None)
    got_sum, _ = pretrain_t5.prefix_lm_loss_fn(chunked)(params, prefix, None)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)

    # DPO: rows [b=2, K=2, L]; plain groups [2, 2], packed rows with S=2 segments [2, 2, 2].
    pairs = {k: v.reshape(2, 2, LENGTH) for k, v in batch.items()}
    plain = {**pairs, "response_mask": jnp.ones((2, 2)), "ref_logps": jnp.full((2, 2), -20.0)}
    packed = {**pairs, "response_mask": jnp.ones((2, 2, 2)), "ref_logps": jnp.full((2, 2, 2), -10.0)}
    dpo_config = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0))
    for group_batch in (plain, packed):
        want_logps = dpo.group_logps(cfg, params, group_batch)
        np.testing.assert_allclose(dpo.group_logps(chunked, params, group_batch), want_logps, rtol=1e-6)
        assert np.ptp(np.asarray(want_logps)) > 1.0  # distinct per group
        want_sum, want = dpo.dpo_loss_fn(cfg, dpo_config)(params, group_batch, None)
        got_sum, got = dpo.dpo_loss_fn(chunked, dpo_config)(params, group_batch, None)
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_chunked_training_on_a_mesh_equals_unchunked_on_one_device():
    """Two train steps (loss, then loss after a gradient step) with the vocabulary sharded over
    'tensor' and the batch over 'fsdp', chunks of 5 of 16 positions, against the unchunked loss on
    one device (the tolerance of test_sharding's mesh invariance)."""
    from tests.test_sharding import small_config, synthetic_batches, train

    batches = synthetic_batches(2, 8)
    want, _ = train(small_config((1, 1, 1)), batches, jax.devices()[:1])
    config = small_config((1, 2, 4))
    config.model.loss_chunk_size = 5
    got, _ = train(config, batches, jax.devices())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[1] < got[0]  # the step moved the params, so the second loss checks the gradient


def test_bad_chunk_sizes_and_heads_raise():
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        objectives.chunked_token_logprobs(jnp.zeros((1, 4, 8)), jnp.zeros((8, 16)), jnp.zeros((1, 4), jnp.int32),
                                          chunk_size=0)
    with pytest.raises(ConfigError, match="model.loss_chunk_size=-1"):
        make_config(loss_chunk_size=-1)
    cfg = make_config()
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="return_hidden needs the LM head"):
        llama.apply(cfg, nn.unbox(llama.init(cfg, jax.random.key(0), head="scalar")), ids, ids, ids + 1,
                    head="scalar", return_hidden=True)
