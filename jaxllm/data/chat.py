"""Conversations: record formats, validation, and the chat template that renders them to ids.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional leading system message, then user and assistant turns alternating, starting with user.
Each message becomes `[role_id(role)] + encode(content) + [role_id("end_of_turn")]`; the
conversation starts with bos and, for training, ends with eos:

    [bos] <|system|> S <|end|> <|user|> U1 <|end|> <|assistant|> A1 <|end|> <|user|> U2 <|end|>
          <|assistant|> A2 <|end|> [eos]

Role markers and bos/eos are inserted as ids; content never produces them. The markers are
user-defined SentencePiece pieces, which `encode` would match anywhere in text, so content holding
a marker's text (e.g. a user pasting `<|end|>`) is encoded with the marker cut into ordinary
pieces (`<` + `|end|>`), which decode back to the same text.

**Record formats** (`to_messages`, `to_prompt`). A JSONL record's format is detected per record
by the first of these keys present:
- `messages`: `[{"role", "content"}...]` as above (the shared bundle's format).
- `conversations`: ShareGPT `[{"from", "value"}...]`; `from` human -> user, gpt -> assistant,
  system -> system.
- `instruction`: Alpaca; `output` required, `input` and `system` optional. The user turn is
  `instruction + "\\n\\n" + input` when `input` is non-empty, else `instruction`.
- `prompt`: `prompt` / `completion` strings -> one user and one assistant turn.
Generation prompts (`to_prompt`, `load_prompts`) take the same keys without the response (a
trailing assistant turn of `messages` / `conversations` is dropped; a `prompt` list is messages, as
in preference files) plus MT-Bench's `turns` (the first turn). Errors are `DataError`s naming
`file:line`; conversation errors are `ChatError`s (both are `ValueError`s).

**Supervision** (`ChatTemplate.render`). `target_mask[i] = 1` iff token `i` is something the model
is trained to produce: the content tokens of every assistant turn, the `<|end|>` closing it, and
the final eos. Everything else is 0: bos, every role marker (including `<|assistant|>`, which the
prompt supplies at generation time), and system and user content with their `<|end|>`. The mask is
aligned with the TOKENS. Training rows use the pretraining convention `inputs = row[:-1]`,
`targets = row[1:]`, so the SFT `loss_mask` (aligned with targets) is `target_mask[1:]` (and-ed
with "same packed example"; see `jaxllm.data.sft`): position `t` is scored iff token `t + 1` is
supervised.

**Generation** (`ChatTemplate.prompt`). A conversation ending on a user turn is rendered without
eos and followed by `<|assistant|>`; it is exactly the prefix of the training rendering that
precedes the first supervised token of the next assistant turn. Generation stops at `stop_ids`
(`<|end|>`, eos); `decode_response` cuts the generated ids there (or at any role marker, for a
model that starts the next turn without closing its own).

**Other templates.** The datasets and samplers use only `render` / `render_batch`, `prompt`,
`decode_response`, `stop_ids`, `fingerprint` and `tokenizer`. A Hugging Face model's own jinja
`chat_template` is `jaxllm.data.chat_template.JinjaChatTemplate`, with the same members (rendering
byte-identical to `apply_chat_template`, the mask on assistant contents and their end-of-turn
token); `template_for(tokenizer)` picks it when the tokenizer has a chat_template, else this
module's `ChatTemplate`. Validation (`validate_messages`) is shared.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxllm.data import sources
from jaxllm.data.sources import DataError

MESSAGE_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TEMPLATE_VERSION = "jaxllm-chat-v1"  # part of `fingerprint`: bump when the rendering changes


class ChatError(ValueError):
    """A conversation the template cannot render; the dataset layer adds the file and line."""


def validate_messages(messages: Any, *, training: bool = True) -> None:
    """Checks the structure of a conversation.

    Args:
      messages: The conversation: a list of `{"role", "content"}` dicts (other keys are ignored).
      training: True: it must end on an assistant turn (a training example). False: it must end
        on a user turn (a generation prompt).

    Raises:
      ChatError: not a list, empty, a message that is not an object or lacks role/content, an
        unknown role, non-string content, a system message anywhere but first, roles not
        alternating user/assistant (starting with user) after it, or the wrong last role.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise ChatError("empty messages: a conversation needs at least one turn")
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"message {k} is {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if key not in message:
                raise ChatError(f"message {k} has no {key!r}")
        role, content = message["role"], message["content"]
        if role not in MESSAGE_ROLES:
            raise ChatError(f"message {k}: unknown role {role!r}; expected one of {MESSAGE_ROLES}")
        if not isinstance(content, str):
            raise ChatError(
                f"message {k} ({role}): content is {type(content).__name__}, not a string"
            )
    first = 1 if messages[0]["role"] == "system" else 0
    if first == len(messages):
        raise ChatError("the conversation has a system message but no user turn")
    for k in range(first, len(messages)):
        expected = "user" if (k - first) % 2 == 0 else "assistant"
        if messages[k]["role"] != expected:
            raise ChatError(
                f"message {k}: role {messages[k]['role']!r} where {expected!r} was expected: "
                "after an optional leading system message, roles alternate user, assistant, ..."
            )
    last = messages[-1]["role"]
    if training and last != "assistant":
        raise ChatError(f"the conversation ends on a {last} turn; training needs an assistant turn")
    if not training and last != "user":
        raise ChatError(f"the prompt ends on a {last} turn; generation needs a user turn last")


