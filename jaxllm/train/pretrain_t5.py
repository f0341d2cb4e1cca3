"""Span-corruption / UL2 pretraining stage, on a T5 encoder-decoder or a decoder-only prefix LM.

`jaxllm pretrain --config configs/pretrain_t5.py:ARG` reaches this module through `pretrain.run`
whenever `handles(config)`: the `data` section is span corruption's (`span_corruption.default_config`)
or `model.family == "t5"`. It trains the run's tokenizer if it has none, tokenizes the sources,
corrupts and packs them (`jaxllm.data.span_corruption`) and runs `jaxllm.train.loop`:

- `model.family == "t5"`, `data.format == "t5"`: `jaxllm.models.t5` on encoder/decoder batches;
  the loss is the decoder's cross-entropy on the targets (`decoder_loss_mask`).
- a `jaxllm.models.llama` decoder, `data.format == "prefix_lm"`: each example is `inputs ++ targets`
  in one row, attended bidirectionally over the corrupted inputs and causally after them
  (`llama.apply(..., prefix_mask=...)`; Raffel et al. 2020 section 3.2.1, Tay et al. 2022 "UL2"
  section 3.1.2); the loss covers the target tokens only (`loss_mask`).

Both losses are normalised by the real target tokens of the global batch. Files go to
`RUN_DIR/pretrain/` like causal-LM pretraining. Samples (during training and `jaxllm sample`)
corrupt text with the run's first span denoiser and print the model's fill of each sentinel
(`SentinelFiller`): T5 encodes once and decodes with a KV cache (`t5_generate.generate`); the prefix LM
prefills its prompt bidirectionally into the decoder's KV cache and decodes causally
(`prefix_lm_generate`, `sampling.generate(..., prefix_lm=True)`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxllm import checkpoint as ckpt_lib
from jaxllm import objectives
from jaxllm import sampling
from jaxllm import scoring
from jaxllm.config import ConfigError
from jaxllm.data import lm
from jaxllm.data import sources
from jaxllm.data import span_corruption
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import llama
from jaxllm.models import t5, t5_generate
from jaxllm.train import loop
from jaxllm.train import pretrain


def default_config(model_family: str = "t5") -> ml_collections.ConfigDict:
    """A complete run config: a tiny T5 (`model_family="t5"`) or a tiny decoder-only prefix LM
    (`"llama"`, with `data.format = "prefix_lm"`) on the stdlib corpus.

    Raises:
      ConfigError: `model_family` is neither "t5" nor "llama".
    """
    if model_family not in ("t5", "llama"):
        raise ConfigError(f"model family {model_family!r}; expected 't5' or 'llama'")
    c = pretrain.default_config()  # causal-LM pretraining with its data, model and sample sections swapped
    c.run_dir = "runs/pretrain_t5"
    c.data = span_corruption.default_config()
    if model_family == "t5":
        c.model = t5.default_config()
    else:
        c.data.format = "prefix_lm"
    c.sample = sample_config()
    # "" = random init; hf:DIR | hf:ORG/NAME[@REV]: continue from a published T5 v1.1 / Flan-T5
    # (its shape, tokenizer and sentinels; `jaxllm.hub.hf_t5`)
    c.init_from = ""
    return c


def sample_config() -> ml_collections.ConfigDict:
    """The `sample` section: validation texts corrupted and filled in by the model."""
    c = ml_collections.ConfigDict()
    c.num_examples = 2  # evenly spaced validation documents
    c.raw_tokens = 48  # tokens of each document's start that get corrupted
    c.max_new_tokens = 0  # 0: the targets length of the corrupted example + 8
    c.temperature = 0.0  # 0 = greedy
    return c


def handles(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` is a span-corruption run (this module's) rather than causal-LM pretraining."""
    return config.model.get("family", "") == "t5" or "denoisers" in config.data


# ---- Models -------------------------------------------------------------------------------------


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


def prefix_lm_loss_fn(model_config: llama.LlamaConfig):
    """`loss_fn(params, batch, rng)` of a decoder-only prefix LM on `format="prefix_lm"` batches:
    cross-entropy on `loss_mask` (the target tokens) under the prefix-LM attention mask."""

    def loss_fn(params, batch, rng):
        del rng
        logprobs, correct = scoring.target_logprobs(model_config, params, batch["inputs"], batch["positions"],
                                                    batch["segment_ids"], batch["targets"],
                                                    prefix_mask=batch["prefix_mask"])
        loss_sum, sums = objectives.lm_loss_from_logprobs(logprobs, correct, batch["loss_mask"])
        return loss_sum, {"count": sums["num_tokens"], "correct": sums["correct"]}

    return loss_fn


