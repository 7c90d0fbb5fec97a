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
  assert abs(h1[0]["loss_count"] - h4[0]["loss_count"]) < 0.5
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


def _hand_adamw(opt, params, grads, m, v, t):
  """One AdamW update (optax convention: lr of step t-1, bias correction t) in NumPy,
  global-norm clipping first, decay on kernels and embeddings only."""
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  gnorm = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for _, g in flat))
  clip = min(1.0, opt.grad_clip_norm / gnorm) if opt.grad_clip_norm else 1.0
  lr = float(steps.lr_schedule(opt)(t - 1))
  out_p = {}
  for path, g in flat:
    key = jax.tree_util.keystr(path)
    p = np.asarray(_leaf(params, path), np.float64)
    g = np.asarray(g, np.float64) * clip
    m[key] = opt.b1 * m.get(key, 0.0) + (1 - opt.b1) * g
    v[key] = opt.b2 * v.get(key, 0.0) + (1 - opt.b2) * g * g
    mhat, vhat = m[key] / (1 - opt.b1 ** t), v[key] / (1 - opt.b2 ** t)
    decay = opt.weight_decay if path[-1].key not in ("scale", "bias") else 0.0
    out_p[key] = p - lr * (mhat / (np.sqrt(vhat) + opt.eps) + decay * p)
  return out_p


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("scan", [True, False])
def test_train_step_equals_plain_grad_and_hand_adamw(scan):
  # The reference: jax.grad of the token-mean loss of the whole batch (one formula, no
  # microbatches), then clipping and AdamW written out in NumPy.
  cfg = dataclasses.replace(CFG, scan_layers=scan, qkv_bias=True)
  opt = dataclasses.replace(OPT, grad_clip_norm=0.05, weight_decay=0.5, learning_rate=1e-2)
  tx, sched = steps.make_optimizer(opt), steps.lr_schedule(opt)
  params = steps.models.init(cfg, jax.random.PRNGKey(0))
  state = steps.TrainState(step=np.zeros((), np.int32), params=params, opt_state=tx.init(params))
  fn = jax.jit(steps.make_train_step(cfg, tx, sched, num_microbatches=4))

  def mean_loss(p, b):
    lp = steps.models.token_logprobs(p, cfg, b["tokens"], b["mask"])
    w = (b["loss_mask"][:, 1:] & b["mask"][:, 1:]).astype(np.float32)
    return -(lp * w).sum() / w.sum()

  m, v = {}, {}
  for t in (1, 2):
    b = _batch(t)
    ref_loss, grads = jax.value_and_grad(mean_loss)(state.params, b)
    want = _hand_adamw(opt, state.params, grads, m, v, t)
    state, metrics = fn(state, b)
    assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
    ref_norm = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2))
                           for g in jax.tree_util.tree_leaves(grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(ref_norm, rel=1e-4)
    for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
      np.testing.assert_allclose(np.asarray(x), want[jax.tree_util.keystr(path)], rtol=2e-4,
                                 atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_weight_decay_skips_norm_scales_and_biases_of_any_rank():
  opt = dataclasses.replace(OPT, weight_decay=0.5, warmup_steps=0, schedule="constant")
  tx = steps.make_optimizer(opt)
  for scan in (True, False):
    cfg = dataclasses.replace(CFG, scan_layers=scan, qkv_bias=True)
    for head in ("lm", "scalar"):
      params = steps.models.init(cfg, jax.random.PRNGKey(0), head)
      params = jax.tree_util.tree_map(lambda p: p + 1.0, params)   # biases start at 0
      zero = jax.tree_util.tree_map(np.zeros_like, params)
      updates, _ = tx.update(zero, tx.init(params), params)        # decay alone moves params
      for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = path[-1].key
        moved = bool(np.any(np.asarray(u) != 0))
        assert moved == (name in ("kernel", "embedding")), (scan, head, jax.tree_util.keystr(path))
