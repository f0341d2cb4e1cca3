"""Ahead-of-time fitting: compile the real train step for a TPU topology on this machine.

`jaxllm compile --config configs/pretrain.py:llama2_7b --topology v5p:4x4x4` lowers and compiles
the jitted train step (same code path as training: `loop.compile_stage`) for the devices of a
Cloud TPU slice described by `libtpu` (`pip install 'jaxllm[tpu]'`; on a machine without TPU chips
the command line starts no TPU backend, `jaxllm.console`), and prints per-chip memory (parameters,
optimizer state, batch, XLA temporaries) against the chip's HBM, the step's FLOPs, and whether it
fits. `--suggest` tries growing slices of the same generation and reports the smallest that fits.

The step is the one the config's pretraining stage trains: causal-LM pretraining
(`jaxllm.train.pretrain`), or span corruption (`jaxllm.train.pretrain_t5`: a T5 encoder-decoder,
or a decoder-only prefix LM) for `configs/pretrain_t5.py` configs, with batches of the shapes and
dtypes the stage's data layer packs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxllm import console
from jaxllm import sharding
from jaxllm.data import packing, span_corruption
from jaxllm.models import llama
from jaxllm.models import t5
from jaxllm.train import loop, pretrain, pretrain_t5

GiB = 1024**3
# HBM per chip (Google Cloud TPU documentation, "TPU versions").
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
# Slice shapes to try with --suggest, smallest first.
SLICES = {
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "v5e": ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
}


class TopologyError(ValueError):
    """An unknown or malformed TPU topology name."""


@dataclasses.dataclass
class Fit:
    """Per-chip memory and FLOPs of one compiled train step."""

    topology: str
    num_devices: int
    mesh_shape: dict[str, int]
    param_bytes: int  # per device
    opt_state_bytes: int
    batch_bytes: int
    temp_bytes: int  # XLA temporaries: activations, gradients, workspace
    total_bytes: int  # arguments + outputs - aliased + temporaries
    argument_bytes: int  # the compiled step's inputs per device (state + batch), from XLA
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (the new train state)
    hbm_bytes: int
    flops: float  # model FLOPs per device per step (MaxText's count; XLA's cost analysis counts a
    # scanned layer body once, so it is not used)
    error: str = ""  # the compiler's out-of-memory message when it refused the step (sizes then
    # come from that message, see `_out_of_memory_fit`; output and alias bytes are 0)

    @property
    def fits(self) -> bool:
        return not self.error and 0 <= self.total_bytes <= self.hbm_bytes

    def table_row(self) -> str:
        g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
        return (f"{self.topology:>10} {self.num_devices:5d} {str(tuple(self.mesh_shape.values())):>13} "
                f"{g(self.param_bytes)} {g(self.opt_state_bytes)} {g(self.batch_bytes)} {g(self.temp_bytes)} "
                f"{g(self.total_bytes)} {g(self.hbm_bytes)} {self.flops / 1e12:9.1f}  {'yes' if self.fits else 'NO'}"
                + ("  (XLA: out of HBM)" if self.error else ""))


HEADER = (f"{'topology':>10} {'chips':>5} {'mesh':>13} {'params':>7} {'opt':>7} {'batch':>7} {'temp':>7} "
          f"{'total':>7} {'HBM':>7} {'TFLOP':>9}  fits   (GiB per chip)")


def generation(topology: str) -> str:
    """`v5p` of `v5p:4x4x4`.

    Raises:
      TopologyError: unknown generation or malformed name.
    """
    gen, sep, shape = topology.partition(":")
    if not sep or gen not in HBM_BYTES or not all(p.isdigit() for p in shape.split("x")):
        raise TopologyError(f"topology {topology!r}: expected GEN:AxB[xC] with GEN in {sorted(HBM_BYTES)}")
    return gen


def topology_devices(topology: str) -> list[Any]:
    """Compile-only devices of a TPU slice (needs `libtpu`), one per chip.

    libtpu lays slices out in hosts of 2x2x1 chips; a smaller slice (`v5e:1x1`) is one host of its
    own size. v4 chips hold two TensorCores that libtpu would list as two devices: the "megacore"
    configuration makes them one device per chip, as JAX shows them on a v4 VM (and as v5p is by
    default), so per-device memory compares with the chip's HBM.

    Raises:
      TopologyError: bad name, or libtpu missing.
    """
    gen = generation(topology)
    dims = [int(d) for d in topology.partition(":")[2].split("x")]
    dims += [1] * (3 - len(dims))
    options: dict[str, Any] = {}
    host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
    if host != (2, 2, 1):
        options["chips_per_host_bounds"] = host
    if gen == "v4":
        options["chip_config_name"] = "megacore"
    # A compile-only client opens no chip, so the lock that keeps two processes off one host's
    # TPUs would only stop two `jaxllm compile` (or a test and its subprocess) running together.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    console.quiet_compile_only_libtpu()
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
    except (RuntimeError, NotImplementedError) as e:
        raise TopologyError(f"cannot describe TPU topology {topology!r} ({e}); is libtpu installed "
                            f"(pip install 'jaxllm[tpu]')?") from None


def _bytes_per_device(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What `compile_step` compiles: the stage (model, loss; no data), one row of its batch
    (`{key: array [...]}` of the data layer's per-row shapes and dtypes) and the model FLOPs of a
    whole step."""

    stage: loop.Stage
    row: dict[str, np.ndarray]
    flops_per_step: float


