"""The one generic training loop shared by every stage.

A stage (`pretrain`, `sft`, `reward`, `ppo`, `dpo`) hands over a `Stage`: how to initialise
parameters, its loss of (params, batch), and its data. Everything else lives here, top to bottom:

mesh -> optimizer -> shapes via `jax.eval_shape` -> shardings -> `jit(init, out_shardings=...)`
-> jitted `train_step` (gradient accumulation, donation) -> restore -> loop (eval, logging,
checkpoints, preemption) -> export of the final params.

Non-finite steps: a step whose loss, gradient norm or new params are NaN or infinite is skipped
inside the jitted step (params, optimizer state and a stage's extra state stay as they were; the
step counter and the data move on, so the batch is dropped) and counted in the metrics row of its window
(`nonfinite_steps`; `loss` and `grad_norm` average the applied steps only, null when there were
none). `train.max_nonfinite_steps` skipped steps in a row stop the run with `NonFiniteError`
(checked every `min(train.log_every, train.max_nonfinite_steps)` steps and at the end) before it
saves a checkpoint, exports `params/` or writes `done.json`. The skipped steps leave the state
finite, so the checkpoints already written hold the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import flax.struct
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from jaxllm import checkpoint as ckpt_lib
from jaxllm import config as config_lib
from jaxllm import fs
from jaxllm import sharding
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import optim
from jaxllm.train import progress

Batch = dict[str, jax.Array]
# loss_fn(params, batch, rng) -> (loss_sum, sums); sums["count"] is what the loss is normalised by
# (real target tokens, pairs, ...), summed over the global batch.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def default_config() -> ml_collections.ConfigDict:
    """The `train` section."""
    c = ml_collections.ConfigDict()
    c.steps = 1000  # optimizer steps
    c.batch_size = 32  # global batch in rows (sequences) per optimizer step
    c.grad_accum_steps = 1  # microbatches per step; batch_size must be divisible by it
    c.eval_every = 200  # evaluate every N steps and at the end (0: only at the end)
    c.eval_at_start = False  # also evaluate the initial params (step 0): the baseline of a fine-tuning stage
    c.eval_batches = 0  # 0: the whole eval split
    c.eval_batch_size = 0  # 0: train.batch_size
    c.log_every = 10
    c.sample_every = 0  # print sample generations every N steps (0: only at the end)
    c.peak_flops_per_device = 0.0  # 0: measured (CPU) or published (TPU/GPU) peak for MFU
    c.progress_bar = True
    c.max_nonfinite_steps = 10  # stop after this many skipped non-finite steps in a row (0: never stop)
    return c


class NonFiniteError(config_lib.ConfigError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss, gradient norm or update (a
    diverged run: the usual fixes are a lower `optimizer.lr`, gradient clipping or a longer
    warmup). A `ConfigError`, so the command line prints it as one line and exits with status 2."""


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: `step` (int32 scalar), `params`, `opt_state`, and a stage's
    `extra` state outside the optimizer (PPO: the frozen reference and reward models and the
    adaptive KL coefficient), checkpointed with the rest."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any = None


