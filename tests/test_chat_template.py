"""JinjaChatTemplate against transformers' apply_chat_template (the independent peer).

The template strings are the published chat templates of SmolLM2-Instruct (ChatML with a default
system prompt; the one stored in the shared GGUF), Llama-2-chat (`[INST]`), Llama-3-Instruct
(header tokens) and Qwen2.5-Instruct, rendered over small real tokenizers (tests/hf_tokenizer_fixture).
"""

import hashlib
import json
import shutil

import numpy as np
import pytest

import hf_tokenizer_fixture as fx
from jaxllm.data import chat
from jaxllm.data.chat_template import JinjaChatTemplate
from jaxllm.data.hf_tokenizer import HFTokenizer

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# HuggingFaceH4/zephyr-7b-beta: one block tag per line (trim_blocks matters).
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# The environment: indented block tags (lstrip_blocks), tojson (no HTML escaping), namespace, loop
# controls, dict.
EXTRAS = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {{ '<|im_start|>' + m.role + '\n' + ({'t': m.content} | tojson) + '<|im_end|>\n' }}
    {% if ns.n > 3 %}
        {% break %}
    {% endif %}
{% endfor %}
{{ dict(a=1) | tojson(indent=1) }}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""
# ChatML that writes each content's length into its header: the marked rendering differs, so the
# contents are located turn by turn.
COUNTED = SMOLLM2.replace("'<|im_start|>' + message['role'] + '\n'",
                          "'<|im_start|>' + message['role'] + ' ' + (message['content'] | length | string) + '\n'")
