"""Smoke tests of `jaxllm generate`, `jaxllm chat` and `jaxllm score` (jaxllm/inference.py).

The run directory is built in-process in a second: a char tokenizer over ~110 characters (so
random ids are mostly real text pieces) and randomly initialised `sft` and `reward` params exported
with `checkpoint.export_params`, with their `config.json` and `done.json`. The commands run in
subprocesses on one CPU device (as tests/test_cli.py); their outputs are checked against
independent in-process computations on the same params: `sampling.generate` / `beam_search` of the
same rendered prompt one at a time, and `llama.apply(head="scalar")` of the training render of each
conversation, unpadded, read at its last token.
"""

import concurrent.futures
import json
import math
import pathlib
import string
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxllm import checkpoint as ckpt_lib
from jaxllm import config as config_lib
from jaxllm import inference
from jaxllm import sampling
from jaxllm.data import chat, preference_records, tokenizer as tokenizer_lib
from jaxllm.data.sources import DataError
from jaxllm.models import llama
from jaxllm.train import reward, sft
from test_cli import describe, error_line, jaxllm, read_rows, subprocess_env

SEQ_LEN = 96
# 119 characters: with the 9 special, role and newline pieces they fill the 128 ids, so no id is an
# `<unused_k>` piece (which decodes to its own name, not to text that encodes back to it).
CHARS = (string.ascii_letters + string.digits + string.punctuation + " \n"
         + "éèàüöäßñçøåæœêâîôûëïÿðþł")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def random_params(model_config, head: str, seed: int, unk_id: int, end_id: int):
    """Random params of the model's shapes, drawn with NumPy (no XLA compilation).

    Matrices are normal with std `1 / sqrt(fan_in)` (the embedding: 1); the LM head's std is
    `3 / sqrt(embed)`, so next-token distributions are peaked like a trained model's, and its
    `<unk>` column is 0, so `<unk>` (which decodes to " ⁇ ", not to its own encoding) is all but
    never chosen, and its `<|end|>` column doubled, so that some responses stop. The scalar head
    gives rewards of order 1. Norm scales are 1.
    """
    abstract = nn.unbox(jax.eval_shape(lambda: llama.init(model_config, jax.random.key(0), head=head)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        fan_in = 1 if "embed_tokens" in name else int(np.prod(leaf.shape[:-1]))
        std = (3.0 if "lm_head" in name else 1.0) / np.sqrt(fan_in)
        value = rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if "lm_head" in name:
            value[:, unk_id] = 0.0
            value[:, end_id] *= 2.0  # end-of-turn wins now and then: some responses stop
        return value

    return jax.tree_util.tree_map_with_path(draw, abstract)


def make_run(root: pathlib.Path, seq_len: int = SEQ_LEN, stages=("sft", "reward")):
    """A run directory with a char tokenizer and finished stages with random params (`random_params`).

    Returns:
      `(tokenizer, model_config, {stage: params})`; `reward` has the scalar head.
    """
    tok_config = tokenizer_lib.default_config()
    tok_config.update(model_type="char", byte_fallback=False, num_sentinels=0)
    tok = tokenizer_lib.train_tokenizer(tok_config, [CHARS * 3], config_lib.tokenizer_dir(root) / "tokenizer.model")
    assert not any(tok.sp.IsUnused(i) for i in range(tok.vocab_size))
    out = {}
    for k, stage in enumerate(stages):
        config = (reward if stage.startswith("reward") else sft).default_config()
        config.run_dir = str(root)
        config.tokenizer.update(model_type="char", byte_fallback=False, num_sentinels=0)
        config.model.update(vocab_size=tok.vocab_size, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                            mlp_dim=64)
        config.data.seq_len = seq_len
        model_config = llama.LlamaConfig.from_config(config.model)
        params = random_params(model_config, "scalar" if stage.startswith("reward") else "lm", k, tok.unk_id,
                               tok.role_id("end_of_turn"))
        ckpt_lib.export_params(root / stage / "params", params)
        config_lib.save_json(config, root / stage / "config.json")
        (root / stage / "done.json").write_text(json.dumps({"step": 0, "eval": {}}))
        out[stage] = params
    return tok, model_config, out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference") / "run"
    tok, model_config, params = make_run(root)
    return root, chat.ChatTemplate(tok), model_config, params


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


PROMPT_RECORDS = [
    {"id": "m1", "messages": [{"role": "system", "content": "Be brief."}, user("Name a color."), bot("Red.")]},
    {"instruction": "Add the numbers.", "input": "2 and 3"},  # no id: the line number
    {"id": 7, "prompt": "Say hi"},
    {"id": "mt-1", "turns": ["First question?", "A second turn, not asked."]},
    {"conversations": [{"from": "human", "value": "hello there"}]},
]


def text_ids(tok):
    """Ids of ordinary text pieces: what `decode` turns into text that encodes back to them."""
    sp = tok.sp
    markers = {tok.role_id(r) for r in tokenizer_lib.ROLES}
    return {i for i in range(tok.vocab_size)
            if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)) and i not in markers}


