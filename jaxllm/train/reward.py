"""Reward model: learn a scalar reward from human comparisons (InstructGPT step 2; Llama-2 RMs).

`jaxllm reward --config configs/reward.py:ARG` starts from the SFT `params/` with a `[embed, 1]`
scalar head instead of the LM head (initialised small), reads the reward at the last real token of
each sequence (from the sequence lengths, or from the segment ids of packed rows; never by looking
for a pad id), and trains the Bradley-Terry pairwise loss (with Llama-2's margin when records have
one and optional reward centering) or, for groups of K ranked responses, InstructGPT's K-choose-2
ranking loss (with the group's margin on each ordered pair and centering per group; on a pair it is
the pairwise loss). It reports held-out `accuracy`, `margin`, `rewards/chosen` and `rewards/rejected`
per eval split and writes its own `params/`.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxllm import objectives
from jaxllm.data import lm
from jaxllm.data import preference
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import pretrain
from jaxllm.train import sft


def default_config() -> ml_collections.ConfigDict:
    """A complete reward-model run config."""
    c = sft.default_config()
    c.stage = "reward"
    c.init_from = "sft"
    c.data = preference.default_config()
    c.center_coef = 0.0  # reward centering (TRL's center_rewards_coefficient); per pair, or per group for K > 2
    c.optimizer.update(lr=5e-5, min_lr=5e-6, warmup_steps=20, weight_decay=0.0)
    c.train.update(steps=300, batch_size=16, eval_every=100, log_every=10)
    c.sample.prompts = ()
    return c


def sequence_rewards(scores: jax.Array, lengths: jax.Array) -> jax.Array:
    """The score at the last real token of each sequence.

    Args:
      scores: `[batch, length]` per-token scalar outputs.
      lengths: `[batch]` int real tokens per right-padded sequence (>= 1).

    Returns:
      `[batch]` float32 `scores[b, lengths[b] - 1]`.
    """
    idx = jnp.clip(lengths - 1, 0, scores.shape[1] - 1)
    return jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0].astype(jnp.float32)


def segment_last_indices(segment_ids: jax.Array, max_segments: int) -> jax.Array:
    """Index of the last token of segments 1..max_segments of each row (-1 when absent).

    Works for right-padded, left-padded and packed rows alike: it looks only at `segment_ids`.

    Args:
      segment_ids: `[batch, length]` int, 0 = padding.
      max_segments: number of segment ids to look for.

    Returns:
      `[batch, max_segments]` int32.
    """
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    where = segment_ids[:, None, :] == ids[None, :, None]  # [batch, segments, length]
    positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(where, positions, -1), axis=-1)


def group_rewards(model_config: llama.LlamaConfig, params, batch) -> jax.Array:
    """Rewards `[G, K]` float32 of a preference batch (`[b, K, length]` token fields), in the group
    order of `preference.flat_groups`: `G = b`, read at `lengths - 1`; or, packed (`[b, S, K]`
    response fields), `G = b * S`, read at the last token of each segment."""
    b, k, length = batch["inputs"].shape
    flat = lambda x: x.reshape(b * k, length)  # noqa: E731
    scores = llama.apply(model_config, params, flat(batch["inputs"]), flat(batch["positions"]),
                         flat(batch["segment_ids"]), head="scalar")
    if batch["response_mask"].ndim == 2:
        return sequence_rewards(scores, batch["lengths"].reshape(-1)).reshape(b, k)
    last = segment_last_indices(flat(batch["segment_ids"]), batch["response_mask"].shape[1])  # [b*K, S]
    per_segment = jnp.take_along_axis(scores, jnp.maximum(last, 0), axis=1).astype(jnp.float32)
    return preference.segments_to_groups(per_segment, b, k)  # absent segments: masked by response_mask


def reward_loss_fn(model_config: llama.LlamaConfig, max_responses: int, center_coef: float):
    """`loss_fn(params, batch, rng) -> (loss_sum, sums)` for `jaxllm.train.loop`; `count` = groups."""

    def loss_fn(params, batch, rng):
        del rng
        rewards = group_rewards(model_config, params, batch)
        groups = preference.flat_groups(batch)
        valid, ranks = groups["response_mask"], groups["ranks"]
        if max_responses == 2:
            # Pairs: slot 0 is chosen, slot 1 rejected (the data sorts responses by rank).
            pair_mask = valid[:, 0] * valid[:, 1]
            loss_sum, sums = objectives.pairwise_reward_loss(
                rewards[:, 0], rewards[:, 1], margin=groups["margin"] * groups["has_margin"],
                pair_mask=pair_mask, center_coef=center_coef)
            sums["pairs"] = sums["count"]
        else:
            loss_sum, sums = objectives.ranking_reward_loss(rewards, ranks, valid, center_coef=center_coef,
                                                            margin=groups["margin"] * groups["has_margin"])
            best = (ranks == 0).astype(jnp.float32) * valid
            worst = (ranks == jnp.max(jnp.where(valid > 0, ranks, -1), axis=1,
                                      keepdims=True)).astype(jnp.float32) * valid
            sums["rewards_chosen"] = jnp.sum(rewards * best) / jnp.maximum(jnp.sum(best), 1.0) * sums["count"]
            sums["rewards_rejected"] = jnp.sum(rewards * worst) / jnp.maximum(jnp.sum(worst), 1.0) * sums["count"]
        return loss_sum, sums

    return loss_fn


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Loss per group; pairwise `accuracy` and `margin`; mean chosen / rejected rewards."""
    count = max(sums["count"], 1.0)
    pairs = max(sums["pairs"], 1.0)
    return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
            "rewards/chosen": sums["rewards_chosen"] / count, "rewards/rejected": sums["rewards_rejected"] / count}


