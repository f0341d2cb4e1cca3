"""The run report's sampling: each prompt batch draws its own noise.

`jaxllm eval` samples every batch of held-out prompts at `eval.temperature` from `eval.seed`; the
key of batch `k` is `fold_in(key(seed), k)`, so row i of two batches holding the same prompts
gets different samples (with one key for all batches, row i of every batch would share its noise
and the report would rest on fewer independent draws than it shows). The report stays a pure
function of the params: the same seed gives the same samples.
"""

import jax
import ml_collections
import numpy as np
import pytest

from jaxllm import fs, sharding
from jaxllm.evaluation import report as evaluation
from jaxllm.data import chat
from test_inference import make_run


def prompt_batch(template, texts, width):
    rows = [template.prompt([{"role": "user", "content": t}]) for t in texts]
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r  # left-padded
    return {"prompt_tokens": tokens, "prompt_lengths": np.array([len(r) for r in rows], np.int32),
            "prompt_mask": np.ones(len(rows), np.float32)}


def test_each_prompt_batch_samples_with_its_own_key(tmp_path):
    tok, model_config, params = make_run(tmp_path / "run")
    template = chat.ChatTemplate(tok)
    batch = prompt_batch(template, ["hello there?", "what is 2 + 2?", "name a colour.", "why?"], width=24)
    c = ml_collections.ConfigDict({"num_prompts": 0, "max_new_tokens": 12, "temperature": 1.0, "seed": 0})
    mesh = sharding.make_mesh(sharding.default_config(), jax.devices()[:1])
    rules = sharding.default_config().rules

    def sample():
        out = evaluation._policy_eval(model_config, {"sft": params["sft"]}, params["reward"], [batch, batch], c,
                                      template.stop_ids, tok.pad_id, 24 + c.max_new_tokens, mesh, rules)
        return [t.tolist() for t in out["sft"]["tokens"]]

    tokens = sample()
    first, second = tokens[:4], tokens[4:]
    assert sum(a != b for a, b in zip(first, second)) >= 3, (first, second)  # identical prompts, new noise
    assert sample() == tokens  # still a pure function of the params and the seed


def test_policy_stats_standard_errors_by_hand(tmp_path):
    """Mean reward, win rate (ties half) and KL with standard errors over prompts, computed by hand
    for four prompts, and the report table showing them as `mean ± se`."""
    sft = np.array([0.0, 1.0, 2.0, 3.0])
    policy = {"reward": np.array([1.0, 1.0, 1.0, 5.0]), "kl": np.array([0.0, 0.2, 0.4, 0.6]),
              "length": np.array([3, 4, 5, 6]), "ended": np.array([True, True, False, True])}
    stats = evaluation.policy_stats(policy, sft)
    # rewards 1, 1, 1, 5: mean 2, sample variance ((1+1+1+9)/3) = 4, se = 2 / sqrt(4) = 1
    assert stats["mean_reward"] == 2.0 and stats["mean_reward_se"] == pytest.approx(1.0)
    # per prompt: win, tie, loss, win -> 1, 0.5, 0, 1: mean 0.625, sample var 0.22916.., se 0.23936..
    assert stats["win_rate_vs_sft"] == 0.625
    assert stats["win_rate_se"] == pytest.approx((0.6875 / 3) ** 0.5 / 2)
    # kl 0, .2, .4, .6: mean .3, sample var .0666.., se .1290..
    assert stats["kl_to_sft"] == pytest.approx(0.3) and stats["kl_to_sft_se"] == pytest.approx((0.2 / 3) ** 0.5 / 2)
    assert stats["missing_eos_rate"] == 0.25 and stats["prompts"] == 4
    one = evaluation.policy_stats({k: v[:1] for k, v in policy.items()}, sft[:1])
    assert np.isnan(one["mean_reward_se"])  # one prompt: no standard error
    evaluation.write_report({"stages": {}, "policies": {"ppo": stats, "one": one}}, fs.path(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "| ppo | 2.0000 ± 1.0000 | 0.625 ± 0.239 | 0.300 ± 0.129 |" in text
    assert "| one | 1.0000 | 1.000 | 0.000 |" in text and "the one PPO optimised" in text
