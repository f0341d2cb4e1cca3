"""Launchers (launch/tpu.py, launch/slurm.py), all offline.

The printed commands are parsed back with `shlex.split`; the scripts they carry (what a TPU worker
or a SLURM task would run) are executed here with bash against stub programs (`jaxllm`, `gcloud`,
`srun`, `scontrol`, `sbatch`, `pip`, ...) that record what they receive, so the tests check what
would really reach jaxllm, not the text the launcher wrote.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `launch` is a top-level directory of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from launch import tpu  # noqa: E402

# A command whose arguments a shell would mangle: spaces, nested quotes, $, backquote, backslash,
# ; | &. The last argument is not a jaxllm key; it only has to arrive intact.
USER_COMMAND = ["jaxllm", "pretrain", "--config", "configs/pretrain.py:tiny",
                "--config.sample.prompts=('a b', 'c')", "--config.train.steps=7",
                """--config.sample.prompts_note=it's "quoted" $HOME `x` \\ ;|&"""]


def launcher(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def commands(stdout: str) -> list[list[str]]:
    """The printed commands, comments and blank lines dropped, each parsed like a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def flag(argv: list[str], name: str) -> str | None:
    """Value of `--name=value` or `--name value` in argv."""
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def stub(path: pathlib.Path, body: str) -> pathlib.Path:
    """An executable Python script at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return path


# A jaxllm that records its argv and working directory, prints, waits, and exits as told.
JAXLLM_STUB = """
with open(os.path.join(os.environ["RECORD_DIR"], "jaxllm.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "JAXLLM_"))}}) + "\\n")
print("stub jaxllm ran", flush=True)
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def records(record_dir: pathlib.Path) -> list[dict]:
    path = record_dir / "jaxllm.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# TPU: accelerator types
# ---------------------------------------------------------------------------------------------

# (type, chips, hosts) as listed in Google's tables (cloud.google.com/tpu/docs/v5p, v6e, v4;
# google/xpk's system characteristics for v5litepod), not derived from the launcher's formula.
@pytest.mark.parametrize("accelerator_type, chips, hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v4-128", 64, 16),
    ("v5p-8", 4, 1), ("v5p-16", 8, 2), ("v5p-32", 16, 4), ("v5p-128", 64, 16), ("v5p-12288", 6144, 1536),
    ("v5litepod-1", 1, 1), ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v5litepod-256", 256, 64),
    ("v6e-1", 1, 1), ("v6e-8", 8, 1), ("v6e-16", 16, 4), ("v6e-64", 64, 16), ("v6e-256", 256, 64),
])
def test_slice_shape_matches_published_tables(accelerator_type, chips, hosts):
    shape = tpu.slice_shape(accelerator_type)
    assert (shape.chips, shape.hosts) == (chips, hosts)
    assert shape.chips_per_host in (1, 4, 8)


@pytest.mark.parametrize("bad, hint", [
    ("v5e-16", "v5litepod-16"), ("v9-8", "unknown TPU family"), ("v5p-12", "multiple of 8"),
    ("v4-4", "multiple of 8"), ("v5p-20000", "multiple of 8 from 8 to 12288"), ("v6e-12", "1, 4, 8"),
    ("v5litepod", "FAMILY-N"), ("a100-8", "FAMILY-N"),
])
def test_unknown_accelerator_type_is_one_clear_error(bad, hint):
    with pytest.raises(ValueError, match="--accelerator-type") as info:
        tpu.slice_shape(bad)
    assert hint in str(info.value)
    result = launcher("tpu", "create", "--name", "n", "--zone", "z", "--accelerator-type", bad, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""  # nothing printed, so nothing half-runs
    assert "error: --accelerator-type" in result.stderr and bad in result.stderr


# ---------------------------------------------------------------------------------------------
# TPU: dry runs
# ---------------------------------------------------------------------------------------------

def tpu_all(*extra: str, command=USER_COMMAND) -> subprocess.CompletedProcess:
    return launcher("tpu", "all", "--name", "llama-pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-16",
                    "--project", "my-proj", "--repo-url", "https://example.com/jaxllm.git",
                    "--run-dir", "gs://bucket/run 1", "--dry-run", *extra, "--", *command)


def test_tpu_dry_run_all_prints_the_pipeline():
    result = tpu_all("--spot")
    assert result.returncode == 0, result.stderr
    assert "2 hosts with 4 chips each" in result.stdout  # v5p-16: 8 chips
    cmds = commands(result.stdout)
    for cmd in cmds:
        assert cmd[:3] == ["gcloud", "compute", "tpus"]
        assert flag(cmd, "--zone") == "us-east5-a" and flag(cmd, "--project") == "my-proj"
    assert [tuple(c[3:5]) for c in cmds] == [("tpu-vm", "create"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                                             ("tpu-vm", "ssh"), ("tpu-vm", "delete")]
    create, setup, run, logs, delete = cmds
    assert create[5] == "llama-pod" and flag(create, "--accelerator-type") == "v5p-16"
    assert flag(create, "--version") == "v2-alpha-tpuv5" and "--spot" in create
    assert [flag(c, "--worker") for c in (setup, run, logs)] == ["all", "all", "0"]
    assert "--quiet" in delete and delete[5] == "llama-pod"
    for script in (flag(setup, "--command"), flag(run, "--command"), flag(logs, "--command")):
        subprocess.run(["bash", "-n", "-c", script], check=True)  # each remote script parses


def test_tpu_queued_dry_run_polls_and_deletes_the_request():
    result = launcher("tpu", "all", "--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                      "--queued", "--repo-url", "u", "--dry-run", "--", "jaxllm", "pretrain")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    create, describe = cmds[0], cmds[1]
    assert create[3:6] == ["queued-resources", "create", "pod-qr"]
    assert flag(create, "--node-id") == "pod" and flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert describe[3:6] == ["queued-resources", "describe", "pod-qr"] and "ACTIVE" in result.stdout
    assert cmds[-1][3:6] == ["queued-resources", "delete", "pod-qr"] and "--force" in cmds[-1]
    assert "4 hosts" in result.stdout
    assert "is not on gs://: on 4 hosts" in result.stderr  # 4 hosts writing a local run_dir get a warning


def test_tpu_run_dir_warning_spot_single_host_and_gcs():
    """A Spot single-host slice loses its disk on preemption: a local run_dir is warned about; a
    gs:// one (which jaxllm writes through etils.epath, tests/test_gcs.py) is not."""
    base = ["tpu", "run", "--name", "v", "--zone", "z", "--accelerator-type", "v5litepod-8", "--dry-run"]
    local = launcher(*base, "--spot", "--", "jaxllm", "pretrain")
    assert local.returncode == 0, local.stderr
    assert "is not on gs://: a Spot VM's disk is deleted" in local.stderr
    on_demand = launcher(*base, "--", "jaxllm", "pretrain")
    assert "warning" not in on_demand.stderr
    gcs = launcher(*base, "--spot", "--run-dir", "gs://bkt/run", "--", "jaxllm", "pretrain")
    assert gcs.returncode == 0, gcs.stderr
    assert "warning" not in gcs.stderr and "--config.run_dir=gs://bkt/run" in gcs.stdout


def test_tpu_wheel_setup_uploads_wheel_and_configs(tmp_path):
    wheel = tmp_path / "jaxllm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = launcher("tpu", "setup", "--name", "pod", "--zone", "z", "--wheel", str(wheel), "--dry-run")
    assert result.returncode == 0, result.stderr
    mkdir, scp, install = commands(result.stdout)
    assert mkdir[3:5] == ["tpu-vm", "ssh"] and flag(mkdir, "--worker") == "all"
    assert scp[3:5] == ["tpu-vm", "scp"] and "--recurse" in scp and flag(scp, "--worker") == "all"
    assert str(wheel) in scp and str(REPO / "configs") in scp and "pod:jaxllm/" in scp
    assert flag(install, "--worker") == "all"
    missing = launcher("tpu", "setup", "--name", "pod", "--zone", "z", "--wheel", str(tmp_path / "x.whl"), "--dry-run")
    assert missing.returncode == 2 and "--wheel" in missing.stderr


def test_tpu_missing_command_and_flag_errors():
    base = ["--name", "pod", "--zone", "z", "--accelerator-type", "v5p-16", "--repo-url", "u", "--dry-run"]
    for args in (["run", *base], ["all", *base], ["all", *base, "--"]):
        result = launcher("tpu", *args)
        assert result.returncode == 2 and "missing the command to run" in result.stderr, args
        assert result.stdout == ""
    result = launcher("tpu", "delete", *base, "--", "jaxllm")
    assert result.returncode == 2 and "takes no command" in result.stderr
    result = launcher("tpu", "create", "--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v5p-8")
    assert result.returncode == 2 and "--name" in result.stderr
    result = launcher("tpu", "setup", "--name", "pod", "--zone", "z", "--dry-run")
    assert result.returncode == 2 and "--repo-url" in result.stderr
    result = tpu_all(command=[*USER_COMMAND, "--config.run_dir=gs://x"])
    assert result.returncode == 2 and "--run-dir" in result.stderr


# ---------------------------------------------------------------------------------------------
# TPU: the remote scripts, executed here as a worker's login shell would
# ---------------------------------------------------------------------------------------------

def remote(script: str, home: pathlib.Path, **env) -> subprocess.CompletedProcess:
    full_env = {"HOME": str(home), "PATH": os.environ["PATH"], "RECORD_DIR": str(home), **env}
    return subprocess.run(["bash", "-c", script], env=full_env, capture_output=True, text=True, timeout=60)


def test_tpu_run_and_logs_scripts_deliver_the_exact_command(tmp_path):
    result = tpu_all()
    _, _, run, logs, _ = commands(result.stdout)
    run_script, logs_script = flag(run, "--command"), flag(logs, "--command")
    home = tmp_path / "worker0"
    (home / "jaxllm").mkdir(parents=True)
    stub(home / "jaxllm-venv" / "bin" / "jaxllm", JAXLLM_STUB)

    assert remote(logs_script, home).returncode == 1  # nothing started yet: a clear failure, no hang

    started = remote(run_script, home, STUB_SLEEP="1.5", STUB_EXIT="3")
    assert started.returncode == 0, started.stderr
    again = remote(run_script, home)  # the first run still holds the chips
    assert again.returncode == 1 and "still going" in again.stderr

    followed = remote(logs_script, home)
    assert followed.returncode == 3  # the run's own exit status comes back through `logs`
    assert "stub jaxllm ran" in followed.stdout
    (received,) = records(home)
    assert received["argv"] == USER_COMMAND[1:] + ["--config.run_dir=gs://bucket/run 1"]
    assert received["cwd"] == str(home / "jaxllm")

    # After the run ended a new one may start; the old log is kept beside the new one.
    assert remote(run_script, home).returncode == 0
    assert remote(logs_script, home).returncode == 0
    assert len(records(home)) == 2 and (home / "jaxllm-run.log.prev").exists()


PIP_STUB = """
with open(os.path.join(os.environ["RECORD_DIR"], "pip.log"), "a") as f:
    f.write(json.dumps([os.getcwd()] + sys.argv[1:]) + "\\n")
"""
PYTHON_STUB = """
print("0.10.2" if "importlib.metadata" in " ".join(sys.argv) else "ready")
"""
UV_STUB = f"""
venv = sys.argv[-1]
assert sys.argv[1] == "venv", sys.argv
with open(os.path.join(os.environ["RECORD_DIR"], "uv.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
for name, body in (("pip", {PIP_STUB!r}), ("python", {PYTHON_STUB!r})):
    path = os.path.join(venv, "bin", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!" + sys.executable + "\\nimport json, os, sys\\n" + body)
    os.chmod(path, 0o755)
"""
GIT_STUB = """
with open(os.path.join(os.environ["RECORD_DIR"], "git.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "clone":
    os.makedirs(os.path.join(sys.argv[3], ".git"))
"""


def test_tpu_setup_script_installs_jaxllm_and_matching_jax_tpu(tmp_path):
    result = tpu_all()
    _, setup, *_ = commands(result.stdout)
    script = flag(setup, "--command")
    home, bin_dir = tmp_path / "worker", tmp_path / "bin"
    stub(home / ".local" / "bin" / "uv", UV_STUB)
    stub(bin_dir / "git", GIT_STUB)
    stub(bin_dir / "curl", "sys.exit('curl must not run: uv is installed')")
    path = f"{bin_dir}:{os.environ['PATH']}"
    for _ in range(2):  # the second run updates the existing install
        done = remote(script, home, PATH=path)
        assert done.returncode == 0, done.stderr
        assert "ready" in done.stdout
    uv = [json.loads(line) for line in (home / "uv.log").read_text().splitlines()]
    assert len(uv) == 1 and "--python" in uv[0] and uv[0][uv[0].index("--python") + 1] == "3.11"
    git = [json.loads(line) for line in (home / "git.log").read_text().splitlines()]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git[0] == ["clone", "https://example.com/jaxllm.git", str(home / "jaxllm")]
    # Both runs check out the launcher's own commit, never the branch tip (no pull).
    checkout = ["-C", str(home / "jaxllm"), "checkout", "--quiet", "--detach", head]
    assert git[1:] == [["-C", str(home / "jaxllm"), "fetch", "--quiet", "origin"], checkout] * 2
    pip = [json.loads(line) for line in (home / "pip.log").read_text().splitlines()]
    assert [str(home / "jaxllm"), "install", "--quiet", "-e", ".[tpu]"] in pip
    # jax[tpu] is pinned to the jax version that jaxllm's install left (the python stub reports it).
    assert pip[-1][1:] == ["install", "--quiet", "jax[tpu]==0.10.2"]


def test_tpu_setup_checks_out_the_given_ref():
    script = flag(commands(tpu_all("--repo-ref", "v1.2").stdout)[1], "--command")
    assert "checkout --quiet --detach v1.2" in script and "pull" not in script


def test_tpu_setup_script_failure_stops_the_script(tmp_path):
    result = tpu_all()
    script = flag(commands(result.stdout)[1], "--command")
    home, bin_dir = tmp_path / "worker", tmp_path / "bin"
    stub(home / ".local" / "bin" / "uv", UV_STUB)
    stub(bin_dir / "git", "sys.exit(128)")  # e.g. a wrong --repo-url
    done = remote(script, home, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert done.returncode == 128 and not (home / "pip.log").read_text().count("jax[tpu]")


# ---------------------------------------------------------------------------------------------
# TPU: real runs against a fake gcloud
# ---------------------------------------------------------------------------------------------

GCLOUD_STUB = """
record = os.path.join(os.environ["RECORD_DIR"], "gcloud.jsonl")
with open(record, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
calls = sum(1 for _ in open(record))
args = sys.argv[1:]
if "describe" in args:  # the first describe (call 2) waits, the next one is final
    print("PROVISIONING" if calls < 3 else os.environ.get("FINAL_STATE", "ACTIVE"))
fail = os.environ.get("FAIL_ON", "")
if fail and fail in " ".join(args):
    sys.exit(int(os.environ.get("FAIL_STATUS", "1")))
"""


def fake_gcloud_run(tmp_path, *args, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "gcloud", GCLOUD_STUB)
    result = launcher("tpu", "all", "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-16",
                      "--repo-url", "u", "--poll-seconds", "0.01", *args, "--", "jaxllm", "pretrain",
                      env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path), **env})
    path = tmp_path / "gcloud.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return result, calls


