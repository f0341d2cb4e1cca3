"""Cloud TPU pod slices: create, install jaxllm on every worker, run, follow logs, delete.

    python -m launch.tpu {create,setup,run,logs,delete,all} --name NAME --zone ZONE \\
        --accelerator-type v5p-32 [--version RUNTIME] [--project P] [--queued] [--spot] \\
        [--repo-url URL | --wheel PATH] [--extras tpu] [--run-dir gs://BUCKET/RUN] [--keep] \\
        [--dry-run] -- jaxllm pretrain --config configs/pretrain.py:llama2_7b

Every worker (host VM) of the slice runs the same command at the same time (`--worker=all`);
JAX finds the other workers through the TPU metadata, so jaxllm's `initialize_runtime` calls
`jax.distributed.initialize()` without arguments and no coordinator flags are needed. `--dry-run`
prints the gcloud commands as a runnable shell script and runs nothing. The walk-through is
launch/README.md.

Remote layout, in the home directory of every worker:
  jaxllm/            the repository clone (`--repo-url`) or the wheel and `configs/` (`--wheel`);
                     the working directory of the run, so `--config configs/...` resolves
  jaxllm-venv/       Python virtualenv with jaxllm and `jax[tpu]`
  jaxllm-run.log     stdout and stderr of the run on that worker (`.prev`: the run before)
  jaxllm-run.pid     process id of the run; jaxllm-run.exit: its exit status once it ended
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

from launch import MISSING_COMMAND, Runner, split_command

ACTIONS = ("create", "setup", "run", "logs", "delete", "all")
REMOTE_DIR = "jaxllm"
VENV = "jaxllm-venv"
LOG, PID, EXIT = "jaxllm-run.log", "jaxllm-run.pid", "jaxllm-run.exit"
UV_INSTALLER = "https://astral.sh/uv/install.sh"
SSH_FAILED = 255  # what ssh (and so `gcloud ... ssh`) exits with when the connection fails
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one TPU generation names its slices (accelerator type `FAMILY-N`).

    Attributes:
      suffix_counts: "TensorCores" (v4, v5p: 2 per chip) or "chips" (v5e, v6e: 1 TensorCore each).
      cores_per_chip: TensorCores per chip.
      runtime: default TPU software version (`--version`) for JAX on this generation.
      max_suffix: the largest N of a single slice.
      sizes: the only N that exist, when the family has a fixed list.
    """

    suffix_counts: str
    cores_per_chip: int
    runtime: str
    max_suffix: int
    sizes: tuple[int, ...] = ()