# Same renderings, assistant turns inside {% generation %}: transformers' assistant masks of these are the
# independent reference for render's target_mask on the originals.
GENERATION = {
    "smollm2": SMOLLM2.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"),
    "llama2": LLAMA2.replace("{{ ' '  + content.strip() + ' ' + eos_token }}",
                             "{{ ' ' }}{% generation %}{{ content.strip() }}{% endgeneration %}{{ ' ' }}"
                             "{% generation %}{{ eos_token }}{% endgeneration %}"),
    "llama3": LLAMA3.replace(
        "{{ content }}", "{% if message['role'] == 'assistant' %}{% set reply = message['content'] | trim %}"
        "{{ content[:(content | length) - (reply | length) - 10] }}{% generation %}{{ reply + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ content }}{% endif %}"),  # 10 = len('<|eot_id|>')
}
BPE_SPECIALS = {"unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
CASES = {  # name: (template, tokenizer kind, tokenizer_config.json special tokens, end-of-turn token)
    "smollm2": (SMOLLM2, "bpe", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", **BPE_SPECIALS}, "<|im_end|>"),
    "llama2": (LLAMA2, "sp", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, "</s>"),
    "llama3": (LLAMA3, "bpe", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|eot_id|>"),
    "qwen25": (QWEN25, "bpe", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "zephyr": (ZEPHYR, "bpe", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|end_of_text|>"),
    "counted": (COUNTED, "bpe", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "<|im_end|>"),
    # `"}` (JSON) stands between each content and <|im_end|>: no end-of-turn token, eos instead.
    "extras": (EXTRAS, "bpe", {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}, "<|endoftext|>"),
}
TRAIN = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And in words, with café?"},
     {"role": "assistant", "content": "Four, déjà vu 🙂.\nSecond line"}],
    [{"role": "user", "content": "Say assistant"}, {"role": "assistant", "content": "assistant"},
     {"role": "user", "content": "<tag> & \"quotes\""}, {"role": "assistant", "content": "<b>bold</b> & more"}],
]
SPACED = [{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "  spaced reply \n"},
          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
PROMPTS = [[{"role": "user", "content": "Hi!"}],
           [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Tell me a joke."}],
           TRAIN[1][:4], SPACED[:3]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tok")
    return {"bpe": fx.byte_level_bpe(root / "bpe", {}), "sp": fx.sentencepiece_llama(root / "sp", {}), "root": root}


def _folder(base, name, template=None):
    source, kind, specials, _ = CASES[name]
    d = base["root"] / f"{name}-{hashlib.sha256((template or source).encode()).hexdigest()[:12]}"
    if not d.exists():
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer.model"):
            if (base[kind] / f).exists():
                shutil.copy(base[kind] / f, d / f)
        cls = "LlamaTokenizer" if kind == "sp" else "PreTrainedTokenizerFast"
        config = {"tokenizer_class": cls, "chat_template": template or source, **specials}
        if kind == "sp":
            config.update(add_bos_token=True, legacy=False)
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def _ours(base, name, template=None):
    return JinjaChatTemplate(HFTokenizer.load(_folder(base, name, template)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendering_matches_transformers(transformers, base, name):
    ours = _ours(base, name)
    theirs = transformers.AutoTokenizer.from_pretrained(str(_folder(base, name)))
    for messages in [*TRAIN, SPACED, *PROMPTS]:
        for gen in (False, True):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render_text(messages, add_generation_prompt=gen) == text, (messages, gen)
    for messages in [*TRAIN, SPACED]:
        tokens, mask = ours.render(messages)
        assert tokens.dtype == np.int32 and mask.dtype == np.float32 and tokens.shape == mask.shape
        assert tokens.tolist() == theirs.apply_chat_template(messages, return_dict=False)
    for messages in PROMPTS:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ours.prompt(messages).tolist() == expected


def test_smollm2_template_is_the_gguf_one():
    path = fx.pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"shared model not found at {path}")
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == SMOLLM2


@pytest.mark.parametrize("name", sorted(CASES))
def test_end_of_turn_is_derived_from_the_template(base, name):
    ours = _ours(base, name)
    end = CASES[name][3]
    assert ours.end_id == ours.tokenizer.tok.token_to_id(end)
    assert ours.stop_ids == tuple(dict.fromkeys([ours.end_id, ours.eos_id]))


def _runs(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("name", ["smollm2", "llama2", "llama3", "qwen25", "zephyr", "counted"])
def test_target_mask_is_assistant_content_and_end_of_turn(base, name):
    """Decoding each supervised run gives exactly the content (as the template renders it) and the
    end-of-turn token, expected strings written out by hand per template."""
    ours = _ours(base, name)
    end = CASES[name][3]
    for messages in [*TRAIN, SPACED]:
        tokens, mask = ours.render(messages)
        got = "".join(ours.tokenizer.decode(tokens[a:b]) for a, b in _runs(mask))
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        # Llama-2 strips and Llama-3 trims the content; Llama-2 also has a space before </s>, which
        # is the template's and not supervised (its own run, so no space here).
        replies = [r.strip() for r in replies] if name in ("llama2", "llama3") else replies
        assert got == "".join(r + end for r in replies), messages
        assert int(mask.sum()) < len(mask) // 2 + 8  # roles, headers, system and user turns are 0


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_target_mask_matches_transformers_generation_masks(transformers, base, name):
    ours = _ours(base, name)
    variant = _ours(base, name, GENERATION[name])
    theirs = transformers.AutoTokenizer.from_pretrained(str(_folder(base, name, GENERATION[name])))
    for messages in TRAIN:
        assert variant.render_text(messages) == ours.render_text(messages)
        out = theirs.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        tokens, mask = ours.render(messages)
        assert tokens.tolist() == out["input_ids"]
        assert mask.tolist() == out["assistant_masks"], messages
        assert variant.render(messages)[1].tolist() == out["assistant_masks"]  # {% generation %} spans


def test_render_batch_prompt_and_decode_response(base):
    ours = _ours(base, "smollm2")
    batch = ours.render_batch(TRAIN)
    for messages, (tokens, mask) in zip(TRAIN, batch):
        t, m = ours.render(messages)
        np.testing.assert_array_equal(tokens, t)
        np.testing.assert_array_equal(mask, m)
    prompt = ours.prompt(TRAIN[0][:1])
    tokens, _ = ours.render(TRAIN[0])
    assert tokens[: len(prompt)].tolist() == prompt.tolist()  # the prompt is the training prefix
    reply = ours.tokenizer.encode("Paris.")
    assert ours.decode_response(reply + [ours.end_id, 5, 6]) == "Paris."
    assert ours.decode_response(reply + ours.tokenizer.encode("<|im_start|>user")) == "Paris."
    with pytest.raises(chat.ChatError, match="conversation 1: .*ends on a user turn"):
        ours.render_batch([TRAIN[0], PROMPTS[0]])
    with pytest.raises(chat.ChatError, match="ends on a assistant turn"):
        ours.prompt(TRAIN[0])


def test_fingerprint(base):
    a, b = _ours(base, "smollm2"), _ours(base, "smollm2")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != _ours(base, "qwen25").fingerprint
    assert a.fingerprint != _ours(base, "smollm2", GENERATION["smollm2"]).fingerprint


def test_template_for(base):
    tok = HFTokenizer.load(_folder(base, "llama3"))
    assert isinstance(chat.template_for(tok), JinjaChatTemplate)
    tok.chat_template = None
    with pytest.raises(KeyError, match="no jaxllm"):  # jaxllm's ChatTemplate needs role markers
        chat.template_for(tok)


def _tok(base):
    return HFTokenizer.load(_folder(base, "smollm2"))


def test_raise_exception_is_a_chat_error(base):
    needs_system = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('no system message') }}{% endif %}"
                    + SMOLLM2)
    ours = JinjaChatTemplate(_tok(base), needs_system)  # the probe retries with a system message
    assert ours.end_id == 2
    with pytest.raises(chat.ChatError, match="chat template raised at line 1: no system message"):
        ours.render(TRAIN[0])
    ours.render(TRAIN[1])
    with pytest.raises(chat.ChatError, match="chat template raised.*always"):
        JinjaChatTemplate(_tok(base), "\n{{ raise_exception('always') }}")
    with pytest.raises(chat.ChatError, match="syntax error at line 2"):
        JinjaChatTemplate(_tok(base), "{{ messages }}\n{% for %}")
    with pytest.raises(chat.ChatError, match="failed .*TypeError"):
        JinjaChatTemplate(_tok(base), "{{ messages[0]['content'] + 1 }}")


def test_sandbox(base):
    tok = _tok(base)
    with pytest.raises(chat.ChatError, match="SecurityError.*unsafe"):
        JinjaChatTemplate(tok, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(chat.ChatError, match="SecurityError"):
        JinjaChatTemplate(tok, "{% set ns = namespace() %}{% set ns._x = 1 %}" + SMOLLM2)
    with pytest.raises(chat.ChatError, match="SecurityError"):  # immutable: no list.append
        JinjaChatTemplate(tok, "{% set xs = [] %}{{ xs.append(1) }}" + SMOLLM2)
    quiet = JinjaChatTemplate(tok, "{{ ''.__class__ }}{{ messages.__class__ }}" + SMOLLM2)
    assert "class" not in quiet.render_text(TRAIN[0]).split("<|im_start|>")[0]


def test_strftime_now_and_tojson_match_transformers(transformers, base):
    template = "{{ strftime_now('%Y') }}|{{ messages | tojson }}|" + SMOLLM2
    d = _folder(base, "smollm2", template)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = _ours(base, "smollm2", template)
    assert ours.render_text(TRAIN[2]) == theirs.apply_chat_template(TRAIN[2], tokenize=False)
    assert '"<b>bold</b> & more"' in ours.render_text(TRAIN[2])
    # The contents appear twice and the turns are not prefixes of each other: the prompt works,
    # the end of turn falls back to eos and render cannot locate the contents.
    assert ours.prompt(PROMPTS[0]).tolist() == theirs.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_dict=False)
    assert ours.end_id == ours.eos_id
    with pytest.raises(chat.ChatError, match="conversation 0: message 1: .*cannot locate"):
        ours.render(TRAIN[0])
