"""The pure pieces of PPO against a preference model (stage 5, ``cai_jax.stages.rl``).

A rollout batch is one fixed-shape array layout for every model that reads it:

  tokens          [B, P + N] int32  each row's prompt, then its sampled response, then pads
  mask            [B, P + N] bool   real (non-pad) tokens: a prefix of every row
  response_start  [B]        int32  the column of each row's first response token (its
                                    prompt length, 1..P)
  response_mask   [B, N]     bool   real response tokens (the actions)

Response token j of row b sits at column s = response_start[b] + j; its log-prob comes
from the logits at column s - 1 and the value V(s_j) of the state before it is the value
head's output at column s - 1. The heads run only at those N columns of each row, so
neither [B, P + N, V] logits nor their softmax exist. Rows are right-padded (real tokens
first), so the decoder runs with ``right_padded=True``: per-row key lengths and a causal
mask, which is cuDNN's fused attention kernel on a GPU in 16-bit
(``layers.fused_causal_impl``). A row's
numbers do not depend on the padding its batch needed.

``rollout`` turns a sampled batch plus the PM scores into everything an update needs:
policy log-probs (recomputed with one forward pass), reference log-probs, values,
per-token rewards = score at the last token - β·KL, GAE advantages and returns.
``make_policy_step`` / ``make_value_step`` build the jitted minibatch updates
(state, batch) -> (state, metrics). Units: log-probs in nats, scores / values / rewards
in PM-score units, KL in nats (per sequence where named so).

On a mesh (``mesh``/``rules`` arguments; multi-process runs included) the policy / value
TrainStates live in their logical shardings (``state_shardings``, ``init_state``), the
reference and PM params too (``models.place_params``), the update steps are jitted with those
shardings (state donated, metrics replicated scalars) and take minibatches placed with
``sharding.shard_batch`` over the batch shards; ``rollout`` places its batch the same way
and gathers its results to every process (``distributed.gather_to_host``). Without a
mesh everything runs unsharded as plain jits.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding, PartitionSpec

from cai_jax import checkpoints, distributed, losses, models, sharding
from cai_jax.configs import ModelConfig, OptimizerConfig, PPOConfig  # noqa: F401  (PPOConfig re-exported)
from cai_jax.steps import TrainState, lr_schedule, make_optimizer

Array = jax.Array
Params = Any
Batch = Dict[str, Array]
Metrics = Dict[str, Array]


def compiled_part(ppo: PPOConfig) -> PPOConfig:
  """ppo with every field that the jitted functions do not read set to its default, so
  runs that differ only in β, K, M, B, N or the controller share compiled programs."""
  return PPOConfig(kl_kind=ppo.kl_kind, gamma=ppo.gamma, lam=ppo.lam, clip=ppo.clip,
                   value_clip=ppo.value_clip, whiten_advantages=ppo.whiten_advantages,
                   value_loss_coef=ppo.value_loss_coef, temperature=ppo.temperature)


# --------------------------------------------------------------------------------------
# Placement on a mesh
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def state_shardings(config: ModelConfig, head: str, optimizer: OptimizerConfig, mesh, rules
                    ) -> TrainState:
  """NamedShardings of a TrainState (params and optimizer state) of that model."""
  return checkpoints.shardings_of(
      checkpoints.abstract_train_state(config, make_optimizer(optimizer), mesh, rules, head))


def _put(batch: Dict[str, Any], mesh, rules) -> Dict[str, Any]:
  return batch if mesh is None else sharding.shard_batch(batch, mesh, rules)


# --------------------------------------------------------------------------------------
# Batch layout
# --------------------------------------------------------------------------------------


def make_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               prompt_len: int, response_len: int) -> Dict[str, np.ndarray]:
  """Host arrays of a rollout batch (layout in the module docstring).

  prompts: B non-empty token lists (at most prompt_len each); responses: B token lists
  (at most response_len each; may be empty). Returns tokens [B, P + N] int32, mask
  [B, P + N] bool, response_start [B] int32, response_mask [B, N] bool with
  P = prompt_len, N = response_len.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  b = len(prompts)
  tokens = np.zeros((b, prompt_len + response_len), np.int32)
  mask = np.zeros((b, prompt_len + response_len), bool)
  start = np.zeros((b,), np.int32)
  response_mask = np.zeros((b, response_len), bool)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    p, r = [int(t) for t in p], [int(t) for t in r]
    if not p or len(p) > prompt_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens; need 1..{prompt_len}")
    if len(r) > response_len:
      raise ValueError(f"response {i} has {len(r)} tokens; at most {response_len} fit")
    tokens[i, :len(p) + len(r)] = p + r
    mask[i, :len(p) + len(r)] = True
    start[i] = len(p)
    response_mask[i, :len(r)] = True
  return {"tokens": tokens, "mask": mask, "response_start": start,
          "response_mask": response_mask}


