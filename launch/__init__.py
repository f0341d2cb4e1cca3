"""Launchers that start jaxllm commands on many hosts at once.

- `python -m launch.tpu`: Cloud TPU pod slices through `gcloud compute tpus` (create, install,
  run on every worker, follow logs, delete).
- `python -m launch.slurm`: GPU clusters through an `sbatch` script whose `srun` starts one
  jaxllm process per GPU or per node.

Both take the jaxllm command after `--` and add only what multi-host needs; with `--dry-run` they
print the exact shell commands (one per line, runnable) and run nothing. See launch/README.md.

This module holds the two pieces both launchers share: splitting argv at `--`, and a `Runner`
that either prints or runs commands.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence, TextIO

MISSING_COMMAND = ("missing the command to run: put it after `--`, e.g. "
                   "`-- jaxllm pretrain --config configs/pretrain.py:llama2_7b`")


def split_command(parser: argparse.ArgumentParser, argv: Sequence[str],
                  required: bool = True) -> tuple[argparse.Namespace, list[str]]:
    """Parses the launcher's own flags before `--` and returns the command after it.

    Args:
      parser: the launcher's argument parser (flags only; the command is never given to it).
      argv: everything after the program name.
      required: whether a non-empty command after `--` is mandatory.

    Returns:
      The parsed flags and the command as a list of arguments, exactly as given.

    Raises:
      SystemExit: through `parser.error` (status 2) when a required command is missing.
    """
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        flags, command = argv[:i], argv[i + 1:]
    else:
        flags, command = argv, []
    args = parser.parse_args(flags)
    if required and not command:
        parser.error(MISSING_COMMAND)
    return args, command


class Runner:
    """Runs commands, or with `dry_run` prints them as a runnable shell script.

    Each command is one line, quoted with `shlex.join`, so `bash` (or copy and paste) runs exactly
    what the launcher would have run. Comments (`# ...`) carry what is not a command, such as the
    host count or a polling loop.
    """

    def __init__(self, dry_run: bool, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def comment(self, text: str) -> None:
        """Prints `# text` (each line), in dry runs and real runs alike."""
        for line in text.splitlines() or [""]:
            print(f"# {line}".rstrip(), file=self.out, flush=True)

    def run(self, argv: Sequence[str], check: bool = True) -> int:
        """Prints `argv` (dry run) or runs it with output streamed to this terminal.

        Returns:
          The exit status (0 in a dry run).

        Raises:
          subprocess.CalledProcessError: when `check` and the command fails.
          FileNotFoundError: when the program (e.g. `gcloud`, `sbatch`) is not installed.
        """
        line = shlex.join(argv)
        if self.dry_run:
            print(line, file=self.out, flush=True)
            return 0
        print(f"+ {line}", file=sys.stderr, flush=True)
        return subprocess.run(list(argv), check=check).returncode

    def output(self, argv: Sequence[str]) -> str:
        """Runs `argv` and returns its stdout (never called in a dry run).

        Raises:
          subprocess.CalledProcessError: when the command fails.
        """
        assert not self.dry_run, "output() runs a command; dry runs only print"
        return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout
