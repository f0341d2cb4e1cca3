"""Decoding from a decoder-only model with a KV cache: greedy, temperature, top-k, top-p, beam search.

Layout. Prompts of different lengths are **left-padded** to one length `P` (`left_pad`): row `b`'s
real tokens fill slots `P - len_b .. P - 1`, so every row's last prompt token is in the last
column, all rows decode at the same cache index, and new token `t` of every row goes to slot
`P + t`. Padding slots have segment 0 and position 0; real tokens have segment 1 and positions
`0, 1, ...` from each row's first real token, so masks come from segment ids and lengths, never
from comparing token ids with the pad id (`jaxllm.models.llama.init_cache` describes the cache).

Programs. `sample` runs one jitted program: a prefill of the prompts into the cache, then a
`lax.while_loop` of one-token decode steps that stops when every row has emitted a stop id or
after `max_new_tokens`. Temperature, top-k and top-p are static (one compilation per setting);
stop ids are data.

Log-probabilities. `SampleOutput.logprobs[b, t]` is the log-probability of the sampled token under
the temperature-scaled, **unfiltered** policy, `log_softmax(logits / temperature)[token]`: the
`pi(token | context)` PPO needs, whatever top-k/top-p did to choose the token. Greedy decoding
(`temperature=0`) reports `log_softmax(logits)[token]` (temperature 1).

Context limit. Positions at or beyond the training length were never trained. With `max_context`
set (the training `seq_len`), the cache holds `max_context` slots; while the `P + max_new_tokens -
1` fed tokens fit, decoding is exact. Past that, whenever the cache is full, the latest
`max_context // 2` slots of each row are re-encoded from position 0 into an empty cache (one
prefill) and decoding continues. The model thus sees at most `max_context` tokens, all at trained
positions, and after a re-encode at least the latest `max_context // 2` (fewer only for a row
that has fewer), at the cost of one prefill per `max_context - max_context // 2` steps instead of
a full forward per step. Slots count padding: a short row of a left-padded batch sees fewer real
tokens before the first re-encode. A prompt longer than `max_context` keeps its latest
`max_context` slots. (`beam_search` instead left-truncates prompts so that prompt and generation
fit, and rejects `max_new_tokens > max_context`.)

Prefix LMs. With `prefix_lm=True` (`sample`, `generate`) the prompt is a prefix-LM prefix
(Raffel et al. 2020, section 3.2.1; UL2's decoder-only models): the prefill attends
bidirectionally over each row's real prompt tokens (`llama.decode(..., prefix_mask=...)`), the
new tokens causally, exactly as `jaxllm.train.pretrain_t5.prefix_lm_loss_fn` trained them. A
re-encode would turn generated tokens into prefix, so prompt and generation must fit
`max_context`.

Beam search (`beam_search`) uses the same layout and cache, with `batch * beams` cache rows
reordered after each step; see its docstring for the GNMT length penalty.

Sharding. Under `jaxllm.sharding.activate(mesh, rules)` with params sharded on `mesh`, the cache
and activations carry logical-axis constraints (batch over ('data', 'fsdp'), kv heads over
'tensor'); `sample` pads the batch with copies of its last row to a multiple of the batch shards.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding
from jaxllm.models import llama


class SampleOutput(NamedTuple):
    """What `sample` returns.

    Attributes:
      tokens: `[batch, max_new_tokens]` int32 generated ids; a stop id is included, slots after it
        hold `pad_id`.
      logprobs: `[batch, max_new_tokens]` float32 `log_softmax(logits / temperature)[token]` of each
        generated token (unfiltered, see the module docstring); 0 after a row stopped.
      lengths: `[batch]` int32 generated tokens per row, including the stop id.
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


# ---- Choosing a token ----------------------------------------------------------------------------

