"""Direct preference optimisation (Rafailov et al. 2023; Zephyr's recipe, Tunstall et al. 2023).

`jaxllm dpo --config configs/dpo.py:ARG` starts the policy from the SFT `params/`; the reference
is the same SFT model, whose sequence log-probabilities (sum over response tokens) are computed
once before training for the train groups the run will read (`train.steps x train.batch_size`
rows of the shuffled train view, one group each or packed) and for every eval group, cached in `RUN_DIR/dpo/reference/`,
and looked up per preference group. A cached table is keyed by the reference params' values
(`params_fingerprint`, wherever they were loaded from), the rendered groups
(`PreferenceGroups.fingerprint`: sources, tokenizer, template, seq_len, truncation, K), the packing
and the `model` section; any change recomputes it.
Losses: sigmoid (with cDPO label smoothing), IPO, hinge (`objectives.dpo_loss`); metrics use
TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
`logps/chosen`, `logps/rejected`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxllm import config as config_lib
from jaxllm import fs
from jaxllm import objectives
from jaxllm import scoring
from jaxllm import sharding
from jaxllm.data import lm
from jaxllm.data import preference
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import pretrain
from jaxllm.train import reward
from jaxllm.train import sft


def default_config() -> ml_collections.ConfigDict:
    """A complete DPO run config."""
    c = sft.default_config()
    c.stage = "dpo"
    c.init_from = "sft"
    c.data = preference.default_config()
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"  # one of objectives.DPO_LOSSES
    c.dpo.label_smoothing = 0.0  # cDPO
    c.optimizer.update(lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0)
    c.train.update(steps=200, batch_size=16, eval_every=100, log_every=10)
    return c


def group_logps(model_config: llama.LlamaConfig, params, batch) -> jax.Array:
    """Summed response log-probabilities `[G, K]` float32 of a preference batch, in the group order
    of `preference.flat_groups` (`G = b`, or `b * S` for packed rows: summed per segment); the
    token log-probs are chunked over positions when `model.loss_chunk_size > 0` (`jaxllm.scoring`)."""
    b, k, length = batch["inputs"].shape
    flat = lambda x: x.reshape(b * k, length)  # noqa: E731
    logps, _ = scoring.target_logprobs(model_config, params, flat(batch["inputs"]), flat(batch["positions"]),
                                       flat(batch["segment_ids"]), flat(batch["targets"]))
    logps = logps * flat(batch["loss_mask"])  # [b*K, L]
    if batch["response_mask"].ndim == 2:
        return jnp.sum(logps, axis=-1).reshape(b, k)
    in_segment = flat(batch["segment_ids"])[..., None] == jnp.arange(1, batch["response_mask"].shape[1] + 1)
    per_segment = jnp.sum(jnp.where(in_segment, logps[..., None], 0.0), axis=1)  # [b*K, S]
    return preference.segments_to_groups(per_segment, b, k)


def dpo_loss_fn(model_config: llama.LlamaConfig, c: ml_collections.ConfigDict):
    """`loss_fn(params, batch, rng) -> (loss_sum, sums)`; the batch carries `ref_logps` `[groups, 2]`."""

    def loss_fn(params, batch, rng):
        del rng
        logps = group_logps(model_config, params, batch)
        groups = preference.flat_groups(batch)
        ref, valid = groups["ref_logps"], groups["response_mask"]
        pair_mask = valid[:, 0] * valid[:, 1]
        return objectives.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=c.beta,
                                   loss_type=c.loss_type, label_smoothing=c.label_smoothing, pair_mask=pair_mask)

    return loss_fn


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Per-pair means of the loss and of TRL's DPO statistics."""
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss_sum"] / count}
    out.update({k: v / count for k, v in sums.items() if "/" in k})
    return out


def params_fingerprint(params, mesh: jax.sharding.Mesh) -> str:
    """sha256 (hex) identifying `params` by their values, computed where they live.

    Each leaf's bits (as unsigned ints) are summed modulo 2^32 with two sets of odd weights of the
    element's flat index, on the mesh: integer sums are exact in any order, so the result does not
    depend on the sharding, and no process gathers the params. Any change of one element changes
    both sums; the host hashes them with each leaf's path, shape and dtype.
    """
    def sums(x):
        x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
        if x.dtype.itemsize not in (1, 2, 4):
            x = x.astype(jnp.float32)
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        u = bits.astype(jnp.uint32)
        index, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for d in reversed(range(x.ndim)):  # the flat index, without reshaping the sharded array
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
            stride *= x.shape[d]
        odd = 2 * index + 1
        return jnp.stack([jnp.sum(u * odd * jnp.uint32(0x9E3779B1)),
                          jnp.sum((u ^ (u >> 15)) * odd * jnp.uint32(0x85EBCA77))])

    values = jax.device_get(jax.jit(lambda p: jax.tree.map(sums, p), out_shardings=sharding.replicated(mesh))(params))
    leaves = [(jax.tree_util.keystr(path), list(x.shape), str(x.dtype), [int(v) for v in s])
              for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(values))]
    return hashlib.sha256(json.dumps(leaves).encode("utf-8")).hexdigest()