def prefix_lm_generate(config: llama.LlamaConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       temperature: float = 0.0, eos_id: int = -1, seed: int = 0) -> list[list[int]]:
    """Continues each prompt as a prefix LM: the prompt is the bidirectional prefix, new tokens causal.

    `t5_generate.generate`'s counterpart for decoder-only span-corruption models: `sampling.generate` with
    `prefix_lm=True`, one prefill of the prompts into the KV cache, then one-token steps.

    Args:
      config, params: the model and its unboxed parameters.
      prompts: token ids of each prompt (non-empty; e.g. `[mode] + corrupted inputs + [eos]`).
      max_new_tokens: tokens to generate per prompt (>= 1).
      temperature: 0 = greedy; eos_id: a row stops after emitting it (-1: never); seed: sampling key.

    Returns:
      The generated ids of each prompt, up to and including eos.

    Raises:
      ValueError: an empty prompt, `max_new_tokens < 1` or `temperature < 0`.
    """
    return sampling.generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             eos_id=eos_id, seed=seed, prefix_lm=True)


@dataclasses.dataclass(frozen=True)
class Model:
    """The model of a span-corruption run: `config` (`T5Config` or `LlamaConfig`), `init(rng)` ->
    boxed params, and `generate(params, prompts, max_new_tokens, *, temperature, eos_id, seed)`."""

    config: Any
    init: Callable[[jax.Array], Any]
    generate: Callable[..., list[list[int]]]


def build_model(config: ml_collections.ConfigDict) -> Model:
    """The T5 or prefix-LM model of `config` (run `pretrain.resolve_vocab` first).

    Raises:
      ConfigError: `model.family` and `data.format` do not match ("t5" with "t5", a decoder-only
        family with "prefix_lm"), or bad `model.*` values.
    """
    family, fmt = config.model.get("family", ""), config.data.get("format", "t5")
    if (family == "t5") != (fmt == "t5"):
        raise ConfigError(f"model.family={family!r} with data.format={fmt!r}: T5 trains on data.format='t5', "
                          f"decoder-only models on data.format='prefix_lm'")
    if family == "t5":
        mc = t5.T5Config.from_config(config.model)
        return Model(mc, functools.partial(t5.init, mc), functools.partial(t5_generate.generate, mc))
    mc = llama.LlamaConfig.from_config(config.model)
    return Model(mc, functools.partial(llama.init, mc), functools.partial(prefix_lm_generate, mc))


def load_params(config: ml_collections.ConfigDict, directory) -> Any:
    """Exported params of a finished span-corruption stage (`RUN_DIR/pretrain/params`), on one device.

    Raises:
      FileNotFoundError: no params in `directory`; ConfigError: see `build_model`.
    """
    model = build_model(config)
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0))))
    return ckpt_lib.load_params(directory, abstract)


# ---- Samples ------------------------------------------------------------------------------------