def init_scalar_params(model_config: llama.LlamaConfig, rng: jax.Array):
    """Boxed params of the decoder with a scalar head."""
    return llama.init(model_config, rng, head="scalar")


def backbone_loader(model_config: llama.LlamaConfig, load_lm, seed: int):
    """`abstract_scalar_params -> params`: the LM's params without its head, plus a fresh scalar head.

    `load_lm(abstract_lm_params) -> params` reads the language model (`sft.params_loader`). The head
    is initialised small (`init_std / sqrt(embed)`-scaled normal, see `llama`), so the first rewards
    are near 0 and the backbone's features drive early training.
    """

    def load(abstract):
        target = {k: v for k, v in abstract.items() if k != "score_head"}
        if not model_config.tie_embeddings:  # the LM head is read (orbax needs the whole tree) and dropped
            target["lm_head"] = jax.ShapeDtypeStruct((model_config.embed_dim, model_config.vocab_size),
                                                     model_config.param_dtype, sharding=abstract["score_head"].sharding)
        loaded = load_lm(target)
        loaded.pop("lm_head", None)
        fresh = jax.jit(lambda k: nn.unbox(init_scalar_params(model_config, k))["score_head"],
                        out_shardings=abstract["score_head"].sharding)(jax.random.key(seed))
        return {**loaded, "score_head": fresh}

    return load


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh | None = None) -> loop.Stage:
    """The reward-model `Stage`."""
    reader = sft.init_model(config)
    sft.prepare_sources(config)
    pretrain.resolve_vocab(config, tokenizer)
    model_config = llama.LlamaConfig.from_config(config.model)
    tc, dc = config.train, config.data
    common = dict(seed=config.seed, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), data_root=config.data_root,
                  process_index=jax.process_index(), process_count=jax.process_count())
    train_data = preference.preference_dataset(dc, tokenizer, split="train", global_batch_size=tc.batch_size, **common)
    eval_data = None
    if dc.eval_sources:
        eval_data = {}
        for spec in dc.eval_sources.split(";"):
            one = dc.copy_and_resolve_references()
            one.eval_sources = spec
            name = eval_name(spec)
            eval_data[name] = preference.preference_dataset(
                one, tokenizer, split="eval", global_batch_size=tc.eval_batch_size or tc.batch_size, **common)
    load_params = None
    if config.init_from:
        load_params = backbone_loader(model_config, sft.params_loader(config, reader, model_config, mesh), config.seed)
    sequences = tc.batch_size * dc.max_responses  # rows of L tokens, packed or not
    return loop.Stage(
        name=config.stage,
        init_params=lambda rng: init_scalar_params(model_config, rng),
        loss_fn=reward_loss_fn(model_config, dc.max_responses, config.center_coef),
        train_data=train_data,
        eval_data=eval_data,
        flops_per_step=llama.flops_per_token(model_config, dc.seq_len) * sequences * dc.seq_len,
        tokens_per_step=sequences * dc.seq_len,
        load_params=load_params,
        summarize=summarize,
    )


def eval_name(spec: str) -> str:
    """A short name for an eval source: the dataset directory (`.../hh_rlhf_harmless_base/test.jsonl`)."""
    path = spec.split(":", 1)[-1].split("#")[0].split("@")[0]
    parts = pathlib.PurePath(path).parts
    return parts[-2] if len(parts) >= 2 else parts[-1]


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Trains the reward model; returns the loop's result."""
    return loop.run_stage(config, build_stage)
