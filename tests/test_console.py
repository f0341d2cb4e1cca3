"""Clean console output on machines without a TPU (jaxllm/console.py), issue 24.

With libtpu installed and no JAX_PLATFORMS set, `jaxllm generate`, `jaxllm pipeline` and
`jaxllm compile --topology` run in subprocesses and their stderr must hold none of libtpu's
start-up errors or absl's "Logging before InitGoogle". The subprocesses get
ALLOW_MULTIPLE_LIBTPU_LOAD=1, so a TPU backend start would really happen (and print those lines)
even while another process holds /tmp/libtpu_lockfile. A JAX_PLATFORMS set by the user is kept as
it is, checked on the value the process sees, without starting a TPU backend.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from jaxllm import console

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import SMALL, describe, jaxllm, subprocess_env
    from tests.test_inference import make_run
except ImportError:
    from test_cli import SMALL, describe, jaxllm, subprocess_env
    from test_inference import make_run

REPO = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("E0000", "INVALID_ARGUMENT", "TPU_WORKER_HOSTNAMES", "Failed to find host bounds", "InitGoogle")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
no_tpu_here = pytest.mark.skipif(console.tpu_chip_count() > 0, reason="this machine has TPU chips")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A subprocess environment with no JAX_PLATFORMS (a newcomer's shell) and a compilation cache."""
    env = subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    del env["JAX_PLATFORMS"]
    env.pop("JAXLLM_VERBOSITY", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    return env


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, describe(proc)
    found = [n for n in NOISE if n in proc.stderr]
    assert not found, f"{found} in stderr\n{describe(proc)}"


# ---------------------------------------------------------------------------------------------
# The platform choice
# ---------------------------------------------------------------------------------------------


def fake_pci(root: pathlib.Path, devices: dict[str, tuple[str, str]]) -> str:
    for address, (vendor, device) in devices.items():
        (root / address).mkdir(parents=True)
        (root / address / "vendor").write_text(vendor + "\n")
        (root / address / "device").write_text(device + "\n")
    return str(root)


def test_tpu_chips_are_counted_by_pci_vendor_and_device_id(tmp_path):
    pci = fake_pci(tmp_path, {
        "0000:00:04.0": ("0x1ae0", "0x0063"),  # TPU v5e
        "0000:00:05.0": ("0x1ae0", "0x0063"),
        "0000:00:06.0": ("0x1ae0", "0x005e"),  # TPU v4
        "0000:00:07.0": ("0x1ae0", "0x0042"),  # another Google device (e.g. gVNIC)
        "0000:00:08.0": ("0x10de", "0x2330"),  # an NVIDIA H100
    })
    assert console.tpu_chip_count(pci) == 3
    assert console.tpu_chip_count(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("user", ["cpu", "tpu", "", "cuda,cpu"])
def test_a_users_jax_platforms_is_kept(user, monkeypatch):
    monkeypatch.setattr(console, "tpu_chip_count", lambda *a: 0)
    environ = {"JAX_PLATFORMS": user}
    assert console.choose_platforms(environ) == user and environ == {"JAX_PLATFORMS": user}


@needs_libtpu
def test_no_tpu_chips_leaves_tpu_out_and_tpu_chips_leave_jax_alone(monkeypatch):
    monkeypatch.setattr(console, "tpu_chip_count", lambda *a: 0)
    monkeypatch.setattr(console, "has_cuda_plugin", lambda: False)
    environ = {}
    assert console.choose_platforms(environ) == "cpu" and environ == {"JAX_PLATFORMS": "cpu"}
    monkeypatch.setattr(console, "has_cuda_plugin", lambda: True)
    environ = {}
    assert console.choose_platforms(environ) == "cuda,cpu" and environ == {"JAX_PLATFORMS": "cuda,cpu"}
    environ = {"JAX_FORCE_TPU_INIT": "1"}
    assert console.choose_platforms(environ) is None and "JAX_PLATFORMS" not in environ
    monkeypatch.setattr(console, "tpu_chip_count", lambda *a: 4)  # a Cloud TPU VM: JAX picks the TPU
    environ = {}
    assert console.choose_platforms(environ) is None and environ == {}


def test_no_libtpu_leaves_jax_alone(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    environ = {}
    assert console.choose_platforms(environ) is None and environ == {}


# What `jaxllm.cli.main` leaves for JAX: a command that stops at a config error, after the platform
# choice and before any backend starts; then the variable and JAX's own setting.
PROBE = """
import os, sys
from jaxllm import cli
code = cli.main(["tokenizer"])
import jax
print(code, os.environ.get("JAX_PLATFORMS", "<unset>"), jax.config.jax_platforms)
"""


@pytest.mark.parametrize("user", ["cpu", "tpu", None])
def test_main_keeps_the_users_jax_platforms(env, tmp_path, user):
    env = dict(env)
    if user is not None:
        env["JAX_PLATFORMS"] = user
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, describe(proc)
    code, seen, jax_setting = proc.stdout.split()
    assert code == "2" and "needs --config" in proc.stderr
    if user is not None:
        assert seen == jax_setting == user
    elif importlib.util.find_spec("libtpu") is not None and console.tpu_chip_count() == 0:
        assert seen == jax_setting == ("cuda,cpu" if console.has_cuda_plugin() else "cpu")
    else:
        assert seen == "<unset>"


def test_verbosity_flag_and_environment_variable(monkeypatch):
    monkeypatch.delenv("JAXLLM_VERBOSITY", raising=False)
    assert console.pop_verbosity(["generate", "--run", "r"]) == ("info", ["generate", "--run", "r"])
    assert console.pop_verbosity(["--verbosity", "debug", "generate"]) == ("debug", ["generate"])
    assert console.pop_verbosity(["generate", "--verbosity=WARNING", "--x"]) == ("warning", ["generate", "--x"])
    monkeypatch.setenv("JAXLLM_VERBOSITY", "debug")
    assert console.pop_verbosity(["eval"]) == ("debug", ["eval"])
    assert console.pop_verbosity(["eval", "--verbosity=info"]) == ("info", ["eval"])
    with pytest.raises(ValueError, match="expected one of warning, info, debug"):
        console.pop_verbosity(["eval", "--verbosity=loud"])
    with pytest.raises(ValueError, match="needs a level"):
        console.pop_verbosity(["eval", "--verbosity"])


# ---------------------------------------------------------------------------------------------
# Commands, as a newcomer runs them
# ---------------------------------------------------------------------------------------------


@needs_libtpu
@no_tpu_here
def test_generate_prints_no_tpu_errors(env, tmp_path):
    run = tmp_path / "run"
    make_run(run, stages=("sft",))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi"}) + "\n")
    proc = jaxllm(env, "generate", "--run", run, "--prompts", prompts, "--max_new_tokens", 4, cwd=tmp_path,
                  script=True)
    assert_quiet(proc)
    assert "stop rate:" in proc.stdout


@needs_libtpu
@no_tpu_here
def test_compile_for_a_tpu_topology_prints_no_host_bound_warnings(env, tmp_path):
    proc = jaxllm(env, "compile", "--config", SMALL, "--config.model.vocab_size=128", "--topology", "v5e:2x2",
                  cwd=tmp_path)
    assert_quiet(proc)
    assert "v5e:2x2" in proc.stdout and "yes" in proc.stdout


@pytest.mark.slow
@needs_libtpu
@no_tpu_here
def test_pipeline_prints_no_tpu_errors(env, tmp_path):
    """configs/pipeline.py:tiny, pretrain and SFT for 2 steps each, then the evaluation (~60 s)."""
    steps = [f"--config.{stage}.{key}" for stage in ("pretrain", "sft")
             for key in ("train.steps=2", "train.eval_every=0", "optimizer.warmup_steps=1")]
    proc = jaxllm(env, "pipeline", "--config", "configs/pipeline.py:tiny", f"--config.run_dir={tmp_path / 'run'}",
                  "--config.stages=('pretrain','sft')", *steps, "--config.eval.num_prompts=2",
                  "--config.eval.max_new_tokens=4", cwd=REPO, timeout=600)
    assert_quiet(proc)
    assert (tmp_path / "run" / "report.md").exists()


@needs_libtpu
@no_tpu_here
def test_debug_verbosity_brings_back_library_logs(env, tmp_path):
    """`--verbosity=debug`: XLA's C++ INFO lines (libtpu loading as a compiler) come back."""
    proc = jaxllm(env, "compile", "--verbosity=debug", "--config", SMALL, "--config.model.vocab_size=128",
                  "--topology", "v5e:1x1", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "GetPjrtApi was found for tpu" in proc.stderr, describe(proc)
