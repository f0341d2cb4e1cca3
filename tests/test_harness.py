"""The lm-evaluation-harness backend (jaxllm/evaluation/harness.py) and the offline tasks.

The model is a tiny random decoder over a char tokenizer (`test_inference.make_run`, context 96
tokens), loaded through `run=DIR,stage=sft` as a user would. Every batched result is checked
against an independent computation on the same params: one unpadded row at a time through
`llama.apply`, log-softmax in float64 NumPy, summed by explicit indexing; greedy generation
against `sampling.generate` of each prompt alone. Requests of different lengths share batches, so
a padding, bucketing or off-by-one error shows. The offline tasks are run through the harness's
own `simple_evaluate` with a recording model, so their prompts are the ones the harness builds.
The SmolLM2 GGUF end-to-end run through `jaxllm lm-eval` is marked slow.

Skips: without lm-eval (`pip install -e .[eval]`); tests of the offline tasks without ../shared/data;
the end-to-end run without ../shared/models.
"""

import json
import pathlib

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from jaxllm import cli  # noqa: E402
from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sampling  # noqa: E402
from jaxllm.evaluation import harness  # noqa: E402
from jaxllm.evaluation.tasks import TASKS_DIR  # noqa: E402
from jaxllm.evaluation.tasks import offline  # noqa: E402
from jaxllm.models import llama  # noqa: E402
from test_cli import describe, jaxllm, subprocess_env  # noqa: E402
from test_inference import SEQ_LEN, make_run  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`(run_dir, model_config, params, lm)`: the tiny run and its harness model (4 rows a batch)."""
    root = tmp_path_factory.mktemp("harness") / "run"
    _, model_config, params = make_run(root, stages=("sft",))
    lm = harness.JaxLLM(run=str(root), stage="sft", batch_size=4, max_batch_tokens=256)
    return root, model_config, params["sft"], lm


def reference_logprobs(model_config, params, ids):
    """float64 `log_softmax` `[n - 1, vocab]` of the next-token distributions of `ids` (one unpadded row)."""
    ids = np.asarray(ids, np.int32)[None, :-1]
    n = ids.shape[1]
    logits = np.asarray(llama.apply(model_config, params, ids, np.arange(n)[None], np.ones_like(ids)), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference_score(model_config, params, ids, num_scored):
    """`(sum of log p(token) over the last num_scored tokens, all of them the argmax)`, by a Python loop."""
    logp = reference_logprobs(model_config, params, ids)
    total, greedy = 0.0, True
    for t in range(len(ids) - num_scored, len(ids)):
        total += logp[t - 1, ids[t]]
        greedy &= int(np.argmax(logp[t - 1])) == ids[t]
    return total, greedy


def ll_request(context, continuation):
    return Instance("loglikelihood", {}, (context, continuation), 0)


def test_loglikelihood_matches_unbatched_reference(tiny):
    _, model_config, params, lm = tiny
    pairs = [("Hello there", " world"), ("", "abc"), ("A", "B"), ("The quick brown fox", " jumps over the dog."),
             ("x" * 150, " y!"),  # longer than the context: cut from the left
             ("mid-length context, " * 2, "ok"), ("Q: 2+2?\nA:", " 4")]
    before = lm.truncated["loglikelihood"]
    results = lm.loglikelihood([ll_request(c, x) for c, x in pairs])
    assert lm.truncated["loglikelihood"] - before == 1
    bos = lm.tok.bos_id
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        whole = [bos] + lm.tok.encode(context + continuation)
        # The harness moves a context's trailing spaces to the continuation (TemplateLM._encode_pair).
        n_cont = len(whole) - 1 - len(lm.tok.encode(context.rstrip(" ")))
        ids = whole[-(SEQ_LEN + 1):]
        expected, expected_greedy = reference_score(model_config, params, ids, n_cont)
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy
    assert all(np.isfinite(lp) and lp < 0 for lp, _ in results)


def test_is_greedy_on_hand_made_sequences(tiny):
    _, model_config, params, lm = tiny
    context = [lm.tok.bos_id] + lm.tok.encode("Once upon a time")
    ids = list(context)
    for _ in range(3):  # the greedy continuation, one unpadded forward per token
        ids.append(int(np.argmax(reference_logprobs(model_config, params, ids + [0])[-1])))
    last = reference_logprobs(model_config, params, ids)[-1]
    not_argmax = int(np.argsort(last)[-2])  # the second most likely last token
    middle = list(ids)
    middle[-2] = int(np.argsort(reference_logprobs(model_config, params, ids[:-1])[-1])[-2])
    cases = [(ids, True), (ids[:-1] + [not_argmax], False), (middle, False), (ids[:-2], True)]
    results = lm.score_tokens([c for c, _ in cases], [3, 3, 3, 1])
    assert [g for _, g in results] == [g for _, g in cases]
    assert results[0][0] == pytest.approx(reference_score(model_config, params, ids, 3)[0], abs=1e-4)


def test_loglikelihood_rolling_is_the_sum_over_windows(tiny):
    _, model_config, params, lm = tiny
    short, long = "A short document.", "Rolling windows over a longer text, " * 7  # 252 chars > 96
    scores = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                       for i, t in enumerate([short, long])])
    ids = [lm.prefix_token_id] + lm.tok.encode(short)  # fits: one window, every token after the prefix
    assert scores[0] == pytest.approx(reference_score(model_config, params, ids, len(ids) - 1)[0], abs=1e-4)
    tokens = lm.tok.encode(long)
    # The harness's windows: the first starts at the prefix token; each later one predicts the next
    # tokens with the longest context that fits, so every token is predicted exactly once.
    expected, predicted, end = 0.0, 0, 0
    while end < len(tokens):
        new_end = min(len(tokens), end + SEQ_LEN)
        window = ([lm.prefix_token_id] + tokens)[max(0, new_end - SEQ_LEN):new_end + 1]
        expected += reference_score(model_config, params, window, new_end - end)[0]
        predicted += new_end - end
        end = new_end
    assert predicted == len(tokens) and len(tokens) > 2 * SEQ_LEN
    assert scores[1] == pytest.approx(expected, abs=1e-3)


def reference_generation(lm, model_config, params, context, max_new_tokens):
    """Greedy ids after `context` (one prompt, no padding; its last `SEQ_LEN - max_new_tokens` ids),
    cut before the first stop id."""
    prompt = lm.tok_encode(context)[-(SEQ_LEN - max_new_tokens):]
    stops = tuple(lm.stage.template.stop_ids) + (lm.eot_token_id,)
    out = sampling.generate(model_config, params, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                            max_context=SEQ_LEN, stop_ids=stops)[0]
    cut = next((k for k, i in enumerate(out) if i in stops), len(out))
    return out[:cut]


def gen_request(context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


@pytest.mark.parametrize("gen_chunk", [0, 3])  # all tokens in one sampler call, or 3 tokens a call
def test_generate_until_honours_stop_sequences_and_max_gen_toks(tiny, gen_chunk):
    root, model_config, params, _ = tiny
    lm = harness.JaxLLM(run=str(root), stage="sft", batch_size=4, gen_chunk=gen_chunk)
    contexts = ["Once upon a time", "Abc", "The answer is", "Q: why?\nA:", "x" * 90]
    full = {c: lm.tok.decode(reference_generation(lm, model_config, params, c, 12)) for c in contexts}
    stop = {c: full[c][3:5] if len(full[c]) > 6 else "\u2603" for c in contexts}  # a stop sequence it produces
    before = lm.truncated["generate_until"]
    limited = lm.generate_until([gen_request(c, until=["\u2603"], max_gen_toks=5) for c in contexts])
    stopped = lm.generate_until([gen_request(c, until=[stop[c]], max_gen_toks=12, do_sample=False) for c in contexts])
    for c, text5, text_stop in zip(contexts, limited, stopped):
        ids5 = reference_generation(lm, model_config, params, c, 5)
        assert text5 == lm.tok.decode(ids5), c
        assert text_stop == full[c].split(stop[c])[0], c
        assert stop[c] not in text_stop
    assert any(len(stopped[k]) < len(full[c]) for k, c in enumerate(contexts))  # some stopped early
    # bos + "x" * 90 is 91 ids: it fits beside 5 new tokens, and loses 7 with max_gen_toks=12.
    assert lm.truncated["generate_until"] - before == 1


def test_bad_model_arguments_fail_with_clear_errors(tiny):
    root, *_ = tiny
    with pytest.raises(config_lib.ConfigError, match="give model=SPEC"):
        harness.JaxLLM()
    with pytest.raises(config_lib.ConfigError, match="unknown colour"):
        harness.JaxLLM(run=str(root), colour="red")
    with pytest.raises(config_lib.ConfigError, match="no such file"):
        harness.JaxLLM(model="gguf:/nonexistent/model.gguf")
    with pytest.raises(config_lib.ConfigError, match="batch_size='many'"):
        harness.JaxLLM(run=str(root), batch_size="many")


# ---- offline tasks, through the harness ---------------------------------------------------------


class RecordingLM(LM):
    """A harness model that records every request and answers constants (no model at all)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def loglikelihood(self, requests):
        self.seen += [r.args for r in requests]
        return [(-float(len(r.args[1])), False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise AssertionError("no offline task asks for rolling log-likelihoods")

    def generate_until(self, requests):
        self.seen += [r.args for r in requests]
        return [" The answer is 18.\n#### 18" for _ in requests]


@pytest.fixture(scope="module")
def task_manager(shared_data):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), metadata={"data_root": str(shared_data)})


