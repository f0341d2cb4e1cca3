"""Device mesh, logical-axis rules and shardings for parameters, train state and batches.

The mesh has axes `('data', 'fsdp', 'tensor')` (product = device count; one `-1` fills).
A rules table maps the logical names that models put on parameters and activations to mesh axes,
e.g. `batch -> ('data', 'fsdp')`, `embed -> 'fsdp'`, `mlp, heads, kv_heads, vocab -> 'tensor'`.
"""

from __future__ import annotations

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

    `mode`: "auto" initialises when the environment says multi-host (Cloud TPU pod, SLURM) or when
    a coordinator is given; "off" never does; "on" always does (explicit coordinator settings or
    JAX's own cluster detection).
    """
    c = ml_collections.ConfigDict()
    c.mode = "auto"
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    c.local_device_ids = ""
    return c


def _cpu_device_count_from_env() -> int:
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def initialize_runtime(config: ml_collections.ConfigDict) -> None:
    """Sets up JAX's process group before any computation.

    Multi-host: `jax.distributed.initialize` with the coordinator from `config.distributed` or
    auto-detected (TPU pods, SLURM). Several CPU devices in one process (`XLA_FLAGS=
    --xla_force_host_platform_device_count=N`): gloo collectives through a one-process distributed
    client, because XLA's in-process CPU collectives deadlock on 2-core machines
    (../shared/docs/cpu-notes.md).
    """
    if jax.distributed.is_initialized():
        return
    d = config.distributed if "distributed" in config else distributed_config()
    cpu_only = os.environ.get("JAX_PLATFORMS", "") == "cpu"
    explicit = bool(d.coordinator_address) or d.num_processes > 1
    detected = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if d.mode == "off":
        return
    if explicit or d.mode == "on" or (detected and not cpu_only):
        kwargs: dict[str, Any] = {}
        if d.coordinator_address:
            kwargs["coordinator_address"] = d.coordinator_address
        if d.num_processes > 0:
            kwargs["num_processes"] = d.num_processes
        if d.process_id >= 0:
            kwargs["process_id"] = d.process_id
        if d.local_device_ids:
            kwargs["local_device_ids"] = [int(x) for x in str(d.local_device_ids).split(",")]
        if cpu_only or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
        return
    if _cpu_device_count_from_env() > 1 and (cpu_only or not _has_accelerator_plugin()):
        import portpicker

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{portpicker.pick_unused_port()}", num_processes=1, process_id=0
        )


def _has_accelerator_plugin() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


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


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows of the batch.

    Each process holds the contiguous rows of the global batch that its devices own (see
    `jaxllm.data.lm`); `jax.make_array_from_process_local_data` assembles them without copying
    data between hosts.
    """
    out = {}
    for key, value in local.items():
        sharding = batch_sharding(mesh, rules, value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


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