# Sources (checked 2025): cloud.google.com/tpu/docs/v5p ("v5p-32 specifies a TPU v5p slice with
# 32 TensorCores (16 chips)"; topology table: 2x2x1 = 8 cores, 4 chips, 1 host; 2x2x2 = 16 cores,
# 8 chips, 2 hosts; 16x16x24 = 12288 cores, the largest slice), cloud.google.com/tpu/docs/v4
# (same naming, 4 chips per host, 4096-chip pod), cloud.google.com/tpu/docs/v6e (VMs per slice:
# v6e-1/4/8 one VM; v6e-16 4 VMs ... v6e-256 64 VMs, machine type ct6e-standard-4t = 4 chips per VM
# in multi-host slices), cloud.google.com/tpu/docs/v5e (the same 1x1 ... 16x16 shapes; VMs hold 1,
# 4 or 8 chips) and google/xpk's system characteristics table (v5litepod-16: 4 VMs of 4 chips,
# ct5lp-hightpu-4t; v4-32: 4 VMs of 4 chips). Runtimes: cloud.google.com/tpu/docs/runtimes.
FAMILIES = {
    "v4": Family("TensorCores", 2, "tpu-ubuntu2204-base", 8192),
    "v5p": Family("TensorCores", 2, "v2-alpha-tpuv5", 12288),
    "v5litepod": Family("chips", 1, "v2-alpha-tpuv5-lite", 256, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Family("chips", 1, "v2-alpha-tpuv6e", 256, (1, 4, 8, 16, 32, 64, 128, 256)),
}
CHIPS_PER_HOST = 4  # every multi-host slice above is made of 4-chip VMs
SINGLE_HOST_MAX_CHIPS = 8  # v5e/v6e slices of up to 8 chips are one VM (1, 4 or 8 chips)


@dataclasses.dataclass(frozen=True)
class SliceShape:
    """Chips and hosts of one accelerator type, e.g. `v5p-32`: 16 chips on 4 hosts."""

    accelerator_type: str
    family: str
    chips: int
    hosts: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def runtime(self) -> str:
        return FAMILIES[self.family].runtime

    def describe(self) -> str:
        f = FAMILIES[self.family]
        cores = f"{self.chips * f.cores_per_chip} TensorCores, " if f.cores_per_chip > 1 else ""
        return (f"{self.accelerator_type}: {self.chips} chips ({cores}{f.cores_per_chip} per chip), "
                f"{self.hosts} host{'s' if self.hosts > 1 else ''} with {self.chips_per_host} chips each")


def slice_shape(accelerator_type: str) -> SliceShape:
    """Number of chips and hosts (TPU VMs, i.e. `--worker` indices) of an accelerator type.

    v4 and v5p suffixes count TensorCores (2 per chip) and every host has 4 chips, so
    `v5p-32` is 16 chips on 4 hosts. v5e (`v5litepod`) and v6e suffixes count chips; slices of up to
    8 chips are a single VM, larger ones are 4-chip VMs, so `v6e-16` is 4 hosts.

    Raises:
      ValueError: naming `--accelerator-type` for an unknown family or a size that does not exist.
    """
    known = ", ".join(f"{name}-N" for name in FAMILIES)
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type or "")
    if not match:
        raise ValueError(f"--accelerator-type {accelerator_type!r} is not of the form FAMILY-N ({known})")
    name, n = match.group(1), int(match.group(2))
    if name == "v5e":
        raise ValueError(f"--accelerator-type {accelerator_type!r}: the Cloud TPU API names v5e slices "
                         f"v5litepod-N; use v5litepod-{n}")
    if name not in FAMILIES:
        raise ValueError(f"--accelerator-type {accelerator_type!r}: unknown TPU family {name!r}; "
                         f"this launcher knows {known}")
    family = FAMILIES[name]
    if family.sizes:
        if n not in family.sizes:
            raise ValueError(f"--accelerator-type {accelerator_type!r}: {name} slices have "
                             f"{', '.join(map(str, family.sizes))} chips")
        chips = n
        hosts = 1 if n <= SINGLE_HOST_MAX_CHIPS else n // CHIPS_PER_HOST
    else:
        per_host = CHIPS_PER_HOST * family.cores_per_chip
        if n % per_host or not per_host <= n <= family.max_suffix:
            raise ValueError(f"--accelerator-type {accelerator_type!r}: {name}-N counts TensorCores "
                             f"({family.cores_per_chip} per chip, {CHIPS_PER_HOST} chips per host), so N "
                             f"must be a multiple of {per_host} from {per_host} to {family.max_suffix}")
        chips = n // family.cores_per_chip
        hosts = chips // CHIPS_PER_HOST
    return SliceShape(accelerator_type, name, chips, hosts)


# ---------------------------------------------------------------------------------------------
# gcloud commands (pure functions of the parsed flags, so tests can check them without gcloud)
# ---------------------------------------------------------------------------------------------

def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def queued_resource_name(args: argparse.Namespace) -> str:
    return f"{args.name}-qr"