def step_spec(config: ml_collections.ConfigDict) -> StepSpec:
    """The pretraining step of `config`, built as the stage that trains it builds it.

    Span-corruption configs (`pretrain_t5.handles`) take their model and loss from
    `jaxllm.train.pretrain_t5` (T5 with `t5_loss_fn`, or a prefix LM with `prefix_lm_loss_fn`), row
    lengths from `span_corruption.make_layout` and one row from the packer itself
    (`pack_t5` / `pack_prefix_lm` of no examples); others are causal-LM pretraining
    (`pretrain.lm_loss_fn`, `data.seq_len` tokens per row).

    Raises:
      config.ConfigError: bad `model.*` or `data.*` values (see `pretrain_t5.build_model`,
        `span_corruption.make_layout`, `llama.LlamaConfig.from_config`).
    """
    rows = config.train.batch_size
    if not pretrain_t5.handles(config):
        mc = llama.LlamaConfig.from_config(config.model)
        length = config.data.seq_len
        stage = loop.Stage(name="pretrain", init_params=lambda rng: llama.init(mc, rng),
                           loss_fn=pretrain.lm_loss_fn(mc), train_data=None)
        row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        row["loss_mask"] = np.zeros(length, np.float32)
        return StepSpec(stage, row, llama.flops_per_token(mc, length) * rows * length)
    model = pretrain_t5.build_model(config)
    dc = config.data
    layout = span_corruption.make_layout(span_corruption.denoisers_from_config(dc), format=dc.get("format", "t5"),
                                         inputs_length=dc.inputs_length, targets_length=dc.targets_length)
    if layout.format == "t5":
        loss_fn = pretrain_t5.t5_loss_fn(model.config)
        row = packing.pack_t5([], layout.inputs_length, layout.targets_length)
        flops = t5.flops_per_example(model.config, layout.inputs_length, layout.targets_length) * rows
    else:
        loss_fn = pretrain_t5.prefix_lm_loss_fn(model.config)
        row = packing.pack_prefix_lm([], layout.inputs_length)
        flops = llama.flops_per_token(model.config, layout.inputs_length) * rows * layout.inputs_length
    return StepSpec(loop.Stage(name="pretrain", init_params=model.init, loss_fn=loss_fn, train_data=None), row, flops)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[Any], topology: str = "cpu") -> Fit:
    """Compiles the pretraining train step of `config` (see `step_spec`) for `devices`; returns its
    per-device memory and FLOPs.

    Raises:
      config.ConfigError: `model.vocab_size` unset (it normally comes from the tokenizer), or bad
        `model.*` / `data.*` values.
      sharding.MeshError: the mesh does not fit the devices or the model.
    """
    from jaxllm.config import ConfigError

    if config.model.vocab_size <= 0:
        raise ConfigError("set --config.model.vocab_size (ahead-of-time compilation has no tokenizer)")
    mesh = Mesh(np.asarray(devices).reshape(sharding.resolve_mesh_shape(config.mesh.shape, len(devices))),
                sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    spec = step_spec(config)
    compiled = loop.compile_stage(config, spec.stage, mesh)
    rows = config.train.batch_size
    batch = {k: jax.ShapeDtypeStruct((rows, *v.shape), v.dtype,
                                     sharding=sharding.batch_sharding(mesh, config.mesh.rules, 1 + v.ndim))
             for k, v in spec.row.items()}
    common = dict(
        topology=topology, num_devices=len(devices), mesh_shape=dict(mesh.shape),
        param_bytes=_bytes_per_device(compiled.abstract_state.params),
        opt_state_bytes=_bytes_per_device(compiled.abstract_state.opt_state),
        batch_bytes=_bytes_per_device(batch), hbm_bytes=HBM_BYTES.get(topology.partition(":")[0], 0),
        flops=spec.flops_per_step / len(devices))
    try:
        with sharding.activate(mesh, config.mesh.rules):
            executable = compiled.train_step.lower(compiled.abstract_state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _out_of_memory_fit(str(e), common)
    memory = executable.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return Fit(**common, temp_bytes=memory.temp_size_in_bytes, total_bytes=total,
               argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
               alias_bytes=memory.alias_size_in_bytes)


_SIZE = r"([\d.]+)([KMGT]?)(?:i?B)?"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _size(match: re.Match, group: int) -> int:
    return int(float(match.group(group)) * _UNITS[match.group(group + 1)])


def _out_of_memory_fit(message: str, common: dict[str, Any]) -> Fit:
    """A Fit from the TPU compiler's refusal of a step that does not fit in HBM.

    XLA:TPU stops compiling when a program cannot fit and says why, in one of two forms (libtpu
    0.0.42): "Ran out of memory in memory space hbm. Used X of Y hbm ..." with a breakdown that
    lists "arguments A" and "HLO temp T", or "the total memory required for HLO temporaries (T)
    exceeds available HBM (Y)". Sizes are binary (G = GiB: v5e's 16 GiB shows as 15.48G available
    after 530M reserved). Missing parts are estimated: arguments = params + optimizer state + batch
    (per chip, from the shardings), total = arguments + temporaries. `hbm_bytes` becomes the
    compiler's available HBM, and the first line of the message goes to `error`.
    """
    estimated_args = common["param_bytes"] + common["opt_state_bytes"] + common["batch_bytes"]
    used = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
    temporaries = re.search(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", message)
    arguments = re.search(rf"^\s*arguments\s+{_SIZE}", message, re.M)
    temp = re.search(rf"^\s*HLO temp\s+{_SIZE}", message, re.M)
    args = _size(arguments, 1) if arguments else estimated_args
    hbm = common["hbm_bytes"]
    if used:
        total, hbm = _size(used, 1), _size(used, 3)
        temp_bytes = _size(temp, 1) if temp else max(total - args, 0)
    elif temporaries:
        temp_bytes, hbm = _size(temporaries, 1), _size(temporaries, 3)
        total = args + temp_bytes
    else:
        temp_bytes, total = -1, -1
    first_line = message.strip().splitlines()[0]
    return Fit(**{**common, "hbm_bytes": hbm}, temp_bytes=temp_bytes, total_bytes=total, argument_bytes=args,
               output_bytes=0, alias_bytes=0, error=first_line)


def suggest(config: ml_collections.ConfigDict, gen: str) -> list[Fit]:
    """Compiles for growing slices of generation `gen`; stops at the first that fits."""
    fits = []
    for shape in SLICES[gen]:
        topology = f"{gen}:{shape}"
        devices = topology_devices(topology)
        try:
            fit = compile_step(config, devices, topology)
        except sharding.MeshError:
            continue  # e.g. the global batch does not divide over this many chips
        fits.append(fit)
        if fit.fits:
            break
    return fits