# ---------------------------------------------------------------------------------------------
# Record formats
# ---------------------------------------------------------------------------------------------


def _optional_str(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, not a string")
    return value


def _sharegpt(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' is {type(turns).__name__}, not a list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{k}] is not an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: conversations[{k}]: unknown role {turn['from']!r}; expected one of "
                f"{tuple(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _alpaca_user(record: dict, where: str) -> list[dict]:
    """System (optional) and user messages of an Alpaca record."""
    instruction = sources.get_field(record, "instruction", where)
    extra = _optional_str(record, "input", where)
    system = _optional_str(record, "system", where)
    user = instruction + "\n\n" + extra if extra else instruction
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}]


def _checked(messages: Any, where: str, *, training: bool) -> list[dict]:
    try:
        validate_messages(messages, training=training)
    except ChatError as e:
        raise DataError(f"{where}: {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _no_format(record: dict, where: str, keys: Sequence[str]) -> DataError:
    return DataError(
        f"{where}: record has none of the fields {', '.join(map(repr, keys))} "
        f"(its keys: {sorted(record)[:8]})"
    )


def to_messages(record: Any, where: str) -> tuple[str, list[dict]]:
    """Converts one training record to `(format, messages)` (see the module docstring).

    Args:
      record: A decoded JSON object.
      where: `file:line`, for error messages.

    Returns:
      The format name ("messages", "sharegpt", "alpaca", "prompt_completion") and the validated
      conversation as fresh `{"role", "content"}` dicts (other keys dropped).

    Raises:
      DataError: no known format key, a missing or non-string field, an unknown ShareGPT role,
        or an invalid conversation (`validate_messages(..., training=True)`).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is {type(record).__name__}, not an object")
    if "messages" in record:
        fmt, messages = "messages", record["messages"]
    elif "conversations" in record:
        fmt, messages = "sharegpt", _sharegpt(record["conversations"], where)
    elif "instruction" in record:
        output = sources.get_field(record, "output", where)
        fmt = "alpaca"
        messages = _alpaca_user(record, where) + [{"role": "assistant", "content": output}]
    elif "prompt" in record:
        prompt = sources.get_field(record, "prompt", where)
        completion = sources.get_field(record, "completion", where)
        fmt = "prompt_completion"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
    else:
        raise _no_format(record, where, ("messages", "conversations", "instruction", "prompt"))
    return fmt, _checked(messages, where, training=True)


def join_repeated_roles(messages: list) -> tuple[list, bool]:
    """`messages` with consecutive messages of one role joined by a blank line (Anthropic HH's
    `flags: ["repeated_role_in_prompt"]` records), and whether any were joined. Items that are not
    `{"role": str, "content": str}` objects are passed through for the caller's validation."""
    out: list = []
    for m in messages:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if ok and out and isinstance(out[-1], dict) and out[-1].get("role") == m["role"] \
                and isinstance(out[-1].get("content"), str):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]} if ok else m)
    return out, len(out) < len(messages)


def safety_flag(record: dict, where: str) -> bool | None:
    """A record's optional boolean `is_safety` (Llama-2's safety-prompt tag, Touvron et al. 2023,
    section 3.2.3), else None.

    Raises:
      DataError: `is_safety` present but not true or false (naming `where`, e.g. file:line).
    """
    flag = record.get("is_safety")
    if flag is not None and not isinstance(flag, bool):
        raise DataError(f"{where}: field 'is_safety' is {flag!r}, not true or false")
    return flag