@dataclasses.dataclass
class Stage:
    """What a stage module gives the loop.

    Attributes:
      name: stage name; its files go to `RUN_DIR/<name>/`.
      init_params: `rng -> params` boxed with logical axes (`nn.LogicallyPartitioned`).
      loss_fn: see `LossFn`.
      train_data: the process-local training `grain.MapDataset` of `[local_batch, ...]` batches.
      eval_data: the process-local eval dataset (finite), a `{name: dataset}` mapping evaluated
        one by one (metrics `eval/<name>/<metric>`, plus `eval/<metric>` over all of them), or None.
      flops_per_step: model FLOPs of one optimizer step (for MFU), or 0.
      tokens_per_step: tokens processed per optimizer step (for tokens/s).
      load_params: optional `abstract_params -> params` restoring the previous stage's `params/`.
      summarize: `sums -> metrics` for train and eval rows (default: loss = loss_sum / count).
      sample_fn: optional `params -> list[str]` of generations printed during training.
      make_step: optional `(tx, schedule) -> step(state, batch) -> (state, metrics)` replacing the
        generic loss-based step (PPO's rollout-and-update iteration); metrics must include the
        sums `summarize` reads plus `grad_norm` and `learning_rate`.
      init_extra: optional `rng -> extra state` boxed with logical axes (for shapes and shardings).
      load_extra: optional `abstract_extra -> extra` giving its initial values.
      export: optional `params -> params` selecting what `params/` hands to the next stage
        (PPO: the policy without the value model).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: LossFn
    train_data: grain.MapDataset
    eval_data: grain.MapDataset | dict[str, grain.MapDataset] | None = None
    flops_per_step: float = 0.0
    tokens_per_step: int = 0
    load_params: Callable[[Any], Any] | None = None
    summarize: Callable[[dict[str, float]], dict[str, float]] | None = None
    sample_fn: Callable[[Any], list[str]] | None = None
    make_step: Callable[[optax.GradientTransformation, optax.Schedule], Callable] | None = None
    init_extra: Callable[[jax.Array], Any] | None = None
    load_extra: Callable[[Any], Any] | None = None
    export: Callable[[Any], Any] | None = None


def microbatches(batch: Batch, k: int) -> Batch:
    """Splits each `[batch, ...]` array into `[k, batch // k, ...]` microbatches.

    Row `i` goes to microbatch `i % k`, so every device's contiguous block of rows holds rows of
    every microbatch and the split moves no data between devices.
    """
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int, seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    Gradients of the summed loss are accumulated over `grad_accum_steps` microbatches and divided
    once by the total `count` of the global batch, so k microbatches of b rows give the same update
    as one batch of k*b rows.
    """
    def step_fn(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        if grad_accum_steps == 1:
            (loss_sum, sums), grads = grad_fn(state.params, batch, rng)
        else:
            def body(carry, xs):
                mb, i = xs
                (l, s), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                acc_l, acc_s, acc_g = carry
                return (acc_l + l, jax.tree.map(jnp.add, acc_s, s), jax.tree.map(jnp.add, acc_g, g)), None

            mbs = microbatches(batch, grad_accum_steps)
            first = jax.tree.map(lambda x: x[0], mbs)
            zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, first, rng)[0][1]))
            init = (jnp.zeros((), jnp.float32), zero_sums, jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, sums, grads) = jax.lax.scan(body, init, (mbs, jnp.arange(grad_accum_steps)))[0]

        denom = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss_sum": loss_sum, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), **sums}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


def skip_nonfinite(step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict]]):
    """Wraps `step_fn` so that a step whose `loss_sum` (when reported), `grad_norm` or updated params
    are not finite returns the state it was given, with only `step` advanced, and reports
    `nonfinite` (1.0 for a skipped step, else 0.0). The params are checked too because finite
    gradients can still give a non-finite update (an infinite learning rate, an overflow).

    The select runs inside the jitted step: no host sync, and the donated state is reused. As with
    `optax.apply_if_finite`, a skipped step does not advance the optimizer's own step count, so a
    schedule inside the optimizer runs one step behind `state.step` per skipped step.
    """
    def guarded(state: TrainState, batch: Batch):
        new, metrics = step_fn(state, batch)
        finite = jnp.isfinite(metrics["grad_norm"])
        for leaf in jax.tree.leaves(new.params):
            finite &= jnp.all(jnp.isfinite(leaf))
        if "loss_sum" in metrics:
            finite &= jnp.isfinite(metrics["loss_sum"])
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return kept.replace(step=new.step), {**metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}

    return guarded


