"""FSDP divides the train state: per-device bytes of the compiled train step, from XLA.

With `mesh.shape = (1, N, 1)` every parameter is split over its `embed` axis, so each device holds
1/N of the parameters and of AdamW's two moments. The bytes are read from
`compiled.memory_analysis()` of the real train step (`aot.compile_step`, the `jaxllm compile`
path): its arguments are the train state plus the batch, so per-device state bytes =
`argument_size_in_bytes - batch bytes`. They must equal the model's total / N within 5%, on the
8 CPU devices and on an ahead-of-time compiled TPU v5e slice (libtpu).

The expected total is counted by hand from the architecture, not from the model code: a Llama
block has q, k, v, o projections (`embed x heads x head_dim` each here, as kv_heads = heads), a
gated MLP (3 x `embed x mlp`) and two RMSNorm scales; plus the input embedding, the final norm and
the untied LM head; AdamW keeps `mu` and `nu` of every parameter, all float32 (4 bytes). The 5%
leaves room for what is not split: scalar step counters and, on TPU, the padding of small arrays
to (8, 128) tiles. Every split dimension is 1024, so a shard's minor dimension is >= 128 and fills
TPU tiles: padding cannot fake or hide the split.
"""

import re
import subprocess
import sys

import jax
import pytest

from jaxllm import aot
from jaxllm.models import llama
from jaxllm.train import pretrain

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import SMALL, subprocess_env
except ImportError:
    from test_cli import SMALL, subprocess_env

TOLERANCE = 0.05
V, D, HEADS, HEAD_DIM, MLP, LAYERS = 256, 1024, 8, 128, 1024, 1
TPU_TOPOLOGY = "v5e:2x4"  # 8 chips


def fsdp_config(n: int):
    c = pretrain.default_config()
    c.model.update(vocab_size=V, embed_dim=D, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
                   head_dim=HEAD_DIM, mlp_dim=MLP)
    c.mesh.shape = (1, n, 1)
    c.train.batch_size = 8
    c.data.seq_len = 64
    return c


def hand_count() -> int:
    """Parameters of the model above, from the architecture."""
    block = 4 * D * HEADS * HEAD_DIM + 3 * D * MLP + 2 * D
    return V * D + LAYERS * block + D + D * V


def total_state_bytes() -> int:
    return 3 * hand_count() * 4  # params, mu, nu: float32


def test_hand_count_is_the_model():
    assert hand_count() == llama.count_params(llama.LlamaConfig.from_config(fsdp_config(1).model))
    abstract = jax.eval_shape(lambda: llama.init(llama.LlamaConfig.from_config(fsdp_config(1).model),
                                                 jax.random.key(0)))
    import flax.linen as nn

    assert sum(x.size for x in jax.tree.leaves(nn.unbox(abstract))) == hand_count()


def state_bytes_per_device(fit: aot.Fit) -> int:
    """Train state bytes on one device: the compiled step's arguments less the batch."""
    return fit.argument_bytes - fit.batch_bytes


def check_split(fit: aot.Fit, n: int) -> None:
    got, want = state_bytes_per_device(fit), total_state_bytes() / n
    assert abs(got / want - 1) < TOLERANCE, f"fsdp={n}: {got} bytes per device, total / {n} = {want:.0f}"
    # The state is donated: the new state is written over the old one.
    assert fit.alias_bytes >= 0.99 * got


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_divides_state_on_cpu(n):
    fit = aot.compile_step(fsdp_config(n), jax.devices()[:n])
    assert fit.mesh_shape == {"data": 1, "fsdp": n, "tensor": 1}
    check_split(fit, n)


def tpu_devices(topology: str = TPU_TOPOLOGY):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jaxllm[tpu]'): no TPU "
                                         "topology to compile for")
    return aot.topology_devices(topology)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_divides_state_on_tpu(n):
    devices = tpu_devices()
    assert len(devices) == 8 and devices[0].platform == "tpu"
    fit = aot.compile_step(fsdp_config(n), devices[:n], TPU_TOPOLOGY)
    check_split(fit, n)
    assert fit.hbm_bytes == aot.HBM_BYTES["v5e"] and fit.fits


