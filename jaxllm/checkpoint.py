"""orbax checkpoints: train state + data-iterator state + config, and the params hand-off.

`RUN_DIR/<stage>/checkpoints/<step>/` holds three items: `state` (the sharded train state,
restored directly onto the current mesh), `data` (the grain iterator position of every process)
and `config` (the resolved config as JSON). orbax writes each step to a temporary directory and
renames it when complete (on Cloud Storage, where a rename is not atomic, it writes a
`commit_success` marker last), so a crash or `kill -9` mid-save leaves the previous step intact.
Directories may be local or `gs://` (`jaxllm.fs`).

`RUN_DIR/<stage>/params/` holds the final parameters: the input of the next stage, which restores
them resharded onto its own mesh.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxllm import config as config_lib
from jaxllm import fs


def default_config() -> ml_collections.ConfigDict:
    """The `checkpoint` section."""
    c = ml_collections.ConfigDict()
    c.every_steps = 500  # save every N steps (0 disables step-based saves)
    c.every_minutes = 30.0  # ... and at least this often in wall time (0 disables)
    c.keep = 3  # keep the N most recent checkpoints
    c.async_save = True  # write in a background thread while training continues
    return c


def manager(directory: str | os.PathLike, c: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A CheckpointManager saving on step and time intervals, keeping the newest `c.keep`."""
    policies: list[Any] = [checkpoint_managers.PreemptionCheckpointingPolicy()]
    if c.every_steps > 0:
        policies.append(checkpoint_managers.FixedIntervalPolicy(c.every_steps))
    if c.every_minutes > 0:
        policies.append(checkpoint_managers.ContinuousCheckpointingPolicy(
            minimum_interval_secs=int(c.every_minutes * 60)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep,
        enable_async_checkpointing=c.async_save,
        save_decision_policy=checkpoint_managers.AnySavePolicy(policies),
        cleanup_tmp_directories=True,
        create=True,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(fs.absolute(directory), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
    """Saves `step` if the policies say so (or `force`); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config_lib.to_dict(config)),
    )
    return mngr.save(step, args=args, force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the train state of `step` onto the shardings of `abstract_state` and moves
    `data_iterator` to where it was. Returns the state.

    Raises:
      ConfigError: if the checkpoint's arrays do not have the shapes of `abstract_state` (the run
        directory was written with a different model or optimizer config).
    """
    stored = mngr.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    try:
        _check_shapes(stored["params"], abstract_state.params, mngr.directory / str(step))
    except ValueError as e:
        raise config_lib.ConfigError(f"cannot resume: {e}. Use a new run_dir or the run's own config "
                                     f"({mngr.directory.parent / 'config.json'})") from None
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
    ))
    return restored["state"]


def export_params(directory: str | os.PathLike, params: Any) -> None:
    """Writes `params` to `directory` (the stage's `params/`), replacing what was there."""
    directory = fs.absolute(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params, force=True)
        ckptr.wait_until_finished()
    logging.info("exported params to %s", directory)


def load_params(directory: str | os.PathLike, abstract_params: Any) -> Any:
    """Restores params from `directory` onto the shardings of `abstract_params`.

    Raises:
      FileNotFoundError: if `directory` has no params (naming it).
      ValueError: if a parameter's shape differs from the model's (naming it).
    """
    directory = fs.absolute(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no params at {directory}: did the previous stage finish?")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(directory)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        _check_shapes(stored_tree, abstract_params, directory)
        return ckptr.restore(directory, abstract_params)


def _check_shapes(stored: Any, abstract: Any, directory: os.PathLike) -> None:
    def flat(tree):
        return {jax.tree_util.keystr(p, simple=True, separator="/"): v
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    flat_stored, flat_target = flat(stored), flat(abstract)
    missing = sorted(set(flat_target) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_target))
    if missing or extra:
        raise ValueError(f"{directory} does not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for key, target in flat_target.items():
        shape = tuple(getattr(flat_stored[key], "shape", ()))
        if shape != tuple(target.shape):
            raise ValueError(f"{directory}: {key} has shape {shape}, the model expects "
                             f"{tuple(target.shape)} (different model config or vocabulary?)")
