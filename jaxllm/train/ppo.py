"""PPO with a per-token KL penalty and a pretraining mix (InstructGPT step 3, Ouyang et al. 2022).

`jaxllm ppo --config configs/ppo.py:ARG` starts the policy from the SFT `params/` and the value
model from the reward model's; the reference (SFT) and the reward model stay frozen in the train
state's `extra`. One train step is one PPO iteration, jitted end to end:

1. Rollout: pure temperature sampling of up to `ppo.max_new_tokens` tokens per prompt
   (`sampling.rollout`), stopping at end-of-turn or eos.
2. Scoring: policy and reference log-probs of the response tokens with logits divided by the same
   temperature as the rollout, values from the value model, the reward model's score at the last
   response token (minus `missing_eos_penalty` when the response did not end with a stop token).
   With `safety_reward_from` set, Llama-2's two reward models (Touvron et al. 2023, section
   3.2.3): the score is `objectives.combined_reward` of the safety and the helpfulness model
   (`reward_from`) on the batch's `prompt_is_safety` tags (`prompts.safety_sources`). With
   `ppo.whiten_scores` the scores are whitened over the batch before they enter the rewards
   (Llama-2's `WHITEN(LOGIT(R_c))`); `objective/scores` always logs the raw ones.
3. Per-token reward `-kl_coef * KL_t` (k1/k2/k3, `objectives.kl_penalty`) plus the score at the
   last response token (Ziegler et al. 2019; Stiennon et al. 2020, eq. 1).
4. GAE (`objectives.gae`, gamma 1, lambda 0.95) and advantages whitened over real response tokens.
5. `ppo.epochs` x `ppo.minibatches` updates of `policy_loss + vf_coef * value_loss
   (+ ptx_coef * pretraining LM loss)`, each term a mean over the minibatch's response tokens
   (the ptx term over its real target tokens: InstructGPT eq. 2's `gamma E_pretrain[log pi]`, per
   token).
6. Adaptive KL coefficient (`objectives.adaptive_kl_coef`, Ziegler et al. 2019, section 2.2) when
   `ppo.adaptive_kl`, from the rollout's mean per-sequence KL, with `n` = the iteration's
   `train.batch_size` episodes.

The pretraining mix: each iteration reads one batch of `ppo.ptx_batch_size` rows, split into
`ppo.minibatches` chunks; minibatch j of every epoch uses chunk j, so each ptx row is seen once per
epoch (`ppo.epochs` times per iteration), as each rollout row is. Steps 1-4 are `collect`, the
loss of step 5 is `minibatch_loss`.

Learning-rate warmup and decay count optimizer updates (`steps x epochs x minibatches`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxllm import config as config_lib
from jaxllm import objectives
from jaxllm import sampling
from jaxllm.data import chat
from jaxllm.data import lm
from jaxllm.data import prompts as prompt_data
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.models import llama
from jaxllm.train import loop
from jaxllm.train import pretrain
from jaxllm.train import sft


PTX = "ptx/"  # key prefix of the pretraining-mix batch inside a PPO batch


def default_config() -> ml_collections.ConfigDict:
    """A complete PPO run config."""
    c = sft.default_config()
    c.stage = "ppo"
    c.init_from = "sft"
    c.reward_from = "reward"  # stage whose params/ give the reward model and the value model's start
    c.safety_reward_from = ""  # stage of a safety reward model: Llama-2's combined reward (module docstring)
    c.prompts = prompt_data.default_config()
    c.data = lm.default_config()  # the pretraining mix (used when ppo.ptx_coef > 0)
    c.data.eval_sources = ""
    c.ppo = ml_collections.ConfigDict()
    c.ppo.max_new_tokens = 64
    c.ppo.temperature = 1.0
    c.ppo.kl_coef = 0.05
    c.ppo.kl_estimator = "k1"  # objectives.KL_ESTIMATORS
    c.ppo.adaptive_kl = False
    c.ppo.kl_target = 6.0  # nats per sequence
    c.ppo.kl_horizon = 10000  # episodes
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.clip = 0.2
    c.ppo.vf_clip = 0.2
    c.ppo.vf_coef = 0.1
    c.ppo.epochs = 4
    c.ppo.minibatches = 4
    c.ppo.whiten_advantages = True
    c.ppo.missing_eos_penalty = 1.0  # subtracted from the score of a response without a stop token
    c.ppo.safety_threshold = 0.15  # with safety_reward_from: safety score below this probability wins
    c.ppo.whiten_scores = False  # whiten the reward-model scores over the batch (Llama-2)
    c.ppo.ptx_coef = 0.0  # InstructGPT's gamma; > 0 mixes in the pretraining LM loss
    c.ppo.ptx_batch_size = 8
    c.optimizer.update(lr=1e-5, min_lr=1e-6, warmup_steps=10, weight_decay=0.0)
    c.train.update(steps=100, batch_size=16, eval_every=0, log_every=1)
    c.sample.prompts = ()
    return c


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Mean over the logged iterations of each per-iteration metric."""
    count = max(sums.pop("count", 1.0), 1.0)
    out = {k: v / count for k, v in sums.items() if k not in ("grad_norm", "learning_rate")}
    out["loss"] = out.pop("loss_sum")
    return out


