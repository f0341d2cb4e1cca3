"""What a `jaxllm` command prints besides its own output: the JAX platform it starts, and logs.

Platform (`choose_platforms`, called by `jaxllm.cli.main` before anything imports JAX): on a
machine with TPU chips (a Cloud TPU VM) JAX starts the TPU as usual. With `libtpu` installed
(`pip install 'jaxllm[tpu]'`, for `jaxllm compile`) but no TPU chip, JAX would still try to start
a TPU backend and libtpu would print errors about host bounds and TPU_WORKER_HOSTNAMES; there
`JAX_PLATFORMS` is set to leave the TPU out ("cuda,cpu" when a JAX CUDA plugin is installed, else
"cpu"). A `JAX_PLATFORMS` set by the user, even to "", is never changed. `jaxllm compile
--topology` still uses libtpu as a compiler on such machines (`quiet_compile_only_libtpu`).

Logs (`setup_logging`): `--verbosity=LEVEL` on any command, or `JAXLLM_VERBOSITY=LEVEL`:
  warning  warnings and errors only
  info     (default) jaxllm's own INFO lines; JAX, absl, orbax, grain, etils at WARNING
  debug    jaxllm DEBUG, those libraries at INFO, and XLA's C++ INFO lines (TF_CPP_MIN_LOG_LEVEL=0)
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import MutableMapping, Sequence

VERBOSITIES = ("warning", "info", "debug")
# Loggers of libraries whose INFO lines are start-up and bookkeeping noise on our console.
THIRD_PARTY_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "etils", "grain", "tensorstore")

# PCI ids of TPU chips, as `jax._src.hardware_utils` (jax 0.10.2) reads them: Google's vendor id and
# the device ids of v3, plc, v4, v5p, v5e, v6e, TPU7x.
GOOGLE_PCI_VENDOR_ID = "0x1ae0"
TPU_PCI_DEVICE_IDS = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def tpu_chip_count(pci_devices: str = "/sys/bus/pci/devices") -> int:
    """TPU chips attached to this machine through PCI (0 on a CPU or GPU machine)."""
    count = 0
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() != GOOGLE_PCI_VENDOR_ID:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device"), encoding="ascii") as f:
                count += f.read().strip() in TPU_PCI_DEVICE_IDS
        except OSError:
            continue
    return count


def has_cuda_plugin() -> bool:
    """Whether a JAX CUDA plugin (`CUDA_PLUGINS`) is installed, without importing it or JAX."""
    return any(importlib.util.find_spec(m) is not None for m in CUDA_PLUGINS)


def _has_libtpu(environ: MutableMapping[str, str]) -> bool:
    return bool(environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def choose_platforms(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Sets `JAX_PLATFORMS` in `environ` (default `os.environ`) when JAX would otherwise try libtpu on
    a machine without TPU chips; call it before JAX initialises a backend.

    Returns:
      The `JAX_PLATFORMS` now in effect: the user's (unchanged, even ""), the one set here
      ("cuda,cpu" with a JAX CUDA plugin installed, else "cpu"), or None where JAX's own choice
      starts no TPU backend by mistake (libtpu not installed, TPU chips present, or
      `JAX_FORCE_TPU_INIT` set).
    """
    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ:
        return environ["JAX_PLATFORMS"]
    if "JAX_FORCE_TPU_INIT" in environ or not _has_libtpu(environ) or tpu_chip_count() > 0:
        return None
    environ["JAX_PLATFORMS"] = "cuda,cpu" if has_cuda_plugin() else "cpu"
    return environ["JAX_PLATFORMS"]


def quiet_compile_only_libtpu(environ: MutableMapping[str, str] | None = None) -> None:
    """Tells libtpu, before it starts as a compiler on a machine without TPU chips, that this host
    is its own single-host slice, so it does not print "Failed to find host bounds for
    accelerator type" and an `E0000 ... INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` error (libtpu
    0.0.42: TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel and TPU_MIN_LOG_LEVEL do not hide them). The
    topology compiled for is given to `get_topology_desc` and does not change: `jaxllm compile`
    rows for v5e 1x1-4x4, v4 2x2x2, v5p 2x2x2 and v6e 2x4 were the same bytes with and without
    these variables. Variables the user set, and machines with TPU chips, are left alone.
    """
    environ = os.environ if environ is None else environ
    if tpu_chip_count() > 0:
        return
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no metadata server: one worker, this one
    environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")  # instead of bounds looked up by accelerator type


def pop_verbosity(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Removes `--verbosity LEVEL` / `--verbosity=LEVEL` from anywhere in `argv`.

    Returns:
      `(level, rest)`: the level given last, else `JAXLLM_VERBOSITY`, else "info"; and `argv`
      without the flag.

    Raises:
      ValueError: an unknown level, or `--verbosity` without one.
    """
    level, rest, args = os.environ.get("JAXLLM_VERBOSITY", "") or "info", [], list(argv)
    source = "JAXLLM_VERBOSITY"
    while args:
        arg = args.pop(0)
        if arg == "--verbosity":
            if not args:
                raise ValueError(f"--verbosity needs a level, one of {', '.join(VERBOSITIES)}")
            level, source = args.pop(0), "--verbosity"
        elif arg.startswith("--verbosity="):
            level, source = arg.partition("=")[2], "--verbosity"
        else:
            rest.append(arg)
    level = level.lower()
    if level not in VERBOSITIES:
        raise ValueError(f"{source}={level!r}: expected one of {', '.join(VERBOSITIES)}")
    return level, rest


def setup_logging(verbosity: str = "info") -> None:
    """Configures the root logger (`HH:MM:SS LEVEL name: message` on stderr) for `verbosity`."""
    own = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[verbosity]
    logging.basicConfig(level=own, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(own)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbosity == "debug" else max(own, logging.WARNING))
    if verbosity == "debug":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # XLA's C++ INFO lines; read when jaxlib loads