def create_command(args: argparse.Namespace) -> list[str]:
    """`tpu-vm create`, or with `--queued` a queued-resource request for the same node."""
    shape = slice_shape(args.accelerator_type)
    version = args.version or shape.runtime
    if args.queued:
        cmd = _gcloud(args, "queued-resources", "create", queued_resource_name(args), f"--node-id={args.name}",
                      f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}")
    else:
        cmd = _gcloud(args, "tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator_type}",
                      f"--version={version}")
    if args.spot:
        cmd.append("--spot")
    return cmd


def describe_command(args: argparse.Namespace) -> list[str]:
    """Prints only the queued resource's state (ACCEPTED, PROVISIONING, ..., ACTIVE, FAILED)."""
    return _gcloud(args, "queued-resources", "describe", queued_resource_name(args),
                   "--format=value(state.state)")


def delete_command(args: argparse.Namespace) -> list[str]:
    """Deletes the VM, or the queued resource together with its node (`--force`), without asking."""
    if args.queued:
        return _gcloud(args, "queued-resources", "delete", queued_resource_name(args), "--force", "--quiet")
    return _gcloud(args, "tpu-vm", "delete", args.name, "--quiet")


def ssh_command(args: argparse.Namespace, script: str, worker: str = "all") -> list[str]:
    """Runs `script` in the login shell of `worker` ("all": every worker at once)."""
    return _gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}") + ["--command", script]


def _home(name: str) -> str:
    return f'"$HOME/{name}"'


def setup_script(args: argparse.Namespace) -> str:
    """The install script each worker runs: Python, a virtualenv, jaxllm and the matching `jax[tpu]`.

    TPU VM images ship Python 3.10 and jaxllm needs 3.11, so `uv` (from its official installer)
    creates the virtualenv with a standalone Python. jaxllm pins its jax version, so `jax[tpu]`
    (JAX's documented TPU install, `pip install -U "jax[tpu]"`) is installed at exactly that version,
    which brings the libtpu built for it. Rerunning the script updates an existing install.
    """
    pip = f"{_home(VENV)}/bin/pip"
    python = f"{_home(VENV)}/bin/python"
    extras = f"[{args.extras}]" if args.extras else ""
    lines = [
        "set -e",
        'cd "$HOME"',
        f'if [ ! -x "$HOME/.local/bin/uv" ]; then curl -LsSf {UV_INSTALLER} -o /tmp/uv-install.sh'
        f" && sh /tmp/uv-install.sh; fi",
        f'if [ ! -x "$HOME/{VENV}/bin/python" ]; then "$HOME/.local/bin/uv" venv --seed '
        f"--python {shlex.quote(args.python)} {_home(VENV)}; fi",
        f"{pip} install --quiet --upgrade pip",
    ]
    if args.repo_url:
        # A pinned commit, not the branch tip: a pod recreated after preemption and set up again
        # resumes its run with the code the run started with.
        ref = shlex.quote(args.repo_ref)
        lines += [
            f'if [ ! -d "$HOME/{REMOTE_DIR}/.git" ]; then git clone {shlex.quote(args.repo_url)} {_home(REMOTE_DIR)}; fi',
            f"git -C {_home(REMOTE_DIR)} fetch --quiet origin",
            f"git -C {_home(REMOTE_DIR)} checkout --quiet --detach {ref}",
            f"cd {_home(REMOTE_DIR)}",
            f"{pip} install --quiet -e {shlex.quote('.' + extras)}",
        ]
    else:
        wheel = pathlib.Path(args.wheel).name
        lines += [
            f"cd {_home(REMOTE_DIR)}",
            f"{pip} uninstall --quiet -y jaxllm",  # same version, new build: reinstall
            f"{pip} install --quiet {shlex.quote('./' + wheel + extras)}",
        ]
    lines += [
        f"JAX_VERSION=$({python} -c 'import importlib.metadata as m; print(m.version(\"jax\"))')",
        f'{pip} install --quiet "jax[tpu]==$JAX_VERSION"',
        f"{python} -c 'import jax, jaxllm; print(\"jaxllm ready on\", __import__(\"socket\").gethostname(), "
        f"\"with jax\", jax.__version__)'",
    ]
    return "; ".join(lines)