def check_rows(rows, template, max_new_tokens):
    """Per-row properties of `jaxllm generate` output; returns how many rows had their text checked."""
    tok, stops = template.tokenizer, set(template.stop_ids)
    cuts = stops | {template.end_id, *template.role_ids.values()}
    texts, checked = text_ids(tok), 0
    for row in rows:
        tokens = row["tokens"]
        assert row["num_tokens"] == len(tokens) and 1 <= len(tokens) <= max_new_tokens
        assert row["stopped"] == (tokens[-1] in stops)
        assert not any(t in stops for t in tokens[:-1])  # generation ends at the first stop id
        if len(tokens) < max_new_tokens:
            assert row["stopped"]
        assert row["response"] == template.decode_response(tokens)
        cut = next((k for k, t in enumerate(tokens) if t in cuts), len(tokens))
        if tok.unk_id in tokens[:cut]:  # <unk> decodes to " ⁇ ", which is not its own encoding
            continue
        assert tok.encode(row["response"]) == [t for t in tokens[:cut] if t in texts]
        checked += 1
    return checked


def stop_rate_line(stdout):
    (line,) = [x for x in stdout.splitlines() if x.startswith("stop rate: ")]
    return line


@pytest.mark.slow
def test_generate_greedy_equals_sampling_generate(env, run, tmp_path):
    root, template, model_config, params = run
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_RECORDS)
    proc = jaxllm(env, "generate", "--run", root, "--prompts", prompts, "--max_new_tokens", 10,
                  "--batch_size", 2, cwd=tmp_path, script=True)
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    out = root / "sft" / "generations" / "prompts.jsonl"
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["m1", 2, 7, "mt-1", 5]
    assert [r["prompt"] for r in rows] == chat.load_prompts(prompts)
    assert rows[3]["prompt"] == [user("First question?")]  # MT-Bench: the first turn
    assert check_rows(rows, template, 10) == len(rows)
    prompt_ids = [template.prompt(row["prompt"]).tolist() for row in rows]
    # All prompts in one batch, padded otherwise than the command's batches of 2.
    want = sampling.generate(model_config, params["sft"], prompt_ids, max_new_tokens=10, temperature=0.0,
                             stop_ids=template.stop_ids, max_context=SEQ_LEN)
    for row, ids, tokens in zip(rows, prompt_ids, want):
        assert row["prompt_tokens"] == len(ids) and not row["prompt_truncated"]
        assert row["tokens"] == tokens, row["id"]
    stopped = sum(r["stopped"] for r in rows)
    assert stop_rate_line(proc.stdout).startswith(f"stop rate: {stopped / 5:.3f} ({stopped}/5 ")