class SentinelFiller:
    """Corrupts text with the run's first span denoiser (its mode token included) and renders what
    a model generates for it: kept text with each span's fill in `[[...]]`.

    The denoiser is the first `R`/`X` entry of `data.denoisers` (T5: `data.noise_density`,
    `data.mean_noise_span_length`); a mixture of `S` entries only gives continuations instead.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer):
        dc = config.data
        denoisers = span_corruption.denoisers_from_config(dc)
        self.denoiser = next((d for d in denoisers if d.kind != "S"), denoisers[0])
        layout = span_corruption.make_layout([self.denoiser], format=dc.get("format", "t5"),
                                             inputs_length=dc.inputs_length, targets_length=dc.targets_length)
        self.sentinel_ids, modes = span_corruption.sentinel_layout(tokenizer, [self.denoiser], layout)
        self.mode_id = modes.get(self.denoiser.kind, -1)
        self.tokenizer = tokenizer
        self._sentinels = {int(s): k for k, s in enumerate(self.sentinel_ids)}

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs, targets)` int32 of raw `tokens` `[n]` (n >= 2), as in training."""
        return self.denoiser.corrupt(tokens, rng, self.sentinel_ids, self.mode_id, self.tokenizer.eos_id)

    def from_text(self, text: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """`(inputs, targets)` of `text`: used as it is (targets None) when it already holds sentinels
        (`<extra_id_k>` pieces), else corrupted with `rng`.

        Raises:
          ConfigError: text without sentinels that has fewer than 2 tokens to corrupt.
        """
        ids = self.tokenizer.encode(text)
        if any(t in self._sentinels for t in ids):
            mode = [self.mode_id] if self.denoiser.mode_token else []
            return np.array(mode + ids + [self.tokenizer.eos_id], np.int32), None
        if len(ids) < 2:
            raise ConfigError(f"prompt {text!r} has {len(ids)} token(s); span corruption needs at least 2 "
                              f"(or write <extra_id_0>, <extra_id_1>, ... where spans should be filled)")
        return self.corrupt(np.array(ids, np.int32), rng)

    def chunks(self, inputs: Sequence[int], targets: Sequence[int]) -> list[list[int]]:
        """Kept chunks (even indices) and fills (odd) of `inputs` filled from `targets`."""
        inputs = list(inputs)[int(self.denoiser.mode_token):]
        eos = self.tokenizer.eos_id
        if self.denoiser.kind == "S":
            cut = lambda seq: seq[: seq.index(eos)] if eos in seq else seq
            return [cut(inputs), cut(list(targets))]
        return span_corruption.reconstruct(inputs, targets, self.sentinel_ids, eos)

    def render(self, inputs: Sequence[int], targets: Sequence[int]) -> str:
        """`inputs` as text with each sentinel replaced by `[[its fill from targets]]`."""
        decode = self.tokenizer.decode
        return "".join(decode(ch) if i % 2 == 0 else f"[[{decode(ch)}]]"
                       for i, ch in enumerate(self.chunks(inputs, targets)))

    def fills(self, inputs: Sequence[int], targets: Sequence[int]) -> list[tuple[str, str]]:
        """`(sentinel piece, fill text)` of each sentinel of `inputs`, in order."""
        used = [int(t) for t in list(inputs) if int(t) in self._sentinels]
        fills = self.chunks(inputs, targets)[1::2]
        if self.denoiser.kind == "S":
            return [("[continuation]", self.tokenizer.decode(fills[0]))]
        return [(tokenizer_lib.sentinel_piece(self._sentinels[s]), self.tokenizer.decode(f))
                for s, f in zip(used, fills)]


def sample_examples(config: ml_collections.ConfigDict, corpus: lm.TokenizedCorpus) -> list[np.ndarray]:
    """The raw token windows samples corrupt: the first `sample.raw_tokens` tokens of
    `sample.num_examples` evenly spaced documents of `corpus`."""
    n = config.sample.num_examples
    docs = sorted({k * corpus.num_docs // max(n, 1) for k in range(n)})
    return [np.asarray(corpus.tokens[corpus.doc_starts[d]:corpus.doc_starts[d + 1]][:config.sample.raw_tokens],
                       np.int32) for d in docs]


def _validation_pairs(config, tokenizer, filler: SentinelFiller) -> list[tuple[np.ndarray, np.ndarray]]:
    dc = config.data
    specs = sources.parse_sources(dc.eval_sources or dc.sources, config.data_root)
    corpus = lm.tokenize_corpus(specs, tokenizer, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), add_bos=False,
                                add_eos=False, num_threads=dc.tokenize_threads)
    rng = np.random.default_rng([config.seed, 7])
    return [filler.corrupt(raw, rng) for raw in sample_examples(config, corpus) if len(raw) >= 2]


def make_sample_fn(config: ml_collections.ConfigDict, tokenizer, model: Model):
    """`params -> list[str]`: corrupted validation texts with the model's spans filled in `[[...]]`,
    followed by the true spans (see `SentinelFiller`)."""
    filler = SentinelFiller(config, tokenizer)
    pairs = _validation_pairs(config, tokenizer, filler)

    def sample_fn(params):
        if not pairs:
            return []
        max_new = config.sample.max_new_tokens or max(len(t) for _, t in pairs) + 8
        preds = model.generate(params, [i.tolist() for i, _ in pairs], max_new, temperature=config.sample.temperature,
                               eos_id=tokenizer.eos_id, seed=config.seed)
        return [f"{filler.render(i, p)}  ||| truth: {filler.render(i, t)}" for (i, t), p in zip(pairs, preds)]

    return sample_fn


def fill_sentinels(config: ml_collections.ConfigDict, tokenizer, params, texts: Sequence[str] | None, *,
                   max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Text blocks for `jaxllm sample` on a span-corruption run: per text, the model's input, the
    fill of each sentinel, the filled text and (when corrupted here) the truth.

    `texts` holding `<extra_id_k>` are filled as written; others are corrupted with the run's first
    span denoiser (seeded by `seed`); None takes the training samples' validation documents.

    Raises:
      ConfigError: see `SentinelFiller.from_text` and `build_model`.
    """
    model = build_model(config)
    filler = SentinelFiller(config, tokenizer)
    rng = np.random.default_rng(seed)
    if texts:
        pairs = [filler.from_text(t, rng) for t in texts]
        labels = [repr(t) for t in texts]
    else:
        pairs = _validation_pairs(config, tokenizer, filler)
        labels = [f"validation example {k}" for k in range(len(pairs))]
    preds = model.generate(params, [i.tolist() for i, _ in pairs], max_new_tokens, temperature=temperature,
                           eos_id=tokenizer.eos_id, seed=seed)
    blocks = []
    for label, (inputs, targets), pred in zip(labels, pairs, preds):
        mode = int(filler.denoiser.mode_token)
        lines = [f"--- prompt: {label}", f"input:  {tokenizer.decode(list(inputs)[mode:])}"]
        lines += [f"{piece} -> {fill!r}" for piece, fill in filler.fills(inputs, pred)]
        lines.append(f"filled: {filler.render(inputs, pred)}")
        if targets is not None:
            lines.append(f"truth:  {filler.render(inputs, targets)}")
        blocks.append("\n".join(lines))
    return blocks


# ---- The stage ----------------------------------------------------------------------------------


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh | None = None) -> loop.Stage:
    """The span-corruption pretraining `Stage`: model, this process's data, loss, FLOPs and samples;
    with `init_from`, the published checkpoint's params read onto `mesh`.

    Raises:
      ConfigError: mismatched `model.family` / `data.format`, or bad `model.*` / `data.*` values.
      pretrain.VocabMismatchError: the tokenizer has more ids than `model.vocab_size`.
    """
    reader = None
    if config.get("init_from", ""):
        from jaxllm.hub import spec as hub_spec  # noqa: PLC0415

        if not hub_spec.is_external(config.init_from):
            raise ConfigError(f"init_from={config.init_from!r}: the T5 stage starts from random params or a "
                              "published checkpoint (hf:DIR, hf:ORG/NAME)")
        reader = hub_spec.configure_from(config, config.init_from)
        if hub_spec.family(reader) != config.model.get("family", ""):
            raise ConfigError(f"{config.init_from} is a {reader.config.get('model_type')!r} model; this stage trains "
                              f"model.family={config.model.get('family')!r}")
    pretrain.resolve_vocab(config, tokenizer)
    model = build_model(config)
    tc, dc = config.train, config.data
    fmt = dc.get("format", "t5")
    load_params = None
    if reader is not None:
        from jaxllm.hub import spec as hub_spec  # noqa: PLC0415

        load_params = hub_spec.params_loader(reader, model.config, mesh, config.mesh.rules)
    denoisers = span_corruption.denoisers_from_config(dc)
    layout = span_corruption.make_layout(denoisers, format=fmt, inputs_length=dc.inputs_length,
                                         targets_length=dc.targets_length)
    common = dict(seed=config.seed, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), data_root=config.data_root,
                  process_index=jax.process_index(), process_count=jax.process_count(), format=fmt)
    train_data = span_corruption.t5_dataset(dc, tokenizer, split="train", global_batch_size=tc.batch_size, **common)
    eval_data = None
    if dc.eval_sources:
        eval_data = span_corruption.t5_dataset(dc, tokenizer, split="eval",
                                               global_batch_size=tc.eval_batch_size or tc.batch_size, **common)
    if fmt == "t5":
        loss_fn = t5_loss_fn(model.config)
        flops = t5.flops_per_example(model.config, layout.inputs_length, layout.targets_length) * tc.batch_size
        tokens_per_step, size = tc.batch_size * (layout.inputs_length + layout.targets_length), t5.count_params
        rows = f"encoder {layout.inputs_length} / decoder {layout.targets_length} tokens per row"
    else:
        loss_fn = prefix_lm_loss_fn(model.config)
        tokens_per_step, size = tc.batch_size * layout.inputs_length, llama.count_params
        flops = llama.flops_per_token(model.config, layout.inputs_length) * tokens_per_step
        rows = f"prefix LM, {layout.inputs_length} tokens per row"
    logging.info("%s: %s parameters; denoisers %s; %s, raw windows %s", config.model.family,
                 f"{size(model.config):,}", [str(d) for d in denoisers], rows, list(layout.raw_lengths))
    return loop.Stage(
        name="pretrain",
        init_params=model.init,
        loss_fn=loss_fn,
        train_data=train_data,
        eval_data=eval_data,
        flops_per_step=flops,
        tokens_per_step=tokens_per_step,
        summarize=pretrain.summarize,
        sample_fn=make_sample_fn(config, tokenizer, model),
        load_params=load_params,
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Runs the stage (training the run's tokenizer first if it has none); returns the loop's result."""
    return loop.run_stage(config, build_stage)
