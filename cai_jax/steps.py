"""Pure jitted training steps: (state, batch) -> (state, metrics).

A batch is a dict of host arrays with a leading batch dim B:
  tokens    [B, T] int32  token ids
  mask      [B, T] bool   real (non-pad) tokens, right-padded: True then False per row
  loss_mask [B, T] bool   tokens whose prediction is trained (assistant tokens); the
                          prediction of tokens[:, t] comes from position t - 1, so
                          loss_mask[:, 0] is ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from cai_jax import axes, models
from cai_jax.configs import ModelConfig, OptimizerConfig
from cai_jax.layers import constrain

Array = jax.Array
Batch = Dict[str, Array]
Metrics = Dict[str, Array]


@flax.struct.dataclass
class TrainState:
  """Everything a training run checkpoints besides the data iterator.

  step: scalar int32, number of optimizer updates applied.
  params: model parameters (plain arrays).
  opt_state: optax state of ``make_optimizer``.
  """

  step: Array
  params: Any
  opt_state: Any


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup 0 -> peak over warmup_steps, then constant or cosine to the fraction."""
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.learning_rate)
  else:
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.final_lr_fraction)
  if cfg.warmup_steps == 0:
    return after
  warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


_NO_DECAY_NAMES = ("scale", "bias")


def _param_name(path: Tuple[Any, ...]) -> str:
  """The Flax name of a param leaf ('kernel', 'scale', ...): its last dict key (a boxed
  leaf's path ends in the box's '.value')."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def _decay_mask(params: Any) -> Any:
  """Weight decay on weight matrices and embeddings only, never on norm scales or biases,
  whatever their rank (under scan_layers a norm scale is [layers, embed]; a q/k/v bias is
  [heads, head_dim])."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _param_name(path) not in _NO_DECAY_NAMES, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on ``lr_schedule``."""
  parts = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


def init_state_boxed(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: Array,
                     head: str = "lm", params: Any = None) -> TrainState:
  """A fresh TrainState whose leaves keep their logical-axis boxes (for sharded_init).

  If `params` (boxed or plain) is given it is used instead of a random init.
  """
  if params is None:
    params = models.init_boxed(model_cfg, rng, head)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def lm_loss_sums(params: Any, model_cfg: ModelConfig, batch: Batch) -> Tuple[Array, Array]:
  """(sum of token cross-entropies over loss_mask, number of counted tokens), float32.

  The batch is right-padded (real tokens first in every row, as ``cai_jax.data`` builds
  it), so attention runs with per-row lengths and a causal mask (``right_padded``).
  """
  logits = models.logits(params, model_cfg, batch["tokens"], batch["mask"],
                         right_padded=True)[:, :-1]
  targets = batch["tokens"][:, 1:].astype(jnp.int32)
  weights = (batch["loss_mask"][:, 1:] & batch["mask"][:, 1:]).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  xent = logz - target_logit
  return jnp.sum(xent * weights), jnp.sum(weights)


def _split_microbatches(batch: Batch, n: int) -> Batch:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={n}")
    y = x.reshape((n, x.shape[0] // n) + x.shape[1:])
    names = (None, axes.BATCH) + (((axes.LENGTH,) + (None,) * (x.ndim - 2)) if x.ndim >= 2 else ())
    return constrain(y, names)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, num_microbatches: int = 1,
                    loss_sums: Callable = lm_loss_sums) -> Callable[[TrainState, Batch], Tuple[TrainState, Metrics]]:
  """Builds the pure step (not jitted; see ``jit_train_step``).

  The loss is the mean over all counted tokens of the whole batch, whatever the
  number of microbatches, so accumulation changes memory, not the result.
  `loss_sums(params, model_cfg, batch) -> (sum, count)` defines the objective.
  """

  def step(state: TrainState, batch: Batch) -> Tuple[TrainState, Metrics]:
    micro = _split_microbatches(batch, num_microbatches)

    def micro_grad(carry, mb):
      grad_acc, loss_acc, count_acc = carry
      (loss_sum, count), grads = _value_and_grad_sums(loss_sums, state.params, model_cfg, mb)
      grad_acc = jax.tree_util.tree_map(jnp.add, grad_acc, grads)
      return (grad_acc, loss_acc + loss_sum, count_acc + count), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grad_sum, loss_sum, count), _ = jax.lax.scan(
        micro_grad, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "loss_count": count,   # what the loss averages over: trained tokens, pairs or rows
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def _value_and_grad_sums(loss_sums, params, model_cfg, batch):
  """((loss_sum, count), d loss_sum / d params)."""
  (s, c), g = jax.value_and_grad(lambda p: loss_sums(p, model_cfg, batch), has_aux=True)(params)
  return (s, c), g


def jit_train_step(step_fn: Callable, state_shardings: Any, batch_shardings: Any) -> Callable:
  """jax.jit of a step with explicit shardings and the state donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
