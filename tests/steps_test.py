"""Train step: sharded == single device, microbatching == one batch, loss falls, schedules."""

import dataclasses

import jax
import numpy as np
import pytest

from cai_jax import sharding, steps
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, weight_decay=0.1, schedule="cosine",
                      total_steps=20)


def _batch(seed=0, batch=8, length=24):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[: batch // 2, length - 6:] = False           # some right padding
  loss_mask = mask.copy()
  loss_mask[:, : length // 3] = False               # a "prompt" that is not trained
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _run(mesh_cfg, devices, num_micro, n_steps=3, batches=None):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.rules_for(mesh_cfg.rules)
  tx, sched = steps.make_optimizer(OPT), steps.lr_schedule(OPT)
  init = lambda: steps.init_state_boxed(CFG, tx, jax.random.PRNGKey(0))
  state, shardings = sharding.sharded_init(init, mesh, rules)
  batches = batches or [_batch(i) for i in range(n_steps)]
  bsh = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in batches[0].items()}
  history = []
  with sharding.use_mesh(mesh, rules):
    fn = steps.jit_train_step(steps.make_train_step(CFG, tx, sched, num_micro), shardings, bsh)
    for b in batches:
      state, m = fn(state, sharding.shard_batch(b, mesh, rules))
      history.append(jax.tree_util.tree_map(float, m))
  return state, history


def test_8_device_2x2x2_mesh_matches_one_device():
  ref, ref_hist = _run(MeshConfig(1, 1, 1, "dp"), jax.devices()[:1], 1)
  for rules in ("fsdp_tp", "fsdp"):
    out, hist = _run(MeshConfig(2, 2, 2, rules), jax.devices(), 1)
    for a, b in zip(ref_hist, hist):
      assert abs(a["loss"] - b["loss"]) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(out.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert int(out.step) == 3
    # Parameters really are sharded on the 2x2x2 mesh.
    spec = out.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor" if rules == "fsdp_tp" else None)


def test_microbatches_give_the_same_update():
  one, h1 = _run(MeshConfig(1, 1, 1, "dp"), jax.devices()[:1], 1, n_steps=2)
  four, h4 = _run(MeshConfig(1, 1, 1, "dp"), jax.devices()[:1], 4, n_steps=2)
  assert abs(h1[0]["loss"] - h4[0]["loss"]) < 1e-5
  assert abs(h1[0]["tokens"] - h4[0]["tokens"]) < 0.5
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_loss_counts_only_loss_mask_tokens():
  b = _batch()
  params = steps.models.init(CFG, jax.random.PRNGKey(0))
  total, count = steps.lm_loss_sums(params, CFG, b)
  assert count == (b["loss_mask"][:, 1:] & b["mask"][:, 1:]).sum()
  # Independent computation from log-softmax.
  lp = np.asarray(steps.models.token_logprobs(params, CFG, b["tokens"], b["mask"]))
  w = b["loss_mask"][:, 1:] & b["mask"][:, 1:]
  np.testing.assert_allclose(float(total), -(lp * w).sum(), rtol=1e-5)


def test_loss_falls_on_a_fixed_batch():
  batch = _batch(7)
  _, hist = _run(MeshConfig(1, 1, 1, "dp"), jax.devices()[:1], 1, batches=[batch] * 15)
  assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]


def test_schedule_warmup_then_cosine():
  s = steps.lr_schedule(OPT)
  assert float(s(0)) == 0.0
  assert abs(float(s(2)) - 3e-3) < 1e-9
  assert abs(float(s(20)) - 3e-3 * OPT.final_lr_fraction) < 1e-8
  const = steps.lr_schedule(dataclasses.replace(OPT, schedule="constant", warmup_steps=0))
  assert float(const(0)) == float(const(100)) == pytest.approx(3e-3)


def test_grad_clipping_bounds_the_update():
  opt = dataclasses.replace(OPT, grad_clip_norm=1e-3, warmup_steps=0, schedule="constant")
  tx = steps.make_optimizer(opt)
  params = steps.models.init(CFG, jax.random.PRNGKey(0))
  grads = jax.tree_util.tree_map(lambda p: np.full(p.shape, 10.0, np.float32), params)
  state = tx.init(params)
  import optax
  clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, state[0])
  assert float(optax.tree.norm(clipped)) == pytest.approx(1e-3, rel=1e-4)
  assert len(state) == 2  # clip + adamw; with grad_clip_norm=0 the clip stage is gone
  assert len(steps.make_optimizer(dataclasses.replace(opt, grad_clip_norm=0.0)).init(params)) == 1
