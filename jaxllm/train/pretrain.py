"""Causal-LM pretraining stage: next-token cross-entropy on packed documents.

`jaxllm pretrain --config configs/pretrain.py:ARG` trains the tokenizer if the run has none,
tokenizes and packs the sources, and runs `jaxllm.train.loop`.
"""

from __future__ import annotations

import logging
import math

import jax
import ml_collections

from jaxllm import checkpoint as ckpt_lib
from jaxllm import objectives
from jaxllm import sampling
from jaxllm import scoring
from jaxllm import sharding
from jaxllm.data import lm
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import optim


def default_config() -> ml_collections.ConfigDict:
    """A complete pretraining run config (a tiny decoder on the stdlib corpus)."""
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.run_dir = "runs/pretrain"
    c.data_root = "../shared/data"
    c.seed = 0
    c.mesh = sharding.default_config()
    c.distributed = sharding.distributed_config()
    c.tokenizer = tokenizer_lib.default_config()
    c.data = lm.default_config()
    c.model = llama.default_config()
    c.optimizer = optim.default_config()
    c.train = loop.default_config()
    c.checkpoint = ckpt_lib.default_config()
    c.sample = sample_config()
    return c


def sample_config() -> ml_collections.ConfigDict:
    """The `sample` section: generations printed during and after training."""
    c = ml_collections.ConfigDict()
    c.prompts = ("",)  # text after bos; "" samples from bos alone
    c.max_new_tokens = 64
    c.temperature = 0.8
    return c


class VocabMismatchError(ValueError):
    """The tokenizer has more ids than the model's embedding."""


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Sets `model.vocab_size` from the tokenizer when it is 0 (rounded up to 128).

    Raises:
      VocabMismatchError: if `model.vocab_size` is set and smaller than the tokenizer's vocabulary
        (ids past the embedding would be silently clamped by the gather).
    """
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer_lib.padded_vocab_size(tokenizer.vocab_size)
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise VocabMismatchError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids ({tokenizer.path}); set --config.model.vocab_size=0 to use the "
            f"tokenizer's size")


def lm_loss_fn(model_config: llama.LlamaConfig):
    """`loss_fn(params, batch, rng) -> (loss_sum, sums)` for `jaxllm.train.loop` (chunked over
    positions when `model.loss_chunk_size > 0`; `jaxllm.scoring`)."""

    def loss_fn(params, batch, rng):
        del rng
        logprobs, correct = scoring.target_logprobs(model_config, params, batch["inputs"], batch["positions"],
                                                    batch["segment_ids"], batch["targets"])
        loss_sum, sums = objectives.lm_loss_from_logprobs(logprobs, correct, batch["loss_mask"])
        return loss_sum, {"count": sums["num_tokens"], "correct": sums["correct"]}

    return loss_fn


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss per real target token (nats), perplexity and next-token accuracy."""
    count = max(sums["count"], 1.0)
    loss = sums["loss_sum"] / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": sums["correct"] / count}


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh | None = None) -> loop.Stage:
    """The pretraining `Stage`: model, data of this process, loss, FLOPs and samples."""
    resolve_vocab(config, tokenizer)
    model_config = llama.LlamaConfig.from_config(config.model)
    tc, dc = config.train, config.data
    cache_dir = lm.resolve_cache_dir(dc, config.run_dir)
    common = dict(seed=config.seed, cache_dir=cache_dir, data_root=config.data_root,
                  process_index=jax.process_index(), process_count=jax.process_count())
    train_data = lm.lm_dataset(dc, tokenizer, split="train", global_batch_size=tc.batch_size, **common)
    eval_data = None
    if dc.eval_sources:
        eval_data = lm.lm_dataset(dc, tokenizer, split="eval",
                                  global_batch_size=tc.eval_batch_size or tc.batch_size, **common)
    tokens_per_step = tc.batch_size * dc.seq_len

    def sample_fn(params):
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in config.sample.prompts]
        outs = sampling.generate(model_config, params, prompts, max_new_tokens=config.sample.max_new_tokens,
                                 temperature=config.sample.temperature, eos_id=tokenizer.eos_id, seed=config.seed,
                                 max_context=dc.seq_len)
        return [p + tokenizer.decode(o) for p, o in zip(config.sample.prompts, outs)]

    logging.info("model: %s parameters", f"{llama.count_params(model_config):,}")
    return loop.Stage(
        name="pretrain",
        init_params=lambda rng: llama.init(model_config, rng),
        loss_fn=lm_loss_fn(model_config),
        train_data=train_data,
        eval_data=eval_data,
        flops_per_step=llama.flops_per_token(model_config, dc.seq_len) * tokens_per_step,
        tokens_per_step=tokens_per_step,
        summarize=summarize,
        sample_fn=sample_fn,
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Runs the stage (training the run's tokenizer first if it has none); returns the loop's result.

    T5 models and decoder-only prefix LMs (`data.format == "prefix_lm"`) pretrain with span
    corruption / UL2 denoisers instead: `jaxllm.train.pretrain_t5`.
    """
    from jaxllm.train import pretrain_t5  # imported here: pretrain_t5 builds on this module

    if pretrain_t5.handles(config):
        return pretrain_t5.run(config)
    return loop.run_stage(config, build_stage)
