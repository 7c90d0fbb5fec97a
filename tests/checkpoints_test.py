"""Tests of cai_jax.checkpoints: orbax save / restore / resume and params export."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import checkpoints, sharding, steps
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig

CFG = ModelConfig()
TX = steps.make_optimizer(OptimizerConfig())


def _init_fn(cfg):
  return lambda: steps.init_state_boxed(cfg, TX, jax.random.PRNGKey(0))


def _abstract(cfg, mesh, rules="fsdp"):
  return checkpoints.abstract_state(_init_fn(cfg), mesh, sharding.rules_for(rules))


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh222():
  return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def state1(mesh1):
  """A TrainState of the default tiny model on one device."""
  state, _ = sharding.sharded_init(_init_fn(CFG), mesh1, sharding.rules_for("fsdp"))
  return state


def _filled(state, seed):
  """Same structure, dtypes and shardings, every leaf (step, opt_state too) random and non-zero."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      v = rng.integers(1, 10_000, x.shape)
    else:
      v = rng.standard_normal(x.shape)
    return jax.device_put(np.asarray(v, dtype=x.dtype), x.sharding)
  return jax.tree.map(fill, state)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_bit_exact(got, want_host):
  assert jax.tree.structure(got) == jax.tree.structure(want_host)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want_host)):
    g = np.asarray(g)
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


def _assert_shardings(got, target):
  for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
    assert g.sharding == t.sharding


def test_save_restore_bit_exact(tmp_path, state1):
  state = _filled(state1, 0)
  want = _host(state)
  with checkpoints.CheckpointManager(tmp_path, save_every=10) as mngr:
    assert mngr.save(10, state, {"next_index": 1234})
    # The save has copied to host: the caller may donate the buffers right away.
    for x in jax.tree.leaves(state):
      x.delete()
  # A new manager, as a resumed run would open it.
  with checkpoints.CheckpointManager(tmp_path, save_every=10) as mngr:
    assert mngr.latest_step() == 10
    restored, data_state = mngr.restore(checkpoints.as_abstract(state1))
  assert isinstance(restored, steps.TrainState)
  _assert_bit_exact(restored, want)
  assert int(restored.step) == int(want.step) and int(want.step) != 0
  assert data_state == {"next_index": 1234}
  assert (tmp_path / "10" / "data_state" / "data_state.json").exists()


def test_restore_onto_different_mesh(tmp_path, state1, mesh222):
  state = _filled(state1, 1)
  want = _host(state)
  with checkpoints.CheckpointManager(tmp_path) as mngr:
    mngr.save(7, state, force=True)
  target = _abstract(CFG, mesh222, "fsdp_tp")
  with checkpoints.CheckpointManager(tmp_path, read_only=True) as mngr:
    restored, data_state = mngr.restore(target)
  _assert_bit_exact(restored, want)
  _assert_shardings(restored, target)
  assert data_state is None
  q = restored.params["layers"]["attn"]["q_proj"]["kernel"]  # [L, embed, heads, head_dim]
  assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
  mu = restored.opt_state[1][0].mu["layers"]["attn"]["q_proj"]["kernel"]
  assert mu.sharding == q.sharding


def test_data_state_round_trip_per_step(tmp_path, state1):
  grain_like = {"next_index": 17, "epoch": 2, "name": "sl/train", "nested": {"a": [1, 2.5, None]}}
  with checkpoints.CheckpointManager(tmp_path, save_every=1, keep=None) as mngr:
    mngr.save(1, state1, None)
    mngr.save(2, state1, grain_like)
    with pytest.raises(TypeError, match="JSON"):
      mngr.save(3, state1, {"bad": object()})
    with pytest.raises(TypeError, match="JSON object"):
      mngr.save(3, state1, [1, 2])
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2]
    target = checkpoints.as_abstract(state1)
    assert mngr.restore(target, step=1)[1] is None
    assert mngr.restore(target, step=2)[1] == grain_like
    assert mngr.restore(target)[1] == grain_like