def _default_summary(sums: dict[str, float]) -> dict[str, float]:
    return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (save, then exit cleanly).

    With several processes JAX's preemption service catches SIGTERM instead (installed by
    `jax.distributed.initialize`) and `CheckpointManager.reached_preemption` turns true on every
    process at the same step: hosts signalled a step apart would otherwise enter the checkpoint's
    collectives at different steps and hang.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        from jax._src import distributed

        if jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Result:
    """What `run` returns: the final step, the final state and whether it was preempted."""

    step: int
    state: TrainState
    preempted: bool
    eval_metrics: dict[str, float]


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Sums of the applied steps' metrics over a log window (all steps, giving NaN, when every
    one was skipped), the mean `grad_norm`, the last `learning_rate` and `nonfinite` skipped steps."""
    host = jax.device_get(rows)
    applied = [r for r in host if not r["nonfinite"]] or host
    sums = {k: float(sum(r[k] for r in applied)) for k in host[0]}
    sums["grad_norm"] = sums["grad_norm"] / len(applied)
    sums["learning_rate"] = float(host[-1]["learning_rate"])
    sums["nonfinite"] = float(sum(r["nonfinite"] for r in host))
    return sums


class _NonFiniteGuard:
    """Counts skipped (non-finite) steps in a row from the steps' `nonfinite` flags, fetched to the
    host every `every` steps, and raises `NonFiniteError` at `limit` in a row (0: never)."""

    def __init__(self, stage: str, limit: int, log_every: int):
        self.stage, self.limit = stage, limit
        self.every = max(min(log_every, limit) if limit else log_every, 1)
        self.flags: list[tuple[int, jax.Array]] = []
        self.run_start, self.run_length = 0, 0

    def add(self, step: int, metrics: dict) -> None:
        self.flags.append((step, metrics["nonfinite"]))

    def check(self) -> None:
        """Raises NonFiniteError once `limit` steps in a row were skipped."""
        flags, self.flags = self.flags, []
        for step, bad in zip([s for s, _ in flags], jax.device_get([f for _, f in flags])):
            if not bad:
                self.run_length = 0
                continue
            self.run_start = step if not self.run_length else self.run_start
            self.run_length += 1
            if self.limit and self.run_length >= self.limit:
                raise NonFiniteError(
                    f"{self.stage}: {self.run_length} steps in a row (steps {self.run_start}-{step}) had a "
                    f"non-finite loss, gradient norm or update and were skipped (train.max_nonfinite_steps="
                    f"{self.limit}); stopped without saving, exporting or marking the stage done. Lower "
                    f"optimizer.lr, clip gradients (optimizer.grad_clip) or lengthen optimizer.warmup_steps, "
                    f"then rerun: it resumes from the last checkpoint")


def evaluate(eval_step, params, data: Iterable[dict], mesh, rules, max_batches: int = 0) -> dict[str, float]:
    """Sums of `eval_step(params, batch)` over the eval split (or its first `max_batches`)."""
    totals: dict[str, float] = {}
    pending = []
    for i, local in enumerate(data):
        if max_batches and i >= max_batches:
            break
        pending.append(eval_step(params, sharding.global_batch(local, mesh, rules)))
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


@dataclasses.dataclass
class Compiled:
    """The jitted pieces of a stage on a mesh (see `compile_stage`)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    eval_step: Callable[[Any, Batch], dict]
    init_state: Callable[[], TrainState]
    state_from_params: Callable[[Any], TrainState]


