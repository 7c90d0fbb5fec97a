"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from cai_jax import models, sharding
from cai_jax.configs import MeshConfig, ModelConfig


def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape(MeshConfig(2, -1, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(MeshConfig(-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(MeshConfig(3, -1, 1), 8)
  with pytest.raises(ValueError, match="only 8 devices"):
    sharding.mesh_shape(MeshConfig(4, 4, 1), 8)


@pytest.mark.parametrize("data", ["2", 2.0, 2.5, True, 0, -2, None])
def test_mesh_dims_that_are_not_integers_are_one_line_errors(data):
  with pytest.raises(ValueError, match=r"^MeshConfig: data, fsdp and tensor must be positive "
                                       rf"integers or -1, got data={data!r} fsdp=-1 tensor=1$"):
    sharding.mesh_shape(MeshConfig(data, -1, 1), 8)


def test_mesh_uses_first_devices_when_smaller():
  mesh = sharding.make_mesh(MeshConfig(1, 2, 1))
  assert mesh.devices.size == 2 and mesh.axis_names == ("data", "fsdp", "tensor")


def test_unknown_rules_named():
  with pytest.raises(ValueError, match="bogus"):
    sharding.rules_for("bogus")


@pytest.mark.parametrize("rules,expected", [
    ("dp", P(None, None, None)),
    ("fsdp", P(None, "fsdp", None)),
    ("fsdp_tp", P(None, "fsdp", "tensor")),
])
def test_rule_presets_on_mlp_kernel(rules, expected):
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2, rules))
  cfg = ModelConfig()
  sh = sharding.logical_shardings(models.abstract_params(cfg), mesh, sharding.rules_for(rules))
  assert sh["layers"]["mlp"]["gate_proj"]["kernel"].spec == expected


def test_indivisible_dims_are_replicated():
  # 3 kv heads cannot be split over tensor=2: that dim stays replicated.
  cfg = ModelConfig(d_model=48, n_heads=6, n_kv_heads=3, d_ff=64)
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2, "fsdp_tp"))
  sh = sharding.logical_shardings(models.abstract_params(cfg), mesh, sharding.rules_for("fsdp_tp"))
  assert sh["layers"]["attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)
  assert sh["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)


def test_batch_sharding_splits_over_data_and_fsdp():
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2, "fsdp_tp"))
  s = sharding.batch_sharding(mesh, sharding.rules_for("fsdp_tp"), 2)
  assert s.spec == P(("data", "fsdp"), None)
  x = sharding.shard_batch({"t": jax.numpy.zeros((8, 4))}, mesh, sharding.rules_for("fsdp_tp"))["t"]
  assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (2, 4)


@pytest.mark.parametrize("rules,cached,expected", [
    ("fsdp_tp", False, P(("data", "fsdp"), "tensor", None)),   # sequence parallel stream
    ("fsdp_tp", True, P(("data", "fsdp"), None, None)),        # a cached (decode) step
    ("fsdp", False, P(("data", "fsdp"), None, None)),
])
def test_residual_stream_sharding(rules, cached, expected):
  """A decoder block's output (the residual stream) splits its positions over tensor under
  fsdp_tp for whole sequences, not for cached steps, and not under the other presets."""
  import jax.numpy as jnp
  from cai_jax import layers
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=32)
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2, rules))
  block = layers.DecoderBlock(cfg)
  x, pos = jnp.ones((4, 8, 16)), jnp.broadcast_to(jnp.arange(8), (4, 8))
  params = block.init(jax.random.PRNGKey(0), x, pos, jnp.full((4,), 8))
  cache = (jnp.zeros((4, 8, 2, 4)), jnp.zeros((4, 8, 2, 4))) if cached else None
  mask = jnp.ones((4, 8, 16), bool) if cached else jnp.full((4,), 8)
  with sharding.use_mesh(mesh, sharding.rules_for(rules)):
    out, _ = jax.jit(lambda p: block.apply(p, x, pos, mask, cache))(params)
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected), 3), out.sharding
