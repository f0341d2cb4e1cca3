"""Preference records: pairs, Anthropic HH transcripts and ranking groups, normalised.

1. **Records** (`load_groups`). Each JSONL record's format is detected by the first rule that
   applies. `responses`: a ranking group `{"prompt": [messages], "responses": [[assistant
   messages] | "text", ...], "ranks": [int, ...]}` (lower is better, ties allowed). `chosen` as
   message lists: a pair `{"prompt", "chosen", "rejected"}` (the shared bundle; ranks `[0, 1]`;
   a response of several messages continues the conversation). `chosen` / `rejected` strings,
   else `chosen_text` / `rejected_text`: Anthropic HH transcripts (`hh_pair`: split on
   `\\n\\nHuman:` / `\\n\\nAssistant:`, one space after the colon dropped; the longest shared
   message prefix, cut back to end at a user turn, is the prompt, the rest of each the response).
   An optional `"margin"` is Llama-2's preference margin. Consecutive messages of one role (HH's
   `flags: ["repeated_role_in_prompt"]`) are joined with a blank line, so such records are kept
   (`flagged`, `merged_turns`). Responses are ordered by rank (best first, stable). Counted skips,
   the first that applies: `skipped_empty_prompt` (no non-blank user content),
   `skipped_identical` (all responses equal), `skipped_no_ordered_pair` (all ranks tied, or one
   response). Other bad input raises `DataError` naming `file:line`.
2. **Sources.** A mixture string of `jsonl:GLOB[#rankings][@WEIGHT]` entries. `#rankings`
   rebuilds ranking groups from OpenAssistant pair records (`build_rankings`); without it every
   record is one group.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from jaxllm.data import chat, sources
from jaxllm.data.sources import DataError, SourceSpec

RANKINGS_FIELD = "rankings"  # `jsonl:GLOB#rankings`
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_OASST_META = ("message_tree_id", "chosen_message_id", "rejected_message_id", "rank_chosen",
               "rank_rejected")  # fmt: skip


@dataclasses.dataclass
class PreferenceStats:
    """Counts of reading (records, groups, skips) and fitting (truncation, drops) groups."""

    files: int = 0
    records: int = 0
    blank_lines: int = 0
    formats: dict[str, int] = dataclasses.field(default_factory=dict)
    flagged: int = 0  # records with `flags` (kept)
    merged_turns: int = 0  # records where consecutive same-role messages were joined
    groups: int = 0  # normalized groups kept by `load_groups`
    responses: int = 0  # responses of those groups
    skipped_empty_prompt: int = 0
    skipped_identical: int = 0
    skipped_no_ordered_pair: int = 0
    examples: int = 0  # groups left by `fit_groups`
    truncated: int = 0  # prompt cut (keep_end)
    dropped_long: int = 0  # a sequence over seq_len (drop)
    dropped_response_too_long: int = 0  # no room for bos + 1 prompt token + response (keep_end)
    dropped_too_many_responses: int = 0  # more than max_responses



# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def hh_split(text: str, where: str = "") -> list[dict]:
    """Splits an HH transcript `"\\n\\nHuman: U\\n\\nAssistant: A..."` into messages.

    Roles may repeat (an inline `\\n\\nHuman:` in a reply splits it); `_messages` joins them.

    Raises:
      DataError: text before the first `\\n\\nHuman:` / `\\n\\nAssistant:` (`where` names it).
    """
    parts = _HH_TURN.split(text)
    if parts[0]:
        raise DataError(f"{where}: HH transcript starts with {parts[0][:40]!r}, not a turn marker")
    return [
        {"role": _HH_ROLES[speaker], "content": content[1:] if content[:1] == " " else content}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]


def hh_pair(chosen_text: str, rejected_text: str, where: str = "") -> tuple[list, list, list]:
    """`(prompt, chosen, rejected)` messages of two HH transcripts (see the module docstring).

    Raises:
      DataError: as `hh_split`.
    """
    c, r = hh_split(chosen_text, where), hh_split(rejected_text, where)
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    while k and c[k - 1]["role"] != "user":
        k -= 1
    return c[:k], c[k:], r[k:]


def _messages(value: Any, where: str, name: str) -> tuple[list[dict], bool]:
    """Fresh `{"role", "content"}` messages with consecutive same-role messages joined by a blank
    line, and whether any were joined. Raises DataError unless a list of objects with string
    `role` and `content`."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise DataError(f"{where}: {name} must be a list of {{'role', 'content'}} string objects")
    return chat.join_repeated_roles(value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _margin(record: dict, where: str) -> float | None:
    m = record.get("margin")
    if m is not None and not (_is_int(m) or isinstance(m, float) and math.isfinite(m)):
        raise DataError(f"{where}: 'margin' must be a finite number, got {m!r}")
    return None if m is None else float(m)


def _normalize(prompt, responses, ranks, margin, where, stats) -> dict | None:
    """One normalized group, or None for a counted skip (see the module docstring)."""
    prompt, merged = _messages(prompt, where, "prompt")
    out = []
    for k, r in enumerate(responses):
        r = [{"role": "assistant", "content": r}] if isinstance(r, str) else r
        r, m = _messages(r, where, f"response {k}")
        out.append(r)
        merged |= m
    stats.merged_turns += merged
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        stats.skipped_empty_prompt += 1
        return None
    if len(out) > 1 and all(r == out[0] for r in out[1:]):
        stats.skipped_identical += 1
        return None
    if min(ranks) == max(ranks):
        stats.skipped_no_ordered_pair += 1
        return None
    for k, conversation in enumerate([prompt] + [prompt + r for r in out]):
        try:
            chat.validate_messages(conversation, training=k > 0)
        except chat.ChatError as e:
            raise DataError(f"{where}: {f'prompt + response {k - 1}' if k else 'prompt'}: {e}")
    order = sorted(range(len(out)), key=lambda k: ranks[k])
    stats.groups += 1
    stats.responses += len(out)
    return {"prompt": prompt, "responses": [out[k] for k in order],
            "ranks": [ranks[k] for k in order], "margin": margin}  # fmt: skip


def _record_group(record: dict, where: str, stats: PreferenceStats) -> dict | None:
    """Detects the record's format (module docstring, point 1) and normalizes it."""
    stats.flagged += bool(record.get("flags"))
    if "responses" in record:
        fmt, responses = "ranking", record["responses"]
        if not isinstance(responses, list) or not responses:
            raise DataError(f"{where}: 'responses' must be a non-empty list")
        prompt, ranks = record.get("prompt"), record.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != len(responses) or not all(
            map(_is_int, ranks)
        ):
            raise DataError(f"{where}: 'ranks' must be a list of ints, one per response")
    elif isinstance(record.get("chosen"), list):
        fmt, ranks = "pairs", [0, 1]
        prompt, responses = record.get("prompt"), [record["chosen"], record.get("rejected")]
    elif isinstance(record.get("chosen"), str) or "chosen_text" in record:
        fmt, ranks = "hh", [0, 1]
        key = "chosen" if isinstance(record.get("chosen"), str) else "chosen_text"
        other = "rejected" if key == "chosen" else "rejected_text"
        if "prompt" in record:
            raise DataError(f"{where}: string {key!r} with a 'prompt': give message lists instead")
        texts = [sources.get_field(record, k, where) for k in (key, other)]
        prompt, *responses = hh_pair(*texts, where)
    else:
        raise DataError(
            f"{where}: record has none of 'responses', 'chosen', 'chosen_text' "
            f"(its keys: {sorted(record)[:8]})"
        )
    stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
    return _normalize(prompt, responses, ranks, _margin(record, where), where, stats)


def normalize_record(record: dict, where: str, stats: PreferenceStats | None = None) -> dict | None:
    """One record's normalized group as `load_groups` returns it, or None for a counted skip
    (module docstring, point 1; `stats` updated in place). Raises DataError naming `where`."""
    return _record_group(record, where, stats if stats is not None else PreferenceStats())


def build_rankings(pair_records: Sequence[dict], wheres: Sequence[str] | None = None) -> list[dict]:
    """Rebuilds ranking groups from OpenAssistant pair records (`oasst_en100_rankings`).

    `meta` holds `message_tree_id`, `chosen_message_id`, `rejected_message_id`, `rank_chosen`,
    `rank_rejected` but no prompter message id, so pairs are grouped on the tree id and the prompt
    messages (the path to the prompter message); each reply enters its group once, with its rank.

    Args:
      pair_records: Records with `prompt`, `chosen`, `rejected` and `meta` as above.
      wheres: `file:line` of each record, for errors (default: the record index).

    Returns:
      `{"prompt", "responses", "ranks", "meta": {"message_tree_id", "message_ids",
      "first_record"}}` per group (in order of first appearance; `first_record` indexes
      `pair_records`), replies by rank (ties by appearance).

    Raises:
      DataError: missing or ill-typed `meta` fields, `rank_chosen >= rank_rejected`, or a reply id
        seen with another rank, content or prompt.
    """
    wheres = wheres if wheres is not None else [f"record {i}" for i in range(len(pair_records))]
    groups: dict[tuple, dict] = {}
    owner: dict[str, tuple] = {}
    for i, (record, where) in enumerate(zip(pair_records, wheres)):
        meta = record.get("meta")
        if not isinstance(meta, dict) or any(k not in meta for k in _OASST_META):
            raise DataError(f"{where}: #rankings needs 'meta' with {', '.join(_OASST_META)}")
        ranks = (meta["rank_chosen"], meta["rank_rejected"])
        if not all(map(_is_int, ranks)):
            raise DataError(f"{where}: meta ranks must be ints, got {ranks}")
        if ranks[0] >= ranks[1]:
            raise DataError(f"{where}: rank_chosen {ranks[0]} is not better than {ranks[1]}")
        key = (str(meta["message_tree_id"]), json.dumps(record.get("prompt"), sort_keys=True))
        group = groups.setdefault(key, {"prompt": record.get("prompt"), "replies": {}, "first": i})
        for side, rank in zip(("chosen", "rejected"), ranks):
            mid = str(meta[f"{side}_message_id"])
            if owner.setdefault(mid, key) != key:
                raise DataError(f"{where}: reply {mid} also answers another prompt")
            seen = group["replies"].setdefault(mid, (rank, record.get(side)))
            if seen != (rank, record.get(side)):
                raise DataError(f"{where}: reply {mid} has rank {rank} here, {seen[0]} before "
                                "(or other content)")  # fmt: skip
    out = []
    for (tree, _), group in groups.items():
        mids = sorted(group["replies"], key=lambda mid: group["replies"][mid][0])  # stable
        ranks, responses = zip(*(group["replies"][mid] for mid in mids))
        meta = {"message_tree_id": tree, "message_ids": mids, "first_record": group["first"]}
        out.append({"prompt": group["prompt"], "responses": list(responses),
                    "ranks": list(ranks), "meta": meta})  # fmt: skip
    return out


def parse_preference_sources(spec: str, data_root: str = "") -> list[SourceSpec]:
    """`sources.parse_sources`, restricted to `jsonl:GLOB[#rankings][@WEIGHT]` entries.

    Raises:
      DataError: as `parse_sources`, another kind, or a `#field` other than `#rankings`.
    """
    specs = sources.parse_sources(spec, data_root)
    for s in specs:
        if s.kind != "jsonl":
            raise DataError(f"preference source {s.text!r}: kind {s.kind!r}; expected jsonl:GLOB")
        if "#" in s.text and s.field != RANKINGS_FIELD:
            raise DataError(f"preference source {s.text!r}: the only '#' option is '#rankings'")
    return specs


def read_source(spec: SourceSpec, stats: PreferenceStats) -> list[dict]:
    """The normalized groups of one `jsonl:GLOB[#rankings]` source, in file and line order.

    Every record is one group; with `#rankings` OpenAssistant pair records are rebuilt into
    ranking groups first (`build_rankings`). `stats` is updated in place (files, records, formats,
    skips).

    Raises:
      DataError: a glob matching nothing, an empty file, or a bad record (naming `file:line`).
    """
    counts: collections.Counter = collections.Counter()
    records, wheres = [], []
    for path in sources.resolve_files(spec):
        for lineno, record in chat.read_records(path, counts):
            records.append(record)
            wheres.append(f"{path}:{lineno}")
    stats.files += counts["files"]
    stats.blank_lines += counts["blank_lines"]
    stats.records += len(records)
    if "#" not in spec.text:  # `parse_preference_sources` allows only `#rankings`
        groups = (_record_group(r, w, stats) for r, w in zip(records, wheres))
        return [g for g in groups if g is not None]
    fmt = "rankings_from_pairs"
    stats.formats[fmt] = stats.formats.get(fmt, 0) + len(records)
    out = []
    for r in build_rankings(records, wheres):
        where = wheres[r["meta"]["first_record"]]
        group = _normalize(r["prompt"], r["responses"], r["ranks"], None, where, stats)
        out += [group] if group is not None else []
    return out


def load_groups(spec: str, data_root: str = "", stats: PreferenceStats | None = None) -> list[dict]:
    """Reads the normalized groups of a mixture string (all entries in order; weights ignored).

    Args:
      spec: `jsonl:GLOB[#rankings][@WEIGHT]` entries joined by `;`; `{data_root}` is replaced.
      stats: Updated in place: files, records, formats, flagged/merged records, groups, skips.

    Returns:
      `{"prompt": messages ending on a user turn, "responses": [messages starting with an
      assistant turn], "ranks": [int] (ascending), "margin": float | None}` per kept group.

    Raises:
      DataError: a bad spec, a glob matching nothing, an empty file, or a bad record (file:line).
    """
    stats = stats if stats is not None else PreferenceStats()
    return [g for s in parse_preference_sources(spec, data_root) for g in read_source(s, stats)]