def test_generate_sampling_limit_and_truncation(env, run, tmp_path):
    root, template, _, _ = run
    long_prompt = {"id": "long", "messages": [user("x" * (SEQ_LEN + 20))]}
    prompts = write_jsonl(tmp_path / "p.jsonl", [long_prompt] + PROMPT_RECORDS)
    out = tmp_path / "out" / "samples.jsonl"
    proc = jaxllm(env, "generate", "--run", root, "--prompts", prompts, "--output", out, "--limit", 4,
                  "--temperature", 1.0, "--top_k", 50, "--top_p", 0.95, "--max_new_tokens", 24, "--batch_size", 3,
                  "--seed", 3, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(out)
    assert len(rows) == 4 and [r["id"] for r in rows] == ["long", "m1", 3, 7]
    assert check_rows(rows, template, 24) >= len(rows) - 1
    # The long prompt keeps bos and its last SEQ_LEN - 1 tokens, as the prompt datasets do.
    assert rows[0]["prompt_truncated"] and rows[0]["prompt_tokens"] == SEQ_LEN
    assert not any(r["prompt_truncated"] for r in rows[1:])
    stopped = sum(r["stopped"] for r in rows)
    assert stop_rate_line(proc.stdout).startswith(f"stop rate: {stopped / 4:.3f} ({stopped}/4 ")
    assert "1 prompts truncated" in proc.stdout


def test_generate_beam_search_equals_beam_search_per_prompt(env, run, tmp_path):
    root, template, model_config, params = run
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_RECORDS[:3])
    out = tmp_path / "beams.jsonl"
    proc = jaxllm(env, "generate", "--run", root, "--prompts", prompts, "--output", out, "--beam_size", 3,
                  "--max_new_tokens", 8, "--batch_size", 2, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(out)
    assert len(rows) == 3
    check_rows(rows, template, 8)
    tokens, lengths = sampling.left_pad([template.prompt(row["prompt"]).tolist() for row in rows])
    want = sampling.beam_search(model_config, params["sft"], tokens, lengths, beam_size=3, max_new_tokens=8,
                                stop_ids=template.stop_ids, max_context=SEQ_LEN)
    best, best_lengths = np.asarray(want.tokens)[:, 0], np.asarray(want.lengths)[:, 0]
    for i, row in enumerate(rows):
        assert row["tokens"] == best[i, : best_lengths[i]].tolist()


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_drops_oldest_turns(env, run, tmp_path):
    root, template, model_config, params = run
    system = {"role": "system", "content": "Be nice."}
    long_turns = [f"{c * 24}?" for c in "abc"]  # 25 characters: two exchanges fit in the context, three do not
    lines = ["hi there", "how are you", "/reset", *long_turns, "/exit", "never answered"]
    transcript = tmp_path / "chat.jsonl"
    argv = ["chat", "--run", str(root), "--system", system["content"], "--max_new_tokens", "8", "--temperature", "0",
            "--transcript", str(transcript)]
    proc = subprocess.run([sys.executable, "-m", "jaxllm.cli", *argv],
                          input="\n".join(lines) + "\n", cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, describe(proc)
    turns = read_rows(transcript)
    assert [t["turn"] for t in turns] == [0, 1, 2, 3, 4]
    budget = SEQ_LEN - 8
    prompt_ids = [template.prompt(t["messages"]).tolist() for t in turns]
    want = sampling.generate(model_config, params["sft"], prompt_ids, max_new_tokens=8, temperature=0.0,
                             stop_ids=template.stop_ids, max_context=SEQ_LEN)
    for t, ids, tokens in zip(turns, prompt_ids, want):
        assert t["prompt_tokens"] == len(ids) <= budget
        assert t["tokens"] == tokens and t["response"] == template.decode_response(tokens)
        assert t["response"] in proc.stdout
    # The second turn is rendered with the first exchange before it.
    assert turns[0]["messages"] == [system, user("hi there")]
    assert turns[1]["messages"] == [system, user("hi there"), bot(turns[0]["response"]), user("how are you")]
    # After /reset only the system message is left.
    assert turns[2]["messages"] == [system, user(long_turns[0])] and turns[2]["dropped_turns"] == 0
    # The conversation grows until it outgrows the context, then loses its oldest exchange.
    history = [system, user(long_turns[0]), bot(turns[2]["response"]), user(long_turns[1])]
    assert turns[3]["messages"] == history and turns[3]["dropped_turns"] == 0
    history += [bot(turns[3]["response"]), user(long_turns[2])]
    assert len(template.prompt(history)) > budget
    assert turns[4]["messages"] == [system] + history[3:] and turns[4]["dropped_turns"] == 1


def reference_rewards(model_config, params, sequences, seed=0):
    """The scalar head at the last token of each sequence, without padding logic.

    Each sequence is followed by random tokens in the same segment up to `SEQ_LEN`: attention is
    causal, so what follows token `n - 1` cannot change its score, which is read at `n - 1`.
    """
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, model_config.vocab_size, (len(sequences), SEQ_LEN)).astype(np.int32)
    for i, s in enumerate(sequences):
        inputs[i, :len(s)] = s
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), inputs.shape)
    scores = np.asarray(llama.apply(model_config, params, inputs, positions, np.ones_like(inputs), head="scalar"))
    return [float(scores[i, len(s) - 1]) for i, s in enumerate(sequences)]