def reference_table(model_config, ref_params, make_data, num_groups: int, mesh, rules, path: os.PathLike,
                    needed: np.ndarray | None = None, key: str = "") -> np.ndarray:
    """Reference log-probs `[num_groups, 2]` float32 (DPO groups are pairs) of the groups `needed`, cached at `path`.

    `make_data(positions)` gives the finite preference dataset of those kept-group positions (in
    order); `needed` None means every group. Groups not computed hold NaN. A table cached under the
    same `key` (what the values depend on: reference params, data, rendering; see `build_stage`)
    is reused, and only the needed groups it lacks are computed and added (a longer run after a
    shorter one); another key starts afresh. Each global batch is evaluated on the mesh and its
    results are replicated, so every process holds the whole table. The file (`.npz`: `table`,
    `key`) is replaced atomically.
    """
    want = np.arange(num_groups) if needed is None else np.asarray(needed, np.int64)
    table = None
    path = fs.path(path)
    if path.exists():
        with path.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as cached:
            table = cached["table"] if str(cached["key"]) == key else None
    if table is None or table.shape[0] != num_groups:
        table = np.full((num_groups, 2), np.nan, np.float32)
    missing = want[np.isnan(table[want]).any(axis=1)]
    if not len(missing):
        return table
    forward = jax.jit(lambda p, b: (group_logps(model_config, p, b), b["group_index"]),
                      out_shardings=sharding.replicated(mesh))  # every process gets the whole batch
    count = 0
    with sharding.activate(mesh, rules):
        for local in make_data(missing):
            batch = sharding.global_batch(local, mesh, rules)
            logps, index, valid = jax.device_get(forward(ref_params, batch) + (batch["response_mask"],))
            groups = preference.flat_groups({"response_mask": np.asarray(valid), "group_index": np.asarray(index)})
            keep = groups["response_mask"].any(axis=1)  # padding groups and unused segments
            table[groups["group_index"][keep]] = np.asarray(logps)[keep]
            count += int(keep.sum())
    if jax.process_index() == 0:
        with fs.atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, table=table, key=np.array(key))
    logging.info("reference log-probs of %d groups (%d of %d cached before) -> %s", count,
                 len(want) - len(missing), num_groups, path)
    return table


def with_reference(data, table: np.ndarray):
    """Adds `ref_logps` (`[b, K]`, packed `[b, S, K]`) to each batch of `data` by its `group_index`.

    Padding groups and unused segments (no response) get 0: their `group_index` 0 may name a
    group whose reference was not computed (NaN), and NaN times a zero mask is still NaN.
    """

    def add(batch):
        used = batch["response_mask"].any(axis=-1, keepdims=True)
        return {**batch, "ref_logps": np.where(used, table[batch["group_index"]], 0.0).astype(np.float32)}

    return data.map(add)


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh) -> loop.Stage:
    """The DPO `Stage`; computes (or loads) the cached reference log-probs first."""
    if config.data.max_responses != 2:
        raise config_lib.ConfigError("DPO needs pairs: set data.max_responses=2")
    reader = sft.init_model(config)
    sft.prepare_sources(config)
    pretrain.resolve_vocab(config, tokenizer)
    model_config = llama.LlamaConfig.from_config(config.model)
    tc, dc, rules = config.train, config.data, config.mesh.rules
    sources = dict(tokenizer=tokenizer, seed=config.seed, cache_dir=lm.resolve_cache_dir(dc, config.run_dir),
                   data_root=config.data_root)
    layout = dict(process_index=jax.process_index(), process_count=jax.process_count())
    eval_batch = tc.eval_batch_size or tc.batch_size

    load_policy = sft.params_loader(config, reader, model_config, mesh)  # the reference is the starting policy
    abstract = loop.abstract_params(lambda rng: llama.init(model_config, rng), mesh, rules)
    ref_params = load_policy(abstract)
    ref_dir = config_lib.stage_dir(config) / "reference"
    ref_key = {"params": params_fingerprint(ref_params, mesh), "model": config_lib.to_dict(config.model),
               "groups_per_row": dc.groups_per_row}

    def key(groups):  # what a cached table's values depend on (module docstring)
        payload = json.dumps({**ref_key, "groups": groups.fingerprint()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    # Reference log-probs of the train groups this run reads (steps x batch rows of the shuffled
    # view, packed or not), computed once through in-order views with the same group indices.
    def in_order(g):
        return lambda only: preference.batch_groups(g.view(only), global_batch_size=eval_batch,
                                                    groups_per_row=dc.groups_per_row, **layout)

    train_groups = preference.preference_groups(dc, split="train", **sources)
    table = reference_table(model_config, ref_params, in_order(train_groups), train_groups.num_groups, mesh, rules,
                            ref_dir / "train.npz", key=key(train_groups),
                            needed=preference.visited_groups(train_groups, tc.steps * tc.batch_size, dc.groups_per_row))
    train_data = with_reference(preference.batch_groups(train_groups, global_batch_size=tc.batch_size,
                                                        groups_per_row=dc.groups_per_row, **layout), table)
    eval_data = {}
    for spec in filter(None, dc.eval_sources.split(";")):
        one = dc.copy_and_resolve_references()
        one.eval_sources = spec
        name = reward.eval_name(spec)
        eval_groups = preference.preference_groups(one, split="eval", **sources)
        eval_table = reference_table(model_config, ref_params, in_order(eval_groups), eval_groups.num_groups, mesh,
                                     rules, ref_dir / f"eval_{name}.npz", key=key(eval_groups))
        eval_data[name] = with_reference(in_order(eval_groups)(None), eval_table)
    del ref_params
    sequences = tc.batch_size * 2
    return loop.Stage(
        name=config.stage,
        init_params=lambda rng: llama.init(model_config, rng),
        loss_fn=dpo_loss_fn(model_config, config.dpo),
        train_data=train_data,
        eval_data=eval_data or None,
        flops_per_step=llama.flops_per_token(model_config, dc.seq_len) * sequences * dc.seq_len,
        tokens_per_step=sequences * dc.seq_len,
        load_params=load_policy,
        summarize=summarize,
        sample_fn=sft.chat_sample_fn(config, tokenizer, model_config, dc.seq_len) if config.sample.prompts else None,
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Trains the policy with DPO; returns the loop's result."""
    return loop.run_stage(config, build_stage)
