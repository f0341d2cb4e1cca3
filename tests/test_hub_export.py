"""`jaxllm export` of a run trained from scratch: a causal LM and a reward model as Hugging Face folders.

The run (tests/test_inference.py `make_run`: a char SentencePiece tokenizer, random `sft` and
`reward` params) is exported through the command line (in-process); `transformers` loads both
folders with no missing or unexpected weights, its `LlamaForCausalLM` logits and
`LlamaForSequenceClassification` scores equal jaxllm's on the same ids, the reward model's
`pad_token_id` is the run's, and the exported jinja chat template renders jaxllm's own template.
"""

import json

import numpy as np
import pytest

from jaxllm import cli
from jaxllm.data import chat, hf_tokenizer
from jaxllm.models import llama
from test_inference import make_run

torch = pytest.importorskip("torch", reason="the parity peer needs torch (pip install -e '.[hf]')")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok, model_config, params = make_run(root / "run")
    for stage in ("sft", "reward"):
        assert cli.main(["export", "--run", str(root / "run"), "--stage", stage, "--output", str(root / stage)]) == 0
    return root, tok, model_config, params


def test_causal_lm_and_reward_model_load_in_transformers(exported, transformers):
    root, tok, model_config, params = exported
    ids = np.asarray([tok.encode("Hello there, general Kenobi!")], np.int32)
    positions, segments = np.arange(ids.shape[1])[None], np.ones_like(ids)
    with torch.no_grad():
        lm, info = transformers.AutoModelForCausalLM.from_pretrained(root / "sft", dtype=torch.float32,
                                                                     output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        theirs = lm(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        rm, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            root / "reward", dtype=torch.float32, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        scores = rm(torch.from_numpy(ids.astype(np.int64))).logits.numpy()[:, 0]
    ours = np.asarray(llama.apply(model_config, params["sft"], ids, positions, segments))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    ours_scores = np.asarray(llama.apply(model_config, params["reward"], ids, positions, segments, head="scalar"))
    np.testing.assert_allclose(ours_scores[:, -1], scores, atol=1e-4, rtol=0)  # HF reads the last real token
    config = json.loads((root / "reward" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == tok.pad_id and config["eos_token_id"] == tok.eos_id


def test_exported_template_renders_jaxllm_template(exported):
    root, tok, _, _ = exported
    config = json.loads((root / "sft" / "tokenizer_config.json").read_text())
    exported_tok = hf_tokenizer.HFTokenizer.load(root / "sft")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    text = chat.template_for(exported_tok).render_text(messages, add_generation_prompt=True)
    # jaxllm's template (jaxllm/data/chat.py), written out by hand with the default markers.
    assert text == config["bos_token"] + "<|system|>Be brief.<|end|><|user|>Name a color.<|end|><|assistant|>"
    assert config["bos_token"] == tok.sp.id_to_piece(tok.bos_id)
