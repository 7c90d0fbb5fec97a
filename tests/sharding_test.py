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


@pytest.mark.parametrize("rules,length,expected", [
    ("fsdp_tp", 8, P(("data", "fsdp"), "tensor", None)),   # sequence parallel residual stream
    ("fsdp_tp", 1, P(("data", "fsdp"), None, None)),       # one decode position: not padded
    ("fsdp", 8, P(("data", "fsdp"), None, None)),
])
def test_residual_stream_constraint(rules, length, expected):
  """The blocks' residual stream (batch, activation_length, embed) splits its positions
  over tensor under fsdp_tp, only where they divide, and not under the other presets."""
  import jax.numpy as jnp
  from cai_jax import axes, layers
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2, rules))
  with sharding.use_mesh(mesh, sharding.rules_for(rules)):
    out = jax.jit(lambda x: layers.constrain(x * 2, (axes.BATCH, axes.ACTIVATION_LENGTH,
                                                     axes.EMBED)))(jnp.ones((4, length, 16)))
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected), 3), out.sharding
