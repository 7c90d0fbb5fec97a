"""cai_jax.deviceless: the target descriptions, topology names and environment of a compile
for absent GPUs. (The compile itself needs the JAX CUDA plugin, which the test environment
lacks; bench/RESULTS.md and docs record runs with it.)"""

from __future__ import annotations

import re

import pytest

from cai_jax import deviceless


@pytest.mark.parametrize("kind,major,cores", [("h100", 9, 132), ("h200", 9, 132), ("a100", 8, 108)])
def test_target_config_text(kind, major, cores):
  text = deviceless.target_config(kind)
  assert re.search(r"cuda_compute_capability \{ major: %d minor: 0 \}" % major, text)
  assert f"core_count: {cores}\n" in text
  assert f'device_description_str: "{deviceless.GPU_TARGETS[kind]["name"]}"' in text
  assert text.count("{") == text.count("}")
  with pytest.raises(ValueError, match="unknown GPU target 'v100'"):
    deviceless.target_config("v100")


def test_topology_names_and_environment():
  assert [deviceless.topology_name(n) for n in (1, 4, 8, 12, 16, 64)] == [
      "1x1x1", "1x1x4", "1x1x8", "1x1x12", "1x2x8", "1x8x8"]
  env = deviceless.environ({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/h",
                            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "0"})
  assert env == {"CUDA_VISIBLE_DEVICES": "-1", "HOME": "/h",
                 "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "0"}
  with pytest.raises(ValueError, match="count must be >= 1"):
    deviceless.gpu_devices("h100", 0)