def compile_stage(config: ml_collections.ConfigDict, stage: Stage, mesh: jax.sharding.Mesh) -> Compiled:
    """Optimizer, sharded state shapes and the jitted init/train/eval functions of `stage`.

    The state is created directly sharded (`jax.jit(init, out_shardings=...)`); the train step has
    explicit in/out shardings and donates the state. Call the functions inside
    `sharding.activate(mesh, config.mesh.rules)`.

    Raises:
      config.ConfigError: (a ValueError) if `train.batch_size` does not split into
        `train.grad_accum_steps` microbatches.
      sharding.MeshError: (a ValueError) if a microbatch's rows do not divide over the mesh's
        batch shards, or a parameter dimension does not divide over its mesh axes.
    """
    tc, rules = config.train, config.mesh.rules
    if tc.batch_size % tc.grad_accum_steps:
        raise config_lib.ConfigError(f"train.batch_size={tc.batch_size} is not divisible by "
                                     f"train.grad_accum_steps={tc.grad_accum_steps}")
    shards = sharding.batch_axis_size(mesh, rules)
    if (tc.batch_size // tc.grad_accum_steps) % shards:
        raise sharding.MeshError(f"microbatch of {tc.batch_size // tc.grad_accum_steps} rows is not divisible "
                                 f"by the {shards} batch shards of mesh {dict(mesh.shape)}")

    tx, schedule = optim.build(config.optimizer, tc.steps)
    rng = jax.random.key(config.seed)

    def init_boxed(key):
        params = stage.init_params(key)
        extra = stage.init_extra(jax.random.fold_in(key, 1)) if stage.init_extra else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optim.fit_state_axes(tx.init(params)),
                          extra=extra)

    abstract_boxed = jax.eval_shape(init_boxed, rng)
    sharding.check_divisible(abstract_boxed.params, mesh, rules)
    state_shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_boxed), state_shardings)

    # Batches arrive as global arrays already sharded over the batch axes (`sharding.global_batch`);
    # `None` keeps their shardings, whatever the rank of each field.
    step_fn = skip_nonfinite(stage.make_step(tx, schedule) if stage.make_step
                             else make_train_step(stage.loss_fn, tx, schedule, tc.grad_accum_steps, config.seed))
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def eval_fn(params, batch):
        loss_sum, sums = stage.loss_fn(params, batch, jax.random.key(0))
        return {"loss_sum": loss_sum, **sums}

    eval_step = jax.jit(eval_fn, in_shardings=(state_shardings.params, None),
                        out_shardings=sharding.replicated(mesh))
    init_jit = jax.jit(lambda k: nn.unbox(init_boxed(k)), out_shardings=state_shardings)
    from_params_jit = jax.jit(lambda p, e: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), e),
                              out_shardings=state_shardings)

    def state_from_params(params):
        extra = stage.load_extra(abstract_state.extra) if stage.load_extra else None
        return from_params_jit(params, extra)

    return Compiled(tx, schedule, abstract_state, state_shardings, train_step, eval_step,
                    lambda: init_jit(rng), state_from_params)