def evaluate(task_manager, tasks, limit=1):
    lm = RecordingLM()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager,
                                      bootstrap_iters=0)
    return lm.seen, results["results"]


def test_mmlu_prompts_and_subjects(task_manager, shared_data):
    seen, results = evaluate(task_manager, ["mmlu_cloze"])
    subjects = sorted({json.loads(line)["subject"] for line in open(shared_data / "eval/mmlu_test.jsonl")})
    assert len(seen) == 4 * len(subjects) == 4 * 57
    first = json.loads(open(shared_data / "eval/mmlu_test.jsonl").readline())
    assert [s for s in seen if first["question"] in s[0]] == [(f"The following are questions about abstract algebra.\nQuestion: {first['question']}\nAnswer:",
                         " " + c) for c in first["choices"]]
    # RecordingLM scores -len(continuation): acc_norm (divided by len(choice) characters) ties at -1
    # for every choice, so the first wins; acc picks the shortest choice.
    assert set(results["mmlu_cloze"]) >= {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}

    seen, _ = evaluate(task_manager, ["mmlu_letter"])
    seen = [s for s in seen if s[0].endswith(f"{first['question'].strip()}\nA. {first['choices'][0]}\nB. "
                                             f"{first['choices'][1]}\nC. {first['choices'][2]}\nD. "
                                             f"{first['choices'][3]}\nAnswer:")]
    dev = [json.loads(line) for line in open(shared_data / "eval/mmlu_dev.jsonl")][:5]
    shot = lambda r: (f"{r['question'].strip()}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\nC. {r['choices'][2]}\n"
                      f"D. {r['choices'][3]}\nAnswer:")
    expected = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                + "".join(f"{shot(r)} {r['answer']}\n\n" for r in dev) + shot(first))
    assert seen[0] == (expected, " A") and [s[1] for s in seen[:4]] == [" A", " B", " C", " D"]