def steps(calls: list[list[str]]) -> list[str]:
    return [f"{c[3]}:{flag(c, '--worker')}" if c[3] == "ssh" else c[3] for c in calls]


def test_tpu_all_runs_the_pipeline_and_deletes(tmp_path):
    result, calls = fake_gcloud_run(tmp_path, "--queued")
    assert result.returncode == 0, result.stderr
    assert steps(calls) == ["create", "describe", "describe", "ssh:all", "ssh:all", "ssh:0", "delete"]


def test_tpu_all_gives_up_on_a_failed_queued_request(tmp_path):
    result, calls = fake_gcloud_run(tmp_path, "--queued", FINAL_STATE="FAILED")
    assert result.returncode == 1 and "pod-qr is FAILED" in result.stderr
    assert steps(calls) == ["create", "describe", "describe", "delete"]


@pytest.mark.parametrize("fail_on, status", [("set -e", 1), ("trap", 7), ("tpu-vm create", 1)])
def test_tpu_all_deletes_after_a_failure(tmp_path, fail_on, status):
    result, calls = fake_gcloud_run(tmp_path, FAIL_ON=fail_on, FAIL_STATUS=str(status))
    assert result.returncode == status
    assert steps(calls)[-1] == "delete" and "ssh:0" not in steps(calls)


