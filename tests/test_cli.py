"""End-to-end tests of the `jaxllm` command line, each command in a subprocess on one CPU device.

Smoke tests per command (`tokenizer`, `pretrain`, `sample`) on `tests/configs/small.py`, then bad
inputs: each must exit with status 2 and print one `jaxllm COMMAND: error: ...` line naming the
culprit, without a Python traceback.

The subprocesses share a JAX persistent compilation cache (per test session), so only the first
pretraining run pays for XLA compilation.
"""

import concurrent.futures
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = str(REPO / "tests" / "configs" / "small.py")
EXIT_USAGE = 2
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches near the old river and bright stars rise above calm hills in autumn").split()
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def write_corpus(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A few KB of made-up English: `train.txt` (120 paragraphs) and `val.txt` (20)."""
    rng = random.Random(seed)

    def paragraph():
        return "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(rng.randint(1, 4)))

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.txt").write_text("\n\n".join(paragraph() for _ in range(120)) + "\n")
    (directory / "val.txt").write_text("\n\n".join(paragraph() for _ in range(20)) + "\n")
    return directory


def subprocess_env(cache_dir: pathlib.Path) -> dict[str, str]:
    """The test's environment for a one-CPU-device jaxllm process with a compilation cache."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def jaxllm(env, *args, cwd, timeout=300, script=False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "jaxllm.cli"]
    console_script = pathlib.Path(sys.executable).parent / "jaxllm"
    if script and console_script.exists():
        launcher = [str(console_script)]
    return subprocess.run(launcher + [str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def read_rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------
# Smoke tests
# ---------------------------------------------------------------------------------------------


def test_no_command_prints_usage(env, tmp_path):
    proc = jaxllm(env, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    for command in ("tokenizer", "pretrain", "sample"):
        assert command in proc.stdout
    bad = jaxllm(env, "pretrainn", cwd=tmp_path)
    assert bad.returncode == EXIT_USAGE, describe(bad)


def test_tokenizer_command(env, corpus, tmp_path):
    from jaxllm.data import tokenizer as tokenizer_lib

    run_dir = tmp_path / "run"
    proc = jaxllm(env, "tokenizer", "--config", SMALL, f"--config.data_root={corpus}",
                  "--config.run_dir", run_dir, cwd=tmp_path, script=True)
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    model = run_dir / "tokenizer" / "tokenizer.model"
    tok = tokenizer_lib.Tokenizer.load(model)
    assert f"tokenizer {model}: {tok.vocab_size} ids" in proc.stdout
    assert tok.model_type == "char"
    text = (corpus / "train.txt").read_text()[:200]
    assert tok.decode(tok.encode(text)) == text  # trained on the corpus: every character known
    # A second call loads the run's tokenizer instead of training another.
    before = model.stat().st_mtime_ns
    again = jaxllm(env, "tokenizer", "--config", SMALL, f"--config.data_root={corpus}",
                   f"--config.run_dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert model.stat().st_mtime_ns == before
    assert again.stdout == proc.stdout


@pytest.fixture(scope="module")
def pretrained(env, corpus, tmp_path_factory):
    """One finished `jaxllm pretrain` run of tests/configs/small.py: (run_dir, process, config)."""
    from jaxllm import config as config_lib

    cwd = tmp_path_factory.mktemp("pretrain_cwd")
    run_dir = cwd / "run"
    proc = jaxllm(env, "pretrain", "--config", SMALL, f"--config.data_root={corpus}",
                  f"--config.run_dir={run_dir}", cwd=cwd)
    assert proc.returncode == 0, describe(proc)
    return run_dir, proc, config_lib.load_config_file(SMALL)


def test_pretrain_writes_the_run_directory(pretrained):
    from jaxllm import config as config_lib
    from jaxllm.data import tokenizer as tokenizer_lib

    run_dir, proc, config = pretrained
    assert "Traceback" not in proc.stderr
    stage = run_dir / "pretrain"
    assert (stage / "metrics.jsonl").is_file()
    assert (stage / "params").is_dir() and any((stage / "params").iterdir())
    assert (stage / "checkpoints").is_dir()
    steps = sorted(int(p.name) for p in (stage / "checkpoints").iterdir() if p.name.isdigit())
    every, total = config.checkpoint.every_steps, config.train.steps
    expected = sorted({s for s in range(every, total + 1, every)} | {total})[-config.checkpoint.keep:]
    assert steps == expected
    # The resolved config: given overrides, and model.vocab_size filled from the tokenizer.
    saved = config_lib.load_json(run_dir / "config.json")
    assert saved.run_dir == str(run_dir)
    tok = tokenizer_lib.Tokenizer.load(run_dir / "tokenizer" / "tokenizer.model")
    assert saved.model.vocab_size == tokenizer_lib.padded_vocab_size(tok.vocab_size)
    assert config_lib.to_dict(config_lib.load_json(stage / "config.json")) == config_lib.to_dict(saved)
    assert f"pretrain finished at step {total}" in proc.stdout


def test_pretrain_metrics(pretrained):
    run_dir, _, config = pretrained
    rows = read_rows(run_dir / "pretrain" / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert len(train) + len(evals) == len(rows)
    tc = config.train
    assert [r["step"] for r in train] == list(range(tc.log_every, tc.steps + 1, tc.log_every))
    expected_eval_steps = sorted({s for s in range(tc.eval_every, tc.steps, tc.eval_every)} | {tc.steps})
    assert [r["step"] for r in evals] == expected_eval_steps
    for r in train:
        for key in ("loss", "learning_rate", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["loss"] > 0 and r["grad_norm"] > 0
    # The first step compiles and is not timed; every later row has throughput and MFU.
    for r in train[1:]:
        assert r["tokens_per_second"] > 0, r
        assert 0 < r["mfu"] < 1, r
    # Warmup from 0 to the configured peak learning rate.
    assert train[0]["learning_rate"] == 0.0
    assert max(r["learning_rate"] for r in train) == pytest.approx(config.optimizer.lr, rel=1e-6)
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-9)
    # It learns: the last evaluation beats the first.
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


def test_pretrain_again_does_not_retrain(env, pretrained, corpus):
    run_dir, _, _ = pretrained
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    before = metrics.read_text()
    proc = jaxllm(env, "pretrain", "--config", SMALL, f"--config.data_root={corpus}",
                  f"--config.run_dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, describe(proc)
    assert metrics.read_text() == before  # no step trained again, no row added


def test_sample_prints_text(env, pretrained):
    run_dir, _, _ = pretrained
    prompts = ["the ", "A quick"]
    proc = jaxllm(env, "sample", "--run", run_dir, "--prompt", prompts[0], "--prompt", prompts[1],
                  "--max_new_tokens", "12", "--temperature", "0", cwd=run_dir.parent)
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    blocks = proc.stdout.split("--- prompt: ")[1:]
    assert len(blocks) == len(prompts), proc.stdout
    for prompt, block in zip(prompts, blocks):
        header, _, text = block.partition("\n")
        assert header == repr(prompt)
        assert text.startswith(prompt)


# ---------------------------------------------------------------------------------------------
# Bad input: exit status 2, one line naming the culprit, no traceback
# ---------------------------------------------------------------------------------------------


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """Checks the failure contract and returns the message of the one error line."""
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    prefix = f"jaxllm {command}: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), describe(proc)
    return lines[0][len(prefix):]


def _pretrain(tmp: pathlib.Path, corpus: pathlib.Path, *overrides: str) -> list[str]:
    return ["pretrain", "--config", SMALL, f"--config.data_root={corpus}",
            f"--config.run_dir={tmp / 'run'}", *overrides]


def case_glob_matches_no_files(tmp, corpus):
    pattern = str(tmp / "missing" / "*.txt")
    return _pretrain(tmp, corpus, f"--config.data.sources=text:{pattern}"), [pattern, "no files"]


def case_empty_data_file(tmp, corpus):
    empty = tmp / "empty.txt"
    empty.write_text("  \n\n")
    return _pretrain(tmp, corpus, f"--config.data.sources=text:{empty}"), [str(empty), "empty"]


def case_non_utf8_byte(tmp, corpus):
    bad = tmp / "latin1.txt"
    bad.write_bytes(b"first line is fine\nsecond line is fine\ncaf\xe9 on the third line\n")
    return _pretrain(tmp, corpus, f"--config.data.sources=text:{bad}"), [str(bad), "line 3", "UTF-8"]


def case_malformed_jsonl_line(tmp, corpus):
    path = tmp / "docs.jsonl"
    path.write_text('{"text": "one document"}\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    return _pretrain(tmp, corpus, f"--config.data.sources=jsonl:{path}"), [f"{path}:3"]


def case_jsonl_record_missing_field(tmp, corpus):
    path = tmp / "docs.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n{"title": "three"}\n')
    return _pretrain(tmp, corpus, f"--config.data.sources=jsonl:{path}#body"), [f"{path}:3", "'body'"]


def case_eval_glob_matches_no_files(tmp, corpus):
    pattern = str(tmp / "missing" / "val*.txt")
    return _pretrain(tmp, corpus, f"--config.data.eval_sources=text:{pattern}"), [pattern, "no files"]


def case_unknown_config_key(tmp, corpus):
    return _pretrain(tmp, corpus, "--config.train.step=3"), ["'train.step'", "did you mean", "train.steps"]


def case_bad_config_value(tmp, corpus):
    return _pretrain(tmp, corpus, "--config.train.steps=many"), ["train.steps", "many"]


def case_section_override(tmp, corpus):
    return _pretrain(tmp, corpus, "--config.model=small"), ["'model'", "section"]


def case_vocab_smaller_than_tokenizer(tmp, corpus):
    return _pretrain(tmp, corpus, "--config.model.vocab_size=64"), ["model.vocab_size=64", "tokenizer"]


def case_mesh_does_not_match_devices(tmp, corpus):
    return _pretrain(tmp, corpus, "--config.mesh.shape=(2,1,1)"), ["mesh.shape", "(2, 1, 1)"]


def case_batch_not_divisible_by_accumulation(tmp, corpus):
    return (_pretrain(tmp, corpus, "--config.train.batch_size=3", "--config.train.grad_accum_steps=2"),
            ["train.batch_size=3", "train.grad_accum_steps=2"])


def case_unknown_preset(tmp, corpus):
    return ["pretrain", "--config", "configs/pretrain.py:nonesuch"], ["nonesuch", "tiny", "shakespeare_char"]


def case_missing_config_file(tmp, corpus):
    return ["pretrain", "--config", str(tmp / "nope.py")], [str(tmp / "nope.py")]


def case_stray_argument(tmp, corpus):
    return _pretrain(tmp, corpus, "stray"), ["stray"]


def case_tokenizer_data_error(tmp, corpus):
    pattern = str(tmp / "missing" / "*.txt")
    return (["tokenizer", "--config", SMALL, f"--config.run_dir={tmp / 'run'}",
             f"--config.data.sources=text:{pattern}"], [pattern])


def case_sample_without_a_run(tmp, corpus):
    return ["sample", "--run", str(tmp / "norun")], [str(tmp / "norun")]


def case_not_a_sentencepiece_model(tmp, corpus):
    bogus = tmp / "bogus.model"
    bogus.write_text("this is a text file, not a SentencePiece model\n")
    return (["tokenizer", "--config", SMALL, f"--config.run_dir={tmp / 'run'}",
             f"--config.tokenizer.model_path={bogus}"], [str(bogus), "not a SentencePiece model"])


def case_tokenizer_without_role_markers(tmp, corpus):
    """SFT with an external SentencePiece model that has no <|user|> ... pieces (MissingPieceError)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus / "train.txt"), model_prefix=str(tmp / "plain"), vocab_size=60,
                                   model_type="char", hard_vocab_limit=False, minloglevel=2)
    conversations = tmp / "chat.jsonl"
    conversations.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}) + "\n")
    return (["sft", "--config", "configs/sft.py:tiny", f"--config.run_dir={tmp / 'run'}", "--config.init_from=",
             "--config.stdlib_tasks=false", f"--config.data.sources=jsonl:{conversations}",
             "--config.data.eval_sources=",
             f"--config.tokenizer.model_path={tmp / 'plain.model'}"], ["has no piece for the", "marker"])


def case_diverging_loss(tmp, corpus):
    """An infinite learning rate: every update is non-finite and skipped; 3 in a row stop the run."""
    return (_pretrain(tmp, corpus, "--config.optimizer.lr=inf", "--config.train.max_nonfinite_steps=3"),
            ["pretrain", "3 steps in a row", "non-finite", "train.max_nonfinite_steps=3"])


BAD_INPUTS = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.fixture(scope="module")
def bad_input_results(env, corpus, tmp_path_factory):
    """Runs every bad-input case at once (they spend most of their time importing JAX)."""
    jobs = {}
    for name, make in BAD_INPUTS.items():
        tmp = tmp_path_factory.mktemp(name)
        argv, expected = make(tmp, corpus)
        jobs[name] = (tmp, argv, expected)
    # cwd: the repository root, where `configs/...` paths resolve (run dirs are absolute).
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(jaxllm, env, *argv, cwd=REPO) for name, (_, argv, _) in jobs.items()}
        return {name: (jobs[name][0], jobs[name][1], jobs[name][2], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_clear_line(bad_input_results, name):
    tmp, argv, expected, proc = bad_input_results[name]
    msg = error_line(proc, argv[0])
    for text in expected:
        assert text in msg, (text, msg)


def test_a_diverged_run_exports_nothing(bad_input_results):
    """The stopped run leaves no params/, done.json or checkpoint, and metrics.jsonl is strict JSON."""
    stage_dir = bad_input_results["diverging_loss"][0] / "run" / "pretrain"
    assert not (stage_dir / "params").exists() and not (stage_dir / "done.json").exists()
    assert not [p for p in (stage_dir / "checkpoints").glob("*") if p.name.isdigit()]

    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    rows = [json.loads(line, parse_constant=refuse) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["nonfinite_steps"] == 1 for r in train)


def test_config_errors_write_nothing(bad_input_results):
    """Config and mesh errors are found before the tokenizer, data or run directory are touched."""
    for name in ("unknown_config_key", "bad_config_value", "section_override", "mesh_does_not_match_devices"):
        tmp = bad_input_results[name][0]
        assert not (tmp / "run").exists(), name