def _local_head() -> str:
    """The HEAD commit of the checkout this launcher runs from (the `--repo-ref` default).

    Raises:
      ValueError: not a git checkout: give `--repo-ref`.
    """
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        raise ValueError(f"--repo-ref: {REPO_ROOT} is not a git checkout; give the commit to run") from None
    return out.stdout.strip()


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Commands that install jaxllm on every worker (`--wheel`: upload the wheel and configs first)."""
    if args.repo_url:
        return [ssh_command(args, setup_script(args))]
    configs = str(args.configs_dir).rstrip("/")
    upload = _gcloud(args, "tpu-vm", "scp", "--recurse", str(args.wheel), configs,
                     f"{args.name}:{REMOTE_DIR}/", "--worker=all")
    return [ssh_command(args, f"mkdir -p {_home(REMOTE_DIR)}"), upload, ssh_command(args, setup_script(args))]


def run_script(command: Sequence[str]) -> str:
    """Starts `command` in the background on one worker; it outlives the ssh session.

    The command runs in `~/jaxllm` with the virtualenv first on PATH, its output goes to
    `~/jaxllm-run.log`, its pid to `~/jaxllm-run.pid`, and its exit status to `~/jaxllm-run.exit`
    when it ends. A background subshell that ignores SIGHUP (what `nohup` does; the command inherits
    it) keeps the command quoted once. A second start while a run is alive is refused: one process
    at a time can hold the TPU chips.
    """
    home = _home
    return "; ".join([
        f'if [ -f {home(PID)} ] && [ ! -f {home(EXIT)} ] && kill -0 "$(cat {home(PID)})" 2>/dev/null; then '
        f'echo "a jaxllm run is still going on $(hostname) (pid $(cat {home(PID)})): wait for it or delete '
        f'the TPU" >&2; exit 1; fi',
        f"rm -f {home(EXIT)}",
        f"if [ -f {home(LOG)} ]; then mv -f {home(LOG)} {home(LOG + '.prev')}; fi",
        f"cd {home(REMOTE_DIR)} || exit 1",
        f"( trap '' HUP; export PATH=\"$HOME/{VENV}/bin:$PATH\"; {shlex.join(command)}; echo $? > {home(EXIT)} ) "
        f"> {home(LOG)} 2>&1 < /dev/null & echo $! > {home(PID)}",
    ])


def logs_script() -> str:
    """Follows `~/jaxllm-run.log` until the run ends, then exits with the run's exit status."""
    return "; ".join([
        f'if [ ! -f {_home(PID)} ]; then echo "no jaxllm run has been started on $(hostname)" >&2; exit 1; fi',
        f'tail -n +1 -F --pid="$(cat {_home(PID)})" {_home(LOG)} 2>/dev/null',
        f'if [ ! -f {_home(EXIT)} ]; then echo "the run ended without an exit status (killed?)" >&2; exit 1; fi',
        f'exit "$(cat {_home(EXIT)})"',
    ])


def job_command(args: argparse.Namespace, command: Sequence[str]) -> list[str]:
    """The user's command, with `--config.run_dir` appended when `--run-dir` is given.

    Raises:
      ValueError: naming `--run-dir` when the command sets `--config.run_dir` too.
    """
    command = list(command)
    if args.run_dir:
        if any(a == "--config.run_dir" or a.startswith("--config.run_dir=") for a in command):
            raise ValueError("--run-dir: the command already sets --config.run_dir; give it once")
        command.append(f"--config.run_dir={args.run_dir}")
    return command


def _run_dir_of(command: Sequence[str]) -> str | None:
    for i, a in enumerate(command):
        if a.startswith("--config.run_dir="):
            return a.split("=", 1)[1]
        if a == "--config.run_dir" and i + 1 < len(command):
            return command[i + 1]
    return None


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------