def to_prompt(record: Any, where: str) -> list[dict]:
    """Converts one record to a generation prompt: messages ending on a user turn.

    Keys as `to_messages`, without the response, plus `turns` (see the module docstring).

    Raises:
      DataError: no known key, a bad field, or an invalid prompt (`validate_messages(...,
        training=False)`).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is {type(record).__name__}, not an object")
    if "messages" in record or "conversations" in record:
        if "messages" in record:
            messages = record["messages"]
        else:
            messages = _sharegpt(record["conversations"], where)
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            messages = messages[:-1]
    elif "instruction" in record:
        messages = _alpaca_user(record, where)
    elif "prompt" in record:
        messages = record["prompt"]
        if not isinstance(messages, list):
            text = sources.get_field(record, "prompt", where)
            messages = [{"role": "user", "content": text}]
        else:  # a preference record's prompt: joined as the preference stages join it
            messages, _ = join_repeated_roles(messages)
    elif "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
        messages = [{"role": "user", "content": turns[0]}]
    else:
        keys = ("messages", "conversations", "instruction", "prompt", "turns")
        raise _no_format(record, where, keys)
    return _checked(messages, where, training=False)


def read_records(
    path: str | os.PathLike, counts: collections.Counter | None = None
) -> Iterator[tuple[int, dict]]:
    """Yields `(1-based line number, record)` of a JSONL file of objects.

    Args:
      path: The file.
      counts: Updated in place: `files` (1 when the file is opened), `blank_lines` (skipped).

    Raises:
      DataError: a missing or empty file, non-UTF-8 bytes, malformed JSON or a line that is not
        a JSON object (file:line).
    """
    path = pathlib.Path(path)
    counts = counts if counts is not None else collections.Counter()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    counts["files"] += 1
    records = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (line byte {e.start})") from None
            if not line.strip():
                counts["blank_lines"] += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {e}") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{path}:{lineno}: record is {kind}, not a JSON object")
            records += 1
            yield lineno, record
    if not records:
        raise DataError(f"{path}: file is empty (nothing but whitespace)")


def load_prompts(path: str | os.PathLike) -> list[list[dict]]:
    """Reads generation prompts from a JSONL file, one per non-blank line (`to_prompt`).

    Returns:
      One conversation ending on a user turn per record, in file order.

    Raises:
      DataError: as `read_records` and `to_prompt`, naming file and line.
    """
    return [to_prompt(record, f"{path}:{lineno}") for lineno, record in read_records(path)]


def jinja_template(tokenizer) -> str:
    """jaxllm's template (module docstring) as a Hugging Face jinja `chat_template` string.

    For exporting runs trained from scratch (`jaxllm.hub.export`): rendered with `bos_token`, it
    gives the text of `ChatTemplate.prompt` (`add_generation_prompt=True`) or of a training render
    without the final eos; the markers are `tokenizer.markers` (single pieces of the vocabulary).
    """
    m = {role: json.dumps(tokenizer.markers[role]) for role in (*MESSAGE_ROLES, "end_of_turn")}
    return ("{{ bos_token }}{% for message in messages %}"
            + "".join(f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{{{{ {m[role]} }}}}"
                      for i, role in enumerate(MESSAGE_ROLES))
            + f"{{% endif %}}{{{{ message['content'] + {m['end_of_turn']} }}}}{{% endfor %}}"
            + f"{{% if add_generation_prompt %}}{{{{ {m['assistant']} }}}}{{% endif %}}")


# ---------------------------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------------------------


class ChatTemplate:
    """jaxllm's chat template over a `jaxllm.data.tokenizer.Tokenizer` (see the module docstring).

    Attributes:
      tokenizer: The tokenizer (`encode_batch_arrays`, `decode`).
      bos_id, eos_id: Conversation start and end ids.
      role_ids: Role ("system", "user", "assistant") -> marker id.
      end_id: The end-of-turn marker id.
      stop_ids: Ids that end a generated response: `(end_id, eos_id)`.
      fingerprint: sha256 (hex) of the template version and its ids (cache keys).
    """

    def __init__(self, tokenizer):
        """Reads the template's ids from `tokenizer`.

        Raises:
          ChatError: (a ValueError) the tokenizer has no bos or eos piece.
          tokenizer.MissingPieceError: (a KeyError) it has no piece for a role marker.
        """
        if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
            raise ChatError(f"tokenizer {tokenizer.path} has no bos/eos piece for the template")
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = int(tokenizer.bos_id), int(tokenizer.eos_id)
        self.role_ids = {role: int(tokenizer.role_id(role)) for role in MESSAGE_ROLES}
        self.end_id = int(tokenizer.role_id("end_of_turn"))
        self.stop_ids = (self.end_id, self.eos_id)
        self._marker_ids = frozenset([*self.role_ids.values(), self.end_id])
        markers = sorted({tokenizer.markers[r] for r in (*MESSAGE_ROLES, "end_of_turn")}, key=len)
        self._markers = re.compile("|".join(re.escape(m) for m in reversed(markers)))
        payload = [TEMPLATE_VERSION, self.bos_id, self.eos_id, self.role_ids, self.end_id]
        self.fingerprint = hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()

    # -- encoding ----------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Content -> int32 ids, with marker text cut into ordinary pieces (one batch call)."""
        plain = [i for i, t in enumerate(texts) if not self._markers.search(t)]
        out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(texts)
        if plain:
            encoded = self.tokenizer.encode_batch_arrays([texts[i] for i in plain])
            for i, ids in zip(plain, encoded):
                out[i] = np.asarray(ids, np.int32)
        for i in sorted(set(range(len(texts))) - set(plain)):
            out[i] = self._encode_with_marker_text(texts[i])
        return out

    def _encode_with_marker_text(self, text: str) -> np.ndarray:
        pieces, pos = [], 0
        for match in self._markers.finditer(text):
            marker = match.group()
            # Encoded apart, neither `<` nor `|end|>` contains a marker, so no marker id results.
            pieces += [text[pos : match.start()], marker[:1], marker[1:]]
            pos = match.end()
        pieces.append(text[pos:])
        ids = np.concatenate(
            [np.zeros(0, np.int32)]
            + [np.asarray(a, np.int32) for a in self.tokenizer.encode_batch_arrays(pieces)]
        )
        if self._marker_ids.intersection(ids.tolist()):  # markers that overlap each other
            raise ChatError(f"content {text[:60]!r}... cannot be encoded without a marker id")
        return ids

    def _assemble(
        self, messages: Sequence[dict], contents: Sequence[np.ndarray], *, generation: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        parts, masks = [np.array([self.bos_id], np.int32)], [np.zeros(1, np.float32)]
        for message, ids in zip(messages, contents):
            supervised = float(message["role"] == "assistant")
            parts += [np.array([self.role_ids[message["role"]]], np.int32), ids]
            parts.append(np.array([self.end_id], np.int32))
            masks += [np.zeros(1, np.float32), np.full(len(ids) + 1, supervised, np.float32)]
        if generation:
            parts.append(np.array([self.role_ids["assistant"]], np.int32))
        else:
            parts.append(np.array([self.eos_id], np.int32))
        masks.append(np.full(1, 0.0 if generation else 1.0, np.float32))
        return np.concatenate(parts), np.concatenate(masks)

    # -- public interface --------------------------------------------------------------------

    def render(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Renders a training conversation.

        Args:
          messages: A conversation ending on an assistant turn (see `validate_messages`).

        Returns:
          `(tokens, target_mask)`: `tokens [n]` int32 (bos ... eos) and `target_mask [n]` float32,
          1.0 where token `i` is supervised (assistant content, its `<|end|>`, the final eos).

        Raises:
          ChatError: as `validate_messages(messages, training=True)`.
        """
        return self.render_batch([messages])[0]

    def render_batch(
        self, conversations: Sequence[Sequence[dict]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`render` of each conversation, with all contents encoded in one batched call.

        Raises:
          ChatError: as `validate_messages(..., training=True)`, naming the conversation index.
        """
        for c, messages in enumerate(conversations):
            try:
                validate_messages(messages, training=True)
            except ChatError as e:
                raise ChatError(f"conversation {c}: {e}") from None
        flat = [m["content"] for messages in conversations for m in messages]
        encoded = self._encode(flat)
        out, k = [], 0
        for messages in conversations:
            out.append(self._assemble(messages, encoded[k : k + len(messages)], generation=False))
            k += len(messages)
        return out

    def prompt(self, messages: Sequence[dict]) -> np.ndarray:
        """Renders a generation prompt: the conversation, then `<|assistant|>`.

        Args:
          messages: A conversation ending on a user turn.

        Returns:
          `[n]` int32: bos, the messages, and the assistant marker the model continues from.

        Raises:
          ChatError: as `validate_messages(messages, training=False)`.
        """
        validate_messages(messages, training=False)
        contents = self._encode([m["content"] for m in messages])
        return self._assemble(messages, contents, generation=True)[0]

    def decode_response(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of generated ids up to (excluding) the first stop id or role marker.

        Args:
          ids: `[n]` ids generated after `prompt(...)` (padding is dropped by the tokenizer).
        """
        stops = set(self.stop_ids) | self._marker_ids
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
        return self.tokenizer.decode(ids[:cut])

    def __repr__(self) -> str:
        return f"ChatTemplate({TEMPLATE_VERSION}, tokenizer={self.tokenizer.path!r})"


def template_for(tokenizer):
    """The chat template of `tokenizer`: its own Hugging Face `chat_template`
    (`jaxllm.data.chat_template.JinjaChatTemplate`) when it has one, else jaxllm's `ChatTemplate`
    (models trained from scratch).

    Raises:
      ChatError: a `chat_template` that does not compile or fails on a plain conversation.
      ValueError / tokenizer.MissingPieceError: as `ChatTemplate` (no bos/eos, no role markers).
    """
    if getattr(tokenizer, "chat_template", None):
        from jaxllm.data.chat_template import JinjaChatTemplate  # noqa: PLC0415 - it imports this module

        return JinjaChatTemplate(tokenizer)
    return ChatTemplate(tokenizer)