def response_view(prompt_tokens: jax.Array, prompt_lengths: jax.Array, responses: jax.Array, lengths: jax.Array):
    """Sequences of left-padded prompts followed by sampled responses, for scoring.

    Args:
      prompt_tokens: `[b, P]` left-padded; prompt_lengths: `[b]`.
      responses: `[b, N]` sampled tokens (padding after a stop); lengths: `[b]` tokens generated.

    Returns:
      `(seq, positions, segment_ids, P, N)` with `seq` `[b, P + N]` and segment 1 exactly on the
      real prompt and response tokens, and the response mask `[b, N]` float32.
    """
    p, n = prompt_tokens.shape[1], responses.shape[1]
    seq = jnp.concatenate([prompt_tokens, responses], axis=1)
    idx = jnp.arange(p + n)[None]
    first_real = (p - prompt_lengths)[:, None]
    segment_ids = ((idx >= first_real) & (idx < p + lengths[:, None])).astype(jnp.int32)
    positions = jnp.where(segment_ids > 0, idx - first_real, 0)
    mask = (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.float32)
    return (seq, positions, segment_ids, p, n), mask


def response_logprobs(config, params, view, temperature: float):
    """Log-probs `[b, N]` of the response tokens under `params` with logits divided by
    `temperature`, and those tempered logits `[b, N, vocab]` (response token t is predicted at
    sequence position P + t - 1)."""
    seq, positions, segment_ids, p, n = view
    logits = llama.apply(config, params, seq, positions, segment_ids)[:, p - 1: p + n - 1] / temperature
    return objectives.token_logprobs(logits, seq[:, p:]), logits


def response_values(config, params, view):
    """Values `[b, N]`: the scalar head at the position that predicts each response token."""
    seq, positions, segment_ids, p, n = view
    return llama.apply(config, params, seq, positions, segment_ids, head="scalar")[:, p - 1: p + n - 1]


def final_scores(config, reward_params, view, lengths):
    """The reward model's score `[b]` at the last response token."""
    seq, positions, segment_ids, p, _ = view
    scores = llama.apply(config, reward_params, seq, positions, segment_ids, head="scalar")
    return jnp.take_along_axis(scores, jnp.maximum(p + lengths - 1, 0)[:, None], axis=1)[:, 0]


def response_scores(config, extra, view, lengths, is_safety, *, safety_threshold: float = 0.15):
    """The reward `[b]` float32 of each response and `[b]` bool: whether the safety model gave it.

    One reward model (`extra["reward"]`): its score at the last response token, never the safety
    one's. With `extra["safety_reward"]` as well: Llama-2's `R_c` (`objectives.combined_reward`),
    the safety score where `is_safety` `[b]` or where it is below probability `safety_threshold`,
    else the helpfulness score (Touvron et al. 2023, section 3.2.3).
    """
    helpful = final_scores(config, extra["reward"], view, lengths)
    if "safety_reward" not in extra:
        return helpful, jnp.zeros(helpful.shape, jnp.bool_)
    safety = final_scores(config, extra["safety_reward"], view, lengths)
    score = objectives.combined_reward(safety, helpful, is_safety > 0, safety_threshold=safety_threshold)
    return score, score == safety