def test_keep_newest_n(tmp_path, state1):
  with checkpoints.CheckpointManager(tmp_path, save_every=1, keep=2) as mngr:
    for step in (1, 2, 3, 4):
      assert mngr.save(step, _filled(state1, step), {"step": step})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 4]
    _, data_state = mngr.restore(checkpoints.as_abstract(state1), step=3)
    assert data_state == {"step": 3}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_save_every_k_and_force(tmp_path, state1):
  with checkpoints.CheckpointManager(tmp_path, save_every=3, keep=None) as mngr:
    written = []
    for step in range(1, 8):
      written.append(mngr.save(step, state1))
      # A save still being written is never reported as a finished step.
      assert all(mngr.step_directory(s).exists() for s in mngr.all_steps())
    assert written == [False, False, True, False, False, True, False]
    assert mngr.should_save(9) and not mngr.should_save(8) and not mngr.should_save(6)
    assert mngr.save(7, state1, force=True)       # end of training
    assert not mngr.save(7, state1, force=True)   # already saved: skipped, not overwritten
    assert not mngr.save(6, state1, force=True)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 6, 7]
    assert mngr.latest_step() == 7
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "6", "7"]


def test_unfinished_save_is_ignored_and_cleaned(tmp_path, state1):
  want = _host(_filled(state1, 2))
  with checkpoints.CheckpointManager(tmp_path, save_every=1) as mngr:
    mngr.save(2, _filled(state1, 2), {"i": 2})
  # A crash in the middle of writing step 5 leaves its temporary directory behind,
  # with files that look like a checkpoint.
  shutil.copytree(tmp_path / "2", tmp_path / "5.orbax-checkpoint-tmp")
  with checkpoints.CheckpointManager(tmp_path, save_every=1) as mngr:
    assert mngr.all_steps() == [2]
    restored, data_state = mngr.restore(checkpoints.as_abstract(state1))
    _assert_bit_exact(restored, want)
    assert data_state == {"i": 2}
    mngr.save(3, state1)  # waits for the start-up cleanup of leftovers
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]


def test_mismatch_names_first_path_and_both_shapes(tmp_path, state1, mesh1):
  with checkpoints.CheckpointManager(tmp_path) as mngr:
    mngr.save(4, state1, force=True)
  small = _abstract(ModelConfig(d_model=32), mesh1)
  with checkpoints.CheckpointManager(tmp_path, read_only=True) as mngr:
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
      mngr.restore(small)
  err = info.value
  assert isinstance(err, ValueError)
  message = str(err)
  assert "\n" not in message
  assert "params/embed/embedding has shape (320, 64) in the checkpoint but (320, 32) is expected" in message
  assert message.startswith(f"checkpoint {tmp_path / '4'} does not match")
  assert err.path == "params/embed/embedding"
  assert err.saved[0] == (320, 64) and err.expected[0] == (320, 32)


def test_mismatch_names_missing_and_extra_keys(tmp_path, state1, mesh1):
  with checkpoints.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, state1, force=True)
  with checkpoints.CheckpointManager(tmp_path, read_only=True) as mngr:
    with pytest.raises(checkpoints.CheckpointMismatchError, match="not in the checkpoint") as info:
      mngr.restore(_abstract(ModelConfig(qkv_bias=True), mesh1))
    assert info.value.path == "params/layers/attn/k_proj/bias"
    assert info.value.saved is None and info.value.expected[0] == (2, 2, 16)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="not in the target") as info:
      mngr.restore(_abstract(ModelConfig(tie_embeddings=True), mesh1))
    assert info.value.path == "params/lm_head/kernel"
    assert "(64, 320)" in str(info.value)


def test_no_checkpoint_errors_name_the_directory(tmp_path, state1):
  target = checkpoints.as_abstract(state1)
  missing = tmp_path / "no_such_run"
  with pytest.raises(checkpoints.CheckpointNotFoundError, match=str(missing)):
    checkpoints.CheckpointManager(missing, read_only=True).restore(target)
  assert not missing.exists()
  with checkpoints.CheckpointManager(tmp_path / "empty") as mngr:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
      mngr.restore(target)
    mngr.save(5, state1, force=True)
    mngr.wait_until_finished()
    with pytest.raises(checkpoints.CheckpointNotFoundError, match=r"step 4 .*finished steps: \[5\]"):
      mngr.restore(target, step=4)
  with pytest.raises(checkpoints.CheckpointNotFoundError, match=str(missing)):
    checkpoints.load_params(missing, target.params)
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="params export"):
    checkpoints.load_params(tmp_path / "empty", target.params)  # a run root, not an export
  with pytest.raises(ValueError, match="read-only"):
    checkpoints.CheckpointManager(tmp_path / "empty", read_only=True).save(6, state1, force=True)


