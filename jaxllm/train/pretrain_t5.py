"""T5 / UL2 pretraining stage: span corruption (or a mixture of denoisers) on an encoder-decoder.

`jaxllm pretrain --config configs/pretrain_t5.py:ARG` (with `model.family == "t5"`) trains the
run's tokenizer if it has none, tokenizes the sources, corrupts and packs them
(`jaxllm.data.span_corruption`) and runs `jaxllm.train.loop`. The loss is the decoder's
cross-entropy on the targets (`objectives.lm_loss` with `decoder_loss_mask`), normalised by the
real target tokens of the global batch. Files go to `RUN_DIR/pretrain/` like causal-LM pretraining.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from jaxllm import checkpoint as ckpt_lib
from jaxllm import objectives
from jaxllm import sharding
from jaxllm.config import ConfigError
from jaxllm.data import lm
from jaxllm.data import sources
from jaxllm.data import span_corruption
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import t5
from jaxllm.train import loop
from jaxllm.train import optim
from jaxllm.train import pretrain


def default_config() -> ml_collections.ConfigDict:
    """A complete T5 pretraining run config (a tiny T5 on the stdlib corpus)."""
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.run_dir = "runs/pretrain_t5"
    c.data_root = "../shared/data"
    c.seed = 0
    c.mesh = sharding.default_config()
    c.distributed = sharding.distributed_config()
    c.tokenizer = tokenizer_lib.default_config()
    c.data = span_corruption.default_config()
    c.model = t5.default_config()
    c.optimizer = optim.default_config()
    c.train = loop.default_config()
    c.checkpoint = ckpt_lib.default_config()
    c.sample = sample_config()
    return c


def sample_config() -> ml_collections.ConfigDict:
    """The `sample` section: validation texts corrupted and filled in by the model."""
    c = ml_collections.ConfigDict()
    c.num_examples = 2  # evenly spaced validation documents
    c.raw_tokens = 48  # tokens of each document's start that get corrupted
    c.max_new_tokens = 0  # 0: the targets length of the corrupted example + 8
    c.temperature = 0.0  # 0 = greedy
    return c


def t5_loss_fn(model_config: t5.T5Config):
    """`loss_fn(params, batch, rng) -> (loss_sum, sums)` for `jaxllm.train.loop`.

    Dropout (if `model.dropout_rate > 0`) uses `rng`; note that the loop's eval step also passes a
    key, so evaluation of a model with dropout is stochastic.
    """

    def loss_fn(params, batch, rng):
        logits = t5.apply(model_config, params, batch, rng=rng)
        loss_sum, sums = objectives.lm_loss(logits, batch["decoder_target_tokens"], batch["decoder_loss_mask"])
        return loss_sum, {"count": sums["num_tokens"], "correct": sums["correct"]}

    return loss_fn


def sample_examples(config: ml_collections.ConfigDict, tokenizer, corpus: lm.TokenizedCorpus) -> list[np.ndarray]:
    """The raw token windows `sample_fn` corrupts: the first `sample.raw_tokens` tokens of
    `sample.num_examples` evenly spaced documents of `corpus`."""
    n = config.sample.num_examples
    docs = sorted({k * corpus.num_docs // max(n, 1) for k in range(n)})
    return [np.asarray(corpus.tokens[corpus.doc_starts[d]:corpus.doc_starts[d + 1]][:config.sample.raw_tokens],
                       np.int32) for d in docs]


def make_sample_fn(config: ml_collections.ConfigDict, tokenizer, model_config: t5.T5Config):
    """`params -> list[str]`: corrupted validation texts with the model's spans filled in `[[...]]`,
    followed by the true spans. Uses the first denoiser (T5's span corruption, or UL2's first entry
    with its mode token)."""
    dc = config.data
    denoiser = span_corruption.denoisers_from_config(dc)[0]
    layout = span_corruption.make_layout([denoiser], inputs_length=dc.inputs_length, targets_length=dc.targets_length)
    sentinel_ids, mode_ids = span_corruption.sentinel_layout(tokenizer, [denoiser], layout)
    specs = sources.parse_sources(dc.eval_sources or dc.sources, config.data_root)
    corpus = lm.tokenize_corpus(specs, tokenizer, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), add_bos=False,
                                add_eos=False, num_threads=dc.tokenize_threads)
    rng = np.random.default_rng([config.seed, 7])
    pairs = [denoiser.corrupt(raw, rng, sentinel_ids, mode_ids.get(denoiser.kind, -1), tokenizer.eos_id)
             for raw in sample_examples(config, tokenizer, corpus) if len(raw) >= 2]
    skip = int(denoiser.mode_token)

    def show(inputs, targets):
        chunks = span_corruption.reconstruct(inputs[skip:], targets, sentinel_ids, tokenizer.eos_id)
        return "".join(tokenizer.decode(ch) if i % 2 == 0 else f"[[{tokenizer.decode(ch)}]]"
                       for i, ch in enumerate(chunks))

    def sample_fn(params):
        if not pairs:
            return []
        max_new = config.sample.max_new_tokens or max(len(t) for _, t in pairs) + 8
        preds = t5.generate(model_config, params, [i.tolist() for i, _ in pairs], max_new,
                            temperature=config.sample.temperature, eos_id=tokenizer.eos_id, seed=config.seed)
        return [f"{show(i, p)}  ||| truth: {show(i, t)}" for (i, t), p in zip(pairs, preds)]

    return sample_fn


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh | None = None) -> loop.Stage:
    """The T5 pretraining `Stage`: model, this process's data, loss, FLOPs and samples (`mesh` unused).

    Raises:
      ConfigError: `model.family` is not "t5", or bad `model.*` / `data.*` values.
      pretrain.VocabMismatchError: the tokenizer has more ids than `model.vocab_size`.
    """
    if config.model.get("family", "") != "t5":
        raise ConfigError(f"model.family={config.model.get('family', '')!r}: pretrain_t5 needs 't5'")
    pretrain.resolve_vocab(config, tokenizer)
    model_config = t5.T5Config.from_config(config.model)
    tc, dc = config.train, config.data
    denoisers = span_corruption.denoisers_from_config(dc)
    layout = span_corruption.make_layout(denoisers, inputs_length=dc.inputs_length, targets_length=dc.targets_length)
    common = dict(seed=config.seed, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), data_root=config.data_root,
                  process_index=jax.process_index(), process_count=jax.process_count())
    train_data = span_corruption.t5_dataset(dc, tokenizer, split="train", global_batch_size=tc.batch_size, **common)
    eval_data = None
    if dc.eval_sources:
        eval_data = span_corruption.t5_dataset(dc, tokenizer, split="eval",
                                               global_batch_size=tc.eval_batch_size or tc.batch_size, **common)
    logging.info("T5: %s parameters; denoisers %s; encoder %d / decoder %d tokens per row, raw windows %s",
                 f"{t5.count_params(model_config):,}", [str(d) for d in denoisers], layout.inputs_length,
                 layout.targets_length, list(layout.raw_lengths))
    return loop.Stage(
        name="pretrain",
        init_params=lambda rng: t5.init(model_config, rng),
        loss_fn=t5_loss_fn(model_config),
        train_data=train_data,
        eval_data=eval_data,
        flops_per_step=t5.flops_per_example(model_config, layout.inputs_length, layout.targets_length) * tc.batch_size,
        tokens_per_step=tc.batch_size * (layout.inputs_length + layout.targets_length),
        summarize=pretrain.summarize,
        sample_fn=make_sample_fn(config, tokenizer, model_config),
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Runs the stage (training the run's tokenizer first if it has none); returns the loop's result."""
    return loop.run_stage(config, build_stage)