def ended_with_stop(responses: jax.Array, lengths: jax.Array, stop_ids) -> jax.Array:
    """`[b]` bool: the response's last token is a stop token (eos / end-of-turn)."""
    last = jnp.take_along_axis(responses, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.isin(last, jnp.asarray(stop_ids)) & (lengths > 0)


def collect(model_config: llama.LlamaConfig, c: ml_collections.ConfigDict, params, extra, batch, rng: jax.Array, *,
            stop_ids, pad_id: int, max_context: int):
    """Steps 1-4 of the module docstring: rollout, scoring, per-token rewards, advantages.

    Args:
      model_config: the policy's (and every other model's) architecture.
      c: the `ppo` config section.
      params: `{"policy", "value"}`; extra: `{"ref", "reward", ["safety_reward"], "kl_coef"}`.
      batch: `prompt_tokens` `[b, P]` left-padded, `prompt_lengths` `[b]`, `prompt_is_safety` `[b]`.
      rng: the rollout's key.

    Returns:
      `(rollout, aux)`, no gradients. `rollout` holds what the updates read: `seq`, `positions`,
      `segment_ids` `[b, P + N]` and `mask`, `old_logprobs`, `old_values`, `advantages`, `returns`
      `[b, N]`. `aux` holds the rest: `responses`, `sample_logprobs` (the sampler's own), `ref_logprobs`,
      `kl` (per-token estimate, 0 off the response), `rewards`, `entropy` `[b, N]`; `lengths`,
      `score` (raw, minus the missing-eos penalty), `final` (what enters the rewards), `ended`,
      `by_safety` `[b]`.
    """
    policy, value = params["policy"], params["value"]
    prompt_tokens, prompt_lengths = batch["prompt_tokens"], batch["prompt_lengths"]
    n_new = c.max_new_tokens

    # ---- 1. Rollout --------------------------------------------------------------------------
    out = sampling.rollout(model_config, policy, prompt_tokens, prompt_lengths, rng, max_new_tokens=n_new,
                           temperature=c.temperature, stop_ids=stop_ids, max_context=max_context, pad_id=pad_id)
    responses, lengths = out.tokens, out.lengths
    view, mask = response_view(prompt_tokens, prompt_lengths, responses, lengths)

    # ---- 2. Scoring --------------------------------------------------------------------------
    old_logprobs, logits = response_logprobs(model_config, policy, view, c.temperature)
    ref_logprobs, _ = response_logprobs(model_config, extra["ref"], view, c.temperature)
    old_values = response_values(model_config, value, view)
    ended = ended_with_stop(responses, lengths, stop_ids)
    score, by_safety = response_scores(model_config, extra, view, lengths, batch["prompt_is_safety"],
                                       safety_threshold=c.safety_threshold)
    score = score - c.missing_eos_penalty * (1.0 - ended.astype(jnp.float32))
    # Metrics report the raw scores; the rewards use the whitened ones when asked.
    final = objectives.whiten(score, jnp.ones_like(score)) if c.whiten_scores else score
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = -jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)

    # ---- 3-4. Rewards, advantages ------------------------------------------------------------
    kl = objectives.kl_penalty(old_logprobs, ref_logprobs, c.kl_estimator) * mask
    rewards = -extra["kl_coef"] * kl
    rewards = rewards + jax.nn.one_hot(jnp.maximum(lengths - 1, 0), n_new) * final[:, None] * (lengths > 0)[:, None]
    advantages, returns = objectives.gae(rewards, old_values, mask, gamma=c.gamma, lam=c.lam)
    if c.whiten_advantages:
        advantages = objectives.whiten(advantages, mask)
    seq, positions, segment_ids, _, _ = view
    rollout = dict(seq=seq, positions=positions, segment_ids=segment_ids, mask=mask, old_logprobs=old_logprobs,
                   old_values=old_values, advantages=advantages, returns=returns)
    aux = dict(responses=responses, sample_logprobs=out.logprobs, ref_logprobs=ref_logprobs, kl=kl, rewards=rewards,
               entropy=entropy, lengths=lengths, score=score, final=final, ended=ended, by_safety=by_safety)
    return jax.lax.stop_gradient((rollout, aux))