def test_params_export_round_trip_onto_other_mesh(tmp_path, state1, mesh222):
  params = _filled(state1, 3).params
  want = _host(params)
  out = checkpoints.export_params(params, tmp_path / "sl_final")
  assert out == tmp_path / "sl_final" and (out / "_METADATA").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["sl_final"]  # no temporary left behind
  target = _abstract(CFG, mesh222, "fsdp_tp").params
  loaded = checkpoints.load_params(out, target)
  _assert_bit_exact(loaded, want)
  _assert_shardings(loaded, target)

  other = _filled(state1, 4).params
  with pytest.raises(FileExistsError, match="sl_final"):
    checkpoints.export_params(other, out)
  checkpoints.export_params(other, out, overwrite=True)
  _assert_bit_exact(checkpoints.load_params(out, target), _host(other))

  small = _abstract(ModelConfig(d_model=32), mesh222, "fsdp_tp").params
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"embed/embedding has shape \(320, 64\)"):
    checkpoints.load_params(out, small)


def test_dtype_mismatch_and_cast_and_default_placement(tmp_path, mesh222):
  w = np.arange(64, dtype=np.float32).reshape(8, 8) / 7
  all_axes = jax.sharding.PartitionSpec(("data", "fsdp", "tensor"))
  spread = jax.device_put(w, jax.sharding.NamedSharding(mesh222, all_axes))
  out = checkpoints.export_params({"w": spread}, tmp_path / "p")
  target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.bfloat16)}  # no sharding given
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="w has dtype float32 in the checkpoint but bfloat16 is expected"):
    checkpoints.load_params(out, target)
  loaded = checkpoints.load_params(out, target, allow_dtype_cast=True)
  assert loaded["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(loaded["w"]), np.asarray(jnp.asarray(w).astype(jnp.bfloat16)))
  # Without a sharding the array lands on this process's first device, not the saved 8-way layout.
  assert loaded["w"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def test_signature_paths_are_slash_joined(state1):
  sig = checkpoints.tree_signature(checkpoints.as_abstract(state1))
  assert list(sig)[:2] == ["step", "params/embed/embedding"]
  assert sig["params/layers/attn/q_proj/kernel"] == ((2, 64, 4, 16), np.dtype(np.float32))
  assert sig["opt_state/1/0/count"] == ((), np.dtype(np.int32))


def test_a_relative_directory_is_taken_from_the_working_directory(tmp_path, monkeypatch, state1):
  monkeypatch.chdir(tmp_path)
  with checkpoints.CheckpointManager("run", save_every=1) as mngr:
    assert mngr.save(1, state1, {"i": 1})
  with checkpoints.CheckpointManager("run", read_only=True) as mngr:
    assert mngr.directory == tmp_path / "run" and mngr.all_steps() == [1]
    assert mngr.restore(checkpoints.as_abstract(state1))[1] == {"i": 1}


def test_steps_are_ascending_and_restore_takes_the_newest(tmp_path, state1):
  """A forced save of a step older than the newest (orbax lists steps in save order)."""
  with checkpoints.CheckpointManager(tmp_path, save_every=3, keep=None) as mngr:
    assert mngr.save(6, state1, {"step": 6})
    assert mngr.save(5, state1, {"step": 5}, force=True)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [5, 6] and mngr.latest_step() == 6
    assert mngr.restore(checkpoints.as_abstract(state1))[1] == {"step": 6}


def test_data_state_is_taken_when_save_returns(tmp_path, state1, monkeypatch):
  """The async save writes the JSON later, in orbax's thread: what save hands orbax is a
  copy, so a nested dict the caller changes after save returns is saved as it was."""
  handed, json_save = [], checkpoints.ocp.args.JsonSave
  monkeypatch.setattr(checkpoints.ocp.args, "JsonSave",
                      lambda item: handed.append(item) or json_save(item))
  data_state = {"epoch": 1, "parent": {"next_index": 17}}
  with checkpoints.CheckpointManager(tmp_path, save_every=1) as mngr:
    assert mngr.save(1, state1, data_state)
    data_state["epoch"], data_state["parent"]["next_index"] = 2, 18
    mngr.wait_until_finished()
    assert handed == [{"epoch": 1, "parent": {"next_index": 17}}]
    assert mngr.restore(checkpoints.as_abstract(state1))[1] == handed[0]