ROW = re.compile(r"^\s*(v5e:\S+)\s+(\d+)\s+\(([\d, ]+)\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                 r"([\d.]+)\s+([\d.]+)\s+(yes|NO)$", re.M)


@pytest.mark.slow
def test_compile_command(tmp_path, tmp_path_factory):
    """`jaxllm compile` prints one row for a topology, and `--suggest` stops at the first slice
    that fits (one v5e chip holds the 29K-parameter test model)."""
    tpu_devices()
    env = subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    common = [sys.executable, "-m", "jaxllm.cli", "compile", "--config", SMALL, "--config.model.vocab_size=128",
              "--config.train.batch_size=8"]
    proc = subprocess.run(common + ["--topology", TPU_TOPOLOGY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = ROW.findall(proc.stdout)
    assert len(rows) == 1, proc.stdout
    topology, chips, mesh, *gib, fits = rows[0]
    assert (topology, chips, mesh, fits) == (TPU_TOPOLOGY, "8", "1, 8, 1", "yes")
    assert float(gib[5]) == pytest.approx(aot.HBM_BYTES["v5e"] / aot.GiB)

    proc = subprocess.run(common + ["--topology", "v5e:4x4", "--suggest"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r[0] for r in ROW.findall(proc.stdout)] == ["v5e:1x1"]
    assert "smallest v5e slice that fits: v5e:1x1" in proc.stdout


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_reported_not_raised():
    """XLA:TPU refuses to compile a step larger than HBM; compile_step turns that into a row."""
    config = fsdp_config(1)
    config.train.batch_size, config.data.seq_len = 256, 1024  # ~30 GiB of activations on one chip
    fit = aot.compile_step(config, tpu_devices("v5e:1x1"), "v5e:1x1")
    assert not fit.fits and "RESOURCE_EXHAUSTED" in fit.error
    assert fit.temp_bytes > fit.hbm_bytes > 15 * aot.GiB
    assert fit.total_bytes == fit.temp_bytes + fit.param_bytes + fit.opt_state_bytes + fit.batch_bytes
    assert fit.table_row().endswith("NO  (XLA: out of HBM)")


def oom_fit(message: str) -> aot.Fit:
    common = dict(topology="v5e:1x1", num_devices=1, mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
                  param_bytes=3 * aot.GiB, opt_state_bytes=6 * aot.GiB, batch_bytes=aot.GiB // 4,
                  hbm_bytes=aot.HBM_BYTES["v5e"], flops=1.0)
    return aot._out_of_memory_fit(message, common)


def test_out_of_memory_message_with_a_breakdown():
    fit = oom_fit("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                  "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.\n\n"
                  "Total hbm usage >= 21.02G:\n    reserved        530.00M \n    program          12.25G \n"
                  "    arguments         8.25G \n\nProgram hbm requirement 12.25G:\n    global           481.0K\n"
                  "    HLO temp         12.25G (100.0% utilization)\n")
    gib = aot.GiB
    assert (fit.total_bytes, fit.hbm_bytes, fit.argument_bytes, fit.temp_bytes) == (
        int(20.5 * gib), int(15.75 * gib), int(8.25 * gib), int(12.25 * gib))
    assert not fit.fits and fit.error.startswith("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error.")


def test_out_of_memory_message_about_temporaries():
    fit = oom_fit("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                  "temporaries (30.13G) exceeds available HBM (15.75G).")
    temp = int(30.13 * aot.GiB)
    assert (fit.temp_bytes, fit.hbm_bytes) == (temp, int(15.75 * aot.GiB))
    # Arguments are not in this message: params + optimizer state + batch from the shardings.
    assert fit.argument_bytes == 9 * aot.GiB + aot.GiB // 4 and fit.total_bytes == fit.argument_bytes + temp
    assert not fit.fits


def test_bad_topology_is_a_clear_error():
    with pytest.raises(aot.TopologyError, match="expected GEN:AxB"):
        aot.generation("v5x:2x2")