def run(config: ml_collections.ConfigDict, stage: Stage, mesh: jax.sharding.Mesh) -> Result:
    """Trains `stage` to `config.train.steps`, resuming from its latest checkpoint.

    Writes `RUN_DIR/<stage>/{checkpoints,params,metrics.jsonl,events.*}`.
    """
    tc = config.train
    rules = config.mesh.rules
    stage_dir = config_lib.stage_dir(config, stage.name)
    summarize = stage.summarize or _default_summary

    compiled = compile_stage(config, stage, mesh)
    abstract_state = compiled.abstract_state
    train_step, eval_step = compiled.train_step, compiled.eval_step
    with sharding.activate(mesh, rules):
        # ---- Data, checkpoints, restore ---------------------------------------------------------
        train_iter = iter(stage.train_data.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
        mngr = ckpt_lib.manager(stage_dir / "checkpoints", config.checkpoint)
        start = mngr.latest_step()
        if start is not None:
            logging.info("resuming %s from step %d", stage.name, start)
            state = ckpt_lib.restore(mngr, start, abstract_state, train_iter)
        else:
            start = 0
            if stage.load_params is not None:
                state = compiled.state_from_params(stage.load_params(abstract_state.params))
            else:
                state = compiled.init_state()
        # Rows past the restored step (all rows when a crash came before the first checkpoint)
        # are trained again: drop them so the file keeps one row per step.
        metrics_lib.truncate_metrics(stage_dir, start if start else -1)
        config_lib.save_json(config, stage_dir / "config.json")

        writer = metrics_lib.MetricWriter(stage_dir)
        peak, peak_source = metrics_lib.peak_flops(tc.peak_flops_per_device)
        logging.info("%s: %s params, peak %.3g FLOP/s (%s)", stage.name,
                     f"{sum(x.size for x in jax.tree.leaves(abstract_state.params)):,}", peak, peak_source)

        def run_eval(state, step, write_row=True):
            if stage.eval_data is None:
                return {}
            sets = stage.eval_data if isinstance(stage.eval_data, dict) else {"": stage.eval_data}
            out, total = {}, {}
            for name, data in sets.items():
                sums = evaluate(eval_step, state.params, data, mesh, rules, tc.eval_batches)
                for k, v in sums.items():
                    total[k] = total.get(k, 0.0) + v
                if name and len(sets) > 1:
                    out.update({f"eval/{name}/{k}": v for k, v in summarize(sums).items()})
            out.update({f"eval/{k}": v for k, v in summarize(total).items()})
            if write_row:
                writer.write(step, out)
            return out

        def run_samples(state, step):
            if stage.sample_fn is None:
                return
            params, context = state.params, contextlib.nullcontext()
            if jax.process_count() > 1:  # the sampler is a one-host program: gather, sample on process 0
                from jax.experimental import multihost_utils

                params = multihost_utils.process_allgather(params, tiled=True)
                context = sharding.activate(sharding.local_mesh(), rules)
            if jax.process_index() != 0:
                return
            with context:
                texts = stage.sample_fn(params)
            for text in texts:
                tqdm.tqdm.write(f"[sample @ {step}] {text!r}")
            fs.append_text(stage_dir / "samples.jsonl",
                           "".join(json.dumps({"step": step, "text": text}) + "\n" for text in texts))

        def train_row(rows):
            sums = _mean_rows(rows)
            nonfinite = sums.pop("nonfinite")
            return {**summarize(sums), "learning_rate": sums["learning_rate"], "grad_norm": sums["grad_norm"],
                    "nonfinite_steps": nonfinite}

        # ---- Loop -----------------------------------------------------------------------------
        bar = progress.progress_bar(total=tc.steps, initial=start, desc=stage.name,
                                    disable=not tc.progress_bar or jax.process_index() != 0)
        write = bar.write if jax.process_index() == 0 else (lambda text: None)  # progress: process 0 only
        pending: list[dict] = []
        eval_metrics: dict[str, float] = {}
        preempted = False
        timer_start, timer_steps = None, 0
        guard = _NonFiniteGuard(stage.name, tc.max_nonfinite_steps, tc.log_every)
        step = start
        if tc.eval_at_start and start == 0:
            eval_metrics = run_eval(state, 0)
            write("step 0: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        with _Preemption() as preemption:
            while step < tc.steps:
                batch = sharding.global_batch(next(train_iter), mesh, rules)
                state, step_metrics = train_step(state, batch)
                step += 1
                pending.append(step_metrics)
                guard.add(step, step_metrics)
                if timer_start is None:  # the first step compiles: time from its end
                    jax.block_until_ready(step_metrics)
                    timer_start = time.perf_counter()
                else:
                    timer_steps += 1
                bar.update(1)

                if pending and (step % tc.log_every == 0 or step == tc.steps):
                    row = train_row(pending)
                    if timer_steps:
                        elapsed = time.perf_counter() - timer_start
                        row["tokens_per_second"] = stage.tokens_per_step * timer_steps / elapsed
                        if peak and stage.flops_per_step:
                            row["mfu"] = stage.flops_per_step * timer_steps / elapsed / peak
                        timer_start, timer_steps = time.perf_counter(), 0
                    writer.write(step, row)
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "tokens_per_second") if k in row})
                    pending = []
                if step % guard.every == 0 or step == tc.steps or preemption.requested:
                    try:
                        guard.check()  # before this step's eval, checkpoint or export
                    except NonFiniteError:
                        if pending:
                            writer.write(step, train_row(pending))
                        bar.close()
                        writer.close()
                        mngr.wait_until_finished()
                        mngr.close()
                        raise
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    eval_metrics = run_eval(state, step)
                    write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                    timer_start, timer_steps = time.perf_counter(), 0  # do not count eval as training
                if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                    run_samples(state, step)
                    timer_start, timer_steps = time.perf_counter(), 0
                if preemption.requested or mngr.reached_preemption(step):
                    if pending:  # log the steps since the last row before stopping
                        writer.write(step, train_row(pending))
                    ckpt_lib.save(mngr, step, state, train_iter, config, force=True)
                    preempted = True
                    break
                # Building the save arguments costs ~0.6 ms of Python per step; ask the policy first.
                if step == tc.steps or mngr.should_save(step):
                    ckpt_lib.save(mngr, step, state, train_iter, config, force=step == tc.steps)
        bar.close()
        mngr.wait_until_finished()
        mngr.close()

        if preempted:
            logging.warning("%s: stopped by SIGTERM at step %d; checkpoint saved", stage.name, step)
            writer.close()
            return Result(step, state, True, eval_metrics)
        # ---- Hand-off: final eval, params/, done.json ------------------------------------------
        # A rerun at start == steps finishes a hand-off that a crash interrupted (after the export,
        # before done.json): it evaluates again but keeps the final eval row already written.
        exported = start == tc.steps and (stage_dir / "params").exists()
        if not exported or not (stage_dir / "done.json").exists():
            if not (step == 0 and tc.eval_at_start):  # `train.steps=0`: evaluated once, at the start
                logged = start == tc.steps and any(r["step"] == step and any(k.startswith("eval/") for k in r)
                                                   for r in metrics_lib.read_metrics(stage_dir))
                eval_metrics = run_eval(state, step, write_row=not logged)
            if eval_metrics:
                write(f"final step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
            if not exported:
                run_samples(state, step)
                ckpt_lib.export_params(stage_dir / "params", stage.export(state.params) if stage.export
                                       else state.params)
            if jax.process_index() == 0:
                done = metrics_lib.finite_or_none({"step": step, "eval": eval_metrics})
                fs.write_atomic(stage_dir / "done.json", json.dumps(done, indent=2, sort_keys=True) + "\n")
        writer.close()
        return Result(step, state, False, eval_metrics)


def abstract_params(init_params: Callable[[jax.Array], Any], mesh: jax.sharding.Mesh, rules) -> Any:
    """Shapes of `init_params(rng)`'s unboxed params as ShapeDtypeStructs carrying their shardings."""
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox_shapes(boxed),
                        shardings)


def unbox_shapes(boxed: Any) -> Any:
    """`jax.eval_shape` output of a boxed init, unboxed without sharding constraints (they cannot
    apply to shapes, e.g. inside `sharding.activate`)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def run_stage(config: ml_collections.ConfigDict, build_stage: Callable[..., Stage]) -> Result:
    """Mesh, a check of any published checkpoint the stage starts from (`jaxllm.hub.spec.preflight`),
    the run's tokenizer (trained, or the checkpoint's, on first use), then `run` on
    `build_stage(config, tokenizer, mesh)`."""
    from jaxllm.data import tokenizer as tokenizer_lib
    from jaxllm.hub import spec as hub_spec

    mesh = sharding.make_mesh(config.mesh)
    sharding.log_mesh(mesh)
    # A published checkpoint that cannot be used fails here, before the run directory is touched.
    for key, head in (("init_from", "lm"), ("reward_from", "scalar"), ("safety_reward_from", "scalar")):
        if hub_spec.is_external(str(config.get(key, "") or "")):
            hub_spec.preflight(config, config[key], head=head, tokenizer=key == "init_from")
    tokenizer = tokenizer_lib.load_or_train(config, config.run_dir)
    return run(config, build_stage(config, tokenizer, mesh), mesh)
