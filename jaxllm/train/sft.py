"""Supervised fine-tuning on conversations (InstructGPT step 1; LIMA, Alpaca, Vicuna recipes).

`jaxllm sft --config configs/sft.py:ARG` starts from `init_from`: the `params/` of the run's pretraining
stage (resharded onto this stage's mesh), or a published checkpoint (`hf:DIR`, `hf:ORG/NAME`,
`gguf:FILE`; `jaxllm.hub.spec`) whose tokenizer and chat template the run then uses; it trains next-token prediction on the assistant turns
only (`jaxllm.data.chat`), reports held-out loss and `mean_token_accuracy`, and writes its own
`params/`.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from etils import epath

from jaxllm import checkpoint as ckpt_lib
from jaxllm import config as config_lib
from jaxllm import fs
from jaxllm import sampling
from jaxllm.data import chat
from jaxllm.data import lm
from jaxllm.data import sft as sft_data
from jaxllm.data import stdlib_tasks
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.hub import spec as hub_spec
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import pretrain


def default_config() -> ml_collections.ConfigDict:
    """A complete SFT run config."""
    c = pretrain.default_config()
    c.stage = "sft"
    c.data = sft_data.default_config()
    # where to start: a stage of RUN_DIR (or init_run_dir), hf:DIR | hf:ORG/NAME[@REV] | gguf:FILE; "" = random
    c.init_from = "pretrain"
    c.init_run_dir = ""  # "" = this run
    c.stdlib_tasks = False  # write the stdlib task sets to RUN_DIR/data/stdlib first (the embedded default)
    c.stdlib_max_examples = 2000  # train examples per stdlib set (keep equal across the stages of a run)
    c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=20, weight_decay=0.0)
    c.train.update(steps=300, batch_size=16, eval_every=100, log_every=10)
    c.sample.prompts = ("Write a haiku about autumn.",)
    c.sample.max_new_tokens = 64
    c.sample.temperature = 0.0
    return c


def source_stage_dir(config: ml_collections.ConfigDict, stage: str | None = None) -> epath.Path:
    """`RUN_DIR/<stage>/` (or `init_run_dir/<stage>/`, local or `gs://`); `stage` defaults to `init_from`."""
    return fs.path(config.init_run_dir or config.run_dir) / (stage or config.init_from)


def init_model(config: ml_collections.ConfigDict, source: str | None = None):
    """Fixes `config.model` from where a stage starts; returns the checkpoint reader or None.

    `source` (default `init_from`) is a model spec (`jaxllm.hub.spec`): a stage of the run, whose
    `config.json` gives the model shape, or an `hf:` / `gguf:` checkpoint, whose own config does
    (a contradicting `model.*` key is an error). An empty `source` leaves the config as it is.

    Raises:
      ConfigError: the source stage has not run; HubError: as `jaxllm.hub.spec.configure_from`.
    """
    source = config.init_from if source is None else source
    if not source:
        return None
    if hub_spec.is_external(source):
        return hub_spec.configure_from(config, source)
    config_lib.inherit_model_shape(config, source_stage_dir(config, source))
    return None


def params_loader(config: ml_collections.ConfigDict, reader, model_config, mesh, source: str | None = None,
                  *, head: str = "lm"):
    """`abstract_params -> params` of `source` (default `init_from`) on `mesh`: the checkpoint of
    `reader` (from `init_model`) or the source stage's `params/`."""
    if reader is not None:
        return hub_spec.params_loader(reader, model_config, mesh, config.mesh.rules, head=head)
    params_dir = source_stage_dir(config, source) / "params"
    return lambda abstract: ckpt_lib.load_params(params_dir, abstract)


def prepare_sources(config: ml_collections.ConfigDict) -> None:
    """Writes the stdlib task sets if `config.stdlib_tasks`, and fills `{run_dir}` in data specs."""
    if config.stdlib_tasks:
        stdlib_tasks.build(fs.path(config.run_dir) / "data" / "stdlib", seed=config.seed,
                           max_examples=config.stdlib_max_examples)
    for key in ("sources", "eval_sources"):
        config.data[key] = config.data[key].replace("{run_dir}", str(config.run_dir))


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss per supervised token, perplexity and `mean_token_accuracy` (TRL's name)."""
    count = max(sums["count"], 1.0)
    loss = sums["loss_sum"] / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "mean_token_accuracy": sums["correct"] / count}


def chat_sample_fn(config, tokenizer, model_config, max_context: int):
    """`params -> [text]`: greedy answers to `config.sample.prompts` in the chat template."""
    template = chat.template_for(tokenizer)

    def sample_fn(params):
        prompts = [template.prompt([{"role": "user", "content": p}]).tolist() for p in config.sample.prompts]
        outs = sampling.generate(model_config, params, prompts, max_new_tokens=config.sample.max_new_tokens,
                                 temperature=config.sample.temperature, eos_id=template.end_id,
                                 seed=config.seed, max_context=max_context)
        return [f"{p} => {template.decode_response(o)}" for p, o in zip(config.sample.prompts, outs)]

    return sample_fn


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh | None = None) -> loop.Stage:
    """The SFT `Stage`: masked LM loss on assistant tokens, starting from the previous stage."""
    reader = init_model(config)
    prepare_sources(config)
    pretrain.resolve_vocab(config, tokenizer)
    model_config = llama.LlamaConfig.from_config(config.model)
    tc, dc = config.train, config.data
    common = dict(seed=config.seed, cache_dir=lm.resolve_cache_dir(dc, config.run_dir), data_root=config.data_root,
                  process_index=jax.process_index(), process_count=jax.process_count())
    train_data = sft_data.sft_dataset(dc, tokenizer, split="train", global_batch_size=tc.batch_size, **common)
    eval_data = None
    if dc.eval_sources:
        eval_data = sft_data.sft_dataset(dc, tokenizer, split="eval",
                                         global_batch_size=tc.eval_batch_size or tc.batch_size, **common)
    load_params = params_loader(config, reader, model_config, mesh) if config.init_from else None
    tokens_per_step = tc.batch_size * dc.seq_len
    return loop.Stage(
        name=config.stage,
        init_params=lambda rng: llama.init(model_config, rng),
        loss_fn=pretrain.lm_loss_fn(model_config),
        train_data=train_data,
        eval_data=eval_data,
        flops_per_step=llama.flops_per_token(model_config, dc.seq_len) * tokens_per_step,
        tokens_per_step=tokens_per_step,
        load_params=load_params,
        summarize=summarize,
        sample_fn=chat_sample_fn(config, tokenizer, model_config, dc.seq_len) if config.sample.prompts else None,
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Runs the stage (training the run's tokenizer first if it has none); returns the loop's result."""
    return loop.run_stage(config, build_stage)
