"""JAX devices of GPUs that are not attached: XLA's GPU compiler without a GPU.

With the JAX CUDA plugin installed, ``jax.experimental.topologies`` describes a set of GPUs
from a target description (the GPU's ``gpu_device_info``), and ``jax.jit(...).lower(...)``
with ShapeDtypeStructs placed on those devices compiles for them on a machine that has no
GPU. Nothing runs; the compiled program's HLO and ``memory_analysis()`` are the GPU
compiler's own (fusion, buffer assignment, custom kernels such as cuDNN attention), not the
host compiler's stand-in. ``cai-jax plan`` (``plan.compiler = 'gpu'``) and
``bench/decode_kernels.py`` use it.

The process must not claim a GPU and must let the plugin load: ``environ`` gives the
variables (CUDA_VISIBLE_DEVICES=-1, the plugin's CUDA version check skipped, JAX_PLATFORMS
not restricted to the CPU). The plugin matching the installed jax, e.g. for CUDA 13:
``pip install "jax-cuda13-plugin[with-cuda]==V" "jax-cuda13-pjrt==V"`` with V = jax's
version (about 3.7 GB with the CUDA libraries).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from cai_jax.errors import first_line

# gpu_device_info of each target (XLA's GpuTargetConfig text format); numbers from the
# vendors' data sheets (SXM parts). They steer XLA's fusion, tiling and autotuning-free
# kernel choices; the compile never measures anything.
_TEMPLATE = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 patch: 0 }}
device_description_str: "{name}"
"""
_HOPPER = dict(cores=132, fpus=128, smem_core=233472, smem_optin=232448, l2=52428800,
               clock=1.98, cc_major=9, cc_minor=0)
GPU_TARGETS: Dict[str, Dict[str, Any]] = {
    "h100": dict(_HOPPER, name="NVIDIA H100 80GB HBM3", bandwidth=3_350_000_000_000,
                 memory=85_520_000_000),
    "h200": dict(_HOPPER, name="NVIDIA H200", bandwidth=4_800_000_000_000,
                 memory=150_000_000_000),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", cores=108, fpus=64, smem_core=167936,
                 smem_optin=166912, l2=41943040, clock=1.41, cc_major=8, cc_minor=0,
                 bandwidth=2_039_000_000_000, memory=85_899_345_920),
}


def target_config(kind: str) -> str:
  """The GpuTargetConfig text of a GPU kind ('h100', 'h200', 'a100')."""
  if kind not in GPU_TARGETS:
    raise ValueError(f"unknown GPU target {kind!r}; one of {sorted(GPU_TARGETS)}")
  return _TEMPLATE.format(**GPU_TARGETS[kind])


def environ(env: Mapping[str, str]) -> Dict[str, str]:
  """`env` for a process that compiles for absent GPUs (see the module docstring)."""
  out = dict(env)
  out["CUDA_VISIBLE_DEVICES"] = "-1"
  out.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  out.pop("JAX_PLATFORMS", None)
  return out


def topology_name(count: int, per_host: int = 8) -> str:
  """The plugin's topology string for `count` GPUs: hosts of `per_host` when they divide."""
  if count > per_host and count % per_host == 0:
    return f"1x{count // per_host}x{per_host}"
  return f"1x1x{count}"


def install_hint() -> str:
  """What to install for compiling without a GPU: the CUDA plugin of the installed jax."""
  import jax
  v = jax.__version__
  return (f"this needs the JAX CUDA plugin of jax {v}, e.g. pip install "
          f"\"jax-cuda13-plugin[with-cuda]=={v}\" \"jax-cuda13-pjrt=={v}\"")


def cuda_plugin_installed() -> bool:
  """Whether a JAX CUDA plugin is installed (found without importing it)."""
  import importlib.util
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12", "jax_cuda13_plugin",
               "jax_cuda12_plugin"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ImportError:   # no jax_plugins package at all
      pass
  return False


def gpu_devices(kind: str, count: int) -> List[Any]:
  """`count` JAX devices of GPU `kind`, for placing ShapeDtypeStructs and compiling.

  Raises RuntimeError (one line, with what to install) when the CUDA plugin is missing.
  """
  from jax.experimental import topologies
  if count < 1:
    raise ValueError(f"gpu_devices: count must be >= 1, got {count}")
  config = target_config(kind)
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=topology_name(count))
  except Exception as e:   # noqa: BLE001  (no plugin: NotImplementedError, RuntimeError, ...)
    raise RuntimeError(f"cannot compile for a CUDA GPU here ({first_line(e)}): "
                       f"{install_hint()}") from None
  devices = list(topo.devices)
  if len(devices) != count:
    raise RuntimeError(f"gpu_devices: the plugin described {len(devices)} GPUs, asked for {count}")
  return devices