def test_tpu_all_keep_and_ssh_reconnect(tmp_path):
    # The first log stream drops (ssh status 255): it reconnects instead of deleting a live job.
    result, calls = fake_gcloud_run(tmp_path, "--keep", FAIL_ON="tail", FAIL_STATUS="255")
    assert result.returncode == 255 and steps(calls).count("ssh:0") == 6  # 1 + --ssh-retries 5
    assert "delete" not in steps(calls) and "--keep" in result.stdout


# ---------------------------------------------------------------------------------------------
# TPU: gcloud itself accepts every flag (argument parsing only: no account, so nothing is sent)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("gcloud") is None, reason="Google Cloud CLI not installed")
def test_gcloud_parses_the_printed_commands(tmp_path):
    wheel = tmp_path / "jaxllm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    printed = commands(tpu_all("--spot").stdout) + commands(launcher(
        "tpu", "all", "--name", "pod", "--zone", "z", "--project", "p", "--accelerator-type", "v6e-16", "--queued",
        "--spot",
        "--wheel", str(wheel), "--dry-run", "--", "jaxllm", "pretrain").stdout)
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false", "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"}

    def parse(cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for cmd, done in zip(printed, pool.map(parse, printed)):
            # Status 2 is gcloud's usage error; past parsing it stops at the missing account.
            assert done.returncode != 2 and "unrecognized arguments" not in done.stderr, (cmd, done.stderr)
            assert "active account" in done.stderr, (cmd, done.stderr)


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

SLURM_ARGS = ("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
              "--workdir", str(REPO))


def slurm(*args: str, command=USER_COMMAND) -> subprocess.CompletedProcess:
    return launcher("slurm", *SLURM_ARGS, "--dry-run", *args, "--", *command)


def heredoc(stdout: str) -> tuple[str, str]:
    """(path, script) of the `cat > PATH <<'END'` block in a dry run."""
    lines = stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("cat > "))
    head = shlex.split(lines[start].split("<<")[0])
    end = lines.index(f"{lines[start].split('<<')[1].strip()[1:-1]}\n", start)
    return head[2], "".join(lines[start + 1:end])


