"""`jaxllm compile` / `aot.compile_step` for span-corruption configs (configs/pretrain_t5.py).

The compiled step is the T5 stage's own (model and loss from `jaxllm.train.pretrain_t5`), and its
per-device sizes are checked against counts made without the compile path: parameters from the
model's initialised tree (float32, split 8 ways by `mesh.shape = (1, 8, 1)`; the 5% covers what is
not split: the relative-position biases and scalar counters), AdamW's two moments (and
Adafactor's factored one, T5's default, counted from the parameter shapes), and the batch
from the packed row layout (T5: 3 encoder and 5 decoder fields of 4 bytes; prefix LM: 6 fields).
"""

import contextlib
import io
import math
import pathlib
import re

import flax.linen as nn
import jax
import pytest

from jaxllm import aot
from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm.models import llama
from jaxllm.models import t5

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 0.05
CONFIGS = str(REPO / "configs" / "pretrain_t5.py")
VOCAB = 4096


def span_config(arg: str):
    return config_lib.build(f"{CONFIGS}:{arg}", [("model.vocab_size", str(VOCAB)), ("mesh.shape", "(1, 8, 1)")])


def tree_size(init) -> int:
    return sum(x.size for x in jax.tree.leaves(nn.unbox(jax.eval_shape(init, jax.random.key(0)))))


def check_state(fit: aot.Fit, params: int) -> None:
    want = params * 4 / 8
    assert abs(fit.param_bytes / want - 1) < TOLERANCE, (fit.param_bytes, want)
    assert abs(fit.opt_state_bytes / (2 * want) - 1) < TOLERANCE, (fit.opt_state_bytes, 2 * want)
    assert fit.temp_bytes > 0 and fit.alias_bytes >= 0.99 * (fit.param_bytes + fit.opt_state_bytes)


def test_t5_step_compiles_on_8_cpu_devices():
    c = span_config("tiny")
    assert c.optimizer.name == "adafactor"  # T5's optimizer; AdamW first, for check_state's two moments
    c.optimizer.name = "adamw"
    fit = aot.compile_step(c, jax.devices())
    mc = t5.T5Config.from_config(c.model)
    params = tree_size(lambda key: t5.init(mc, key))
    assert params == t5.count_params(mc)
    check_state(fit, params)
    # Adafactor keeps one second moment: for a matrix whose two largest dims are >= 128 (optax's
    # `min_dim_size_to_factor`) a row and a column vector (replicated, full size on every device),
    # else the whole moment (split 8 ways like its parameter).
    c.optimizer.name = "adafactor"
    ada = aot.compile_step(c, jax.devices())
    shapes = [x.shape for x in jax.tree.leaves(nn.unbox(jax.eval_shape(lambda key: t5.init(mc, key),
                                                                        jax.random.key(0))))]
    factored = [s for s in shapes if len(s) >= 2 and sorted(s)[-2] >= 128]
    whole = sum(math.prod(s) for s in shapes if s not in factored)
    want = 4 * (sum(sum(sorted(s)[-2:]) for s in factored) + whole / 8)
    assert abs(ada.opt_state_bytes / want - 1) < TOLERANCE, (ada.opt_state_bytes, want)
    assert ada.opt_state_bytes < 0.15 * fit.opt_state_bytes
    rows, enc, dec = c.train.batch_size, c.data.inputs_length, 29  # configs/pretrain_t5.py: 128 / 29 tokens
    assert fit.batch_bytes == rows * (3 * enc + 5 * dec) * 4 / 8
    assert fit.flops == t5.flops_per_example(mc, enc, dec) * rows / 8


def test_prefix_lm_step_compiles_on_8_cpu_devices():
    c = span_config("ul2_prefix_lm_tiny")
    fit = aot.compile_step(c, jax.devices())
    mc = llama.LlamaConfig.from_config(c.model)
    check_state(fit, tree_size(lambda key: llama.init(mc, key)))
    rows, length = c.train.batch_size, c.data.inputs_length
    assert fit.batch_bytes == rows * 6 * length * 4 / 8
    assert fit.flops == llama.flops_per_token(mc, length) * rows * length / 8


@pytest.mark.slow
def test_compile_command_on_a_t5_config():
    """`jaxllm compile --config configs/pretrain_t5.py:tiny --topology v5e:2x2` prints a row that fits."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jaxllm[tpu]')")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.cmd_compile(["--config", f"{CONFIGS}:tiny", f"--config.model.vocab_size={VOCAB}",
                              "--topology", "v5e:2x2"])
    row = re.search(r"^\s*v5e:2x2\s+4\s+\(1, 4, 1\).*\byes$", out.getvalue(), re.M)
    assert rc == 0 and row, out.getvalue()
