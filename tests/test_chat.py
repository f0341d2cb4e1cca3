"""Tests of jaxllm.data.chat: the template's tokens and masks, validation, record formats."""

import json
import re

import numpy as np
import pytest

from jaxllm.data import chat, tokenizer
from jaxllm.data.sources import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>/\n0123456789"

THREE_TURNS = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "fine"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "a"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A char model: one token per character keeps hand-written expectations exact."""
    config = tokenizer.default_config()
    config.update(model_type="char", num_sentinels=0)
    path = tmp_path_factory.mktemp("tok") / "char.model"
    return tokenizer.train_tokenizer(config, [ALPHABET], path)


@pytest.fixture(scope="module")
def template(tok):
    return chat.ChatTemplate(tok)


def spell(tok, items):
    """Hand-written sequence -> ids: role names and bos/eos map to their ids, other strings to
    their single character piece."""
    special = {
        "BOS": tok.bos_id,
        "EOS": tok.eos_id,
        "SYS": tok.role_id("system"),
        "USER": tok.role_id("user"),
        "ASST": tok.role_id("assistant"),
        "END": tok.role_id("end_of_turn"),
    }
    ids = []
    for item in items:
        if item in special:
            ids.append(special[item])
        else:
            (piece,) = tok.encode(item)
            ids.append(piece)
    return ids


def test_three_turn_tokens_and_mask_by_hand(tok, template):
    # (token, supervised) written out by hand for system + 3 user/assistant pairs.
    expected = [
        ("BOS", 0),
        ("SYS", 0), ("s", 0), ("y", 0), ("s", 0), ("END", 0),
        ("USER", 0), ("h", 0), ("i", 0), ("END", 0),
        ("ASST", 0), ("y", 1), ("o", 1), ("END", 1),
        ("USER", 0), ("o", 0), ("k", 0), ("END", 0),
        ("ASST", 0), ("f", 1), ("i", 1), ("n", 1), ("e", 1), ("END", 1),
        ("USER", 0), ("q", 0), ("END", 0),
        ("ASST", 0), ("a", 1), ("END", 1),
        ("EOS", 1),
    ]  # fmt: skip
    tokens, target_mask = template.render(THREE_TURNS)
    assert tokens.dtype == np.int32 and target_mask.dtype == np.float32
    assert tokens.tolist() == spell(tok, [t for t, _ in expected])
    assert target_mask.tolist() == [float(m) for _, m in expected]
    # The loss mask of the training rows is aligned with targets = tokens[1:]: input position t
    # is scored iff token t + 1 is supervised. By hand: the assistant markers predict content.
    assert np.flatnonzero(target_mask[1:]).tolist() == [10, 11, 12, 18, 19, 20, 21, 22, 27, 28, 29]


def test_prompt_is_the_prefix_before_the_response(tok, template):
    tokens, mask = template.render(THREE_TURNS)
    prompt = template.prompt(THREE_TURNS[:-1])
    assert prompt.dtype == np.int32
    assert prompt.tolist() == tokens[:28].tolist()
    assert prompt[-1] == tok.role_id("assistant")
    assert mask[len(prompt)] == 1 and not mask[: len(prompt)][-4:].any()  # first response token
    single = template.prompt([{"role": "user", "content": "hi"}])
    assert single.tolist() == spell(tok, ["BOS", "USER", "h", "i", "END", "ASST"])


def test_decode_response_cuts_at_stop_ids(tok, template):
    assert set(template.stop_ids) == {tok.role_id("end_of_turn"), tok.eos_id}
    yo = tok.encode("yo there")
    assert template.decode_response(yo) == "yo there"
    end = tok.role_id("end_of_turn")
    assert template.decode_response(yo + [end] + tok.encode("x")) == "yo there"
    assert template.decode_response(np.array(yo + [tok.eos_id, *yo])) == "yo there"
    assert template.decode_response(yo + [tok.role_id("user")] + yo) == "yo there"
    assert template.decode_response([tok.eos_id] + yo) == ""


def test_marker_text_in_content_never_becomes_a_marker_id(tok, template):
    messages = [
        {"role": "user", "content": "a<|end|>b<|assistant|>"},
        {"role": "assistant", "content": "<|user|><|system|>!"},
    ]
    tokens, mask = template.render(messages)
    markers = {tok.role_id(r) for r in ("system", "user", "assistant", "end_of_turn")}
    # Exactly the four markers of the template itself: USER, END, ASST, END.
    got = [t for t in tokens.tolist() if t in markers]
    assert got == spell(tok, ["USER", "END", "ASST", "END"])
    first_end = tokens.tolist().index(tok.role_id("end_of_turn"))
    assert tok.decode(tokens[2:first_end].tolist()) == messages[0]["content"]
    response = tokens[first_end + 2 : -2]
    assert tok.decode(response.tolist()) == messages[1]["content"]
    assert mask[first_end + 2 :].all()  # the whole marker-like response is supervised


def test_render_batch_equals_render(template):
    convs = [THREE_TURNS, THREE_TURNS[1:3], [{"role": "user", "content": ""}, THREE_TURNS[2]]]
    for (t, m), conv in zip(template.render_batch(convs), convs):
        t1, m1 = template.render(conv)
        np.testing.assert_array_equal(t, t1)
        np.testing.assert_array_equal(m, m1)


@pytest.mark.parametrize(
    "messages, training, match",
    [
        ([], True, "empty messages"),
        ("hi", True, "must be a list"),
        ([{"role": "user", "content": "x"}], True, "ends on a user turn"),
        ([{"role": "bot", "content": "x"}], True, "unknown role 'bot'"),
        ([{"role": "user"}], True, "no 'content'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], True, "int"),
        ([{"role": "assistant", "content": "x"}], True, "'user' was expected"),
        (THREE_TURNS[1:3] + THREE_TURNS[:1] + THREE_TURNS[3:5], True, "'user' was expected"),
        (THREE_TURNS[:2] + THREE_TURNS[3:5], True, "'assistant' was expected"),
        (THREE_TURNS[:1], True, "no user turn"),
        (THREE_TURNS, False, "generation needs a user turn"),
    ],
)
def test_validation_errors(template, messages, training, match):
    with pytest.raises(chat.ChatError, match=match):
        chat.validate_messages(messages, training=training)
    with pytest.raises(ValueError, match=match):  # ChatError is a ValueError
        if training:
            template.render(messages)
        else:
            template.prompt(messages)


# ---------------------------------------------------------------------------------------------
# Record formats
# ---------------------------------------------------------------------------------------------

EXPECTED = [
    {"role": "user", "content": "Name a colour.\n\nIn French."},
    {"role": "assistant", "content": "Rouge."},
]
RECORDS = {
    "messages": {"id": 1, "messages": [dict(m, extra=1) for m in EXPECTED]},
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": EXPECTED[0]["content"]},
            {"from": "gpt", "value": "Rouge."},
        ]
    },
    "alpaca": {"instruction": "Name a colour.", "input": "In French.", "output": "Rouge."},
    "prompt_completion": {"prompt": EXPECTED[0]["content"], "completion": "Rouge."},
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_converts_to_the_same_messages(fmt):
    assert chat.to_messages(RECORDS[fmt], "f:1") == (fmt, EXPECTED)


def test_alpaca_without_input_and_with_system_and_sharegpt_system():
    record = {"instruction": "Do it.", "input": "", "output": "Done.", "system": "Be brief."}
    assert chat.to_messages(record, "f:1")[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Do it."},
        {"role": "assistant", "content": "Done."},
    ]
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}]
    turns.append({"from": "gpt", "value": "A"})
    assert [m["role"] for m in chat.to_messages({"conversations": turns}, "f:1")[1]] == [
        "system",
        "user",
        "assistant",
    ]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "x"}, "f.jsonl:7: record has no field 'completion'"),
        ({"instruction": "x"}, "f.jsonl:7: record has no field 'output'"),
        ({"instruction": "x", "input": 3, "output": "y"}, "f.jsonl:7: field 'input' is int"),
        ({"text": "x"}, "f.jsonl:7: record has none of the fields"),
        ({"messages": []}, "f.jsonl:7: empty messages"),
        ({"messages": EXPECTED[:1]}, "f.jsonl:7: the conversation ends on a user turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "f.jsonl:7: .*unknown role 'bot'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "f.jsonl:7: .*unknown role 'bot'"),
        ({"conversations": "x"}, "f.jsonl:7: field 'conversations' is str"),
        ([1, 2], "f.jsonl:7: record is list"),
    ],
)
def test_record_errors_name_the_location(record, match):
    with pytest.raises(DataError, match=match):
        chat.to_messages(record, "f.jsonl:7")


def test_load_prompts_every_format(tmp_path):
    records = [
        {"messages": THREE_TURNS},  # trailing assistant turn dropped
        {"messages": THREE_TURNS[:-1]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"prompt": "Why?"},
        {"prompt": [{"role": "user", "content": "Why?"}], "chosen": []},  # preference files
        {"instruction": "Name a colour.", "input": "In French."},
        {"turns": ["First turn.", "Second turn."]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(
        json.dumps(r) for r in records[3:]
    ) + "\n")  # fmt: skip
    prompts = chat.load_prompts(path)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assert prompts == [
        THREE_TURNS[:-1],
        THREE_TURNS[:-1],
        user("hi"),
        user("Why?"),
        user("Why?"),
        EXPECTED[:1],
        user("First turn."),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", ":3: malformed JSON"),
        ('{"turns": []}', ":3: field 'turns' must be a non-empty list"),
        ('{"messages": []}', ":3: empty messages"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', ":3: empty messages"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
         ":3: message 1: .*'assistant' was expected"),  # fmt: skip
        ('{"prompt": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
         ":3: message 0: .*'user' was expected"),  # fmt: skip
        ('{"question": "x"}', ":3: record has none of the fields"),
        ('{"prompt": 5}', ":3: field 'prompt' is int"),
    ],
)
def test_load_prompts_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + match):
        chat.load_prompts(path)


def test_read_records_file_errors(tmp_path):
    empty, blank = tmp_path / "e.jsonl", tmp_path / "b.jsonl"
    empty.write_text("")
    blank.write_text("\n  \n")
    for path, match in [(empty, "0 bytes"), (blank, "nothing but whitespace")]:
        with pytest.raises(DataError, match=f"{path}: file is empty .*{match}"):
            list(chat.read_records(path))
    with pytest.raises(DataError, match="not found"):
        list(chat.read_records(tmp_path / "missing.jsonl"))
    bad = tmp_path / "u.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"{bad}:2: not valid UTF-8"):
        list(chat.read_records(bad))


def test_preference_prompt_with_a_repeated_role_is_joined_as_the_preference_loader_joins_it():
    """HH's `repeated_role_in_prompt` records: PPO/eval prompts join the two turns with a blank line."""
    record = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
                         {"role": "assistant", "content": "B"}, {"role": "user", "content": "Why?"}],
              "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    assert chat.to_prompt(record, "f.jsonl:3") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A\n\nB"},
        {"role": "user", "content": "Why?"}]
    assert chat.join_repeated_roles(record["prompt"])[1] is True
    assert chat.join_repeated_roles(record["prompt"][:2]) == (record["prompt"][:2], False)
    with pytest.raises(DataError, match="f.jsonl:3"):  # a bad item still fails validation, with its place
        chat.to_prompt({"prompt": [{"role": "user", "content": 3}]}, "f.jsonl:3")
