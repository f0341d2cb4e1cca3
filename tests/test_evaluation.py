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

from jaxllm import sharding
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
