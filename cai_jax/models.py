"""Pure functional interface to the decoder: init, logits, token_logprobs, score.

Parameters are explicit pytrees (no boxes); everything here is jit-able.
Stages use only these functions, never Flax modules directly.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax import sharding
from cai_jax.configs import ModelConfig
from cai_jax.transformer import Decoder, last_token_index

Array = jax.Array
Params = Any


def module(config: ModelConfig, head: str = "lm") -> Decoder:
  return Decoder(config, head=head)


def init_boxed(config: ModelConfig, rng: Array, head: str = "lm", seq_len: int = 8) -> Params:
  """Parameters still wrapped in nn.Partitioned boxes (carry logical axis names)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return module(config, head).init(rng, tokens)["params"]


def init(config: ModelConfig, rng: Array, head: str = "lm") -> Params:
  """Random parameters (plain arrays). For sharded init see ``cai_jax.sharding``."""
  return nn.meta.unbox(init_boxed(config, rng, head))


def abstract_params(config: ModelConfig, head: str = "lm") -> Params:
  """ShapeDtypeStructs of the parameters (boxed), without allocating anything."""
  return jax.eval_shape(lambda: init_boxed(config, jax.random.PRNGKey(0), head))


def count_params(config: ModelConfig, head: str = "lm") -> int:
  """Exact number of parameters, from eval_shape (no weights allocated)."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(abstract_params(config, head)))
  return int(sum(x.size for x in leaves))


def logits(params: Params, config: ModelConfig, tokens: Array,
           mask: Optional[Array] = None, right_padded: bool = False,
           columns: Optional[Array] = None) -> Array:
  """Next-token logits [B, T, V] (float32) for tokens [B, T].

  right_padded: every row of mask [B, T] is real tokens then pads (see
  ``transformer.Decoder``); lets a fused causal attention kernel run.
  columns: optional [B, K] int32; the LM head runs only at those columns of each row and
  the result is [B, K, V] (``Decoder``'s head_columns).
  """
  return module(config).apply({"params": params}, tokens, mask, right_padded=right_padded,
                              head_columns=columns)


def token_logprobs(params: Params, config: ModelConfig, tokens: Array,
                   mask: Optional[Array] = None, right_padded: bool = False) -> Array:
  """log p(tokens[:, t+1] | tokens[:, :t+1]) as [B, T-1] float32 (right_padded: as ``logits``)."""
  lg = logits(params, config, tokens, mask, right_padded)[:, :-1]
  logp = jax.nn.log_softmax(lg, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def continuation_columns(start: Array, n: int) -> Array:
  """[B, N] int32 columns start - 1 + j, j < N: where the state before continuation token
  j sits, for continuations starting at column start [B] (>= 1) of each row."""
  return start.astype(jnp.int32)[:, None] - 1 + jnp.arange(n, dtype=jnp.int32)[None, :]


def continuation_tokens(tokens: Array, start: Array, n: int) -> Array:
  """[B, N] int32: tokens [B, T] at columns start + j (the continuation's tokens; the
  columns must lie inside T)."""
  return jnp.take_along_axis(tokens, continuation_columns(start, n) + 1, axis=1).astype(jnp.int32)


def continuation_logits(params: Params, config: ModelConfig, tokens: Array, mask: Array,
                        start: Array, n: int) -> Array:
  """Logits [B, N, V] float32 that predict continuation tokens j < N of right-padded rows.

  tokens, mask: [B, T], each row a prompt, then its continuation starting at column
  start [B] (1 <= start, start + N <= T), then pads (real tokens first: the fused
  attention path). The LM head runs at those N columns only.
  """
  return logits(params, config, tokens, mask, right_padded=True,
                columns=continuation_columns(start, n))


def values(params: Params, config: ModelConfig, tokens: Array,
           mask: Optional[Array] = None, right_padded: bool = False,
           columns: Optional[Array] = None) -> Array:
  """Scalar-head output at every position, [B, T] float32 (right_padded, columns: as
  ``logits``; with columns [B, K] the result is [B, K])."""
  return module(config, "scalar").apply({"params": params}, tokens, mask,
                                        right_padded=right_padded, head_columns=columns)


def score(params: Params, config: ModelConfig, tokens: Array,
          mask: Optional[Array] = None, right_padded: bool = False) -> Array:
  """Scalar-head output at the last real token of each sequence, [B] float32
  (right_padded: as ``logits``)."""
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  return values(params, config, tokens, mask, right_padded,
                columns=last_token_index(mask)[:, None])[:, 0]


def score_right_padded(params: Params, config: ModelConfig, tokens: Array, mask: Array) -> Array:
  """``score`` of right-padded rows (real tokens first), [B] float32: the fused-attention
  path, for ``sampler.apply_batched``, which calls fn(params, config, *fields)."""
  return score(params, config, tokens, mask, right_padded=True)


@functools.lru_cache(maxsize=None)
def _param_shardings(config: ModelConfig, head: str, mesh, rules):
  with sharding.use_mesh(mesh, rules):
    return sharding.logical_shardings(abstract_params(config, head), mesh, rules)


def param_shardings(config: ModelConfig, head: str, mesh, rules) -> Any:
  """NamedShardings of a `head` ('lm' | 'scalar') model's params on the mesh (logical rules)."""
  return _param_shardings(config, head, mesh, sharding.hashable_rules(rules))


def place_params(params: Any, config: ModelConfig, mesh, rules, head: str = "lm") -> Any:
  """params (host arrays holding the same global values on every process, or jax arrays)
  in their logical sharding on the mesh: no copy for arrays already so placed, safe in
  multi-process runs (``sharding.place_tree``). Unchanged without a mesh.

  Raises ValueError when params has another number of arrays than the model."""
  if mesh is None:
    return params
  shardings = jax.tree_util.tree_leaves(param_shardings(config, head, mesh, rules),
                                        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if len(leaves) != len(shardings):
    raise ValueError(f"params have {len(leaves)} arrays but a {head!r}-head model of this config "
                     f"has {len(shardings)}")
  return jax.tree_util.tree_unflatten(treedef, sharding.place_tree(leaves, shardings))
