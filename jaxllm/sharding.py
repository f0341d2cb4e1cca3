"""Device mesh, logical-axis rules and shardings for parameters, train state and batches.

The mesh has axes `('data', 'fsdp', 'tensor')` (product = device count; one `-1` fills).
A rules table maps the logical names that models put on parameters and activations to mesh axes,
e.g. `batch -> ('data', 'fsdp')`, `embed -> 'fsdp'`, `mlp, heads, kv_heads, vocab -> 'tensor'`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("score", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class MeshError(ValueError):
    """A mesh shape or rules table that cannot work on these devices or this model."""


def default_config() -> ml_collections.ConfigDict:
    """The `mesh` section: `shape` over `('data', 'fsdp', 'tensor')` and the logical `rules`."""
    c = ml_collections.ConfigDict()
    c.shape = (1, -1, 1)
    c.rules = DEFAULT_RULES
    return c


def distributed_config() -> ml_collections.ConfigDict:
    """The `distributed` section: how (and whether) to call `jax.distributed.initialize`.

    `mode`: "auto" initialises when any of the settings below is given, or when JAX's cluster
    detection finds a multi-process job (SLURM `srun` steps, Cloud TPU pod slices, Open MPI,
    Kubernetes); "off" never does; "on" always does (explicit settings, else detection).
    `coordinator_address` (HOST:PORT of process 0), `num_processes`, `process_id` and
    `local_device_ids` (comma-separated, e.g. "0,1") override what detection would find; 0 / -1 / ""
    leave a value to detection. `initialization_timeout` is how long (seconds) every process
    waits for the others to connect.
    """
    c = ml_collections.ConfigDict()
    c.mode = "auto"
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    c.local_device_ids = ""
    c.initialization_timeout = 300
    return c


DISTRIBUTED_MODES = ("auto", "on", "off")


def _cpu_device_count_from_env() -> int:
    """CPU devices per process asked for by `jax_num_cpu_devices` (`JAX_NUM_CPU_DEVICES`) or
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` (1 when neither is set)."""
    configured = int(jax.config.jax_num_cpu_devices or -1)
    if configured > 0:
        return configured
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def detected_cluster() -> str:
    """The multi-process job JAX's own cluster detection finds here, or "" if none.

    Asks each of JAX's cluster environments (`jax._src.clusters`: SLURM, Cloud TPU on GCE and
    GKE, Open MPI, Kubernetes; not the opt-in mpi4py one), as `jax.distributed.initialize()` does
    without arguments, and keeps one that reports more than one process: a one-task SLURM step or
    a single-host TPU VM needs no distributed runtime. SLURM counts only inside an `srun` step
    (JAX needs `SLURM_STEP_NODELIST`, `SLURM_PROCID`, `SLURM_LOCALID`), not in the batch script.
    """
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return env.name or env.__name__
        except (KeyError, ValueError, OSError, RuntimeError):  # a partial environment: not this one
            continue
    return ""


def _distributed_kwargs(d: ml_collections.ConfigDict) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments from the explicit `distributed` settings.

    Raises:
      ConfigError: naming the `distributed.*` key of a malformed value.
    """
    from jaxllm.config import ConfigError

    kwargs: dict[str, Any] = {"initialization_timeout": int(d.get("initialization_timeout", 300))}
    if d.coordinator_address:
        host, sep, port = str(d.coordinator_address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.coordinator_address={d.coordinator_address!r}: expected HOST:PORT "
                              f"of process 0, e.g. 10.0.0.2:1234")
        kwargs["coordinator_address"] = str(d.coordinator_address)
    if d.num_processes < 0:
        raise ConfigError(f"distributed.num_processes={d.num_processes} must be >= 1 (0 = detect)")
    if d.num_processes > 0:
        kwargs["num_processes"] = int(d.num_processes)
    if d.process_id >= 0:
        if d.num_processes > 0 and d.process_id >= d.num_processes:
            raise ConfigError(f"distributed.process_id={d.process_id} must be < distributed.num_processes="
                              f"{d.num_processes}")
        kwargs["process_id"] = int(d.process_id)
    if d.local_device_ids:
        try:
            kwargs["local_device_ids"] = [int(x) for x in str(d.local_device_ids).split(",")]
        except ValueError:
            raise ConfigError(f"distributed.local_device_ids={d.local_device_ids!r}: expected comma-separated "
                              f"device numbers, e.g. 0,1,2,3") from None
    return kwargs


def distributed_init_kwargs(d: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The `jax.distributed.initialize` arguments for the `distributed` section `d`, or None when
    this process is not part of a multi-process job (`mode` "off", or "auto" with no explicit
    setting and no cluster detected). Values left unset are for JAX's cluster detection to fill.

    Raises:
      ConfigError: a bad `mode` or malformed value, or explicit settings that leave the coordinator,
        process count or process id unknown outside a cluster that JAX detects.
    """
    from jaxllm.config import ConfigError

    if d.mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"distributed.mode={d.mode!r}; expected one of {DISTRIBUTED_MODES}")
    if d.mode == "off":
        return None
    kwargs = _distributed_kwargs(d)
    explicit = bool(kwargs.keys() & {"coordinator_address", "num_processes", "process_id", "local_device_ids"})
    cluster = detected_cluster()
    if not (explicit or cluster or d.mode == "on"):
        return None
    required = ("coordinator_address", "num_processes", "process_id")
    if not cluster and not set(required) <= kwargs.keys():
        missing = ", ".join(f"distributed.{k}" for k in required if k not in kwargs)
        raise ConfigError(f"distributed.mode={d.mode}: set {missing} (no SLURM step, TPU pod or other cluster "
                          f"that JAX detects was found)")
    return kwargs


def initialize_runtime(config: ml_collections.ConfigDict) -> None:
    """Sets up JAX's process group before any computation.

    Multi-host (see `distributed_config`): `jax.distributed.initialize` with the explicit
    `config.distributed` settings, JAX filling in the rest from the cluster it detects. CPU
    processes use gloo collectives. Several CPU devices in one process (`JAX_NUM_CPU_DEVICES=N` or
    `XLA_FLAGS=--xla_force_host_platform_device_count=N`): gloo through a one-process distributed
    client, because XLA's in-process CPU collectives deadlock on 2-core machines
    (../shared/docs/cpu-notes.md). Does nothing when JAX's distributed runtime is already up.

    Processes that do not all connect within `distributed.initialization_timeout` seconds are
    ended by JAX itself (a fatal "DEADLINE_EXCEEDED ... RegisterTask" log, exit status 134), after
    the INFO line that names the settings used.

    Raises:
      ConfigError: as `distributed_init_kwargs`, or when `jax.distributed.initialize` rejects the
        settings.
    """
    from jaxllm.config import ConfigError

    if jax.distributed.is_initialized():
        return
    d = config.distributed if "distributed" in config else distributed_config()
    kwargs = distributed_init_kwargs(d)
    cpu = (os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu"
           or not _has_accelerator_plugin())
    if kwargs is not None:
        if cpu:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        cluster = detected_cluster()
        logging.info("jax.distributed.initialize(%s)%s", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
                     f", the rest from the {cluster} environment" if cluster else "")
        try:
            jax.distributed.initialize(**kwargs)
        except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"jax.distributed.initialize failed ({first_line}); check distributed."
                              f"coordinator_address / num_processes / process_id") from None
        return
    if d.mode != "off" and cpu and _cpu_device_count_from_env() > 1:
        import portpicker

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{portpicker.pick_unused_port()}", num_processes=1, process_id=0
        )


def _has_accelerator_plugin() -> bool:
    """Whether JAX may start a non-CPU backend: a CUDA plugin, or libtpu on a machine with TPU
    chips (libtpu alone, as installed for ahead-of-time compilation, starts no TPU backend here)."""
    import importlib.util

    from jaxllm import console

    if console.has_cuda_plugin():
        return True
    return importlib.util.find_spec("libtpu") is not None and console.tpu_chip_count() > 0


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single `-1` in `shape` and checks the product equals `num_devices`.

    Raises:
      MeshError: naming `mesh.shape` when it has the wrong length, more than one -1, a
        non-positive entry, or a product different from the device count.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"mesh.shape={shape} cannot be filled: {known} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh.shape={shape} has {math.prod(shape)} devices but {num_devices} are available "
            f"({jax.default_backend()}); set --config.mesh.shape so the product is {num_devices}"
        )
    return shape


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `MESH_AXES` from `mesh_config.shape` (all devices unless `devices` given)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    # Auto axes: the compiler propagates shardings from the annotated params and batch (GSPMD).
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def local_mesh() -> Mesh:
    """A one-device mesh over `MESH_AXES` on this process's first device, for host-local programs
    (sampling) in a multi-host run, where the global mesh would make them collective."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_tuple(rules) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table from a config (lists become tuples) for flax."""
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> Any:
    """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules_tuple(rules))


def check_divisible(abstract_boxed, mesh: Mesh, rules) -> None:
    """Checks each sharded parameter dimension is divisible by its mesh axes.

    Raises:
      MeshError: naming the parameter, its logical axis and the mesh axes that do not divide it.
    """
    rules = dict(rules_tuple(rules))
    flat = jax.tree_util.tree_flatten_with_path(
        abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, leaf in flat:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        for dim, name in zip(leaf.value.shape, leaf.names):
            axes = rules.get(name)
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise MeshError(
                    f"parameter {jax.tree_util.keystr(path)} dimension {name}={dim} is not divisible by "
                    f"mesh axes {axes} of size {size}; change mesh.shape or mesh.rules")


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: batch over the mesh axes of logical `batch`."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules_tuple(rules))
    return NamedSharding(mesh, spec)


def batch_axis_size(mesh: Mesh, rules) -> int:
    """Number of shards of the batch dimension (global batch must be a multiple of it)."""
    axes = dict(rules_tuple(rules)).get("batch")
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> list[tuple[int, int]]:
    """The row ranges `[start, stop)` of a `[rows, ...]` array that this process's devices hold,
    merged and sorted (a replicated array: one range over all rows)."""
    spans = sorted({idx[0].indices(global_shape[0])[:2]
                    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


@functools.lru_cache(maxsize=64)
def _check_process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> None:
    """Raises MeshError unless this process's devices hold exactly its share of the batch rows.

    The data layer hands process p of P the rows `[p*b, (p+1)*b)` of each global batch of B = P*b
    rows (`jaxllm.data.lm._ProcessSlice`). `make_array_from_process_local_data` puts them, in
    order, on the rows this process's devices own; when those are b rows in all (each row on one
    process), the global batch is the data layer's batch, rows at most permuted between
    processes, so losses and gradients (sums over rows) are unchanged. A mesh that puts more rows
    on a process (the batch replicated over an axis that spans processes) would need the same
    rows on several processes, which the data layer does not read.
    """
    p, count, rows = jax.process_index(), jax.process_count(), global_shape[0]
    local = rows // count
    held = process_rows(sharding, global_shape)
    total = sum(stop - start for start, stop in held)
    if total != local:
        raise MeshError(
            f"mesh {dict(sharding.mesh.shape)} puts rows {held} of each global batch of {rows} rows on "
            f"process {p} of {count}, but each process reads {local} rows of its own; shard the batch "
            f"over the mesh axes that span processes (data, fsdp) or change mesh.rules 'batch'")
    own = [(p * local, (p + 1) * local)]
    logging.info("process %d of %d reads rows %d:%d of each global batch of %d rows; its devices hold rows %s%s",
                 p, count, own[0][0], own[0][1], rows, held,
                 "" if held == own else " (rows permuted between processes)")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows of the batch.

    Each of P processes holds `b` contiguous rows of the global batch of `P * b` rows (see
    `jaxllm.data.lm`); `jax.make_array_from_process_local_data` assembles them without copying
    data between hosts.

    Raises:
      MeshError: with several processes, when the mesh does not give each process's devices
        exactly `b` rows of the batch (see `_check_process_rows`).
    """
    out = {}
    count = jax.process_count()
    for key, value in local.items():
        sharding = batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * count,) + value.shape[1:]
        if count > 1:
            _check_process_rows(sharding, global_shape)
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    if count > 1:
        _log_first_batch(local)
    return out


_LOGGED_LAYOUTS: set[tuple] = set()  # per process: each layout is logged once


def _log_first_batch(local: dict[str, np.ndarray]) -> None:
    """Logs a digest of the first local batch of each layout, so that the logs of the hosts show
    which rows each one fed (two hosts reading the same rows is a silent multi-host bug)."""
    layout = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(local.items()))
    if layout in _LOGGED_LAYOUTS:
        return
    _LOGGED_LAYOUTS.add(layout)
    h = hashlib.sha256()
    for key in sorted(local):
        h.update(key.encode())
        h.update(np.ascontiguousarray(local[key]).tobytes())
    logging.info("process %d of %d: first local batch %s sha256 %s", jax.process_index(), jax.process_count(),
                 {k: v.shape for k, v in sorted(local.items())}, h.hexdigest())


def batch_shards() -> int:
    """Shards of the logical `batch` axis under the active mesh and logical-axis rules (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = dict(nn.get_logical_axis_rules()).get("batch")
    if mesh.empty or not axes:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def log_mesh(mesh: Mesh) -> None:
    """Logs the mesh shape and device kind."""
    logging.info("mesh %s over %d %s devices (%d processes)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].device_kind, jax.process_count())


def activate(mesh: Mesh, rules):
    """Context in which jitted model code traces: the mesh plus the logical-axis rules."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules_tuple(rules)))
    return stack