def training_render(template, messages):
    """The reward data's sequence of a conversation: its training render without the final eos."""
    tokens, _ = template.render(messages)
    assert tokens[-1] == template.eos_id
    return tokens[:-1]


def keep_end(sequences, max_len):
    """Cuts the same number of tokens after bos from every sequence so the longest fits."""
    cut = max(len(s) for s in sequences) - max_len
    return [np.concatenate([s[:1], s[1 + cut:]]) if cut > 0 else s for s in sequences]


def test_score_equals_the_scalar_head_at_the_last_real_token(env, run, tmp_path):
    root, template, model_config, params = run
    system = {"role": "system", "content": "sys"}
    long_question = "q" * (SEQ_LEN + 30)
    records = [
        {"id": "c1", "messages": [user("hello"), bot("hi!")]},
        {"id": "c2", "messages": [system, user("a"), bot("b"), user("c"), bot("dd")]},
        {"id": "p1", "prompt": [user("q1")], "chosen": [bot("good")], "rejected": [bot("bad answer")]},
        {"id": "same", "prompt": [user("q2")], "chosen": [bot("x")], "rejected": [bot("x")]},  # skipped
        {"id": "hh", "chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: zz"},
        {"id": "g1", "prompt": [user("what")], "response": "that"},  # a `jaxllm generate` row
        {"id": "long", "messages": [user(long_question), bot("short")]},
        {"id": "longpair", "prompt": [user(long_question)], "chosen": [bot("ok")], "rejected": [bot("no way")]},
        {"id": "rank", "prompt": [user("r")], "responses": ["a", "bb", "ccc"], "ranks": [2, 0, 1]},
    ]
    path = write_jsonl(tmp_path / "conversations.jsonl", records)
    proc = jaxllm(env, "score", "--run", root, "--input", path, "--batch_size", 3, cwd=tmp_path, script=True)
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    rows = {r["id"]: r for r in read_rows(root / "reward" / "scores" / "conversations.jsonl")}
    assert list(rows) == ["c1", "c2", "p1", "hh", "g1", "long", "longpair", "rank"]
    conversations = {
        "c1": [records[0]["messages"]], "c2": [records[1]["messages"]],
        "p1": [[user("q1"), bot("good")], [user("q1"), bot("bad answer")]],
        "hh": [[user("x"), bot("y")], [user("x"), bot("zz")]],
        "g1": [[user("what"), bot("that")]],
        "long": [records[6]["messages"]],
        "longpair": [[user(long_question), bot("ok")], [user(long_question), bot("no way")]],
        "rank": [[user("r"), bot(text)] for text in ("bb", "ccc", "a")],  # best rank first
    }
    sequences = {rid: keep_end([training_render(template, c) for c in convs], SEQ_LEN)
                 for rid, convs in conversations.items()}
    flat = reference_rewards(model_config, params["reward"], [s for seqs in sequences.values() for s in seqs])
    everything, pairs = [], []
    for rid, seqs in sequences.items():
        want, flat = flat[:len(seqs)], flat[len(seqs):]
        row = rows[rid]
        got = ([row["reward"]] if "reward" in row else [row["reward_chosen"], row["reward_rejected"]]
               if "reward_chosen" in row else row["rewards"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=rid)
        assert row["truncated"] == rid.startswith("long")
        everything += got
        pairs += [got] if len(got) == 2 else []
    assert rows["rank"]["ranks"] == [0, 1, 2]
    # The long pair's shared prompt was cut once: both keep the same context before the responses.
    c, r = keep_end([training_render(template, x) for x in conversations["longpair"]], SEQ_LEN)
    assert len(r) == SEQ_LEN and np.array_equal(c[:-3], r[:-7])  # "ok" + <|end|>, "no way" + <|end|>
    assert f"mean reward {np.mean(everything):.4f} over {len(everything)} sequences (8 records)" in proc.stdout
    rc, rr = np.asarray(pairs).T
    assert f"pairs: 3, accuracy {np.mean(rc > rr):.4f}" in proc.stdout
    assert f"truncated to seq_len={SEQ_LEN}: 2 of 8" in proc.stdout and "1 identical" in proc.stdout


def test_score_combines_safety_and_helpfulness_models_as_llama2(env, tmp_path):
    root = tmp_path / "run"
    _, model_config, params = make_run(root, stages=("reward", "reward_safety"))
    texts = ["a", "bb", "no", "yes!", "maybe", "x y z", "42", "hmm", "ok", "never", "sure", "why"]
    records = [{"id": f"p{i}", "prompt": [user(f"question {i}")], "chosen": [bot(texts[i])],
                "rejected": [bot(texts[-1 - i])], **({"is_safety": True} if i % 3 == 0 else {})}
               for i in range(len(texts))]
    records.append({"id": "c", "messages": [user("hi"), bot("hello")], "is_safety": False})
    template = inference.load_stage(root, "reward", head="scalar").template
    convs = [[[user(f"question {i}"), bot(texts[i])], [user(f"question {i}"), bot(texts[-1 - i])]]
             for i in range(len(texts))] + [[[user("hi"), bot("hello")]]]
    sequences = [training_render(template, c) for pair in convs for c in pair]
    helpful = reference_rewards(model_config, params["reward"], sequences)
    safety = reference_rewards(model_config, params["reward_safety"], sequences)
    flags = [bool(r.get("is_safety", False)) for r in records for _ in range(2 if "chosen" in r else 1)]
    # A threshold at the median safety score of the other prompts, so both of their branches are taken.
    threshold = float(np.median([s for s, flag in zip(safety, flags) if not flag])) + 1e-4
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    proc = jaxllm(env, "score", "--run", root, "--stage", "reward", "--safety_stage", "reward_safety",
                  "--safety_threshold", repr(1.0 / (1.0 + math.exp(-threshold))), "--input", path,
                  cwd=tmp_path, script=True)
    assert proc.returncode == 0, describe(proc)
    rows = {r["id"]: r for r in read_rows(root / "reward" / "scores" / "mixed.jsonl")}
    want = [s if flag or s < threshold else h for s, h, flag in zip(safety, helpful, flags)]
    got = [x for r in records for x in ([rows[r["id"]]["reward"]] if r["id"] == "c" else
                                        [rows[r["id"]]["reward_chosen"], rows[r["id"]]["reward_rejected"]])]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    gated = sum(1 for s, flag in zip(safety, flags) if not flag and s < threshold)
    assert gated > 0 and sum(flags) > 0 and len(want) - sum(flags) - gated > 0  # every branch is taken
    assert (f"reward_safety scored {sum(flags) + gated} of {len(want)} sequences "
            f"(4 of {len(records)} records are safety prompts)") in proc.stdout


def test_scoring_records_kinds_skips_and_errors(tmp_path):
    records = [
        {"id": "c", "messages": [user("u"), bot("a")]},
        {"instruction": "do", "output": "done"},  # Alpaca: a conversation too; id = line number
        {"id": "g", "prompt": [user("u")], "response": "r"},
        {"id": "p", "prompt": [user("u")], "chosen": [bot("a")], "rejected": [bot("b")]},
        {"id": "same", "prompt": [user("u")], "chosen": [bot("a")], "rejected": [bot("a")]},
        {"id": "empty", "prompt": [], "chosen": [bot("a")], "rejected": [bot("b")]},
        {"id": "tied", "prompt": [user("u")], "responses": ["a", "b"], "ranks": [1, 1]},
    ]
    stats = preference_records.PreferenceStats()
    got = inference.read_scoring_records(write_jsonl(tmp_path / "s.jsonl", records), stats)
    assert [(rid, kind) for rid, kind, _ in got] == [("c", "conversation"), (2, "conversation"),
                                                     ("g", "generation"), ("p", "group")]
    assert got[2][2]["prompt"] == [user("u")] and got[2][2]["responses"] == [[bot("r")]]
    assert got[3][2]["responses"] == [[bot("a")], [bot("b")]]
    assert (stats.skipped_identical, stats.skipped_empty_prompt, stats.skipped_no_ordered_pair) == (1, 1, 1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {"id": "q", "messages": [user("no reply")]}])
    with pytest.raises(DataError, match=f"{bad}:2: .*user turn"):
        inference.read_scoring_records(bad)
    tag = write_jsonl(tmp_path / "tag.jsonl", [{**records[3], "is_safety": True}, {**records[3], "is_safety": "yes"}])
    with pytest.raises(DataError, match=f"{tag}:2: field 'is_safety' is 'yes'"):
        inference.read_scoring_records(tag)
    assert inference.fit_prompt(np.arange(10), 4).tolist() == [0, 7, 8, 9]
    assert [inference.bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


# ---------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line naming the culprit
# ---------------------------------------------------------------------------------------------


def bad_cases(root: pathlib.Path, tmp: pathlib.Path):
    prompts = write_jsonl(tmp / "ok.jsonl", PROMPT_RECORDS[:1])
    broken = write_jsonl(tmp / "broken.jsonl", [PROMPT_RECORDS[0], '{"messages": [}'])
    unfinished = root / "dpo"
    gen = ["generate", "--run", root, "--prompts", prompts]
    return {
        "no_run_dir": (["generate", "--run", tmp / "nope", "--prompts", prompts], [str(tmp / "nope"), "not found"]),
        "no_such_stage": (gen + ["--stage", "ppo"], [str(root / "ppo" / "config.json"), "sft", "reward"]),
        "unfinished_stage": (gen + ["--stage", "dpo"], [str(unfinished), "not finished", "done.json"]),
        "reward_stage_cannot_generate": (gen + ["--stage", "reward"], ["score_head", "language-model stage"]),
        "lm_stage_for_score": (["score", "--run", root, "--input", write_jsonl(tmp / "c.jsonl", [
            {"messages": [user("a"), bot("b")]}]), "--stage", "sft"], ["lm_head", "reward-model stage"]),
        "safety_flag_without_safety_stage": (["score", "--run", root, "--input", tmp / "c.jsonl", "--safety_prompts"],
                                             ["--safety_prompts", "--safety_stage"]),
        "malformed_prompt_line": (["generate", "--run", root, "--prompts", broken], [f"{broken}:2", "JSON"]),
        "beam_with_temperature": (gen + ["--beam_size", "2", "--temperature", "0.5"], ["--beam_size", "--temperature"]),
    }


@pytest.mark.slow
def test_bad_input_fails_with_one_clear_line(env, run, tmp_path):
    root = run[0]
    # A stage that started but did not finish: config and params, no done.json.
    (root / "dpo").mkdir(exist_ok=True)
    (root / "dpo" / "config.json").write_text((root / "sft" / "config.json").read_text())
    cases = bad_cases(root, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(jaxllm, env, *argv, cwd=tmp_path) for name, (argv, _) in cases.items()}
    for name, (argv, expected) in cases.items():
        msg = error_line(futures[name].result(), argv[0])
        for text in expected:
            assert text in msg, (name, text, msg)
