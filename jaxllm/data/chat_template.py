"""A model's own Hugging Face chat template (jinja), with the members of `chat.ChatTemplate`.

**Rendering** (`JinjaChatTemplate.render_text`) is transformers' `apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)`, byte for byte: the template source runs in jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` tag, the globals `raise_exception(message)`, `strftime_now(format)`,
a `dict` and a `namespace` that refuses underscore names, and transformers' `tojson` filter (no
HTML escaping; `ensure_ascii`, `indent`, `separators`, `sort_keys` options). The variables are
`messages` (fresh `{"role", "content"}` dicts: other keys are not passed), `tools` and `documents`
(None), `add_generation_prompt`, and the tokenizer's named special tokens (`bos_token`,
`eos_token`, `unk_token`, `pad_token`, ...: `HFTokenizer.special_tokens_map`). Token ids are the
rendered text's ids with no special tokens added (`apply_chat_template(..., tokenize=True)`):
special tokens the template writes as text (`<|im_start|>`, `<s>`) encode to their ids.

**End-of-turn token** (`end_id`). Derived from the template, not from a table: a probe conversation
(user, assistant) is rendered, and the end-of-turn token is the first added token of the
tokenizer that follows the assistant content with nothing but whitespace between: `<|im_end|>` for
ChatML (SmolLM2, Qwen2), `<|eot_id|>` for Llama-3, `</s>` (eos) for Llama-2's `[INST]` template.
A template that writes no added token after an assistant turn gets `end_id = eos_id` (and the mask
then covers the content only). `stop_ids` are `end_id` and `eos_id` (once each, absent ones left out).

**Supervision** (`render`). `target_mask[i] = 1` iff token `i` overlaps the character span of an
assistant message's content as rendered, or is the end-of-turn token closing it (the first added
token after the content, whitespace-only text between, with id `end_id` or `eos_id`). Nothing else:
not bos, role headers, system prompts a template inserts (SmolLM2's), user turns, nor template
text between the content and the end-of-turn token (Llama-2's space before `</s>`). A token that
straddles the content's edge (Llama-2's `▁Hello`, whose `▁` is the template's space) counts as
content, as in transformers' assistant masks.
The content spans are found by rendering the conversation once more with each assistant content
between two private-use marks (as is, else stripped: templates `trim` it): when the rendering
without the marks is the real one and holds one marked span per assistant message, the marks are
the spans. Otherwise (a template that renders a content twice, e.g. `messages | tojson`, or looks
at its length) turn by turn: for the assistant message `k`, the generation prompt of `messages[:k]`
must be a prefix of the full rendering, and the content (as is or stripped) is the first match
after it and before the end of the rendering of `messages[:k+1]`; when the generation prompt is not
a prefix, the rendering of `messages[:k]` without it is used and the last match is taken.
Templates with `{% generation %}` blocks use those blocks' spans instead (transformers'
`return_assistant_tokens_mask`), whatever they contain. A content that cannot be found (a template
that rewrites it) is a `ChatError`.
As in `chat.ChatTemplate`, the SFT `loss_mask` is `target_mask[1:]`.

**Errors.** A template that fails to compile, calls `raise_exception`, reaches for an unsafe
attribute (`''.__class__.__mro__`: the sandbox's `SecurityError`) or fails otherwise raises
`chat.ChatError` naming the problem and the template line where jinja knows it; callers add the
file. An unsafe attribute that is only printed (`{{ ''.__class__ }}`) renders as jinja's empty
undefined value, as in transformers.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import logging
import re
from collections.abc import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.data.chat import ChatError, validate_messages

logger = logging.getLogger(__name__)

TEMPLATE_VERSION = "jaxllm-jinja-chat-v1"  # part of `fingerprint`: bump when the rendering changes
# Private-use characters around `{% generation %}` output while spans are tracked, and around
# assistant contents to locate them (a content that holds one is refused: no span is forged).
_GEN_START, _GEN_END = "\U000f0010", "\U000f0011"
_SPAN_START, _SPAN_END = "\U000f0012", "\U000f0013"
_RESERVED = (_GEN_START, _GEN_END, _SPAN_START, _SPAN_END)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"}]


# ---------------------------------------------------------------------------------------------
# The sandboxed environment (transformers' `_compile_jinja_template` semantics)
# ---------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body; while spans are tracked
    (`environment.jaxllm_track`) wraps it in `_GEN_START` / `_GEN_END`."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        return f"{_GEN_START}{text}{_GEN_END}" if self.environment.jaxllm_track else text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: jinja's own escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002 - the name templates call it with
    return datetime.datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` without exposing the `dict` type to attribute access."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` refusing underscore-prefixed attributes (no reach into internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r} on a namespace")


def _environment(track: bool) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.extend(jaxllm_track=track)
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line of the innermost template frame of `exc`'s traceback (jinja rewrites
    template frames to template line numbers), if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def compile_template(source: str, *, track: bool = False) -> jinja2.Template:
    """Compiles a chat template in the sandbox (module docstring).

    Raises:
      ChatError: a jinja syntax error, naming the line.
    """
    try:
        return _environment(track).from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------


class JinjaChatTemplate:
    """A Hugging Face `chat_template` over an `HFTokenizer` (module docstring).

    Attributes:
      tokenizer: The tokenizer (`HFTokenizer`: `tok`, `special_tokens_map`, `chat_template`,
        `encode_batch`, `decode`, `special_ids`).
      source: The template's jinja source.
      bos_id, eos_id: The tokenizer's (-1 when it has none).
      end_id: The end-of-turn token id (module docstring).
      stop_ids: Ids that end a generated response: `end_id` and `eos_id`.
      fingerprint: sha256 (hex) of the template version, source, special tokens and the
        tokenizer's fingerprint (cache keys).
    """

    def __init__(self, tokenizer, source: str | None = None):
        """Compiles `source` (default: `tokenizer.chat_template`) and derives the end-of-turn token.

        Raises:
          ChatError: no template, a syntax error, or a template that fails on a (user, assistant)
            conversation, with and without a system message.
        """
        self.tokenizer = tokenizer
        self.source = source if source is not None else tokenizer.chat_template
        if not self.source:
            raise ChatError(f"tokenizer {tokenizer.path} has no chat_template")
        self._plain = compile_template(self.source)
        self._tracked = compile_template(self.source, track=True) if _GENERATION_TAG.search(self.source) else None
        self._special = dict(tokenizer.special_tokens_map)
        # Offsets without the post-processor: ByteLevel's trims spaces off them (the ids are the same).
        self._offsets_tok = tokenizer.tok.__class__.from_str(tokenizer.tok.to_str())
        self._offsets_tok.post_processor = None
        self._added_ids = frozenset(tokenizer.tok.get_added_tokens_decoder())
        self.bos_id, self.eos_id = int(tokenizer.bos_id), int(tokenizer.eos_id)
        self.end_id = self._derive_end_id()
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.end_id, self.eos_id) if i >= 0))
        if not self.stop_ids:
            raise ChatError(f"tokenizer {tokenizer.path}: the chat template has no end-of-turn token and "
                            "the tokenizer no eos: generation could not stop")
        self._closing = frozenset(self.stop_ids)
        self._cut_ids = self._closing | frozenset(tokenizer.special_ids)
        payload = [TEMPLATE_VERSION, self.source, self._special, tokenizer.fingerprint, self.end_id]
        self.fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    # -- rendering ----------------------------------------------------------------------------

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool, track: bool = False) -> str:
        template = self._tracked if track else self._plain
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return template.render(messages=plain, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as e:  # raise_exception, SecurityError, UndefinedError, ...
            kind = "raised" if type(e) is jinja2.TemplateError else f"failed ({type(e).__name__})"
            line = _template_line(e)
            raise ChatError(f"chat template {kind}{f' at line {line}' if line else ''}: {e}") from None
        except Exception as e:  # a Python error inside the template (e.g. str + None)
            line = _template_line(e)
            raise ChatError(f"chat template failed{f' at line {line}' if line else ''}: "
                            f"{type(e).__name__}: {e}") from None

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation: `apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)`, byte for byte.

        Args:
          messages: A conversation ending on a user or an assistant turn (`validate_messages`).
          add_generation_prompt: Append the template's assistant header.

        Raises:
          ChatError: an invalid conversation, or the template failing on it.
        """
        try:
            validate_messages(messages, training=True)
        except ChatError:
            validate_messages(messages, training=False)
        return self._render(messages, add_generation_prompt)

    def _content_spans(self, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        """Character spans `[start, end)` of each assistant content in `text` (the rendering of
        `messages`): marked rendering first, else turn by turn (module docstring).

        Raises:
          ChatError: a content that cannot be located.
        """
        count = sum(m["role"] == "assistant" for m in messages)
        for strip in (False, True):
            marked = [{"role": m["role"], "content": _SPAN_START + (m["content"].strip() if strip else m["content"])
                       + _SPAN_END} if m["role"] == "assistant" else m for m in messages]
            try:
                clean, spans = _strip_marks(self._render(marked, False), _SPAN_START, _SPAN_END)
            except ChatError:
                continue
            if clean == text and len(spans) == count:
                return spans
        return self._turn_by_turn_spans(messages, text)

    def _turn_by_turn_spans(self, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            upto = self._render(messages[: k + 1], False)
            limit = len(upto) if text.startswith(upto) else len(text)
            prompt = self._render(messages[:k], True)
            last = not text.startswith(prompt)
            if last:
                prompt = self._render(messages[:k], False)
                if not text.startswith(prompt):
                    raise ChatError(f"message {k}: the chat template renders the turns before this "
                                    "assistant message differently once it is added: cannot locate its content")
            content = message["content"]
            # Falling back to the prompt without its header, the content is the last match (the
            # header may hold the content's text); bounded by `upto` or, for the last turn, the end.
            search = text.rfind if last and (limit < len(text) or k == len(messages) - 1) else text.find
            for variant in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                found = search(variant, len(prompt), limit)
                if found >= 0:
                    spans.append((found, found + len(variant)))
                    break
            else:
                raise ChatError(f"message {k}: the chat template does not render this assistant content "
                                f"({content[:40]!r}...) as it is or stripped: cannot locate it")
        return spans

    def _supervised_spans(self, messages: Sequence[dict], text: str, offsets) -> list[tuple[int, int]]:
        """Content spans plus, for each, the span of the end-of-turn token closing it."""
        spans = []
        for start, end in self._content_spans(messages, text):
            spans.append((start, end))
            closing = self._closing_token(text, end, offsets[0], offsets[1])
            if closing is not None and closing[0] in self._closing:
                spans.append(closing[1])
        return spans

    def _closing_token(self, text: str, end: int, ids, offsets) -> tuple[int, tuple[int, int]] | None:
        """The first added token at or after character `end` with only whitespace before it:
        `(id, (start, end))`, or None."""
        first = bisect.bisect_left([s for s, _ in offsets], end)
        for tid, (s, e) in zip(ids[first:], offsets[first:]):
            if tid in self._added_ids:
                return (tid, (s, e)) if not text[end:s].strip() else None
        return None

    def _derive_end_id(self) -> int:
        """The end-of-turn token of a probe conversation (module docstring); `eos_id` when the
        template writes none after the content, or when the content cannot be located (logged:
        `render` then fails on such conversations too, `prompt` and `render_text` work).

        Raises:
          ChatError: the template fails on the probe, with and without a system message.
        """
        failure = None
        for probe in (_PROBE, [{"role": "system", "content": "Be brief."}, *_PROBE]):
            try:
                text = self._render(probe, False)
            except ChatError as e:
                failure = e
                continue
            try:
                (_, end), = self._content_spans(probe, text)
            except ChatError as e:
                logger.warning("tokenizer %s: cannot locate the assistant content in its chat template's "
                               "rendering (%s): end of turn = eos", self.tokenizer.path, e)
                return self.eos_id
            enc = self._offsets_tok.encode(text, add_special_tokens=False)
            closing = self._closing_token(text, end, enc.ids, enc.offsets)
            return closing[0] if closing is not None else self.eos_id
        raise ChatError(f"tokenizer {self.tokenizer.path}: the chat template fails on a user/assistant "
                        f"conversation: {failure}")

    # -- the chat.ChatTemplate interface ------------------------------------------------------

    def render(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Renders a training conversation.

        Args:
          messages: A conversation ending on an assistant turn (see `validate_messages`).

        Returns:
          `(tokens, target_mask)`: `tokens [n]` int32, the ids of `render_text(messages)`, and
          `target_mask [n]` float32, 1.0 on assistant content and its end-of-turn token.

        Raises:
          ChatError: as `validate_messages(messages, training=True)`, or the template failing.
        """
        return self.render_batch([messages])[0]

    def render_batch(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`render` of each conversation, tokenised in one batched call.

        Raises:
          ChatError: as `render`, naming the conversation index.
        """
        texts, spans_of = [], []
        for c, messages in enumerate(conversations):
            try:
                validate_messages(messages, training=True)
                if any(ch in m["content"] for m in messages for ch in _RESERVED):
                    raise ChatError("content holds a private-use character (U+F0010..U+F0013) that jaxllm "
                                    "reserves for locating spans")
                if self._tracked is not None:
                    text, spans = _strip_marks(self._render(messages, False, track=True), _GEN_START, _GEN_END)
                else:
                    text, spans = self._render(messages, False), None
            except ChatError as e:
                raise ChatError(f"conversation {c}: {e}") from None
            texts.append(text)
            spans_of.append(spans)
        out = []
        encodings = self._offsets_tok.encode_batch(texts, add_special_tokens=False)
        for c, (messages, text, spans, enc) in enumerate(zip(conversations, texts, spans_of, encodings)):
            if spans is None:
                try:
                    spans = self._supervised_spans(messages, text, (enc.ids, enc.offsets))
                except ChatError as e:
                    raise ChatError(f"conversation {c}: {e}") from None
            out.append((np.asarray(enc.ids, np.int32), _overlap_mask(enc.offsets, spans)))
        return out

    def prompt(self, messages: Sequence[dict]) -> np.ndarray:
        """Renders a generation prompt: `render_text(messages, add_generation_prompt=True)`'s ids.

        Args:
          messages: A conversation ending on a user turn.

        Returns:
          `[n]` int32 ids the model continues from.

        Raises:
          ChatError: as `validate_messages(messages, training=False)`, or the template failing.
        """
        validate_messages(messages, training=False)
        text = self._render(messages, True)
        return np.asarray(self.tokenizer.encode(text), np.int32)

    def decode_response(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of generated ids up to (excluding) the first stop id or special token (a model that
        starts the next turn without closing its own).

        Args:
          ids: `[n]` ids generated after `prompt(...)`.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        cut = next((k for k, i in enumerate(ids) if i in self._cut_ids), len(ids))
        return self.tokenizer.decode(ids[:cut])

    def __repr__(self) -> str:
        return f"JinjaChatTemplate(tokenizer={self.tokenizer.path!r}, end_id={self.end_id})"


def _strip_marks(text: str, open_mark: str, close_mark: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` without the marks and the spans `[start, end)` they enclosed in it (nested marks:
    the outermost span)."""
    out, spans, pos, length, depth, start = [], [], 0, 0, 0, 0
    for match in re.finditer(f"[{open_mark}{close_mark}]", text):
        out.append(text[pos : match.start()])
        length += match.start() - pos
        pos = match.end()
        if match.group() == open_mark:
            start = length if depth == 0 else start
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, length))
    out.append(text[pos:])
    return "".join(out), spans


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """`[n]` float32: 1.0 where token `[s, e)` overlaps a span (`e > span_start and s < span_end`)."""
    bounds = np.asarray(offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(bounds), bool)
    for a, b in spans:
        mask |= (bounds[:, 1] > a) & (bounds[:, 0] < b)
    return mask.astype(np.float32)