def test_gsm8k_prompts_and_both_filters(task_manager, shared_data):
    seen, results = evaluate(task_manager, ["gsm8k", "gsm8k_cot"], limit=2)
    test = [json.loads(line) for line in open(shared_data / "eval/gsm8k_test.jsonl")][:2]
    five_shot = sorted((s for s in seen if s[0].endswith("\nAnswer:")), key=lambda s: test[1]["question"] in s[0])
    eight_shot = sorted((s for s in seen if s[0].endswith("\nA:")), key=lambda s: test[1]["question"] in s[0])
    assert len(five_shot) == 2 and len(eight_shot) == 2
    assert five_shot[0][0].endswith(f"Question: {test[0]['question']}\nAnswer:")
    assert five_shot[0][0].count("\n#### ") == 5  # five solved training problems before it
    assert eight_shot[0][0].startswith("Q: There are 15 trees in the grove.")
    assert five_shot[0][1]["until"] == ["Question:", "</s>", "<|im_end|>"]
    # The answer " ... #### 18" is right for the first problem (18) only: strict and flexible agree.
    assert results["gsm8k"]["exact_match,strict-match"] == 0.5
    assert results["gsm8k"]["exact_match,flexible-extract"] == 0.5
    assert results["gsm8k_cot"]["exact_match,strict-match"] == 0.5  # "The answer is 18."


def test_offline_data_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(offline.DataError, match=r"gsm8k_test.jsonl:2: malformed JSON line"):
        offline.gsm8k(data_root=str(tmp_path))
    (tmp_path / "eval/gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(offline.DataError, match="sft/gsm8k/train.jsonl: file not found.*--data_root"):
        offline.gsm8k(data_root=str(tmp_path))
    row = {"subject": "s", "question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}
    with pytest.raises(offline.DataError, match="f:3: field 'answer' must be one of A, B, C, D"):
        offline.mmlu_row(row, "f:3")


# ---- the command line -----------------------------------------------------------------------------


def run_cli(capsys, *args):
    code = cli.main(["lm-eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_user_errors_are_one_line(tiny, tmp_path, capsys):
    root, *_ = tiny
    code, _, err = run_cli(capsys, "--model_args", f"run={root},stage=sft", "--tasks", "no_such_task")
    assert code == 2 and "jaxllm lm-eval: error: Tasks not found: no_such_task" in err
    assert "Traceback" not in err

    code, _, err = run_cli(capsys, "--model_args", "model=gguf:/nonexistent/m.gguf", "--tasks", "gsm8k")
    assert code == 2 and "jaxllm lm-eval: error: gguf:/nonexistent/m.gguf: no such file" in err

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    code, _, err = run_cli(capsys, "--data_root", tmp_path, "--model_args", f"run={root},stage=sft",
                           "--tasks", "gsm8k", "--limit", "1")
    assert code == 2 and f"{tmp_path}/eval/gsm8k_test.jsonl:2: malformed JSON line" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_smollm2_mmlu_cloze_end_to_end(shared_models, shared_data, tmp_path):
    out = tmp_path / "out"
    proc = jaxllm(subprocess_env(tmp_path / "cache"), "lm-eval", "--model_args",
                  f"model=gguf:{shared_models / 'SmolLM2-135M-Instruct.Q4_1.gguf'}", "--tasks", "mmlu_cloze",
                  "--limit", "2", "--batch_size", "8", "--data_root", shared_data, "--output_path", out,
                  cwd=pathlib.Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert "loglikelihood 0 of 456" in proc.stdout  # 57 subjects x 2 questions x 4 choices
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["mmlu_cloze"]
    assert 0.0 <= results["acc_norm,none"] <= 1.0 and 0.0 < results["acc_norm_stderr,none"] < 0.1
