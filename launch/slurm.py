"""GPU clusters under SLURM: write an sbatch script that starts jaxllm on every node, submit it.

    python -m launch.slurm --nodes 2 --gpus-per-node 8 [--partition P] [--time 04:00:00] \\
        [--account A] [--mode per-gpu|per-node] [--container IMAGE] [--script-out FILE] \\
        [--dry-run] -- jaxllm pretrain --config configs/pretrain.py:llama2_7b

Modes:
  per-gpu   one process per GPU: `--ntasks-per-node=G --gpus-per-task=1` (SLURM binds each task to
            its GPU, so every process sees exactly one device, local id 0)
  per-node  one process per node that drives all G GPUs: `--ntasks-per-node=1 --gpus-per-node=G`

jaxllm's `initialize_runtime` would find SLURM by itself, but JAX's SLURM detection assumes a
third layout (G tasks per node that each see all G GPUs) and then picks device `SLURM_LOCALID`:
that is an invalid device under `--gpus-per-task=1` and uses only GPU 0 in per-node mode
(jax-ml/jax#23452, #16788). So the script passes everything explicitly: the coordinator
(`JAXLLM_COORDINATOR`: first host of the allocation and a port), `num_processes=$SLURM_NTASKS`,
`process_id=$SLURM_PROCID` (expanded inside each task) and `local_device_ids`.

`--dry-run` prints a runnable shell script: the sbatch script as a here-document, then `sbatch`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Sequence

from launch import Runner, split_command

MODES = ("per-gpu", "per-node")
HEREDOC_END = "JAXLLM_SBATCH_EOF"
# A port in [61440, 65535] derived from the job id, the formula of JAX's own SLURM detection
# (jax/_src/clusters/slurm_cluster.py), so two jobs sharing a node do not collide.
DEFAULT_PORT_EXPR = "$(( SLURM_JOB_ID % 4096 + 61440 ))"
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
SIGTERM_GRACE_S = 120  # jaxllm saves a checkpoint on SIGTERM; SLURM sends it this long before the limit


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.gpus_per_node if args.mode == "per-gpu" else 1


def local_device_ids(args: argparse.Namespace) -> str:
    """Device ordinals one process drives, as CUDA numbers the GPUs that process can see."""
    return "0" if args.mode == "per-gpu" else ",".join(str(i) for i in range(args.gpus_per_node))


def task_command(args: argparse.Namespace, command: Sequence[str]) -> str:
    """The shell text each task runs: the user's command plus the distributed flags.

    The user's arguments are quoted once with `shlex.join`; the SLURM variables stay in double
    quotes so each task expands its own `$SLURM_PROCID`.

    Raises:
      ValueError: naming `--config.distributed.*` or `--run-dir` when the command sets them itself.
    """
    command = list(command)
    for key in DISTRIBUTED_KEYS:
        flag = f"--config.distributed.{key}"
        if any(a == flag or a.startswith(flag + "=") for a in command):
            raise ValueError(f"the launcher sets {flag}; remove it from the command")
    if args.run_dir:
        if any(a == "--config.run_dir" or a.startswith("--config.run_dir=") for a in command):
            raise ValueError("--run-dir: the command already sets --config.run_dir; give it once")
        command.append(f"--config.run_dir={args.run_dir}")
    return (f"exec {shlex.join(command)}"
            ' --config.distributed.coordinator_address="$JAXLLM_COORDINATOR"'
            ' --config.distributed.num_processes="$SLURM_NTASKS"'
            ' --config.distributed.process_id="$SLURM_PROCID"'
            f" --config.distributed.local_device_ids={local_device_ids(args)}")


def srun_command(args: argparse.Namespace, command: Sequence[str]) -> list[str]:
    """`srun` over every task of the allocation, each running `bash -c TASK_COMMAND`."""
    cmd = ["srun", "--kill-on-bad-exit=1"]
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")  # srun no longer inherits it from sbatch
    if args.container:
        cmd += [f"--container-image={args.container}", f"--container-mounts={args.workdir}:{args.workdir}",
                f"--container-workdir={args.workdir}"]
    return cmd + ["bash", "-c", task_command(args, command)]


def sbatch_script(args: argparse.Namespace, command: Sequence[str]) -> str:
    """The complete sbatch script: directives, the coordinator address, and the srun line."""
    ntasks = args.nodes * tasks_per_node(args)
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                  f"--ntasks-per-node={tasks_per_node(args)}"]
    if args.mode == "per-gpu":
        directives.append("--gpus-per-task=1")
    else:
        directives.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        directives.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag in ("time", "partition", "account"):
        if getattr(args, flag):
            directives.append(f"--{flag}={getattr(args, flag)}")
    directives += [f"--chdir={args.workdir}", f"--output={args.output}", f"--signal=TERM@{SIGTERM_GRACE_S}"]
    directives += args.sbatch_option
    port = str(args.port) if args.port else DEFAULT_PORT_EXPR
    lines = [
        "#!/bin/bash",
        f"# Generated by `python -m launch.slurm`: {args.nodes} nodes x {args.gpus_per_node} GPUs, "
        f"{args.mode} ({ntasks} jaxllm processes).",
        *(f"#SBATCH {shlex.quote(d)}" for d in directives),
        "",
        "set -euo pipefail",
        "# Process 0 runs on the first node of the allocation and hosts JAX's coordinator service.",
        'COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"COORD_PORT={port}",
        'export JAXLLM_COORDINATOR="$COORD_HOST:$COORD_PORT"',
        'echo "jaxllm: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes, coordinator $JAXLLM_COORDINATOR"',
        "",
        shlex.join(srun_command(args, command)),
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The jaxllm command goes after `--`.")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    p.add_argument("--mode", choices=MODES, default="per-gpu",
                   help="one process per GPU or per node (default: %(default)s)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00")
    p.add_argument("--account", help="account to charge")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per process (data loading)")
    p.add_argument("--job-name", default="jaxllm", help="job name (default: %(default)s)")
    p.add_argument("--output", help="job log file (default: JOB_NAME-%%j.out in --workdir)")
    p.add_argument("--workdir", default=os.getcwd(),
                   help="working directory of the job: relative config and run paths resolve here "
                        "(default: the current directory)")
    p.add_argument("--container", help="container image for srun (pyxis/enroot), with --workdir mounted")
    p.add_argument("--port", type=int, help="coordinator port (default: derived from the job id)")
    p.add_argument("--run-dir", help="appended to the command as --config.run_dir (shared storage)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="--KEY=VALUE",
                   help="extra #SBATCH directive, e.g. --sbatch-option=--qos=high (repeatable)")
    p.add_argument("--script-out", help="where to write the sbatch script (default: a temporary file)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command, run nothing")
    return p


_SLURM_TIME = re.compile(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})")


def validate(args: argparse.Namespace) -> None:
    """Checks the flags before anything is written or submitted.

    Raises:
      ValueError: naming the flag that is wrong.
    """
    if args.nodes < 1:
        raise ValueError(f"--nodes must be at least 1 (got {args.nodes})")
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be at least 1 (got {args.gpus_per_node})")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task must be at least 1 (got {args.cpus_per_task})")
    if args.time and not _SLURM_TIME.fullmatch(args.time):
        raise ValueError(f"--time {args.time!r}: use minutes, [HH:]MM:SS or DAYS-HH[:MM[:SS]], e.g. 04:00:00")
    if args.port is not None and not 1024 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not in 1024..65535")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job_name):
        raise ValueError(f"--job-name {args.job_name!r}: use letters, digits, '_', '.', '-'")
    if not os.path.isabs(args.workdir):
        raise ValueError(f"--workdir {args.workdir!r} must be an absolute path (the nodes' view of it)")
    for option in args.sbatch_option:
        if not option.startswith("--") or "\n" in option:
            raise ValueError(f"--sbatch-option {option!r}: expected one long option such as --qos=high")
    if args.run_dir is not None and not args.run_dir:
        raise ValueError("--run-dir is empty")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, command = split_command(parser, sys.argv[1:] if argv is None else argv)
    args.output = args.output or f"{args.job_name}-%j.out"
    try:
        validate(args)
        script = sbatch_script(args, command)
    except ValueError as e:
        parser.error(str(e))
    runner = Runner(args.dry_run)
    ntasks = args.nodes * tasks_per_node(args)
    runner.comment(f"{args.nodes} nodes x {args.gpus_per_node} GPUs, {args.mode}: {ntasks} processes")
    if args.dry_run:
        path = args.script_out or f"{args.job_name}.sbatch"
        print(f"cat > {shlex.quote(path)} <<'{HEREDOC_END}'\n{script}{HEREDOC_END}", flush=True)
        runner.run(["sbatch", path])
        return 0
    if args.script_out:
        path = args.script_out
        with open(path, "w") as f:
            f.write(script)
    else:
        fd, path = tempfile.mkstemp(prefix=f"{args.job_name}-", suffix=".sbatch")
        with os.fdopen(fd, "w") as f:
            f.write(script)
    print(f"wrote {path}", file=sys.stderr)
    try:
        return runner.run(["sbatch", path])
    except subprocess.CalledProcessError as e:
        print(f"sbatch failed with status {e.returncode}; the script is {path}", file=sys.stderr)
        return e.returncode or 1
    except FileNotFoundError:
        print(f"sbatch: not found (run this on a SLURM login node); the script is {path}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