def wait_until_active(runner: Runner, args: argparse.Namespace) -> None:
    """Polls the queued resource until ACTIVE (dry run: prints the polling command once).

    Raises:
      RuntimeError: when the request ends FAILED or SUSPENDED.
    """
    describe = describe_command(args)
    if runner.dry_run:
        runner.comment(f"poll every {args.poll_seconds:g} s until the state is ACTIVE:")
        runner.run(describe)
        return
    while True:
        state = runner.output(describe).strip()
        print(f"queued resource {queued_resource_name(args)}: {state or 'unknown'}", file=sys.stderr, flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            full = _gcloud(args, "queued-resources", "describe", queued_resource_name(args))
            raise RuntimeError(f"queued resource {queued_resource_name(args)} is {state}; see `{shlex.join(full)}`")
        time.sleep(args.poll_seconds)


def follow_logs(runner: Runner, args: argparse.Namespace) -> int:
    """Streams worker 0's log until its run ends; returns the run's exit status.

    A dropped ssh connection (status 255) is retried, so a network blip never reads as a finished
    run (which `all` would answer by deleting the slice under a live job).
    """
    cmd = ssh_command(args, logs_script(), worker="0")
    for attempt in range(args.ssh_retries + 1):
        status = runner.run(cmd, check=False)
        if status != SSH_FAILED or attempt == args.ssh_retries:
            return status
        print(f"ssh to worker 0 failed; reconnecting in {args.poll_seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(args.poll_seconds)
    return status


def execute(args: argparse.Namespace, command: list[str], runner: Runner) -> int:
    """Runs (or prints) the commands of `args.action`; returns the exit status for the shell."""
    if args.accelerator_type:
        shape = slice_shape(args.accelerator_type)
        runner.comment(f"{shape.describe()}; runtime {args.version or shape.runtime}")
        run_dir = _run_dir_of(command) if command else None
        if command and not (run_dir or "").startswith("gs://") and (shape.hosts > 1 or args.spot):
            why = (f"on {shape.hosts} hosts every worker must write to the same storage" if shape.hosts > 1
                   else "a Spot VM's disk is deleted with it on preemption")
            print(f"warning: run_dir {run_dir or '(the config default, a local path)'} is not on gs://: {why}; "
                  "pass --run-dir gs://BUCKET/RUN so checkpoints survive and resume", file=sys.stderr)
    if args.action == "create":
        runner.run(create_command(args))
        if args.queued:
            wait_until_active(runner, args)
    elif args.action == "setup":
        for cmd in setup_commands(args):
            runner.run(cmd)
    elif args.action == "run":
        runner.run(ssh_command(args, run_script(command)))
    elif args.action == "logs":
        return follow_logs(runner, args)
    elif args.action == "delete":
        runner.run(delete_command(args))
    elif args.action == "all":
        return run_all(args, command, runner)
    return 0


def run_all(args: argparse.Namespace, command: list[str], runner: Runner) -> int:
    """create -> setup -> run -> logs, then delete: also after a failure or Ctrl-C, unless --keep."""
    status = 0
    try:
        runner.run(create_command(args))
        if args.queued:
            wait_until_active(runner, args)
        for cmd in setup_commands(args):
            runner.run(cmd)
        runner.run(ssh_command(args, run_script(command)))
        status = follow_logs(runner, args)
        if status:
            print(f"the run on worker 0 exited with status {status}", file=sys.stderr)
    except subprocess.CalledProcessError as e:
        print(f"failed with status {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        status = e.returncode or 1
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    finally:
        if args.keep:
            again = ["python", "-m", "launch.tpu", "delete", "--name", args.name, "--zone", args.zone]
            again += (["--project", args.project] if args.project else []) + (["--queued"] if args.queued else [])
            runner.comment(f"--keep: {args.name} is left running; delete it with: {shlex.join(again)}")
        else:
            runner.run(delete_command(args), check=False)
    return status


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The jaxllm command goes after `--` (needed by run and all).")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--name", required=True, help="TPU (node) name; the queued resource is NAME-qr")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-central2-b (v4)")
    p.add_argument("--accelerator-type", help="v4-N / v5p-N (N TensorCores), v5litepod-N / v6e-N (N chips); "
                                              "required by create and all")
    p.add_argument("--version", help="TPU software version (default: the runtime of the TPU family)")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
    p.add_argument("--queued", action="store_true", help="request the slice as a queued resource NAME-qr")
    p.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--repo-url", help="git URL of jaxllm to clone on every worker (setup)")
    src.add_argument("--wheel", help="local jaxllm wheel to upload to every worker (setup)")
    p.add_argument("--repo-ref", default="", help="with --repo-url: the commit (or tag) every worker checks out "
                   "(default: this checkout's HEAD commit, which must be pushed)")
    p.add_argument("--configs-dir", default=str(REPO_ROOT / "configs"),
                   help="with --wheel: the configs/ directory uploaded beside it (default: %(default)s)")
    p.add_argument("--extras", default="tpu", help="jaxllm extras to install (default: %(default)s; '' for none)")
    p.add_argument("--python", default="3.11", help="Python version of the workers' virtualenv")
    p.add_argument("--run-dir", help="appended to the command as --config.run_dir (a gs:// path on pods)")
    p.add_argument("--keep", action="store_true", help="all: do not delete the slice at the end")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="queued-resource polling interval")
    p.add_argument("--ssh-retries", type=int, default=5, help="reconnects of the log stream after ssh failures")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def validate(args: argparse.Namespace, command: list[str]) -> None:
    """Checks the flags an action needs before anything runs.

    Raises:
      ValueError: naming the flag that is missing or wrong.
    """
    if not _NAME.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r}: use lowercase letters, digits and hyphens, starting with a letter")
    if args.action in ("create", "all") and not args.accelerator_type:
        raise ValueError(f"--accelerator-type is required by {args.action}, e.g. --accelerator-type v5p-32")
    if args.accelerator_type:
        slice_shape(args.accelerator_type)
    if args.action in ("setup", "all"):
        if not (args.repo_url or args.wheel):
            raise ValueError(f"{args.action} installs jaxllm: give --repo-url URL or --wheel PATH")
        if args.repo_url and not args.repo_ref:
            args.repo_ref = _local_head()
        if args.wheel:
            if not args.wheel.endswith(".whl") or not pathlib.Path(args.wheel).is_file():
                raise ValueError(f"--wheel {args.wheel!r} is not a .whl file (build one with `pip wheel --no-deps .`)")
            if not pathlib.Path(args.configs_dir).is_dir():
                raise ValueError(f"--configs-dir {args.configs_dir!r} is not a directory")
    if not re.fullmatch(r"[A-Za-z0-9_,.-]*", args.extras):
        raise ValueError(f"--extras {args.extras!r}: expected comma-separated extra names, e.g. tpu")
    if args.run_dir is not None and not args.run_dir:
        raise ValueError("--run-dir is empty")
    if args.poll_seconds <= 0 or args.ssh_retries < 0:
        raise ValueError("--poll-seconds must be positive and --ssh-retries non-negative")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, command = split_command(parser, sys.argv[1:] if argv is None else argv, required=False)
    if args.action in ("run", "all") and not command:
        parser.error(MISSING_COMMAND)
    # The other actions reject a command, so a misplaced one is never dropped silently.
    if command and args.action not in ("run", "all"):
        parser.error(f"{args.action} takes no command after `--` (only run and all do)")
    try:
        validate(args, command)
        command = job_command(args, command) if command else command
        return execute(args, command, Runner(args.dry_run))
    except ValueError as e:
        parser.error(str(e))
    except subprocess.CalledProcessError as e:
        print(f"failed with status {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
    except FileNotFoundError as e:
        print(f"{e.filename or e}: not found; install the Google Cloud CLI (gcloud) first", file=sys.stderr)
        return 127
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