def _logp_and_entropy(logits: Array, targets: Array, temperature: float = 1.0
                      ) -> Tuple[Array, Array]:
  """(log p(targets) [B, N], entropy [B, N]) of softmax(logits / temperature), logits
  [B, N, V] (nats): the distribution the rollouts were sampled from."""
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def response_values(params: Params, config: ModelConfig, tokens: Array, mask: Array,
                    start: Array, n: int) -> Array:
  """V(s_j) [B, N]: the scalar head at the column before each response token."""
  return models.values(params, config, tokens, mask, right_padded=True,
                       columns=models.continuation_columns(start, n))


# --------------------------------------------------------------------------------------
# Rollout analysis
# --------------------------------------------------------------------------------------


def _rollout(policy_cfg: ModelConfig, ref_cfg: ModelConfig, value_cfg: ModelConfig,
             ppo: PPOConfig, policy_params: Params, ref_params: Params, value_params: Params,
             batch: Batch, scores: Array, beta: Array) -> Dict[str, Array]:
  tokens, mask, rmask = batch["tokens"], batch["mask"], batch["response_mask"]
  start, n = batch["response_start"], rmask.shape[1]
  targets = models.continuation_tokens(tokens, start, n)
  logp, entropy = _logp_and_entropy(
      models.continuation_logits(policy_params, policy_cfg, tokens, mask, start, n), targets,
      ppo.temperature)
  ref_logp, _ = _logp_and_entropy(
      models.continuation_logits(ref_params, ref_cfg, tokens, mask, start, n), targets,
      ppo.temperature)
  values = response_values(value_params, value_cfg, tokens, mask, start, n)
  kl = losses.kl_per_token(logp, ref_logp, ppo.kl_kind)
  rewards = losses.kl_penalized_rewards(scores, logp, ref_logp, rmask, beta, ppo.kl_kind)
  adv, returns = losses.gae(rewards, values, rmask, ppo.gamma, ppo.lam)
  if ppo.whiten_advantages:
    adv = losses.whiten(adv, rmask)
  zero = lambda x: jnp.where(rmask, x, 0.0)
  return {
      "logp": zero(logp), "ref_logp": zero(ref_logp), "values": zero(values),
      "entropy": zero(entropy), "kl": zero(kl), "rewards": rewards,
      "advantages": zero(adv), "returns": returns,
  }


@functools.lru_cache(maxsize=None)
def _jitted_rollout(policy_cfg, ref_cfg, value_cfg, ppo):
  return jax.jit(functools.partial(_rollout, policy_cfg, ref_cfg, value_cfg, ppo))


def rollout(policy_params: Params, policy_cfg: ModelConfig, ref_params: Params,
            ref_cfg: ModelConfig, value_params: Params, value_cfg: ModelConfig,
            batch: Dict[str, Any], scores: Any, beta: float, ppo: PPOConfig, mesh=None,
            rules=None) -> Dict[str, np.ndarray]:
  """Everything the updates need for one sampled batch (one jitted forward of each model).

  batch: ``make_batch`` arrays (B rows, N response columns); scores: [B] PM score of each
  (prompt, response); beta: KL coefficient. mesh, rules: batch and scores are placed over
  the batch shards (B must divide over them; params should already be placed) and the
  results gathered to every process (a collective). Returns host arrays, all [B, N] and
  0 at response pads:
    logp: log π(a_t) recomputed under the policy (the "old" log-probs of the ratio);
    ref_logp: log π_ref(a_t); both, the policy loss's log-probs and the entropy are of
    the tempered distributions softmax(logits / ppo.temperature), the one sampled from
    (as TRL and OpenRLHF do); values: V(s_t) of the value model; entropy: entropy of
    the policy's next-token distribution at each response position (nats); kl: per-token
    KL estimate (``ppo.kl_kind``); rewards: -β·kl plus the score at the last real token;
    advantages: GAE (whitened over the batch if ``ppo.whiten_advantages``); returns:
    GAE returns (un-whitened advantages + values).
  """
  fn = _jitted_rollout(policy_cfg, ref_cfg, value_cfg, compiled_part(ppo))
  placed = _put(dict(batch, scores=np.asarray(scores, np.float32)), mesh, rules)
  scores = placed.pop("scores")
  out = fn(policy_params, ref_params, value_params, placed, scores, np.float32(beta))
  return {k: np.asarray(v) for k, v in distributed.gather_to_host(out).items()}


