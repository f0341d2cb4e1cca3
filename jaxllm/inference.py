"""Inference from a finished stage of a run: loading, batched chat generation, reward scoring.

The library behind `jaxllm generate`, `jaxllm chat` and `jaxllm score` (see jaxllm/cli.py).

**Loading** (`load_stage`). A finished stage `RUN_DIR/<stage>/` holds `config.json` (its resolved
config), `params/` and `done.json` (both written at its last step); the tokenizer is
`RUN_DIR/tokenizer/tokenizer.model`. Params are restored onto a mesh over all devices of this
single-process job (`mesh.shape=(1, -1, 1)`, the stage's logical rules), whatever mesh trained them. The model's
context, `max_context`, is the stage's training length `data.seq_len`.

**Generation** (`generate`). Each prompt (messages ending on a user turn) is rendered with
`ChatTemplate.prompt` (ending with `<|assistant|>`). A prompt longer than its budget keeps bos and
its last `budget - 1` tokens, as `jaxllm.data.prompts` does: the budget is `max_context` for
sampling (the sampler's sliding window handles a longer generation, see `jaxllm.sampling`) and
`max_context - max_new_tokens + 1` for beam search, whose prompt and output must fit together.
Rows are left-padded to a power-of-two length (`bucket`) and the batch is filled up to `rows` with
copies of its last prompt, so a whole file compiles the sampler only a few times. A response stops
after `<|end|>` or eos (`ChatTemplate.stop_ids`); its text is `decode_response` of the ids.

**Scoring** (`score_groups`). A conversation is one sequence; a preference record is a group of
responses to one prompt (`jaxllm.data.preference` reads it, with its skips and merged turns). Each
sequence is built exactly as the reward stage builds its inputs (`preference.render_groups`:
`template.prompt(prompt)` + the response's training render without the final eos), so the reward
is read where training read it, at the `<|end|>` closing the last assistant turn, from right-padded
rows and their lengths (`reward.sequence_rewards`). A group whose longest sequence exceeds
`max_context` is cut as the preference data's `keep_end` cuts it: every sequence loses the same
`longest - max_context` prompt tokens after bos, so bos, the end of the prompt and the responses
stay. When that would leave no prompt token but `<|assistant|>` (where training drops the group),
the prompt keeps bos and `<|assistant|>`, and a sequence still too long keeps bos and its last
`max_context - 1` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxllm import checkpoint as ckpt_lib
from jaxllm import config as config_lib
from jaxllm import fs
from jaxllm import sampling
from jaxllm import sharding
from jaxllm.data import chat
from jaxllm.data import preference, preference_records
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.sources import DataError
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import reward

MIN_BUCKET = 16  # shortest padded row length


def bucket(n: int) -> int:
    """The padded length of a row of `n` tokens: the next power of two >= `n` (at least 16).

    A file of prompts of any lengths then compiles the sampler (or the scorer) at most
    `log2(max_context / 16) + 1` times per batch size, for at most twice the tokens of the prompt.
    """
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class LoadedStage:
    """A finished stage of a run, ready for inference.

    Attributes:
      run_dir: The run directory.
      name: The stage (`sft`, `reward`, ...).
      config: Its resolved config (`RUN_DIR/<stage>/config.json`).
      model_config: The decoder's config.
      params: Unboxed params on `mesh` (`lm_head` or, with `head="scalar"`, `score_head`).
      template: The chat template over the run's tokenizer.
      mesh, rules: Where the params live and the logical-axis rules to trace under.
      max_context: Training sequence length (`data.seq_len`), in tokens.
    """

    run_dir: epath.Path
    name: str
    config: ml_collections.ConfigDict
    model_config: llama.LlamaConfig
    params: Any
    template: chat.ChatTemplate
    mesh: jax.sharding.Mesh
    rules: Any
    max_context: int


def load_stage(run_dir: str | pathlib.Path, stage: str, *, head: str = "lm",
               mesh: jax.sharding.Mesh | None = None) -> LoadedStage:
    """Loads the config, tokenizer and params of the finished `stage` of `run_dir`.

    Args:
      run_dir: The run directory.
      stage: A stage directory of it (`sft`, `dpo`, `ppo`, `pretrain`; `reward` with `head="scalar"`).
      head: "lm" (language model) or "scalar" (reward model).
      mesh: Mesh to restore onto; default: all devices on `fsdp`.

    Raises:
      FileNotFoundError: no run directory, or no tokenizer model (naming the path).
      ConfigError: no such stage, a stage that has not finished, a non-Llama model, or params of
        the other head kind (naming the path).
    """
    run_dir = fs.path(run_dir)
    stage_dir = run_dir / stage
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    if not (stage_dir / "config.json").is_file():
        present = sorted(p.parent.name for p in run_dir.glob("*/config.json"))
        raise config_lib.ConfigError(f"{stage_dir / 'config.json'} not found: {run_dir} has no {stage} stage "
                                     f"(stages there: {', '.join(present) or 'none'})")
    if not (stage_dir / "done.json").is_file():
        raise config_lib.ConfigError(f"{stage_dir} has not finished (no done.json): run `jaxllm {stage}` "
                                     "to its last step first")
    config = config_lib.load_json(stage_dir / "config.json")
    if config.model.get("family", "llama") != "llama":
        raise config_lib.ConfigError(f"{stage_dir}: model.family={config.model.family!r}; inference "
                                     "supports decoder-only llama models")
    markers = tokenizer_lib.role_markers(config.tokenizer) if "tokenizer" in config else None
    tokenizer = tokenizer_lib.load_tokenizer(config_lib.tokenizer_dir(run_dir), markers)
    model_config = llama.LlamaConfig.from_config(config.model)
    rules = config.mesh.rules if "mesh" in config else sharding.DEFAULT_RULES
    mesh = mesh or sharding.make_mesh(sharding.default_config())
    abstract = loop.abstract_params(lambda rng: llama.init(model_config, rng, head=head), mesh, rules)
    try:
        params = ckpt_lib.load_params(stage_dir / "params", abstract)
    except ValueError as e:
        need = ("a reward-model stage (scalar head), e.g. --stage reward" if head == "scalar" else
                "a language-model stage (pretrain, sft, dpo, ppo); reward models are for `jaxllm score`")
        raise config_lib.ConfigError(f"{e}; this command needs {need}") from None
    return LoadedStage(run_dir, stage, config, model_config, params, chat.template_for(tokenizer), mesh, rules,
                       int(config.data.seq_len))


DEFAULT_MAX_CONTEXT = 4096  # context of a checkpoint whose config names none


def load_model(text: str, *, head: str = "lm", mesh: jax.sharding.Mesh | None = None) -> LoadedStage:
    """Loads a published checkpoint for inference: `hf:DIR`, `hf:ORG/NAME[@REV]` or `gguf:FILE`.

    The model config, tokenizer and chat template are the checkpoint's own (`jaxllm.hub.spec`); the
    context is its `max_position_embeddings` (`DEFAULT_MAX_CONTEXT` when absent). `run_dir` is
    `runs/models/<file or folder name>`, where commands write their default outputs.

    Raises:
      HubError: a spec that is not `hf:` / `gguf:`, or a checkpoint that cannot be read (naming it).
    """
    from jaxllm.hub import HubError  # noqa: PLC0415
    from jaxllm.hub import spec as hub_spec  # noqa: PLC0415

    spec = hub_spec.parse(text)
    if not spec.external:
        raise HubError(f"--model {text!r}: expected hf:DIR, hf:ORG/NAME[@REVISION] or gguf:FILE "
                       "(a stage of a run is --run RUN_DIR --stage STAGE)")
    config = ml_collections.ConfigDict({"model": llama.default_config(), "mesh": sharding.default_config()})
    reader = hub_spec.configure_from(config, text)
    if hub_spec.family(reader) != "llama":
        raise HubError(f"{spec}: a {reader.config.get('model_type')!r} model; generate, chat, sample and score "
                       "take decoder-only (llama-family) models")
    model_config = llama.LlamaConfig.from_config(config.model)
    tokenizer = hub_spec.load_tokenizer(spec)
    mesh = mesh or sharding.make_mesh(sharding.default_config())
    rules = config.mesh.rules
    params = hub_spec.params_loader(reader, model_config, mesh, rules, head=head)(None)
    max_context = int(reader.config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT)
    name = pathlib.Path(spec.value.rstrip("/")).name or "model"
    return LoadedStage(fs.path("runs") / "models" / name, "", config, model_config, params,
                       chat.template_for(tokenizer), mesh, rules, max_context)


def load(run_dir: str | None, stage: str, model: str | None, *, head: str = "lm") -> LoadedStage:
    """`load_model(model)` when a model spec is given, else `load_stage(run_dir, stage)`.

    Raises:
      ConfigError: neither or both of a run and a model.
    """
    if bool(model) == bool(run_dir):
        raise config_lib.ConfigError("give either --run RUN_DIR (with --stage) or --model SPEC")
    return load_model(model, head=head) if model else load_stage(run_dir, stage, head=head)


def check_generation_args(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                          beam_size: int, max_context: int) -> None:
    """Validates sampling settings where they enter (the CLI flags).

    Raises:
      ConfigError: naming the flag that is out of range or conflicts with another.
    """
    problems = [
        max_new_tokens < 1 and f"--max_new_tokens={max_new_tokens} must be >= 1",
        temperature < 0 and f"--temperature={temperature} must be >= 0 (0 = greedy)",
        top_k < 0 and f"--top_k={top_k} must be >= 0 (0 = off)",
        not 0 < top_p <= 1 and f"--top_p={top_p} must be in (0, 1]",
        beam_size < 1 and f"--beam_size={beam_size} must be >= 1",
        beam_size > 1 and (temperature > 0 or top_k or top_p < 1)
        and "--beam_size > 1 is deterministic: drop --temperature, --top_k and --top_p",
        beam_size > 1 and max_new_tokens > max_context
        and f"beam search needs --max_new_tokens={max_new_tokens} <= the model's context {max_context}",
    ]
    if any(problems):
        raise config_lib.ConfigError("; ".join(p for p in problems if p))


class Generation(NamedTuple):
    """One generated response.

    Attributes:
      tokens: Generated ids (at most `max_new_tokens`), including the stop id when there is one.
      response: Text of `tokens` up to the first stop id or role marker (`decode_response`).
      stopped: The last generated id is `<|end|>` or eos: the model ended its turn in budget.
      prompt_tokens: Prompt ids fed to the model (after truncation).
      prompt_truncated: The prompt was longer than its budget and lost tokens after bos.
    """

    tokens: list[int]
    response: str
    stopped: bool
    prompt_tokens: int
    prompt_truncated: bool


def fit_prompt(ids: np.ndarray, budget: int) -> np.ndarray:
    """`ids` `[n]` if `n <= budget`, else bos (`ids[0]`) and the last `budget - 1` ids (`budget >= 2`)."""
    return ids if len(ids) <= budget else np.concatenate([ids[:1], ids[len(ids) - budget + 1:]])


def generate(stage: LoadedStage, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, beam_size: int = 1,
             alpha: float = 0.6, rows: int = 0) -> list[Generation]:
    """Responses to a batch of conversations (see the module docstring).

    Args:
      stage: A language-model stage.
      conversations: `batch` conversations, each ending on a user turn (`chat.validate_messages`).
      max_new_tokens: Tokens per response at most.
      rng: `jax.random` key of the batch (unused by greedy decoding and beam search).
      temperature, top_k, top_p: As `sampling.sample` (temperature 0 = greedy).
      beam_size: > 1: `sampling.beam_search` with GNMT length penalty `alpha`, best beam kept.
      rows: Pad the batch to this many rows (copies of the last prompt); 0 = `batch`.

    Returns:
      One `Generation` per conversation, in order.

    Raises:
      chat.ChatError: a conversation that does not end on a user turn.
    """
    template = stage.template
    budget = stage.max_context - (max_new_tokens - 1 if beam_size > 1 else 0)
    full = [template.prompt(messages) for messages in conversations]
    prompts = [fit_prompt(p, max(budget, 2)) for p in full]
    longest = max(len(p) for p in prompts)
    length = bucket(longest)
    if length + max_new_tokens - 1 > stage.max_context:  # padding must not cost context
        length = max(longest, stage.max_context - max_new_tokens + 1)
    pad_id = max(template.tokenizer.pad_id, 0)
    tokens, lengths = sampling.left_pad(prompts, pad_id=pad_id, length=length)
    tokens, lengths = sampling.pad_rows(tokens, rows or 1), sampling.pad_rows(lengths, rows or 1)
    with sharding.activate(stage.mesh, stage.rules):
        if beam_size > 1:
            out = sampling.beam_search(stage.model_config, stage.params, tokens, lengths, beam_size=beam_size,
                                       max_new_tokens=max_new_tokens, alpha=alpha, stop_ids=template.stop_ids,
                                       max_context=stage.max_context, pad_id=pad_id)
            new, new_lengths = np.asarray(out.tokens)[:, 0], np.asarray(out.lengths)[:, 0]
        else:
            out = sampling.sample(stage.model_config, stage.params, tokens, lengths, rng,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  stop_ids=template.stop_ids, max_context=stage.max_context, pad_id=pad_id)
            new, new_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    results = []
    for i, prompt in enumerate(prompts):
        ids = new[i, : new_lengths[i]].tolist()
        results.append(Generation(ids, template.decode_response(ids), bool(ids) and ids[-1] in template.stop_ids,
                                  len(prompt), len(prompt) < len(full[i])))
    return results


def fit_conversation(template: chat.ChatTemplate, messages: Sequence[dict], budget: int) -> tuple[list[dict], int]:
    """Drops the oldest user/assistant exchanges until the generation prompt fits `budget` tokens.

    A leading system message and the last user turn always stay; when those alone are too long,
    `generate` truncates the prompt itself (bos and its end stay).

    Args:
      template: The chat template.
      messages: A conversation ending on a user turn.
      budget: Prompt tokens allowed (`max_context - max_new_tokens` leaves room for the reply).

    Returns:
      `(messages, dropped)`: the kept conversation (a new list) and the number of exchanges dropped.
    """
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(head):])
    dropped = 0
    while len(turns) > 1 and len(template.prompt(head + turns)) > budget:
        turns, dropped = turns[2:], dropped + 1  # one user turn and its reply
    return head + turns, dropped


def read_prompts(path: str | pathlib.Path, limit: int = 0) -> list[tuple[Any, list[dict]]]:
    """`(id, messages)` of the first `limit` (0: all) records of a prompt file.

    Records are anything `chat.load_prompts` reads (MT-Bench's `turns`: the first turn). The id
    is the record's `id`, else its `question_id`, else its 1-based line number.

    Raises:
      DataError: as `chat.load_prompts`, naming file and line.
    """
    out = []
    for lineno, record in chat.read_records(path):
        out.append((record.get("id", record.get("question_id", lineno)), chat.to_prompt(record, f"{path}:{lineno}")))
        if limit and len(out) == limit:
            break
    return out


def write_jsonl(path: str | pathlib.Path, rows: Sequence[dict]) -> None:
    """Writes one JSON object per line to `path` atomically (parent directories are created)."""
    fs.write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_scoring_records(path: str | pathlib.Path,
                         stats: preference_records.PreferenceStats | None = None) -> list[tuple[Any, str, dict]]:
    """Conversations and preference groups to score, as `(id, kind, group)`.

    `kind` and record formats, by the first rule that applies:
    - "group": preference records (`chosen`/`rejected` message lists or HH strings, `chosen_text`,
      ranking groups with `responses`), read by `preference_records.normalize_record`; its counted skips
      (identical responses, empty prompt, all ranks tied) are left out and counted in `stats`.
    - "generation": `prompt` messages with a `response` string (the rows `jaxllm generate` writes).
    - "conversation": anything `chat.to_messages` reads (`messages`, ShareGPT, Alpaca,
      prompt/completion), ending on an assistant turn.
    `group` is `{"prompt", "responses", "ranks", "margin"}` as `preference_records.load_groups` returns it
    (a conversation: the messages before its last assistant turn, and that turn), plus `is_safety`:
    the record's optional boolean `is_safety` (Llama-2's safety-prompt tag), else None. The id is
    the record's `id`, else its 1-based line number.

    Raises:
      DataError: a bad record or conversation, naming file and line.
    """
    stats = stats if stats is not None else preference_records.PreferenceStats()
    out = []
    for lineno, record in chat.read_records(path):
        where, rid = f"{path}:{lineno}", record.get("id", lineno)
        is_safety = chat.safety_flag(record, where)
        if any(k in record for k in ("chosen", "chosen_text", "responses")):
            group = preference_records.normalize_record(record, where, stats)
            if group is not None:
                out.append((rid, "group", {**group, "is_safety": is_safety}))
            continue
        if "response" in record and isinstance(record.get("prompt"), list):
            response = record["response"]
            if not isinstance(response, str):
                raise DataError(f"{where}: field 'response' is {type(response).__name__}, not a string")
            messages = record["prompt"] + [{"role": "assistant", "content": response}]
            try:
                chat.validate_messages(messages, training=True)
            except chat.ChatError as e:
                raise DataError(f"{where}: {e}") from None
            kind = "generation"
        else:
            kind, (_, messages) = "conversation", chat.to_messages(record, where)
        out.append((rid, kind, {"prompt": messages[:-1], "responses": [messages[-1:]], "ranks": [0], "margin": None,
                                "is_safety": is_safety}))
    return out


def score_groups(stage: LoadedStage, groups: Sequence[dict], *, batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Rewards of every response of every group (see the module docstring).

    Args:
      stage: A reward-model stage (`load_stage(..., head="scalar")`).
      groups: `{"prompt", "responses", ...}` dicts (`read_scoring_records`).
      batch_size: Sequences per forward pass.

    Returns:
      `(rewards, truncated)`: per group a float32 `[responses]` array of rewards (the scalar head at
      the last real token of each sequence), and a bool `[groups]` array, True where the group was
      longer than `max_context` and lost tokens after bos.
    """
    rendered = preference.render_groups(groups, stage.template)
    sequences, owner, truncated = [], [], np.zeros(len(groups), bool)
    for g in range(len(groups)):
        prompt = rendered.prompt_tokens[rendered.prompt_starts[g]:rendered.prompt_starts[g + 1]]
        responses = [rendered.response_tokens[rendered.response_starts[s]:rendered.response_starts[s + 1]]
                     for s in range(rendered.group_starts[g], rendered.group_starts[g + 1])]
        full = [np.concatenate([prompt, r]) for r in responses]
        shared = min(max(len(x) for x in full) - stage.max_context, len(prompt) - 2)  # cut of the prompt
        cuts = [max(shared, len(x) - stage.max_context) for x in full]
        truncated[g] = max(cuts) > 0
        sequences += [np.concatenate([x[:1], x[1 + cut:]]) if cut > 0 else x for x, cut in zip(full, cuts)]
        owner += [g] * len(full)

    def forward(params, inputs, positions, segment_ids, lengths):
        scores = llama.apply(stage.model_config, params, inputs, positions, segment_ids, head="scalar")
        return reward.sequence_rewards(scores, lengths)

    forward = jax.jit(forward, out_shardings=sharding.replicated(stage.mesh))
    values = []
    with sharding.activate(stage.mesh, stage.rules):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            length = min(stage.max_context, bucket(max(len(x) for x in chunk)))
            inputs = np.zeros((batch_size, length), np.int32)
            segment_ids, positions = np.zeros_like(inputs), np.zeros_like(inputs)
            lengths = np.ones(batch_size, np.int32)  # padding rows read slot 0; they are dropped
            for i, x in enumerate(chunk):
                inputs[i, :len(x)], segment_ids[i, :len(x)], positions[i, :len(x)] = x, 1, np.arange(len(x))
                lengths[i] = len(x)
            shards = sharding.batch_shards()
            arrays = [jnp.asarray(sampling.pad_rows(a, shards)) for a in (inputs, positions, segment_ids, lengths)]
            values.append(np.asarray(forward(stage.params, *arrays))[:len(chunk)])
    flat = np.concatenate(values) if values else np.zeros(0, np.float32)
    owner = np.asarray(owner, np.int64)
    return [flat[owner == g] for g in range(len(groups))], truncated