def directives(script: str) -> list[str]:
    return [shlex.split(line)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("mode, ntasks, gpus", [("per-gpu", "8", "--gpus-per-task=1"),
                                                 ("per-node", "1", "--gpus-per-node=8")])
def test_slurm_dry_run_script(mode, ntasks, gpus):
    result = slurm("--mode", mode)
    assert result.returncode == 0, result.stderr
    path, script = heredoc(result.stdout)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    d = directives(script)
    assert "--nodes=2" in d and f"--ntasks-per-node={ntasks}" in d and gpus in d
    assert "--time=04:00:00" in d and "--partition=gpu" in d and f"--chdir={REPO}" in d
    (srun,) = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
    assert srun[-3:-1] == ["bash", "-c"]
    assert shlex.split(result.stdout.splitlines()[-1]) == ["sbatch", path]


def run_batch_script(tmp_path, script: str, ntasks: int) -> list[dict]:
    """Runs an sbatch script under a fake SLURM: scontrol lists two nodes, srun starts `ntasks` tasks."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "jaxllm", JAXLLM_STUB)
    stub(bin_dir / "scontrol", 'assert sys.argv[1:3] == ["show", "hostnames"]\nprint("gpu-a07\\ngpu-a08")')
    stub(bin_dir / "srun", """
argv = sys.argv[1:]
while argv[0].startswith("--"):
    argv.pop(0)
import subprocess
n = int(os.environ["SLURM_NTASKS"])
for rank in range(n):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % (n // 2)))
    subprocess.run(argv, env=env, check=True)
""")
    batch = tmp_path / "job.sbatch"
    batch.write_text(script)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path), "HOME": str(tmp_path),
           "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_JOB_ID": "1234", "SLURM_NTASKS": str(ntasks),
           "SLURM_JOB_NUM_NODES": "2"}
    done = subprocess.run(["bash", str(batch)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return records(tmp_path)


@pytest.mark.parametrize("mode, local_ids", [("per-gpu", "0"), ("per-node", "0,1,2,3,4,5,6,7")])
def test_slurm_tasks_receive_their_own_process_id(tmp_path, mode, local_ids):
    from jaxllm import config as config_lib
    from jaxllm import sharding

    _, script = heredoc(slurm("--mode", mode).stdout)
    received = run_batch_script(tmp_path, script, ntasks=4)
    assert [r["env"]["SLURM_PROCID"] for r in received] == ["0", "1", "2", "3"]
    port = int(received[0]["env"]["JAXLLM_COORDINATOR"].split(":")[1])
    assert 61440 <= port <= 65535  # JAX's own job-id-derived range
    for rank, r in enumerate(received):
        assert r["argv"][:len(USER_COMMAND) - 1] == USER_COMMAND[1:]  # survives both quoting levels
        assert r["cwd"] == str(REPO)
        # What the task received is what jaxllm's own config parser turns into the distributed section.
        spec, overrides, rest = config_lib.parse_overrides(r["argv"][1:])
        assert rest == []
        overrides = [(k, v) for k, v in overrides if k != "sample.prompts_note"]
        config = config_lib.build(spec, overrides)
        assert config.distributed.process_id == rank and config.distributed.num_processes == 4
        assert config.distributed.coordinator_address == f"gpu-a07:{port}"
        assert config.distributed.local_device_ids == local_ids
        # ... and what jaxllm's initialize_runtime hands to jax.distributed.initialize.
        assert sharding.distributed_init_kwargs(config.distributed) == {
            "initialization_timeout": 300, "coordinator_address": f"gpu-a07:{port}", "num_processes": 4,
            "process_id": rank, "local_device_ids": [int(i) for i in local_ids.split(",")]}
        assert config.sample.prompts == ("a b", "c") and config.train.steps == 7


def test_slurm_explicit_port_and_container(tmp_path):
    result = slurm("--port", "23456", "--container", "nvcr.io/nvidia/jax:25.04-py3", "--cpus-per-task", "12")
    _, script = heredoc(result.stdout)
    (srun,) = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
    assert "--container-image=nvcr.io/nvidia/jax:25.04-py3" in srun and f"--container-workdir={REPO}" in srun
    assert "--cpus-per-task=12" in srun and "--cpus-per-task=12" in directives(script)
    received = run_batch_script(tmp_path, script, ntasks=2)
    assert {r["env"]["JAXLLM_COORDINATOR"] for r in received} == {"gpu-a07:23456"}


def test_slurm_dry_run_output_runs_and_real_mode_submits(tmp_path):
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "sbatch", """
with open(os.path.join(os.environ["RECORD_DIR"], "sbatch.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "script": open(sys.argv[1]).read()}, f)
print("Submitted batch job 42")
""")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path)}
    dry = slurm("--script-out", str(tmp_path / "dry.sbatch"))
    _, script = heredoc(dry.stdout)
    done = subprocess.run(["bash"], input=dry.stdout, env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0 and "Submitted batch job 42" in done.stdout
    assert json.loads((tmp_path / "sbatch.json").read_text())["script"] == script

    real = launcher("slurm", *SLURM_ARGS, "--script-out", str(tmp_path / "real.sbatch"), "--", *USER_COMMAND, env=env)
    assert real.returncode == 0, real.stderr
    sent = json.loads((tmp_path / "sbatch.json").read_text())
    assert sent == {"argv": [str(tmp_path / "real.sbatch")], "script": script}  # same script as the dry run


@pytest.mark.parametrize("args, command, message", [
    ([], [], "missing the command to run"),
    (["--time", "4h"], USER_COMMAND, "--time"),
    (["--port", "80"], USER_COMMAND, "--port"),
    (["--sbatch-option=qos=high"], USER_COMMAND, "--sbatch-option"),
    ([], [*USER_COMMAND, "--config.distributed.process_id=3"], "--config.distributed.process_id"),
])
def test_slurm_rejects_bad_arguments(args, command, message):
    result = slurm(*args, command=command)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    zero = launcher("slurm", "--nodes", "0", "--gpus-per-node", "8", "--dry-run", "--", "jaxllm")
    assert zero.returncode == 2 and "--nodes" in zero.stderr