def rollout_metrics(ro: Dict[str, np.ndarray], response_mask: np.ndarray, scores: np.ndarray,
                    beta: float) -> Dict[str, float]:
  """Scalars logged per iteration from ``rollout``'s output (host side).

  reward / pm_score: mean score [B]; kl: mean over sequences of the summed per-token KL
  the rewards used (nats per sequence); sqrt_kl: sqrt(max(kl, 0)); entropy: mean policy
  entropy per response token (nats); response_length: mean N_i; penalized_reward: mean
  per-sequence sum of the per-token rewards; explained_variance: of the rollout values
  for the returns; beta: the coefficient used.
  """
  m = response_mask.astype(bool)
  count = max(int(m.sum()), 1)
  kl_seq = np.where(m, ro["kl"], 0.0).sum(axis=1)
  kl = float(kl_seq.mean())
  ev = float(losses.explained_variance(ro["values"], ro["returns"], m))
  score = float(np.mean(scores))
  return {
      "reward": score,
      "pm_score": score,
      "kl": kl,
      "sqrt_kl": float(np.sqrt(max(kl, 0.0))),
      "entropy": float(np.where(m, ro["entropy"], 0.0).sum() / count),
      "response_length": float(m.sum(axis=1).mean()),
      "penalized_reward": float(np.where(m, ro["rewards"], 0.0).sum(axis=1).mean()),
      "explained_variance": ev,
      "beta": float(beta),
  }


# --------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------


def policy_loss(params: Params, config: ModelConfig, ppo: PPOConfig, batch: Batch
                ) -> Tuple[Array, Metrics]:
  """Clipped-surrogate loss of one minibatch.

  batch: tokens, mask [b, P + N]; response_start [b]; response_mask, logp_old,
  advantages [b, N]. Returns (loss scalar, metrics: clip_frac, approx_kl, ratio_mean,
  entropy).
  """
  rmask, start = batch["response_mask"], batch["response_start"]
  n = rmask.shape[1]
  tokens = batch["tokens"]
  logits = models.continuation_logits(params, config, tokens, batch["mask"], start, n)
  logp, entropy = _logp_and_entropy(logits, models.continuation_tokens(tokens, start, n),
                                    ppo.temperature)
  loss, metrics = losses.ppo_policy_loss(logp, batch["logp_old"], batch["advantages"], rmask,
                                         ppo.clip)
  metrics = dict(metrics, entropy=jax.lax.stop_gradient(losses.masked_mean(entropy, rmask)))
  return loss, metrics


def value_loss(params: Params, config: ModelConfig, ppo: PPOConfig, batch: Batch
               ) -> Tuple[Array, Metrics]:
  """value_loss_coef · clipped value loss of one minibatch.

  batch: tokens, mask [b, P + N]; response_start [b]; response_mask, values_old,
  returns [b, N]. Returns (loss scalar, metrics: clip_frac, explained_variance,
  value_mean, return_mean).
  """
  rmask = batch["response_mask"]
  v = response_values(params, config, batch["tokens"], batch["mask"], batch["response_start"],
                      rmask.shape[1])
  loss, metrics = losses.ppo_value_loss(v, batch["values_old"], batch["returns"], rmask,
                                        ppo.value_clip)
  return ppo.value_loss_coef * loss, metrics