def minibatch_loss(model_config: llama.LlamaConfig, c: ml_collections.ConfigDict, params, m, ptx_chunk=None):
    """Step 5's loss of one minibatch: `policy_loss + vf_coef * value_loss (+ ptx_coef * ptx_loss)`.

    Args:
      params: `{"policy", "value"}` being trained.
      m: rows of `collect`'s `rollout` (`seq` `[mb, P + N]`, the rest `[mb, N]`).
      ptx_chunk: a pretraining-mix batch (`inputs`, `targets`, `positions`, `segment_ids`, `loss_mask`)
        or None; used when `c.ptx_coef > 0`.

    Returns:
      `(total, stats)`: the clipped policy and value losses (`objectives.ppo_policy_loss`,
      `objectives.ppo_value_loss`) each a mean over the minibatch's response tokens, the ptx term a
      mean over its real target tokens.
    """
    n_new = m["mask"].shape[1]
    mview = (m["seq"], m["positions"], m["segment_ids"], m["seq"].shape[1] - n_new, n_new)
    logprobs, _ = response_logprobs(model_config, params["policy"], mview, c.temperature)
    values = response_values(model_config, params["value"], mview)
    pl, ps = objectives.ppo_policy_loss(logprobs, m["old_logprobs"], m["advantages"], m["mask"], c.clip)
    vl, vs = objectives.ppo_value_loss(values, m["old_values"], m["returns"], m["mask"], c.vf_clip)
    n = jnp.maximum(ps["count"], 1.0)
    total = pl / n + c.vf_coef * vl / n
    stats = {"loss/policy": pl / n, "loss/value": vl / n, "policy/approxkl": ps["approxkl"] / n,
             "policy/clipfrac": ps["clipfrac"] / n, "policy/ratio": ps["ratio"] / n,
             "val/clipfrac": vs["clipfrac"] / n}
    if ptx_chunk is not None and c.ptx_coef > 0:
        lg = llama.apply(model_config, params["policy"], ptx_chunk["inputs"], ptx_chunk["positions"],
                         ptx_chunk["segment_ids"])
        ptx_sum, ptx_sums = objectives.lm_loss(lg, ptx_chunk["targets"], ptx_chunk["loss_mask"])
        ptx_loss = ptx_sum / jnp.maximum(ptx_sums["num_tokens"], 1.0)
        total = total + c.ptx_coef * ptx_loss
        stats["loss/ptx"] = ptx_loss
    return total, stats