def top_k_logits(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the `k` largest logits of the last axis, sets the rest to -inf (Fan et al. 2018).

    Ties with the `k`-th largest value are all kept (as in Hugging Face's `TopKLogitsWarper`), so
    more than `k` tokens may survive; `k >= vocab` changes nothing. Static `k >= 1`.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_logits(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020, sec. 3.1, eq. 2): keeps the smallest top set of mass >= p.

    Token `i` is kept iff the probability mass of the tokens strictly more probable than `i` is
    below `p`, i.e. `sum_{j: p_j > p_i} p_j < p` with `p = softmax(logits)`: the nucleus `V^(p)`
    of the paper, with every token tied at its boundary kept (the set does not depend on how a
    sort orders ties). The most probable token always survives (its mass above is 0 < p).

    Args:
      logits: `[..., vocab]`; -inf entries (e.g. from `top_k_logits`) have probability 0.
      p: static, `0 < p <= 1`.

    Returns:
      `logits` with the tokens outside the nucleus set to -inf.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass; 0 at rank 0
    num_kept = jnp.sum(mass_above < p, axis=-1, keepdims=True)  # >= 1
    cutoff = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_logits(rng: jax.Array, logits: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from `logits` `[batch, vocab]`.

    `temperature == 0` takes the argmax (top-k/top-p cannot change it). Otherwise the token is
    drawn from `softmax(top_p(top_k(logits / temperature)))`, filters applied in that order (the
    nucleus is taken within the top k, renormalised, as in Hugging Face).

    Returns:
      `(tokens, logprobs)`: int32 `[batch]` and float32 `[batch]`, the log-probability of each
      token under the unfiltered policy `log_softmax(logits / temperature)` (temperature 1 when
      greedy).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        policy = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        policy = jax.nn.log_softmax(scaled, axis=-1)
        if top_k:
            scaled = top_k_logits(scaled, top_k)
        if top_p < 1.0:
            scaled = top_p_logits(scaled, top_p)
        tokens = jax.random.categorical(rng, scaled, axis=-1)
    logprobs = jnp.take_along_axis(policy, tokens[..., None], axis=-1)[..., 0]
    return tokens.astype(jnp.int32), logprobs


# ---- Prompt layout -------------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads `prompts` into int32 `tokens` `[batch, length]` and `lengths` `[batch]`.

    `length` defaults to the longest prompt. The pad id only fills slots; it is never compared.

    Raises:
      ValueError: on no prompts, an empty prompt, or a prompt longer than `length`.
    """
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    longest = max(len(p) for p in prompts)
    length = length or longest
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def prompt_window(seq: jax.Array, end: jax.Array | int, size: int, first_real: jax.Array):
    """Slots `end - size .. end - 1` of left-padded rows, laid out for a fresh cache.

    Args:
      seq: `[batch, slots]` int32 tokens, row `b` real from slot `first_real[b]` on.
      end: slot after the window (scalar).
      size: static window length.
      first_real: `[batch]` int32 first real slot of each row.

    Returns:
      `(inputs, positions, segment_ids, next_positions)`: the first three `[batch, size]` int32
      (positions restart at 0 at the first real token inside the window; padding has segment 0),
      and `[batch]` the position the token at slot `end` will have.
    """
    start = end - size
    inputs = jax.lax.dynamic_slice_in_dim(seq, start, size, axis=1)
    slots = start + jnp.arange(size, dtype=jnp.int32)
    real_start = jnp.maximum(first_real, start)[:, None]
    segment_ids = (slots[None, :] >= real_start).astype(jnp.int32)
    positions = jnp.where(segment_ids > 0, slots[None, :] - real_start, 0)
    return inputs, positions, segment_ids, end - real_start[:, 0]


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    """`x` with its last row repeated until the leading axis is a multiple of `multiple`."""
    extra = -len(x) % multiple
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def stop_array(stop_ids: Sequence[int]) -> jax.Array:
    """Stop ids as int32 `[m]`, padded with -1 (never a token) to a multiple of 4 (>= 4).

    Passed as data, not baked into the program: changing the stop ids (or adding up to 4) does not
    recompile the sampler.
    """
    stops = [int(s) for s in stop_ids]
    return jnp.asarray(stops + [-1] * (max(4, -(-len(stops) // 4) * 4) - len(stops)), jnp.int32)


def check_prompts(model_config: llama.LlamaConfig, tokens, lengths, max_new_tokens: int, pad_id: int):
    """Host-side validation of a left-padded prompt batch; returns them as int32 NumPy arrays.

    Raises:
      ValueError: naming the argument that is malformed.
    """
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"prompt_tokens {tokens.shape} must be [batch, length] and prompt_lengths "
                         f"{lengths.shape} [batch]")
    if (lengths < 1).any() or (lengths > tokens.shape[1]).any():
        raise ValueError(f"prompt_lengths must be in [1, {tokens.shape[1]}], got {lengths.tolist()}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= model_config.vocab_size):
        raise ValueError(f"prompt ids must be in [0, {model_config.vocab_size}) (model.vocab_size)")
    if not 0 <= pad_id < model_config.vocab_size:
        raise ValueError(f"pad_id={pad_id} must be in [0, {model_config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    return tokens.astype(np.int32), lengths.astype(np.int32)


# ---- Sampling loop -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=(
    "model_config", "max_new_tokens", "cache_len", "temperature", "top_k", "top_p", "pad_id", "prefix_lm"))
def _sample(model_config, params, tokens, lengths, rng, stops, *, max_new_tokens, cache_len, temperature, top_k,
            top_p, pad_id, prefix_lm=False):
    cfg, n = model_config, max_new_tokens
    batch, prompt_len = tokens.shape
    first_real = prompt_len - lengths
    seq = jnp.concatenate([tokens, jnp.full((batch, n), pad_id, jnp.int32)], axis=1)

    def prefill(seq, end, size, prefix_lm=False):
        inputs, positions, segment_ids, next_positions = prompt_window(seq, end, size, first_real)
        cache = llama.init_cache(cfg, batch, cache_len)
        logits, cache = llama.decode(cfg, params, inputs, positions, segment_ids, cache, last_logits_only=True,
                                     prefix_mask=segment_ids if prefix_lm else None)
        return logits[:, 0], cache, next_positions

    def step(seq, slot, cache, positions):
        inputs = jax.lax.dynamic_slice_in_dim(seq, slot, 1, axis=1)
        logits, cache = llama.decode(cfg, params, inputs, positions[:, None], jnp.ones_like(inputs), cache,
                                     last_logits_only=True)
        return logits[:, 0], cache, positions + 1

    def emit(t, logits, seq, logprobs, num_new, done):
        token, logprob = sample_logits(jax.random.fold_in(rng, t), logits, temperature=temperature,
                                       top_k=top_k, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        seq = jax.lax.dynamic_update_slice(seq, token[:, None], (0, prompt_len + t))
        logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(done, 0.0, logprob)[:, None], (0, t))
        num_new = num_new + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
        return seq, logprobs, num_new, done

    def cond(carry):
        t, *_, done = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, cache, positions, seq, logprobs, num_new, done = carry
        slot = prompt_len + t - 1  # of the token fed now: the one sampled last
        if prompt_len + n - 1 > cache_len:  # static: generation outgrows the context window
            logits, cache, positions = jax.lax.cond(
                cache["index"] >= cache_len,
                lambda: prefill(seq, slot + 1, max(cache_len // 2, 1)),
                lambda: step(seq, slot, cache, positions))
        else:
            logits, cache, positions = step(seq, slot, cache, positions)
        return (t + 1, cache, positions, *emit(t, logits, seq, logprobs, num_new, done))

    logits, cache, positions = prefill(seq, prompt_len, min(prompt_len, cache_len), prefix_lm)
    zeros = jnp.zeros((batch,), jnp.int32)
    first = emit(0, logits, seq, jnp.zeros((batch, n), jnp.float32), zeros, zeros.astype(jnp.bool_))
    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, positions, *first))
    seq, logprobs, num_new = carry[3:6]
    return SampleOutput(seq[:, prompt_len:], logprobs, num_new)


def sample(
    model_config: llama.LlamaConfig,
    params,
    prompt_tokens,
    prompt_lengths,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    max_context: int = 0,
    pad_id: int = 0,
    prefix_lm: bool = False,
) -> SampleOutput:
    """Continues a batch of left-padded prompts with a KV cache (see the module docstring).

    Args:
      model_config: the decoder's config.
      params: its unboxed parameters (sharded or not).
      prompt_tokens: `[batch, prompt_len]` int left-padded prompts (`left_pad`).
      prompt_lengths: `[batch]` int real tokens per row, each in `[1, prompt_len]`.
      rng: a `jax.random` key; step `t` uses `fold_in(rng, t)`.
      max_new_tokens: tokens to generate per row at most.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: keep the `top_k` most likely tokens (0: all).
      top_p: nucleus mass, in `(0, 1]` (1: all).
      stop_ids: a row stops after emitting any of these (eos, end-of-turn, ...), included in its output.
      max_context: the training sequence length, the most tokens the model sees (0: no limit).
      pad_id: id written into padding and after a row stopped.
      prefix_lm: the prompts are prefix-LM prefixes, attended bidirectionally (module docstring).

    Returns:
      `SampleOutput` of NumPy-convertible `jax.Array`s (`[batch, max_new_tokens]`, `[batch]`).

    Raises:
      ValueError: on malformed prompts, a sampling parameter out of range, or a prefix LM whose
        prompt and generation do not fit `max_context`.
    """
    tokens, lengths = check_prompts(model_config, prompt_tokens, prompt_lengths, max_new_tokens, pad_id)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or max_context < 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_context >= 0; got "
                         f"{temperature}, {top_k}, {top_p}, {max_context}")
    batch, prompt_len = tokens.shape
    cache_len = prompt_len + max_new_tokens - 1  # the last token is sampled, never fed
    if max_context:
        if prefix_lm and cache_len > max_context:
            raise ValueError(f"prefix_lm: prompt ({prompt_len} slots) + max_new_tokens ({max_new_tokens}) - 1 "
                             f"exceeds max_context={max_context}; a prefix LM cannot re-encode its window")
        cache_len = min(cache_len, max_context)
    shards = sharding.batch_shards()
    out = _sample(model_config, params, jnp.asarray(pad_rows(tokens, shards)), jnp.asarray(pad_rows(lengths, shards)),
                  rng, stop_array(stop_ids), max_new_tokens=int(max_new_tokens), cache_len=cache_len,
                  temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), pad_id=int(pad_id),
                  prefix_lm=bool(prefix_lm))
    return SampleOutput(*(x[:batch] for x in out))


def generate(
    model_config: llama.LlamaConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_id: int = -1,
    seed: int = 0,
    max_context: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    prefix_lm: bool = False,
) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens: `sample` on Python lists.

    Args:
      model_config, params: the decoder.
      prompts: token ids per prompt (each non-empty; e.g. starting with bos).
      max_new_tokens: tokens to add per prompt at most.
      temperature: 0 for greedy decoding, else softmax temperature.
      eos_id: generation of a prompt stops after it emits this id (included in the output); -1: none.
      seed: sampling seed.
      max_context: the training sequence length (see the module docstring); 0 = no limit.
      top_k, top_p: filters as in `sample`.
      stop_ids: more ids that end a generation (e.g. end-of-turn).
      prefix_lm: attend bidirectionally over each prompt (a prefix LM's prefix; see `sample`).

    Returns:
      The generated ids of each prompt, without the prompt, up to and including a stop id.

    Raises:
      ValueError: on an empty prompt or a bad sampling parameter.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    longest = max(len(p) for p in prompts)
    length = -(-longest // 16) * 16  # nearby prompt lengths share one compilation...
    if max_context and length + max_new_tokens - 1 > max_context:
        length = max(longest, max_context - max_new_tokens + 1)  # ...unless padding would cost context
    tokens, lengths = left_pad(prompts, length=length)
    stops = tuple(stop_ids) + ((eos_id,) if eos_id >= 0 else ())
    out = sample(model_config, params, tokens, lengths, jax.random.key(seed), max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stops, max_context=max_context,
                 prefix_lm=prefix_lm)
    new_tokens, new_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [new_tokens[i, : new_lengths[i]].tolist() for i in range(len(prompts))]


# ---- Beam search ---------------------------------------------------------------------------------

class BeamOutput(NamedTuple):
    """What `beam_search` returns, beams best first.

    Attributes:
      tokens: `[batch, beams, max_new_tokens]` int32; a stop id is included, `pad_id` after it.
      lengths: `[batch, beams]` int32 generated tokens, including the stop id.
      scores: `[batch, beams]` float32 `logprobs / length_penalty(lengths, alpha)`, the ranking key.
      logprobs: `[batch, beams]` float32 sum of the tokens' log-probabilities (temperature 1).
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    logprobs: jax.Array


def length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length normalisation `lp(Y) = ((5 + |Y|) / 6)^alpha` (Wu et al. 2016, eq. 14).

    A hypothesis is ranked by `log P(Y|X) / lp(Y)`; `alpha = 0` ranks by raw log-probability,
    larger `alpha` favours longer outputs. `lengths` float or int, any shape; returns float32.
    """
    return ((5.0 + jnp.asarray(lengths, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("model_config", "beam_size", "max_new_tokens", "pad_id"))
def _beam_search(model_config, params, tokens, lengths, stops, alpha, *, beam_size, max_new_tokens, pad_id):
    cfg, k, n, vocab = model_config, beam_size, max_new_tokens, model_config.vocab_size
    batch, prompt_len = tokens.shape
    inputs, positions, segment_ids, next_positions = prompt_window(tokens, prompt_len, prompt_len, prompt_len - lengths)
    cache = llama.init_cache(cfg, batch, prompt_len + n - 1)
    logits, cache = llama.decode(cfg, params, inputs, positions, segment_ids, cache, last_logits_only=True)
    # Beam j of row b is row b * k + j of the cache; all start as copies of the prompt.
    batch_axis = lambda path: 1 if cfg.scan_layers and path[0].key == "layers" else 0
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: x if x.ndim == 0 else jnp.repeat(x, k, axis=batch_axis(path)), cache)
    axes = llama.cache_logical_axes(cfg)
    state = dict(
        tokens=jnp.full((batch, k, n), pad_id, jnp.int32),
        logprob=jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1)),  # one live copy
        length=jnp.zeros((batch, k), jnp.int32),
        finished=jnp.zeros((batch, k), jnp.bool_),
        score=jnp.zeros((batch, k), jnp.float32),
    )

    def select(t, logits, state, cache):
        """Keeps the best `k` of: every one-token extension of a live beam, every finished beam."""
        candidates = state["logprob"][..., None] + jax.nn.log_softmax(logits, axis=-1)  # [batch, k, vocab]
        candidates = jnp.where(state["finished"][..., None], -jnp.inf, candidates).reshape(batch, k * vocab)
        live_scores = candidates / jnp.repeat(length_penalty(state["length"] + 1, alpha), vocab, axis=1)
        done_scores = jnp.where(state["finished"], state["logprob"] / length_penalty(state["length"], alpha), -jnp.inf)
        score, index = jax.lax.top_k(jnp.concatenate([live_scores, done_scores], axis=1), k)
        kept_done = index >= k * vocab
        parent = jnp.where(kept_done, index - k * vocab, index // vocab)
        token = jnp.where(kept_done, pad_id, index % vocab).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, parent, axis=1)
        extended = jnp.take_along_axis(candidates, jnp.minimum(index, k * vocab - 1), axis=1)
        seqs = jnp.take_along_axis(state["tokens"], parent[..., None], axis=1)
        state = dict(
            tokens=jax.lax.dynamic_update_slice(seqs, token[..., None], (0, 0, t)),
            logprob=jnp.where(kept_done, take(state["logprob"]), extended),
            length=take(state["length"]) + (~kept_done).astype(jnp.int32),
            finished=kept_done | jnp.any(token[..., None] == stops, axis=-1),
            score=score,
        )
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        cache = jax.tree_util.tree_map_with_path(
            lambda path, x: x if x.ndim == 0 else jnp.take(x, rows, axis=batch_axis(path)), cache)
        return state, nn.with_logical_constraint(cache, axes), token.reshape(-1)

    def cond(carry):
        t, state, *_ = carry
        return (t < n) & ~jnp.all(state["finished"])

    def body(carry):
        t, state, cache, token = carry
        positions = jnp.repeat(next_positions, k) + t - 1
        logits, cache = llama.decode(cfg, params, token[:, None], positions[:, None], jnp.ones_like(token)[:, None],
                                     cache, last_logits_only=True)
        return (t + 1, *select(t, logits[:, 0].reshape(batch, k, vocab), state, cache))

    state, cache, token = select(0, jnp.repeat(logits, k, axis=1), state, cache)
    _, state, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache, token))
    return BeamOutput(state["tokens"], state["length"], state["score"], state["logprob"])


def beam_search(
    model_config: llama.LlamaConfig,
    params,
    prompt_tokens,
    prompt_lengths,
    *,
    beam_size: int,
    max_new_tokens: int,
    alpha: float = 0.6,
    stop_ids: Sequence[int] = (),
    max_context: int = 0,
    pad_id: int = 0,
) -> BeamOutput:
    """Beam search with GNMT's length penalty over left-padded prompts, with a KV cache.

    Each step keeps the `beam_size` best of (a) every one-token extension of a live beam and
    (b) every finished beam (one that emitted a stop id, kept unchanged), ranked by
    `log P(Y|X) / ((5 + |Y|) / 6)^alpha` (Wu et al. 2016, eq. 14; `alpha=0.6` is tensor2tensor's and
    T5X's default). Extensions of one beam share a length, so with `beam_size=1` each step takes
    the argmax token: exactly greedy decoding. It stops when all kept beams are finished or after
    `max_new_tokens`; unfinished beams are then ranked like finished ones.

    Args:
      model_config, params: the decoder (params sharded or not).
      prompt_tokens, prompt_lengths: left-padded prompts, as for `sample`.
      beam_size: beams per prompt (>= 1).
      max_new_tokens: tokens per beam at most.
      alpha: length-penalty exponent (>= 0).
      stop_ids: ids that finish a beam (included in it).
      max_context: training sequence length; prompts are left-truncated so that prompt and
        generation fit (0: no limit).
      pad_id: fills slots after a beam's end.

    Returns:
      `BeamOutput`, beams sorted best first.

    Raises:
      ValueError: on malformed prompts, `beam_size < 1`, `alpha < 0`, or `max_new_tokens >
        max_context`.
    """
    tokens, lengths = check_prompts(model_config, prompt_tokens, prompt_lengths, max_new_tokens, pad_id)
    if beam_size < 1 or alpha < 0:
        raise ValueError(f"need beam_size >= 1 and alpha >= 0, got {beam_size}, {alpha}")
    overflow = tokens.shape[1] + max_new_tokens - 1 - max_context if max_context else 0
    if overflow > 0:
        if max_new_tokens > max_context:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds max_context={max_context}")
        tokens, lengths = tokens[:, overflow:], np.minimum(lengths, tokens.shape[1] - overflow)
    batch = len(tokens)
    shards = sharding.batch_shards()
    out = _beam_search(model_config, params, jnp.asarray(pad_rows(tokens, shards)),
                       jnp.asarray(pad_rows(lengths, shards)), stop_array(stop_ids), jnp.float32(alpha),
                       beam_size=int(beam_size), max_new_tokens=int(max_new_tokens), pad_id=int(pad_id))
    return BeamOutput(*(x[:batch] for x in out))


def rollout(model_config: llama.LlamaConfig, params, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            rng: jax.Array, *, max_new_tokens: int, temperature: float, stop_ids: Sequence[int],
            max_context: int = 0, pad_id: int = 0) -> SampleOutput:
    """Pure temperature sampling that can be traced inside a jitted step (PPO rollouts).

    No top-k/top-p, so the sampled tokens follow the tempered policy exactly and the KL penalty
    stays meaningful; no host-side checks or padding: `prompt_tokens` `[batch, prompt_len]` must be
    left-padded with lengths in `[1, prompt_len]` and `batch` a multiple of the mesh's batch shards.
    Returns `SampleOutput` as `sample`.
    """
    prompt_len = prompt_tokens.shape[1]
    cache_len = prompt_len + max_new_tokens - 1
    if max_context:
        cache_len = min(cache_len, max_context)
    return _sample(model_config, params, prompt_tokens, prompt_lengths, rng, stop_array(stop_ids),
                   max_new_tokens=int(max_new_tokens), cache_len=cache_len, temperature=float(temperature),
                   top_k=0, top_p=1.0, pad_id=int(pad_id))
