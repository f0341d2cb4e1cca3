"""An lm-evaluation-harness model backend, `jaxllm`, on jaxllm's forward pass and KV-cache sampler.

`import jaxllm.evaluation.harness` registers the model name `jaxllm` with the harness
(`lm_eval.api.registry`); `jaxllm lm-eval ARGS` (jaxllm/cli.py) runs the harness's own command line
with it as the default model and the offline tasks of `jaxllm/evaluation/tasks/` included. In Python:
`lm_eval.simple_evaluate(model=JaxLLM(model="gguf:FILE"), tasks=[...], task_manager=...)`.

**Model arguments** (`--model_args key=value,...`): `model=SPEC` (`hf:DIR`, `hf:ORG/NAME[@REV]`,
`gguf:FILE`: `jaxllm.inference.load_model`) or `run=RUN_DIR` with `stage=STAGE` (default `sft`:
`jaxllm.inference.load_stage`); `max_length` (tokens; default the model's context:
`max_position_embeddings`, or the stage's training `seq_len`); `max_gen_toks` (default 256);
`add_bos_token` (default the tokenizer's own setting, as the harness's `hf` backend: SmolLM2 adds
none, jaxllm's SentencePiece models add bos); `max_batch_tokens` (rows x padded length per forward
pass, default 4096: bounds the `[rows, length, vocab]` float32 logits); `gen_chunk` (new tokens
per sampler call at most, default 0: the request's `max_gen_toks`); `seed` (sampling, default 0). The harness's
`--batch_size N` is the number of rows per forward pass ("auto" takes 16).

**Log-likelihood** (`loglikelihood`, `loglikelihood_rolling`). Requests are tokenised as the
harness's `TemplateLM` does (context and continuation split on the whole encoding; an empty context
is the prefix token: bos, else eos), sorted by length, and scored in batches: each row is
`(context + continuation)[:-1]` right-padded, its targets the same tokens shifted by one, its
`loss_mask` 1 on the continuation's tokens. A batch is padded to a fixed set of shapes: the length
to the next power of two (`jaxllm.inference.bucket`, at most `max_length`), the rows to
`min(batch_size, max_batch_tokens // length)` rounded up to the mesh's batch shards (copies of the
last row, dropped), so a whole evaluation compiles the forward pass once per length bucket. One
jitted program (`scoring.target_logprobs`, chunked when `model.loss_chunk_size` is set) returns per row the summed float32
log-probability of the continuation and whether every continuation token is the argmax
(`is_greedy`). A request longer than `max_length + 1` tokens keeps its last `max_length + 1` (the
harness's `hf` backend rule: the left of the context is cut), is counted in `truncated` and logged.
A continuation longer than `max_length` is an error. Rolling log-likelihoods split the document
into the harness's disjoint windows (`lm_eval.utils.get_rolling_token_windows`, one token of
context, the prefix token first) and sum them.

**Generation** (`generate_until`). Requests are grouped by their `gen_kwargs` (`until`,
`max_gen_toks`, `do_sample`, `temperature`, `top_k`, `top_p`; other keys are ignored with a
warning). Contexts longer than `max_length - max_gen_toks` keep their last tokens (counted). Rows are
left-padded to a power-of-two length and decoded with `jaxllm.sampling.sample` (greedy unless
`do_sample` with a temperature > 0), which ends a row at eos, the chat template's end of turn
(`template.stop_ids`) or a stop sequence that is one token. A call makes up to `gen_chunk` new
tokens (default: all `max_gen_toks` in one call); after it a row is done when it emitted one of
those stop ids, when its decoded text contains a stop sequence, or after `max_gen_toks`, and the
others continue from their prompt plus what they generated in a new call. (A multi-token stop
sequence such as "Question:" is found in the text only after the call: ending rows there inside
the sampler would take a second call per row, whose prefill and compilation cost more on CPU than
the tokens they save; measured in the note.) The text is decoded without special tokens, up to the
first stop id, and cut before the first stop sequence (the harness's `hf` backend does the same;
eos's text is one of the stop sequences).

**Chat template** (`--apply_chat_template`): the model's own jinja `chat_template` (an `hf:` or
`gguf:` model), or jaxllm's role-marker template (`jaxllm.data.chat.jinja_template`) for a run's
own tokenizer, rendered to text that `tok_encode` then encodes.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from jaxllm import config as config_lib
from jaxllm import inference
from jaxllm import sampling
from jaxllm import scoring
from jaxllm import sharding
from jaxllm.data import chat
from jaxllm.models import llama

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
# Arguments the harness passes to every backend; JAX places the computation itself.
HARNESS_ARGS = ("device", "max_batch_size", "trust_remote_code", "dtype", "parallelize")
SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def load(model: str | None, run: str | None, stage: str) -> inference.LoadedStage:
    """The model of `model=SPEC` or `run=RUN_DIR,stage=STAGE`.

    Raises:
      ConfigError: neither or both given; HubError (a ConfigError) / FileNotFoundError: as
        `inference.load_model` / `inference.load_stage`.
    """
    if bool(model) == bool(run):
        raise config_lib.ConfigError("jaxllm model_args: give model=SPEC (hf:DIR, hf:ORG/NAME, gguf:FILE) or "
                                     f"run=RUN_DIR[,stage=STAGE] (got model={model!r}, run={run!r})")
    return inference.load_model(model) if model else inference.load_stage(run, stage)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise config_lib.ConfigError(f"jaxllm model_args: {name}={value!r} must be true or false")
    return text in ("true", "1")


def _int(value: Any, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise config_lib.ConfigError(f"jaxllm model_args: {name}={value!r} must be an integer >= {minimum}")
    return number


def scoring_batch(sequences: Sequence[Sequence[int]], num_scored: Sequence[int], length: int,
                  rows: int) -> dict[str, np.ndarray]:
    """Right-padded rows that score the last `num_scored[i]` tokens of `sequences[i]`.

    Row `i` feeds `sequences[i][:-1]` and predicts `sequences[i][1:]`; rows past `len(sequences)`
    repeat the last one with an all-zero `loss_mask` (their results are dropped).

    Args:
      sequences: token ids, each of `2 <= n <= length + 1` tokens.
      num_scored: continuation tokens per sequence, `1 <= num_scored[i] <= n - 1`.
      length: padded row length (static shape of the program).
      rows: padded row count, `>= len(sequences)`.

    Returns:
      int32 `inputs`, `targets`, `positions`, `segment_ids` and float32 `loss_mask`, all `[rows, length]`.
    """
    out = {k: np.zeros((rows, length), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((rows, length), np.float32)
    for i in range(rows):
        seq = np.asarray(sequences[min(i, len(sequences) - 1)], np.int32)
        n = len(seq) - 1
        out["inputs"][i, :n], out["targets"][i, :n] = seq[:-1], seq[1:]
        out["positions"][i, :n], out["segment_ids"][i, :n] = np.arange(n), 1
        if i < len(sequences):
            out["loss_mask"][i, n - num_scored[i]:n] = 1.0
    return out


@functools.partial(jax.jit, static_argnums=0)
def _score(model_config: llama.LlamaConfig, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """`(logprob [rows] float32, is_greedy [rows] bool)` of the masked targets of `scoring_batch` rows."""
    logprobs, correct = scoring.target_logprobs(model_config, params, batch["inputs"], batch["positions"],
                                                batch["segment_ids"], batch["targets"])
    scored = batch["loss_mask"] > 0
    return jnp.sum(jnp.where(scored, logprobs, 0.0), axis=-1), jnp.all(correct | ~scored, axis=-1)


@register_model("jaxllm")
class JaxLLM(TemplateLM):
    """The `jaxllm` harness model (module docstring).

    Attributes:
      stage: The loaded model (`inference.LoadedStage`): config, params, mesh, chat template.
      name: The model spec or `RUN_DIR/STAGE`, for file names and messages.
      truncated: Counter of requests cut from the left, by request type.
      requests: Counter of requests served, by request type.
    """

    last_instance: "JaxLLM | None" = None  # the latest model built, for the CLI's truncation summary

    def __init__(self, model: str | None = None, run: str | None = None, stage: str = "sft",
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, add_bos_token: bool | str | None = None,
                 max_batch_tokens: int | str = 4096, gen_chunk: int | str = 0, seed: int | str = 0,
                 **unknown: Any):
        """Loads the model (see the module docstring for the arguments).

        Raises:
          ConfigError: an unknown or malformed argument, or a model that does not load (as `load`).
        """
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if k not in HARNESS_ARGS}
        if unknown:
            raise config_lib.ConfigError(f"jaxllm model_args: unknown {', '.join(sorted(unknown))} (known: model, run, "
                                         "stage, max_length, max_gen_toks, add_bos_token, max_batch_tokens, "
                                         "gen_chunk, seed)")
        if str(batch_size).startswith("auto"):
            logger.warning("jaxllm: batch_size=%s is taken as %d rows", batch_size, DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.max_batch_tokens = _int(max_batch_tokens, "max_batch_tokens", 1)
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks", 1)
        self.gen_chunk = _int(gen_chunk, "gen_chunk", 0)
        self.stage = load(model, run, stage)
        self.name = model or f"{run}/{stage}"
        self.max_length = (_int(max_length, "max_length", 2) if max_length is not None
                           else int(self.stage.max_context))
        self.tok = self.stage.template.tokenizer
        self.add_bos_token = (_flag(add_bos_token, "add_bos_token") if add_bos_token is not None
                              else bool(getattr(self.tok, "add_bos", True)) and self.tok.bos_id >= 0)
        self._rng = jax.random.key(_int(seed, "seed", 0))
        self._sample_calls = 0
        self._special_ids = frozenset(int(i) for i in getattr(self.tok, "special_ids", ()))
        self.truncated: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        JaxLLM.last_instance = self

    # ---- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """End of text: eos (what `generate_until` stops on)."""
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and every rolling window) starts from: bos, else eos."""
        return int(self.tok.bos_id) if self.tok.bos_id >= 0 else int(self.tok.eos_id)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of `string`; bos first when `add_special_tokens` (default: `add_bos_token`) and the
        text does not already start with it (a rendered chat template may)."""
        del kwargs
        ids = [int(i) for i in self.tok.encode(string)]
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and self.tok.bos_id >= 0 and ids[:1] != [self.tok.bos_id]:
            ids = [int(self.tok.bos_id)] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (as `skip_special_tokens=True`)."""
        return self.tok.decode([int(i) for i in ids if int(i) not in self._special_ids])

    # ---- log-likelihood ---------------------------------------------------------------------------

    def _rows_for(self, length: int) -> int:
        rows = max(1, min(self.batch_size, self.max_batch_tokens // length))
        shards = sharding.batch_shards()
        return -(-rows // shards) * shards

    def score_tokens(self, sequences: Sequence[Sequence[int]], num_scored: Sequence[int],
                     disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """`(log p(last num_scored tokens | the tokens before), is_greedy)` of each sequence.

        Sequences of at most `max_length + 1` tokens (callers truncate), scored in length-sorted,
        bucket-padded batches (module docstring); results in input order.
        """
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        bar = tqdm(total=len(order), desc="jaxllm loglikelihood", disable=disable_tqdm)
        with sharding.activate(self.stage.mesh, self.stage.rules):
            start = 0
            while start < len(order):
                length = min(self.max_length, inference.bucket(len(sequences[order[start]]) - 1))
                rows = self._rows_for(length)
                chunk = order[start:start + rows]
                batch = scoring_batch([sequences[i] for i in chunk], [num_scored[i] for i in chunk], length, rows)
                logprob, greedy = _score(self.stage.model_config, self.stage.params,
                                         {k: jnp.asarray(v) for k, v in batch.items()})
                logprob, greedy = np.asarray(logprob), np.asarray(greedy)
                for row, i in enumerate(chunk):
                    results[i] = (float(logprob[row]), bool(greedy[row]))
                start += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Scores `((context, continuation), context_ids, continuation_ids)` requests (TemplateLM's).

        Raises:
          ConfigError: a continuation longer than `max_length` tokens.
        """
        sequences, num_scored, cut = [], [], 0
        for (strings, context, continuation) in requests:
            if len(continuation) > self.max_length:
                raise config_lib.ConfigError(
                    f"a continuation of {len(continuation)} tokens is longer than the context of {self.max_length} "
                    f"tokens (max_length): {str(strings[1] if strings else '')[:60]!r}...")
            whole = list(context) + list(continuation)
            cut += len(whole) > self.max_length + 1
            sequences.append(whole[-(self.max_length + 1):])
            num_scored.append(len(continuation))
        self._count("loglikelihood", len(requests), cut)
        results = self.score_tokens(sequences, num_scored, disable_tqdm=disable_tqdm)
        for (strings, _, _), answer in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, in the harness's disjoint windows (module docstring)."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((list(context) + list(continuation), len(continuation)))
                owner.append(k)
        self.requests["loglikelihood_rolling"] += len(requests)
        scores = self.score_tokens([w for w, _ in windows], [n for _, n in windows], disable_tqdm=disable_tqdm)
        totals = np.zeros(len(requests), np.float64)
        np.add.at(totals, np.asarray(owner, np.int64), [s for s, _ in scores])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # ---- generation -------------------------------------------------------------------------------

    def _settings(self, gen_kwargs: dict) -> dict[str, Any]:
        """Sampler settings of one `gen_kwargs` dict (module docstring).

        Raises:
          ConfigError: `max_gen_toks` that leaves no room for a context, or a bad sampling value.
        """
        if not isinstance(gen_kwargs, dict):
            raise config_lib.ConfigError(f"generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
        ignored = sorted(set(gen_kwargs) - set(SAMPLING_KEYS))
        if ignored:
            logger.warning("jaxllm: generation settings %s are not supported and ignored", ", ".join(ignored))
        eos_text = self.tok.decode([self.eot_token_id])
        until = [u for u in handle_stop_sequences(gen_kwargs.get("until"), eos=eos_text or None) if u]
        max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        do_sample = gen_kwargs.get("do_sample")
        temperature = float(gen_kwargs.get("temperature", 1.0 if do_sample else 0.0))
        if do_sample is False or (do_sample is None and "temperature" not in gen_kwargs):
            temperature = 0.0
        top_k, top_p = int(gen_kwargs.get("top_k") or 0), float(gen_kwargs.get("top_p") or 1.0)
        if not 1 <= max_gen < self.max_length:
            raise config_lib.ConfigError(f"generate_until: max_gen_toks={max_gen} must be in [1, max_length="
                                         f"{self.max_length}) so that a context fits")
        inference.check_generation_args(max_new_tokens=max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                                        beam_size=1, max_context=self.max_length)
        stop_ids = {self.eot_token_id, *(int(i) for i in self.stage.template.stop_ids)}
        for text in until:
            ids = self.tok.encode(text)
            if len(ids) == 1:
                stop_ids.add(int(ids[0]))
        return dict(until=until, max_gen=max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_ids=tuple(sorted(stop_ids)))

    def _decode(self, ids: Sequence[int], settings: dict) -> str:
        """Text of generated ids: up to the first stop id, without special tokens, before the first stop sequence."""
        ids = list(ids[:settings["max_gen"]])
        cut = next((k for k, i in enumerate(ids) if i in settings["stop_ids"]), len(ids))
        text = self.tok_decode(ids[:cut])
        for term in settings["until"]:
            text = text.split(term)[0]
        return text

    def _stopped(self, ids: Sequence[int], settings: dict) -> bool:
        if len(ids) >= settings["max_gen"] or any(i in settings["stop_ids"] for i in ids):
            return True
        text = self.tok_decode(ids)
        return any(term in text for term in settings["until"])

    def generate_ids(self, prompts: Sequence[Sequence[int]], settings: dict) -> list[list[int]]:
        """Generated ids of each prompt (module docstring: sampler calls, stop checks between them).

        Args:
          prompts: non-empty token ids, each at most `max_length - settings["max_gen"]` long.
          settings: as `_settings` returns.
        """
        chunk = min(self.gen_chunk or settings["max_gen"], settings["max_gen"])
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        pad_id = max(int(self.tok.pad_id), 0)
        with sharding.activate(self.stage.mesh, self.stage.rules):
            while active:
                rows = [list(prompts[i]) + generated[i] for i in active]
                longest = max(len(r) for r in rows)
                length = inference.bucket(longest)
                if length + chunk - 1 > self.max_length:  # padding must not cost context
                    length = max(longest, self.max_length - chunk + 1)
                tokens, lengths = sampling.left_pad(rows, pad_id=pad_id, length=length)
                tokens = sampling.pad_rows(tokens, self.batch_size)
                lengths = sampling.pad_rows(lengths, self.batch_size)
                rng = jax.random.fold_in(self._rng, self._sample_calls)
                self._sample_calls += 1
                out = sampling.sample(self.stage.model_config, self.stage.params, tokens, lengths, rng,
                                      max_new_tokens=chunk, temperature=settings["temperature"],
                                      top_k=settings["top_k"], top_p=settings["top_p"],
                                      stop_ids=settings["stop_ids"], max_context=self.max_length, pad_id=pad_id)
                new, new_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
                still = []
                for row, i in enumerate(active):
                    generated[i] += new[row, :new_lengths[row]].tolist()
                    if not self._stopped(generated[i], settings):
                        still.append(i)
                active = still
        return generated

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut before the first stop sequence (module docstring)."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for k, (_, gen_kwargs) in enumerate(args):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(k)
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="jaxllm generate_until", disable=disable_tqdm)
        cut = 0
        for members in groups.values():
            settings = self._settings(args[members[0]][1])
            budget = self.max_length - settings["max_gen"]
            prompts = {}
            for k in members:
                ids = self.tok_encode(args[k][0]) or [self.prefix_token_id]
                cut += len(ids) > budget
                prompts[k] = ids[-budget:]
            order = sorted(members, key=lambda k: -len(prompts[k]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                for k, ids in zip(batch, self.generate_ids([prompts[k] for k in batch], settings)):
                    results[k] = self._decode(ids, settings)
                    self.cache_hook.add_partial("generate_until", args[k], results[k])
                bar.update(len(batch))
        bar.close()
        self._count("generate_until", len(args), cut)
        return results  # type: ignore[return-value]

    def _count(self, kind: str, total: int, cut: int) -> None:
        self.requests[kind] += total
        self.truncated[kind] += cut
        if cut:
            logger.warning("jaxllm %s: %d of %d requests were longer than the context of %d tokens and were "
                           "truncated from the left", kind, cut, total, self.max_length)

    def truncation_summary(self) -> str:
        """One line: requests served and truncated from the left, by type."""
        parts = [f"{kind} {self.truncated[kind]} of {n}" for kind, n in sorted(self.requests.items())]
        return (f"jaxllm: requests truncated from the left to the context of {self.max_length} tokens: "
                + (", ".join(parts) or "none served"))

    # ---- chat template ----------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """The model spec as a file-name-safe string (the harness keys its request cache on it)."""
        return re.sub(r"[^\w.-]+", "__", self.name)

    def _template_source(self) -> str:
        template = self.stage.template
        return template.source if hasattr(template, "source") else chat.jinja_template(self.tok)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The jinja source of the chat template used (module docstring), or None when not applied."""
        return self._template_source() if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered to text by the model's chat template.

        With `add_generation_prompt=False` the last (assistant) message is left open, as
        transformers' `continue_final_message`: the text ends with that message's content.

        Raises:
          ChatError: a conversation the template or `chat.validate_messages` rejects.
        """
        template = self.stage.template
        if hasattr(template, "render_text"):
            text = template.render_text(chat_history, add_generation_prompt=add_generation_prompt)
        else:  # jaxllm's own markers; bos comes from tok_encode (SentencePiece does not parse "<s>" text)
            from jaxllm.data import chat_template  # noqa: PLC0415

            chat.validate_messages(chat_history, training=not add_generation_prompt)
            text = chat_template.compile_template(self._template_source()).render(
                messages=chat_history, add_generation_prompt=add_generation_prompt, bos_token="")
        if not add_generation_prompt and chat_history:
            content = chat_history[-1]["content"]
            end = text.rfind(content)
            if end >= 0:
                text = text[:end + len(content)]
        return text