def make_step(model_config: llama.LlamaConfig, config: ml_collections.ConfigDict, stop_ids, pad_id: int):
    """`(tx, schedule) -> step(state, batch) -> (state, metrics)`: one PPO iteration (module docstring)."""
    c = config.ppo
    n_new, epochs, minibatches = c.max_new_tokens, c.epochs, c.minibatches
    max_context = config.prompts.max_prompt_len + n_new

    def build(tx: optax.GradientTransformation, schedule: optax.Schedule):
        def step(state: loop.TrainState, batch):
            rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
            extra = state.extra
            b = batch["prompt_tokens"].shape[0]
            kl_coef = extra["kl_coef"]

            # ---- 1-4. Rollout, scoring, rewards, advantages ---------------------------------
            rollout, aux = collect(model_config, c, state.params, extra, batch, rng, stop_ids=stop_ids,
                                   pad_id=pad_id, max_context=max_context)

            # ---- 5. Epochs x minibatches ----------------------------------------------------
            mb = b // minibatches
            order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, 1000 + e), b)
                                     for e in range(epochs)]).reshape(epochs * minibatches, mb)
            ptx = {k[len(PTX):]: v for k, v in batch.items() if k.startswith(PTX)} or None

            def update(carry, xs):
                params, opt_state = carry
                rows, i = xs
                m = jax.tree.map(lambda x: x[rows], rollout)
                # Minibatch j of every epoch takes ptx chunk j (module docstring).
                chunk = None if ptx is None else jax.tree.map(
                    lambda x: x.reshape((minibatches, -1) + x.shape[1:])[i % minibatches], ptx)
                (total, stats), grads = jax.value_and_grad(
                    lambda q: minibatch_loss(model_config, c, q, m, chunk), has_aux=True)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                stats = {**stats, "loss": total, "grad_norm": optax.tree.norm(grads)}
                return (optax.apply_updates(params, updates), opt_state), stats

            (params, opt_state), stats = jax.lax.scan(
                update, (state.params, state.opt_state), (order, jnp.arange(epochs * minibatches)))
            stats = jax.tree.map(jnp.mean, stats)

            # ---- 6. KL controller, metrics --------------------------------------------------
            mask, returns, old_values = rollout["mask"], rollout["returns"], rollout["old_values"]
            score, lengths = aux["score"], aux["lengths"]
            seq_kl = jnp.sum(aux["kl"], axis=1)
            mean_kl = jnp.mean(seq_kl)
            new_kl_coef = kl_coef
            if c.adaptive_kl:  # one update per iteration of b episodes
                new_kl_coef = objectives.adaptive_kl_coef(kl_coef, mean_kl, c.kl_target, b, c.kl_horizon)
            residual = (returns - old_values) * mask
            var = lambda x: objectives.masked_mean(jnp.square(x - objectives.masked_mean(x, mask)), mask)  # noqa: E731
            metrics = {
                "count": jnp.ones(()),
                "loss_sum": stats.pop("loss"),
                "grad_norm": stats.pop("grad_norm"),
                "learning_rate": schedule(state.step * epochs * minibatches),
                **stats,
                "objective/kl": mean_kl,
                "objective/kl_coef": kl_coef,
                "objective/scores": jnp.mean(score),
                "objective/rlhf_reward": jnp.mean(score - kl_coef * seq_kl),
                "objective/entropy": objectives.masked_mean(aux["entropy"], mask),
                "val/var_explained": 1.0 - var(residual) / jnp.maximum(var(returns), 1e-8),
                "completions/mean_length": jnp.mean(lengths.astype(jnp.float32)),
                "completions/missing_eos_rate": 1.0 - jnp.mean(aux["ended"].astype(jnp.float32)),
            }
            if "safety_reward" in extra:
                metrics["objective/safety_reward_rate"] = jnp.mean(aux["by_safety"].astype(jnp.float32))
            new_state = loop.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                                        extra={**extra, "kl_coef": new_kl_coef})
            return new_state, metrics

        return step

    return build