def _make_step(loss_fn, config: ModelConfig, ppo: PPOConfig, optimizer: OptimizerConfig,
               prefix: str):
  tx = make_optimizer(optimizer)
  schedule = lr_schedule(optimizer)

  def step(state: TrainState, batch: Batch) -> Tuple[TrainState, Metrics]:
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, config, ppo, batch), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"{prefix}_loss": loss, f"{prefix}_grad_norm": optax.tree.norm(grads),
               f"{prefix}_learning_rate": schedule(state.step)}
    metrics.update({f"{prefix}_{k}": v for k, v in aux.items()})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


@functools.lru_cache(maxsize=None)
def _jitted_step(loss_fn, config, ppo, optimizer, prefix, head, mesh, rules):
  step = _make_step(loss_fn, config, ppo, optimizer, prefix)
  if mesh is None:
    return jax.jit(step, donate_argnums=(0,))
  state = state_shardings(config, head, optimizer, mesh, rules)
  # Every minibatch field is [b, ...] with b split over the batch shards: a 1-d spec is a
  # prefix sharding for the [b] and [b, T] fields alike.
  batch = sharding.batch_sharding(mesh, rules, 1)
  return jax.jit(step, in_shardings=(state, batch),
                 out_shardings=(state, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))


def _placing(step, mesh, rules):
  if mesh is None:
    return step
  return lambda state, batch: step(state, sharding.shard_batch(batch, mesh, rules))


def make_policy_step(config: ModelConfig, ppo: PPOConfig, optimizer: OptimizerConfig, mesh=None,
                     rules=None):
  """Jitted (state, batch) -> (state, metrics) for the policy (state donated).

  batch as in ``policy_loss`` (host arrays; with a mesh they are placed over the batch
  shards and the state must be in ``state_shardings(config, 'lm', ...)``). Metrics
  (replicated scalars): policy_loss, policy_grad_norm, policy_learning_rate,
  policy_clip_frac, policy_approx_kl, policy_ratio_mean, policy_entropy.
  """
  step = _jitted_step(policy_loss, config, compiled_part(ppo), optimizer, "policy", "lm", mesh,
                      rules)
  return _placing(step, mesh, rules)


def make_value_step(config: ModelConfig, ppo: PPOConfig, optimizer: OptimizerConfig, mesh=None,
                    rules=None):
  """Jitted (state, batch) -> (state, metrics) for the value model (state donated).

  batch as in ``value_loss`` (placed as in ``make_policy_step``; state in
  ``state_shardings(config, 'scalar', ...)``). Metrics: value_loss, value_grad_norm,
  value_learning_rate, value_clip_frac, value_explained_variance, value_value_mean,
  value_return_mean.
  """
  step = _jitted_step(value_loss, config, compiled_part(ppo), optimizer, "value", "scalar", mesh,
                      rules)
  return _placing(step, mesh, rules)


def init_state(params: Params, optimizer: OptimizerConfig, config: Optional[ModelConfig] = None,
               head: str = "lm", mesh=None, rules=None) -> TrainState:
  """A fresh TrainState holding a COPY of params (the caller's arrays survive donation).

  With a mesh (and the model's config / head) the state is built in its logical
  shardings (``state_shardings``); params must hold the same values on every process.
  """
  tx = make_optimizer(optimizer)

  def make(p):
    p = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), p)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  if mesh is None:
    return make(params)
  shardings = state_shardings(config, head, optimizer, mesh, rules)
  params = sharding.place_tree(params, shardings.params)
  with sharding.use_mesh(mesh, rules):
    return jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def minibatches(ro: Dict[str, np.ndarray], batch: Dict[str, np.ndarray], ppo: PPOConfig,
                rng: np.random.Generator):
  """Yields (policy_batch, value_batch) for K epochs x M shuffled minibatches of size B / M.

  The shuffle of each epoch comes from `rng` (seed it per iteration for resumability).
  """
  b = batch["tokens"].shape[0]
  size = b // ppo.minibatches
  for _ in range(ppo.epochs):
    order = rng.permutation(b)
    for j in range(ppo.minibatches):
      idx = np.sort(order[j * size:(j + 1) * size])
      base = {k: batch[k][idx] for k in ("tokens", "mask", "response_start", "response_mask")}
      pol = dict(base, logp_old=ro["logp"][idx], advantages=ro["advantages"][idx])
      val = dict(base, values_old=ro["values"][idx], returns=ro["returns"][idx])
      yield pol, val