def build_stage(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                mesh: jax.sharding.Mesh) -> loop.Stage:
    """The PPO `Stage`: policy+value trainable, reference+reward frozen in `extra`."""
    c = config.ppo
    if config.train.batch_size % c.minibatches:
        raise config_lib.ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by "
                                     f"ppo.minibatches={c.minibatches}")
    if c.temperature <= 0:
        raise config_lib.ConfigError("ppo.temperature must be > 0: PPO needs sampled rollouts")
    if c.kl_estimator not in objectives.KL_ESTIMATORS:
        raise config_lib.ConfigError(f"ppo.kl_estimator={c.kl_estimator!r}; expected one of {objectives.KL_ESTIMATORS}")
    reader = sft.init_model(config)
    sft.prepare_sources(config)
    pretrain.resolve_vocab(config, tokenizer)
    if not config.optimizer.decay_steps:
        config.optimizer.decay_steps = config.train.steps * c.epochs * c.minibatches
    model_config = llama.LlamaConfig.from_config(config.model)
    template = chat.template_for(tokenizer)
    common = dict(seed=config.seed, data_root=config.data_root, process_index=jax.process_index(),
                  process_count=jax.process_count())
    train_data = prompt_data.prompt_dataset(config.prompts, template, split="train",
                                            global_batch_size=config.train.batch_size, run_dir=config.run_dir,
                                            **common)
    if c.ptx_coef > 0:
        if c.ptx_batch_size % c.minibatches:
            raise config_lib.ConfigError(f"ppo.ptx_batch_size={c.ptx_batch_size} is not divisible by "
                                         f"ppo.minibatches={c.minibatches}")
        ptx = lm.lm_dataset(config.data, tokenizer, split="train", global_batch_size=c.ptx_batch_size,
                            cache_dir=lm.resolve_cache_dir(config.data, config.run_dir), **common)
        import grain  # noqa: PLC0415

        # Flat keys (`ptx/inputs`, ...): batches stay one level deep for `sharding.global_batch`.
        # Both are endless, but batched `len`s differ (sys.maxsize // batch size): zip equal slices.
        n = min(len(train_data), len(ptx))
        train_data = grain.experimental.ZipMapDataset([train_data[:n], ptx[:n]]).map(
            lambda pair: {**pair[0], **{f"{PTX}{k}": v for k, v in pair[1].items()}})

    if not 0.0 < c.safety_threshold < 1.0:
        raise config_lib.ConfigError(f"ppo.safety_threshold={c.safety_threshold} must be in (0, 1)")
    load_policy = sft.params_loader(config, reader, model_config, mesh)
    reward_reader = sft.init_model(config.copy_and_resolve_references(), config.reward_from)
    load_reward = sft.params_loader(config, reward_reader, model_config, mesh, config.reward_from, head="scalar")
    safety = config.get("safety_reward_from", "")
    if safety:
        safety_reader = sft.init_model(config.copy_and_resolve_references(), safety)
        load_safety = sft.params_loader(config, safety_reader, model_config, mesh, safety, head="scalar")

    def init_params(rng):
        return {"policy": llama.init(model_config, rng),
                "value": llama.init(model_config, jax.random.fold_in(rng, 1), head="scalar")}

    def init_extra(rng):
        extra = {"ref": llama.init(model_config, rng),
                 "reward": llama.init(model_config, jax.random.fold_in(rng, 1), head="scalar"),
                 "kl_coef": jnp.asarray(c.kl_coef, jnp.float32)}
        if safety:
            extra["safety_reward"] = llama.init(model_config, jax.random.fold_in(rng, 2), head="scalar")
        return extra

    def load_params(abstract):
        return {"policy": load_policy(abstract["policy"]), "value": load_reward(abstract["value"])}

    def load_extra(abstract):
        extra = {"ref": load_policy(abstract["ref"]), "reward": load_reward(abstract["reward"]),
                 "kl_coef": jnp.asarray(c.kl_coef, jnp.float32)}
        if safety:
            extra["safety_reward"] = load_safety(abstract["safety_reward"])
        return extra

    tokens = config.train.batch_size * (config.prompts.max_prompt_len + c.max_new_tokens)
    # Per iteration: rollout + 4 (5 with a safety RM) scoring forwards + epochs x (policy and value
    # forward+backward).
    flops = llama.flops_per_token(model_config, config.prompts.max_prompt_len + c.max_new_tokens) * tokens
    return loop.Stage(
        name=config.stage,
        init_params=init_params,
        loss_fn=None,
        train_data=train_data,
        flops_per_step=flops * ((5 + bool(safety)) / 3 + 2 * c.epochs),
        tokens_per_step=tokens,
        load_params=load_params,
        summarize=summarize,
        make_step=make_step(model_config, config, (template.end_id, template.eos_id), tokenizer.pad_id),
        init_extra=init_extra,
        load_extra=load_extra,
        export=lambda params: params["policy"],
    )


def run(config: ml_collections.ConfigDict) -> loop.Result:
    """Trains the policy with PPO; returns the loop's result."""
    return loop.run_stage(config, build_stage)
