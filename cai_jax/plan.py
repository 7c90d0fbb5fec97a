"""`cai-jax plan`: will each stage fit a topology? Per-device memory from compiles on fake devices.

For a model config, a device mesh and a topology (``v5p-256``, ``h100x8``, ...), every
requested stage's programs are lowered and compiled for that many fake CPU devices
(``--xla_force_host_platform_device_count``) with inputs that are ShapeDtypeStructs carrying
their NamedShardings (``jax.eval_shape`` + the logical-axis rules: nothing is allocated),
and XLA's ``compiled.memory_analysis()`` gives the per-device buffer sizes:

  * ``sl``: the train step of ``cai_jax.steps`` (as ``cai_jax.train`` jits it, state donated)
    on a [batch_size, seq_len] batch with gradient-accumulation microbatches;
  * ``pm``: the same step with the scalar head and the preference-model loss on pairs
    (``tokens_a`` and ``tokens_b``: 2 x batch_size sequences per step);
  * ``rl``: the PPO policy step and value step (``ppo.make_policy_step`` /
    ``make_value_step``) on a minibatch of rollout_batch / minibatches rows of
    prompt_len + max_new_tokens tokens, and the rollout scoring forward (policy, reference
    and value model on the whole rollout batch), and the sampler's prefill + decode of the
    rollout batch (``sampler.generate``'s program; ``sample_config``); resident besides:
    the frozen reference's and the preference model's parameters and the sampler's KV
    cache for its rows (``sampler_rows``: the rollout batch padded to a multiple of the
    batch shards; computed from shapes).

Per device, in bytes: parameters and optimizer state (from the shardings, exact),
temporaries (XLA ``temp``), KV cache (rl), other (batch, outputs, step counters, code: the
rest), their total, the chip's HBM, whether it fits and the headroom. A stage's total is
XLA's argument + output - alias + temp + code of its step; for rl it is everything resident
(four parameter sets, two optimizer states, the KV cache) plus the largest of the four
programs' needs beyond the resident arguments it reads, and its temporaries are that
program's (the sampler's without the KV cache it builds; the cache is counted as live
during the updates too, which makes the rl total an upper bound).

The compile runs in a child process (``python -m cai_jax.plan --request=-``) because the
fake-device count must be set before JAX creates its CPU backend. The CPU compiler's
fusion and buffer assignment stand in for the TPU / GPU compiler's: argument sizes are
exact, temporaries are an estimate that runs high for bf16 compute (the CPU backend widens
bf16 arithmetic to f32 and can keep f32 copies of large bf16 buffers). For a GPU topology,
``compiler='gpu'`` compiles with XLA's GPU compiler for that GPU instead, on a machine
without one (``cai_jax.deviceless``: the JAX CUDA plugin installed, nothing run), so the
temporaries are the GPU compiler's own (cuDNN attention, its fusions and buffer reuse;
cuBLAS for every dot, see ``child_env``).

``python -m cai_jax.plan --docs`` writes the markdown table of docs/PLAN.md.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cai_jax import resources
from cai_jax.errors import first_line
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, PPOConfig, TrainConfig

STAGES = ("sl", "pm", "rl")
PRESET_DIR = resources.PRESET_DIR
GIB = 2**30

# --------------------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------------------

# (pattern of the lower-cased name, what N counts, JAX devices per N, HBM per device in GiB,
#  GPU kind of cai_jax.deviceless or None)
_FAMILIES = (
    (r"v4-(\d+)", "TensorCores", 0.5, 32.0, None),
    (r"v5p-(\d+)", "TensorCores", 0.5, 95.0, None),
    (r"(?:v5e|v5litepod)-(\d+)", "chips", 1, 16.0, None),
    (r"v6e-(\d+)", "chips", 1, 32.0, None),
    (r"h100x(\d+)", "GPUs", 1, 80.0, "h100"),
    (r"h200x(\d+)", "GPUs", 1, 141.0, "h200"),
    (r"a100x(\d+)", "GPUs", 1, 80.0, "a100"),
)
TOPOLOGY_FORMS = ("v4-N, v5p-N (N TensorCores = 2 per chip), v5e-N, v5litepod-N, v6e-N "
                  "(N chips), h100xN, h200xN, a100xN (N GPUs)")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice or cluster: one JAX device per chip.

  Attributes:
    name: the name as given, lower-cased (e.g. 'v5p-256').
    devices: number of JAX devices (chips; a TPU v4 / v5p chip has 2 TensorCores).
    hbm_gib: device memory per chip, GiB (nominal capacity).
    gpu: the GPU kind of an h100xN / h200xN / a100xN cluster, None for a TPU slice.
  """

  name: str
  devices: int
  hbm_gib: float
  gpu: Optional[str] = None   # 'h100', 'h200', 'a100' for a GPU cluster (``deviceless``)

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GIB)


def parse_topology(name: str) -> Topology:
  """'v5p-256' / 'H100x8' / ... -> Topology (case-insensitive).

  Raises ValueError naming the accepted forms for an unknown name, and for a TensorCore
  count that is not a positive even number.
  """
  text = str(name).strip().lower()
  for pattern, unit, per, hbm, gpu in _FAMILIES:
    m = re.fullmatch(pattern, text)
    if not m:
      continue
    n = int(m.group(1))
    devices = n * per
    if n < 1 or devices != int(devices):
      raise ValueError(f"topology {name!r}: N counts {unit} and must be a positive"
                       f"{' even' if per != 1 else ''} number")
    return Topology(text, int(devices), hbm, gpu)
  raise ValueError(f"unknown topology {name!r}; accepted forms: {TOPOLOGY_FORMS}")


def mesh_dims(mesh: MeshConfig, devices: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) of `mesh` with -1 resolved; the product must equal `devices`."""
  from cai_jax import sharding
  try:
    dims = sharding.mesh_shape(mesh, devices)
  except ValueError as e:
    raise ValueError(f"plan: {e}") from None
  if math.prod(dims) != devices:
    raise ValueError(f"plan: mesh data*fsdp*tensor = {dims[0]}*{dims[1]}*{dims[2]} = "
                     f"{math.prod(dims)} does not use all {devices} devices of the topology")
  return dims


def mesh_candidates(devices: int) -> List[MeshConfig]:
  """Meshes `suggest_mesh` tries, in order: fsdp over all devices, fsdp x tensor 4, x 8."""
  out = [MeshConfig(data=1, fsdp=devices, tensor=1, rules="fsdp")]
  for t in (4, 8):
    if devices % t == 0:
      out.append(MeshConfig(data=1, fsdp=devices // t, tensor=t, rules="fsdp_tp"))
  return out


# --------------------------------------------------------------------------------------
# Model presets (gin/models/*.gin read without gin)
# --------------------------------------------------------------------------------------

_PRESET_LINE = re.compile(r"^ModelConfig\.([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*$")


def _strip_comment(line: str) -> str:
  """Drops a trailing `# ...` that is not inside a string literal."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      if ch == quote:
        quote = None
    elif ch in ("'", '"'):
      quote = ch
    elif ch == "#":
      return line[:i]
  return line


def parse_preset(text: str, source: str = "<preset>") -> Dict[str, Any]:
  """{field: value} of the `ModelConfig.field = <python literal>` lines of a preset file.

  Blank lines and `#` comments are skipped; any other line is a ValueError naming
  `source` and the line number.
  """
  fields: Dict[str, Any] = {}
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = _strip_comment(raw).strip()
    if not line:
      continue
    m = _PRESET_LINE.match(line)
    if not m:
      raise ValueError(f"{source}:{lineno}: expected 'ModelConfig.<field> = <literal>', got {raw!r}")
    key, value = m.group(1), m.group(2)
    try:
      fields[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise ValueError(f"{source}:{lineno}: {value!r} is not a Python literal") from None
  return fields


def load_preset(name: str) -> ModelConfig:
  """ModelConfig of gin/models/<name>.gin (or of a preset file path)."""
  path = name if os.path.isfile(name) else os.path.join(PRESET_DIR, name + ".gin")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model preset not found: {path}")
  with open(path, encoding="utf-8") as f:
    return ModelConfig(**parse_preset(f.read(), path))


_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                 "dim_per_head", "tie_embeddings", "qkv_bias")


def preset_name(config: ModelConfig) -> Optional[str]:
  """Name of the gin/models preset with the same shape as `config`, or None."""
  if not os.path.isdir(PRESET_DIR):
    return None
  key = tuple(getattr(config, f) for f in _SHAPE_FIELDS)
  for fname in sorted(os.listdir(PRESET_DIR)):
    if not fname.endswith(".gin"):
      continue
    try:
      preset = load_preset(os.path.join(PRESET_DIR, fname))
    except (ValueError, TypeError):
      continue
    if tuple(getattr(preset, f) for f in _SHAPE_FIELDS) == key:
      return fname[:-4]
  return None


# --------------------------------------------------------------------------------------
# Sizes from shapes and shardings; XLA's memory analysis (JAX imported lazily: the parent
# process of `run` never initialises a backend)
# --------------------------------------------------------------------------------------


def shard_bytes(tree: Any, shardings: Any = None) -> Dict[str, int]:
  """{'global', 'per_device'} bytes of a tree of arrays / ShapeDtypeStructs.

  shardings: a matching tree of shardings; None reads each leaf's own `.sharding`.
  Per device = the bytes of one shard (replicated dims count whole).
  """
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(tree)
  shards = ([x.sharding for x in leaves] if shardings is None
            else jax.tree_util.tree_leaves(shardings))
  if len(shards) != len(leaves):
    raise ValueError(f"shard_bytes: {len(leaves)} leaves but {len(shards)} shardings")
  total = per_device = 0
  for x, s in zip(leaves, shards):
    item = np.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape)) * item
    per_device += int(np.prod(s.shard_shape(x.shape))) * item
  return {"global": total, "per_device": per_device}


XLA_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")


def xla_memory(compiled: Any) -> Dict[str, int]:
  """Per-device buffer sizes of a compiled program (``compiled.memory_analysis()``).

  Returns the XLA_FIELDS in bytes plus total_bytes = argument + output - alias + temp +
  generated code (and peak_memory_in_bytes where the backend reports it).
  """
  mem = compiled.memory_analysis()
  out = {f: int(getattr(mem, f)) for f in XLA_FIELDS}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
                        + out["generated_code_size_in_bytes"])
  peak = getattr(mem, "peak_memory_in_bytes", None)
  if peak:
    out["peak_memory_in_bytes"] = int(peak)
  return out


def batch_structs(mesh: Any, rules: Any, fields: Dict[str, Tuple[Tuple[int, ...], Any]]
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """({name: ShapeDtypeStruct}, {name: NamedSharding}) of a batch, batch dim over (data, fsdp).

  fields: {name: (shape, dtype)} with the batch as the leading dim.
  """
  import jax
  from cai_jax import sharding
  shardings = {k: sharding.batch_sharding(mesh, rules, len(shape), shape)
               for k, (shape, _) in fields.items()}
  structs = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
             for k, (shape, dtype) in fields.items()}
  return structs, shardings


def kv_cache_structs(model_config: ModelConfig, batch: int, length: int, mesh: Any,
                     rules: Any) -> Dict[str, Any]:
  """The sampler's KV cache (``transformer.init_cache``) as sharded ShapeDtypeStructs.

  k, v: [layers, batch, length, kv_heads, head_dim] in the compute dtype, batch over
  (data, fsdp) and kv heads over tensor where they divide (the sampler's constraint);
  mask: [batch, length] bool.
  """
  import flax.linen as nn
  import jax
  from cai_jax import axes, checkpoints, sharding, transformer
  shapes = jax.eval_shape(lambda: transformer.init_cache(model_config, batch, length))
  kv_names = (None, axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.KV)
  boxed = {"k": nn.Partitioned(shapes["k"], kv_names), "v": nn.Partitioned(shapes["v"], kv_names),
           "mask": nn.Partitioned(shapes["mask"], (axes.BATCH, axes.LENGTH))}
  return checkpoints.with_shardings(shapes, sharding.logical_shardings(boxed, mesh, rules))


# --------------------------------------------------------------------------------------
# One plan (runs where JAX sees enough devices: the child process, or a test session)
# --------------------------------------------------------------------------------------


def _log(msg: str) -> None:
  print(f"[plan] {msg}", file=sys.stderr, flush=True)


def _compile(fn: Any, args: Tuple[Any, ...], mesh: Any, rules: Any) -> Tuple[Dict[str, int], float]:
  """(xla_memory of jitted fn lowered for args under mesh + rules, compile seconds)."""
  from cai_jax import sharding
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh, rules):
    compiled = fn.lower(*args).compile()
  return xla_memory(compiled), time.perf_counter() - t0


def _program(xla: Dict[str, int], resident: int, seconds: float) -> Dict[str, Any]:
  return {"xla": xla, "resident_args_bytes": resident,
          "extra_bytes": xla["total_bytes"] - resident, "compile_s": round(seconds, 2)}


def _finish(out: Dict[str, Any], hbm_bytes: int) -> Dict[str, Any]:
  out["hbm_bytes"] = hbm_bytes
  out["headroom_bytes"] = hbm_bytes - out["total_bytes"]
  out["fits"] = bool(out["compiled"] and out["total_bytes"] <= hbm_bytes)
  return out


def _plan_train_stage(stage: str, model_config: ModelConfig, optimizer: OptimizerConfig,
                      train_config: TrainConfig, microbatches: int, mesh: Any, rules: Any,
                      hbm_bytes: int, prune: bool) -> Dict[str, Any]:
  """sl (LM head, token cross-entropy) or pm (scalar head, soft Bradley-Terry on pairs)."""
  import jax.numpy as jnp
  from cai_jax import checkpoints, steps
  rows, seq = train_config.batch_size, train_config.seq_len
  check_seq_len(model_config, train_config)
  if rows % microbatches:
    raise ValueError(f"plan: microbatches={microbatches} does not divide "
                     f"TrainConfig.batch_size={rows}")
  tx = steps.make_optimizer(optimizer)
  if stage == "sl":
    head, loss_sums = "lm", steps.lm_loss_sums
    fields = {k: ((rows, seq), d) for k, d in
              (("tokens", jnp.int32), ("mask", jnp.bool_), ("loss_mask", jnp.bool_))}
  else:
    from cai_jax.stages.pm import pm_loss_sums
    head, loss_sums = "scalar", pm_loss_sums
    fields = {k: ((rows, seq), d) for k, d in (("tokens_a", jnp.int32), ("mask_a", jnp.bool_),
                                               ("tokens_b", jnp.int32), ("mask_b", jnp.bool_))}
    fields["p"] = ((rows, 1), jnp.float32)
  state = checkpoints.abstract_train_state(model_config, tx, mesh, rules, head)
  state_sh = checkpoints.shardings_of(state)
  params = shard_bytes(state.params)["per_device"]
  opt = shard_bytes(state.opt_state)["per_device"]
  out: Dict[str, Any] = {
      "rows": rows, "seq": seq, "microbatches": microbatches,
      "sequences_per_step": rows * (2 if stage == "pm" else 1),
      "params_bytes": params, "opt_state_bytes": opt, "kv_cache_bytes": 0, "programs": {}}
  if prune and params + opt > hbm_bytes:
    out.update(compiled=False, temp_bytes=None, other_bytes=None, total_bytes=params + opt,
               note="parameters and optimizer state alone exceed HBM; not compiled")
    return _finish(out, hbm_bytes)
  batch, batch_sh = batch_structs(mesh, rules, fields)
  fn = steps.jit_train_step(
      steps.make_train_step(model_config, tx, steps.lr_schedule(optimizer), microbatches,
                            loss_sums), state_sh, batch_sh)
  xla, seconds = _compile(fn, (state, batch), mesh, rules)
  out["programs"]["train_step"] = _program(xla, shard_bytes(state)["per_device"], seconds)
  total = xla["total_bytes"]
  out.update(compiled=True, temp_bytes=xla["temp_size_in_bytes"],
             other_bytes=total - params - opt - xla["temp_size_in_bytes"], total_bytes=total)
  return _finish(out, hbm_bytes)


def check_seq_len(model_config: ModelConfig, train_config: TrainConfig) -> None:
  """ValueError (one line) for an sl / pm batch longer than the model's context, the run
  ``train.check_seq_len`` refuses."""
  from cai_jax import train
  try:
    train.check_seq_len(train_config.seq_len, model_config.max_seq_len, "ModelConfig")
  except ValueError as e:
    raise ValueError(f"plan: {e}; sl and pm refuse it") from None


RL_PROMPT_LEN = 512
"""Default prompt columns of the rl plan: rl pads a rollout batch to its longest prompt
(bucketed), and red-team prompts are short; a model's whole context would size the plan for
prompts the stage never sees."""


def rl_prompt_len(model_config: ModelConfig, ppo: PPOConfig, prompt_len: Optional[int]) -> int:
  """The prompt columns P of the rl plan: `prompt_len`, default min(RL_PROMPT_LEN,
  max_seq_len - max_new_tokens)."""
  n = ppo.max_new_tokens
  p = (min(RL_PROMPT_LEN, model_config.max_seq_len - n) if prompt_len is None
       else int(prompt_len))
  if p < 1 or p + n > model_config.max_seq_len:
    raise ValueError(f"plan: prompt_len {p} + PPOConfig.max_new_tokens {n} must be in "
                     f"[{n + 1}, ModelConfig.max_seq_len={model_config.max_seq_len}]")
  return p


def rl_batch_error(ppo: PPOConfig, dims: Sequence[int]) -> Optional[str]:
  """Why the rl stage refuses `ppo` on a mesh of `dims` (data, fsdp, tensor), or None: the
  rollout batch and its minibatch rows must be multiples of the batch shards (data x fsdp),
  as ``stages.rl`` checks."""
  shards = _batch_shards(dims)
  rows = ppo.rollout_batch // ppo.minibatches
  if ppo.rollout_batch % shards or rows % shards:
    return (f"plan: PPOConfig.rollout_batch={ppo.rollout_batch} with PPOConfig.minibatches="
            f"{ppo.minibatches} ({rows} rows per minibatch) does not divide over the {shards} "
            "batch shards (data x fsdp) of the mesh; rl refuses it (a rollout_batch that is a "
            f"multiple of {shards * ppo.minibatches} runs, or leave rl out of plan.stages)")
  return None


def sample_config(model_config: ModelConfig) -> ModelConfig:
  """`model_config` as the rl plan compiles the sampler: ``unroll_decode`` None becomes
  False, what ``sampler.resolve_unroll_decode`` falls back to when a per-layer copy of the
  layer weights would not fit in half the free memory (the unrolled program holds that copy
  besides the stacked weights); True and False stay."""
  if model_config.unroll_decode is None:
    return dataclasses.replace(model_config, unroll_decode=False)
  return model_config


def sampler_rows(batch: int, mesh: Any, rules: Any) -> int:
  """Rows of the program ``sampler.generate`` runs for `batch` prompts at batch_size `batch`:
  padded to a multiple of the batch shards (data x fsdp), e.g. 64 rollout prompts on 128
  shards run as 128 rows, one per shard."""
  from cai_jax import sampler, sharding
  multiple = sharding.batch_shards(mesh, rules)
  return sampler.batch_rows(batch, sampler.full_batch_rows(batch, multiple), multiple)


def _sample_program(model_config: ModelConfig, ppo: PPOConfig, params: Any, batch: int,
                    prompt_len: int, mesh: Any, rules: Any) -> Tuple[Any, Tuple[Any, ...]]:
  """(jitted program, abstract args) of the sampler's prefill + decode of one rollout batch
  (``sampler.generate``'s per-batch program with PPO's sampling: `batch` rows of
  `prompt_len` prompt columns, ``ppo.max_new_tokens`` new tokens, no shared prefix)."""
  import jax
  import jax.numpy as jnp
  from cai_jax import sampler, sharding
  sp = sampler.SamplingParams(temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens,
                              eos_ids=(0,), seed=0)
  fn = sampler._jitted("batch", sample_config(model_config), sampler._DecodeSpec.of(sp), mesh,
                       sharding.hashable_rules(rules))
  rows, _ = batch_structs(mesh, rules, {"tokens": ((batch, prompt_len), jnp.int32),
                                        "mask": ((batch, prompt_len), jnp.bool_),
                                        "active": ((batch,), jnp.bool_),
                                        "row_ids": ((batch,), jnp.int32)})
  seed = jax.ShapeDtypeStruct((), jnp.uint32)
  return fn, (params, rows["tokens"], rows["mask"], rows["active"], rows["row_ids"], seed,
              None, None)


def _plan_rl_stage(model_config: ModelConfig, optimizer: OptimizerConfig, ppo: PPOConfig,
                   prompt_len: int, mesh: Any, rules: Any, hbm_bytes: int,
                   prune: bool) -> Dict[str, Any]:
  """PPO: policy and value updates, rollout scoring, resident reference + PM, KV cache."""
  import jax
  import jax.numpy as jnp
  from cai_jax import checkpoints, ppo as ppo_lib, steps
  n = ppo.max_new_tokens
  big, rows, cols = ppo.rollout_batch, ppo.rollout_batch // ppo.minibatches, prompt_len + n
  tx = steps.make_optimizer(optimizer)
  policy = checkpoints.abstract_train_state(model_config, tx, mesh, rules, "lm")
  value = checkpoints.abstract_train_state(model_config, tx, mesh, rules, "scalar")
  policy_params = shard_bytes(policy.params)["per_device"]
  value_params = shard_bytes(value.params)["per_device"]
  opt = shard_bytes(policy.opt_state)["per_device"] + shard_bytes(value.opt_state)["per_device"]
  # Policy and value model train; the reference (LM head) and the PM (scalar head) are frozen.
  params = 2 * policy_params + 2 * value_params
  counters = shard_bytes(policy.step)["per_device"] + shard_bytes(value.step)["per_device"]
  # The sampler's cache: prompt + response slots, the last sampled token never fed back.
  sample_rows = sampler_rows(big, mesh, rules)
  cache = kv_cache_structs(model_config, sample_rows, cols - 1, mesh, rules)
  kv = shard_bytes(cache)["per_device"]
  out: Dict[str, Any] = {
      "rows": rows, "seq": cols, "rollout_batch": big, "sample_rows": sample_rows,
      "prompt_len": prompt_len,
      "max_new_tokens": n, "kv_cache_slots": cols - 1, "params_bytes": params,
      "opt_state_bytes": opt, "kv_cache_bytes": kv, "programs": {}}
  resident = params + opt + counters + kv
  if prune and resident > hbm_bytes:
    out.update(compiled=False, temp_bytes=None, other_bytes=None, total_bytes=resident,
               note="parameters, optimizer states and KV cache alone exceed HBM; not compiled")
    return _finish(out, hbm_bytes)

  f32, i32, b = jnp.float32, jnp.int32, jnp.bool_
  base = {"tokens": ((rows, cols), i32), "mask": ((rows, cols), b),
          "response_start": ((rows,), i32), "response_mask": ((rows, n), b)}
  pol_batch, _ = batch_structs(mesh, rules, dict(base, logp_old=((rows, n), f32),
                                                 advantages=((rows, n), f32)))
  val_batch, _ = batch_structs(mesh, rules, dict(base, values_old=((rows, n), f32),
                                                 returns=((rows, n), f32)))
  ro_batch, _ = batch_structs(mesh, rules, {"tokens": ((big, cols), i32),
                                            "mask": ((big, cols), b),
                                            "response_start": ((big,), i32),
                                            "response_mask": ((big, n), b)})
  scores, _ = batch_structs(mesh, rules, {"s": ((big,), f32)})
  beta = jax.ShapeDtypeStruct((), f32)
  programs = out["programs"]
  xla, s = _compile(ppo_lib.make_policy_step(model_config, ppo, optimizer), (policy, pol_batch),
                    mesh, rules)
  programs["policy_step"] = _program(xla, shard_bytes(policy)["per_device"], s)
  xla, s = _compile(ppo_lib.make_value_step(model_config, ppo, optimizer), (value, val_batch),
                    mesh, rules)
  programs["value_step"] = _program(xla, shard_bytes(value)["per_device"], s)
  rollout = ppo_lib._jitted_rollout(model_config, model_config, model_config,
                                    ppo_lib.compiled_part(ppo))
  xla, s = _compile(rollout, (policy.params, policy.params, value.params, ro_batch,
                              scores["s"], beta), mesh, rules)
  programs["rollout"] = _program(xla, 2 * policy_params + value_params, s)
  xla, s = _compile(*_sample_program(model_config, ppo, policy.params, sample_rows,
                                     prompt_len, mesh, rules), mesh, rules)
  # The KV cache the sampler builds is among its temporaries; `resident` counts it already.
  programs["sample"] = _program(xla, policy_params + kv, s)
  peak = max(programs, key=lambda k: programs[k]["extra_bytes"])
  total = resident + programs[peak]["extra_bytes"]
  temp = programs[peak]["xla"]["temp_size_in_bytes"] - (kv if peak == "sample" else 0)
  out.update(compiled=True, temp_bytes=temp, other_bytes=total - params - opt - kv - temp,
             total_bytes=total, peak_program=peak)
  return _finish(out, hbm_bytes)


def plan_on_devices(model_config: ModelConfig, mesh: MeshConfig, hbm_bytes: int,
                    train_config: TrainConfig = TrainConfig(), ppo: PPOConfig = PPOConfig(),
                    optimizer: OptimizerConfig = OptimizerConfig(),
                    stages: Sequence[str] = STAGES, microbatches: Optional[int] = None,
                    prompt_len: Optional[int] = None, devices: Optional[Sequence[Any]] = None,
                    prune: bool = False) -> Dict[str, Any]:
  """Plans `stages` on the JAX devices this process sees (all of them, or `devices`).

  The mesh must use every device. prune: skip the compile of a stage whose parameters and
  optimizer state (plus KV cache for rl) alone exceed hbm_bytes (fits False, no temp).
  Returns {mesh: [data, fsdp, tensor], rules, microbatches, stages: {name: {...}}, fits}.
  """
  import jax
  from cai_jax import sharding
  devices = list(jax.devices() if devices is None else devices)
  dims = mesh_dims(mesh, len(devices))
  stages = check_stages(stages)
  microbatches = resolve_microbatches(microbatches, train_config)
  jmesh = sharding.make_mesh(mesh, devices)
  rules = sharding.rules_for(mesh.rules)
  out: Dict[str, Any] = {"mesh": list(dims), "rules": mesh.rules, "microbatches": microbatches,
                         "stages": {}}
  for stage in stages:
    t0 = time.perf_counter()
    if stage == "rl":
      plen = rl_prompt_len(model_config, ppo, prompt_len)
      error = rl_batch_error(ppo, dims)
      if error:
        raise ValueError(error)
      res = _plan_rl_stage(model_config, optimizer, ppo, plen, jmesh, rules, hbm_bytes, prune)
    else:
      res = _plan_train_stage(stage, model_config, optimizer, train_config, microbatches, jmesh,
                              rules, hbm_bytes, prune)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    out["stages"][stage] = res
    _log(f"{stage}: mesh {dims} {mesh.rules}, mb {microbatches}: "
         f"{_gib(res['total_bytes'])} GiB of {_gib(hbm_bytes)} "
         f"({'fits' if res['fits'] else 'does not fit'}; {res['seconds']:.1f} s)")
  out["fits"] = all(s["fits"] for s in out["stages"].values())
  return out


def resolve_microbatches(microbatches: Optional[int], train_config: TrainConfig) -> int:
  """`microbatches`, or train_config.num_microbatches when None; ValueError naming
  plan.microbatches unless it is an integer >= 1."""
  if microbatches is None:
    return train_config.num_microbatches
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"plan.microbatches must be an integer >= 1, got {microbatches!r}")
  return microbatches


def check_stages(stages: Sequence[str]) -> Tuple[str, ...]:
  if isinstance(stages, str):
    stages = tuple(s for s in stages.split(",") if s)
  stages = tuple(stages)
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ValueError(f"plan: unknown stage(s) {bad or stages!r}; expected some of {STAGES}")
  return stages


# --------------------------------------------------------------------------------------
# The child process: a request of job groups -> JSON results
# --------------------------------------------------------------------------------------


def _job(model_config: ModelConfig, mesh: MeshConfig, train_config: TrainConfig, ppo: PPOConfig,
         optimizer: OptimizerConfig, stages: Sequence[str], microbatches: Optional[int],
         prompt_len: Optional[int], hbm_bytes: int, prune: bool) -> Dict[str, Any]:
  return {"model": dataclasses.asdict(model_config), "mesh": dataclasses.asdict(mesh),
          "train": dataclasses.asdict(train_config), "ppo": dataclasses.asdict(ppo),
          "optimizer": dataclasses.asdict(optimizer), "stages": list(stages),
          "microbatches": microbatches, "prompt_len": prompt_len, "hbm_bytes": int(hbm_bytes),
          "prune": bool(prune)}


def gpu_model_config(model: ModelConfig, gpu: str) -> ModelConfig:
  """`model` as a run on GPU kind `gpu` resolves it: attention_impl None becomes 'cudnn'
  where ``layers.fused_causal_impl`` takes cuDNN's fused kernel on that GPU (compute
  capability 8.0 or later, 16-bit, a head width it takes), else 'xla' (the dense masked
  attention a GPU runs). A deviceless compile needs this: its process's backend is the CPU,
  where None would compile the CPU's query-chunked attention into the GPU program."""
  from cai_jax import deviceless, layers
  capable = layers.cudnn_compute_capability(deviceless.GPU_TARGETS[gpu]["cc_major"])
  if model.attention_impl is None:
    fused = layers.fused_causal_impl(model, capable) == "cudnn"
    return dataclasses.replace(model, attention_impl="cudnn" if fused else "xla")
  return model


def _run_job(job: Dict[str, Any], devices: Sequence[Any], gpu: Optional[str] = None
             ) -> Dict[str, Any]:
  """Plans one job on `devices`; for a deviceless GPU compile (`gpu`) the model config as
  that GPU resolves it (``gpu_model_config``)."""
  model = ModelConfig(**job["model"])
  if gpu:
    model = gpu_model_config(model, gpu)
  return plan_on_devices(
      model, MeshConfig(**job["mesh"]), job["hbm_bytes"],
      TrainConfig(**job["train"]), PPOConfig(**job["ppo"]), OptimizerConfig(**job["optimizer"]),
      job["stages"], job["microbatches"], job["prompt_len"], devices=devices, prune=job["prune"])


def serve(request: Dict[str, Any]) -> Dict[str, Any]:
  """Evaluates a request in this process: {devices, groups: [[job, ...], ...], gpu}; gpu
  (optional) names the GPU kind to compile for without one (``deviceless``), else the
  process's own (fake CPU) devices are used.

  The jobs of a group are tried in order and the group stops at the first whose stages
  all fit. Returns {results: [[job result, ...] per group]}.
  """
  import jax
  if request.get("gpu"):
    from cai_jax import deviceless
    devices = deviceless.gpu_devices(request["gpu"], request["devices"])
  else:
    devices = jax.devices()
    if len(devices) != request["devices"]:
      raise RuntimeError(f"plan: JAX sees {len(devices)} devices, the request needs "
                         f"{request['devices']} (XLA_FLAGS / JAX_NUM_CPU_DEVICES were not applied)")
  results = []
  for group in request["groups"]:
    done = []
    for job in group:
      done.append(_run_job(job, devices, request.get("gpu")))
      if done[-1]["fits"]:
        break
    results.append(done)
  return {"results": results}


def child_env(devices: int, gpu: Optional[str] = None) -> Dict[str, str]:
  """Environment of a child process that sees `devices` fake CPU devices, or with `gpu`
  one that compiles for absent GPUs (``deviceless.environ``)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (resources.IMPORT_ROOT, env.get("PYTHONPATH"))
                                      if p)
  if gpu:
    from cai_jax import deviceless
    env = deviceless.environ(env)
    flags = env.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
      # Without a GPU to autotune on, XLA's default Triton GEMM tiling rejects some shapes
      # (the sampler's prefill of a 512-column rollout batch: "Couldn't find output tile
      # sizes"); cuBLAS takes every dot instead. Buffer sizes barely move: 810m on h100x8,
      # sl 1.83 -> 1.81 GiB and pm 1.53 -> 1.55 GiB per device.
      env["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
    return env
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  flags = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
  if "xla_backend_optimization_level" not in flags:
    # LLVM's effort on machine code that never runs; buffer sizes do not depend on it.
    flags += " --xla_backend_optimization_level=0"
  env["XLA_FLAGS"] = flags
  env["JAX_NUM_CPU_DEVICES"] = str(devices)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _call_child(request: Dict[str, Any]) -> Dict[str, Any]:
  """Runs `serve(request)` in `python -m cai_jax.plan --request=-`; its stderr is forwarded.

  Raises the child's ValueError as ValueError (one line) and anything else as RuntimeError.
  """
  proc = subprocess.Popen([sys.executable, "-m", "cai_jax.plan", "--request=-"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=child_env(request["devices"], request.get("gpu")))
  tail: collections.deque = collections.deque(maxlen=20)

  def pump():
    for line in proc.stderr:
      tail.append(line.rstrip("\n"))
      if line.startswith("[plan]"):
        sys.stderr.write(line)
        sys.stderr.flush()

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  proc.stdin.write(json.dumps(request))   # stderr belongs to the reader thread alone
  proc.stdin.close()
  stdout = proc.stdout.read()
  proc.wait()
  reader.join()
  lines = [line for line in stdout.splitlines() if line.strip()]
  reply = None
  if lines:
    try:
      reply = json.loads(lines[-1])
    except json.JSONDecodeError:
      reply = None
  if not isinstance(reply, dict) or ("results" not in reply and "error" not in reply):
    last = next((t for t in reversed(tail) if t.strip()), "no output")
    raise RuntimeError(f"plan: the compile process exited with status {proc.returncode}: {last}")
  if "error" in reply:
    cls = ValueError if reply.get("type") == "ValueError" else RuntimeError
    raise cls(reply["error"])
  return reply


def _child_main(text: str) -> None:
  """`--request`: serve one request, print one JSON line (result or error)."""
  import logging
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    request = json.loads(sys.stdin.read() if text == "-" else text)
    reply = serve(request)
  except Exception as e:  # reported to the parent as one line
    first = first_line(e)
    kind = "ValueError" if isinstance(e, ValueError) else type(e).__name__
    print(json.dumps({"error": first if kind == "ValueError" else f"{kind}: {first}",
                      "type": kind}))
    sys.stdout.flush()
    sys.exit(1)
  print(json.dumps(reply))


# --------------------------------------------------------------------------------------
# Runner, suggestions, table
# --------------------------------------------------------------------------------------


def _batch_shards(dims: Sequence[int]) -> int:
  return dims[0] * dims[1]


def microbatch_options(rows: int, dims: Sequence[int], microbatches: int) -> List[int]:
  """Microbatch counts a search tries for `rows` sequences: as asked, then one sequence per
  batch shard per microbatch (rows / (data * fsdp)), when that divides and differs."""
  out = [microbatches]
  shards = _batch_shards(dims)
  if rows % shards == 0 and rows // shards not in out:
    out.append(rows // shards)
  return out


def _model_summary(config: ModelConfig) -> Dict[str, Any]:
  return {"name": preset_name(config), "params": config.param_count(),
          "dtype": config.dtype, "param_dtype": config.param_dtype,
          "remat_policy": config.remat_policy}


COMPILERS = ("cpu", "gpu")


def _check_compiler(topo: Topology, compiler: str) -> None:
  """ValueError for an unknown compiler, or 'gpu' with a TPU topology."""
  if compiler not in COMPILERS:
    raise ValueError(f"plan: compiler={compiler!r}; expected one of {COMPILERS}")
  if compiler == "gpu" and topo.gpu is None:
    raise ValueError(f"plan: compiler='gpu' needs a GPU topology (h100xN, h200xN, a100xN), "
                     f"got {topo.name!r}")
  if compiler == "gpu":
    from cai_jax import deviceless
    if not deviceless.cuda_plugin_installed():
      raise ValueError(f"plan: compiler='gpu' compiles with XLA's GPU compiler: "
                       f"{deviceless.install_hint()}")


def _request(topo: Topology, groups: List[List[Dict[str, Any]]], compiler: str) -> Dict[str, Any]:
  """The child's request: the job groups, and for compiler 'gpu' the GPU kind to compile for
  (``_check_compiler``'s errors)."""
  _check_compiler(topo, compiler)
  request: Dict[str, Any] = {"devices": topo.devices, "groups": groups}
  if compiler == "gpu":
    request["gpu"] = topo.gpu
  return request


def compiler_label(topo: Topology, compiler: str) -> str:
  """What compiled the plan, for its table."""
  if compiler == "gpu":
    from cai_jax import deviceless
    return f"XLA's GPU compiler for {deviceless.GPU_TARGETS[topo.gpu]['name']} (no GPU attached)"
  return f"XLA's CPU compiler on {topo.devices} fake devices (temporaries estimated)"


def suggest_mesh(topology: str, model_config: ModelConfig = ModelConfig(),
                 train_config: TrainConfig = TrainConfig(), ppo: PPOConfig = PPOConfig(),
                 stages: Sequence[str] = STAGES, microbatches: Optional[int] = None,
                 optimizer: OptimizerConfig = OptimizerConfig(), prompt_len: Optional[int] = None,
                 hbm_gib: Optional[float] = None,
                 exclude: Sequence[Tuple[Tuple[int, int, int], str, int]] = (),
                 compiler: str = "cpu") -> Optional[Dict[str, Any]]:
  """The first of ``mesh_candidates`` (each as asked, then with one sequence per batch shard
  per microbatch when sl / pm are planned) on which every stage fits, or None. With rl,
  only meshes whose batch shards the rl stage accepts (``rl_batch_error``).

  exclude: (mesh dims, rules, microbatches) already known not to fit (the same dims under
  other rules shard differently and are still tried). compiler: as ``run``.
  Returns a job result ({mesh, rules, microbatches, stages, fits}) of one compile process.
  """
  topo = parse_topology(topology)
  hbm = int((hbm_gib or topo.hbm_gib) * GIB)
  stages = check_stages(stages)
  mb = resolve_microbatches(microbatches, train_config)
  known = {(tuple(d), r, k) for d, r, k in exclude}
  group = []
  for cand in mesh_candidates(topo.devices):
    dims = mesh_dims(cand, topo.devices)
    if "rl" in stages and rl_batch_error(ppo, dims):
      continue
    options = microbatch_options(train_config.batch_size, dims, mb) if set(stages) & {"sl", "pm"} \
        else [mb]
    for m in options:
      if (tuple(dims), cand.rules, m) in known:
        continue
      group.append(_job(model_config, cand, train_config, ppo, optimizer, stages, m, prompt_len,
                        hbm, prune=True))
  if not group:
    return None
  tried = _call_child(_request(topo, [group], compiler))["results"][0]
  return tried[-1] if tried[-1]["fits"] else None


def run(topology: str, model_config: ModelConfig = ModelConfig(), mesh: MeshConfig = MeshConfig(),
        train_config: TrainConfig = TrainConfig(), ppo: PPOConfig = PPOConfig(),
        stages: Sequence[str] = STAGES, microbatches: Optional[int] = None,
        optimizer: OptimizerConfig = OptimizerConfig(), prompt_len: Optional[int] = None,
        hbm_gib: Optional[float] = None, suggest: bool = True,
        compiler: str = "cpu") -> Dict[str, Any]:
  """Will each stage fit `topology`? Compiles in a child process.

  Args:
    topology: 'v5p-256', 'h100x8', ... (``parse_topology``).
    model_config, mesh, train_config, ppo, optimizer: the run's configs (mesh -1 resolved
      against the topology's device count; the mesh must use every device).
    stages: any of 'sl', 'pm', 'rl'.
    microbatches: gradient-accumulation splits for sl / pm (default
      train_config.num_microbatches).
    prompt_len: prompt columns of the rl plan (default min(RL_PROMPT_LEN,
      max_seq_len - ppo.max_new_tokens)).
    hbm_gib: device memory to check against instead of the topology's.
    suggest: when a stage does not fit, also search ``mesh_candidates`` (``suggest_mesh``).
    compiler: 'cpu' (XLA's CPU compiler on fake host devices: runs anywhere, temporaries are
      an estimate) or 'gpu' (for an h100xN / h200xN / a100xN topology: XLA's GPU compiler for
      that GPU without one attached, ``cai_jax.deviceless``; needs the JAX CUDA plugin, and
      its temporaries are the GPU compiler's own).
  Returns {topology, devices, hbm_gib, compiler, mesh: [data, fsdp, tensor], rules, microbatches,
  model: {name, params, ...}, stages: {stage: {params_bytes, opt_state_bytes, temp_bytes,
  kv_cache_bytes, other_bytes, total_bytes, hbm_bytes, fits, headroom_bytes, programs, ...}},
  fits, suggestion (when searched), seconds}; the table (``format_table``) goes to stderr.
  A mesh on which the rl stage would refuse `ppo` (``rl_batch_error``) plans the other stages
  and gives rl as {refused: reason} (fits False, so a mesh that runs every stage is searched).
  Raises ValueError for a bad topology (naming --topology), stage, mesh, batch split or
  compiler, RuntimeError when compiler 'gpu' finds no CUDA plugin.
  """
  t0 = time.perf_counter()
  try:
    topo = parse_topology(topology)
  except ValueError as e:
    raise ValueError(f"plan: --topology: {e}") from None
  _check_compiler(topo, compiler)
  if hbm_gib is not None and hbm_gib <= 0:
    raise ValueError(f"plan: hbm_gib must be > 0, got {hbm_gib}")
  hbm_gib = float(hbm_gib or topo.hbm_gib)
  hbm = int(hbm_gib * GIB)
  stages = check_stages(stages)
  dims = mesh_dims(mesh, topo.devices)
  mb = resolve_microbatches(microbatches, train_config)
  if set(stages) & {"sl", "pm"} and train_config.batch_size % mb:
    raise ValueError(f"plan: microbatches={mb} does not divide TrainConfig.batch_size="
                     f"{train_config.batch_size}")
  if set(stages) & {"sl", "pm"}:
    check_seq_len(model_config, train_config)
  refused = None
  if "rl" in stages:
    rl_prompt_len(model_config, ppo, prompt_len)
    refused = rl_batch_error(ppo, dims)
  compiled = tuple(s for s in stages if not (s == "rl" and refused))
  if compiled:
    _log(f"{topo.name}: {topo.devices} devices, mesh {dims} ({mesh.rules}); compiling "
         f"{', '.join(compiled)} with {compiler_label(topo, compiler)}")
    job = _job(model_config, mesh, train_config, ppo, optimizer, compiled, mb, prompt_len, hbm,
               prune=False)
    planned = _call_child(_request(topo, [[job]], compiler))["results"][0][0]
  else:
    planned = {"mesh": list(dims), "rules": mesh.rules, "microbatches": mb, "stages": {}}
  if refused:
    refused = refused[len("plan: "):]
    _log(f"rl: refused: {refused}")
    planned["stages"] = {s: ({"refused": refused} if s == "rl"
                             else planned["stages"][s]) for s in stages}
    planned["fits"] = False
  result: Dict[str, Any] = {"topology": topo.name, "devices": topo.devices, "hbm_gib": hbm_gib,
                            "compiler": compiler_label(topo, compiler),
                            "model": _model_summary(model_config), **planned}
  if suggest and not planned["fits"]:
    found = suggest_mesh(topo.name, model_config, train_config, ppo, stages, mb, optimizer,
                         prompt_len, hbm_gib, exclude=[(tuple(dims), mesh.rules, mb)],
                         compiler=compiler)
    result["suggestion"] = None if found is None else {
        "mesh": found["mesh"], "rules": found["rules"], "microbatches": found["microbatches"],
        "total_bytes": {s: r["total_bytes"] for s, r in found["stages"].items()}}
  result["seconds"] = round(time.perf_counter() - t0, 2)
  print(format_table(result), file=sys.stderr, flush=True)
  return result


def _gib(n: Optional[float]) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def mesh_label(dims: Sequence[int], microbatches: Optional[int] = None) -> str:
  """'fsdp 16 x tp 8' style name of (data, fsdp, tensor), with ', N mb' when N > 1."""
  parts = [f"{name} {d}" for name, d in zip(("dp", "fsdp", "tp"), dims) if d > 1]
  text = " x ".join(parts) or "1 device"
  return text + (f", {microbatches} mb" if microbatches and microbatches > 1 else "")


def format_table(result: Dict[str, Any]) -> str:
  """Plain-text table of a ``run`` result: one row per stage, sizes in GiB (2 decimals)."""
  model = result["model"]
  head = (f"plan: {model.get('name') or 'model'} ({model['params']:,} params) on "
          f"{result['topology']}: {result['devices']} devices x {result['hbm_gib']:.2f} GiB; "
          f"mesh data {result['mesh'][0]} x fsdp {result['mesh'][1]} x tensor "
          f"{result['mesh'][2]} ({result['rules']})")
  cols = ("stage", "rows x seq", "params", "optimizer", "temp", "kv cache", "other", "total",
          "HBM", "headroom", "fits")
  rows = [cols]
  notes = []
  for name, s in result["stages"].items():
    if "refused" in s:
      rows.append((name, "refused") + ("-",) * (len(cols) - 3) + ("NO",))
      notes.append(f"{name} refused: {s['refused']}")
      continue
    shape = f"{s['rows']} x {s['seq']}"
    if name == "pm":
      shape = f"2x{s['rows']} x {s['seq']}"
    if name in ("sl", "pm") and s["microbatches"] > 1:
      shape += f" /{s['microbatches']}mb"
    if name == "rl":
      shape += f" (B {s['rollout_batch']})"
    rows.append((name, shape, _gib(s["params_bytes"]), _gib(s["opt_state_bytes"]),
                 _gib(s["temp_bytes"]), _gib(s["kv_cache_bytes"]), _gib(s["other_bytes"]),
                 _gib(s["total_bytes"]), _gib(s["hbm_bytes"]), _gib(s["headroom_bytes"]),
                 "yes" if s["fits"] else "NO"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  lines = [head]
  if result.get("compiler"):
    lines.append(f"compiled by {result['compiler']}")
  lines.append("sizes per device in GiB")
  for r in rows:
    lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))))
  lines.extend(notes)
  if "suggestion" in result:
    sug = result["suggestion"]
    lines.append("suggestion: " + ("no candidate mesh fits" if sug is None else
                                    f"{mesh_label(sug['mesh'], sug['microbatches'])} "
                                    f"({sug['rules']}) fits every stage"))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------
# docs/PLAN.md
# --------------------------------------------------------------------------------------

DOCS_PRESETS = ("810m", "1_6b", "3_5b", "6_4b", "13b", "22b", "52b")
DOCS_TOPOLOGIES = ("v5p-16", "v5p-64", "v5p-256", "h100x8", "h100x64")
DOCS_SEQ = 2048
DOCS_PPO = PPOConfig(rollout_batch=64, max_new_tokens=128)
DOCS_PROMPT_LEN = 512


def docs_search(topology: str, presets: Sequence[str] = DOCS_PRESETS,
                stages: Sequence[str] = STAGES) -> Dict[str, Dict[str, Any]]:
  """{preset: {stage: {'found': job result or None, 'tried': n}}} for one topology.

  Workload: sl / pm batch 2 x devices (global), seq DOCS_SEQ; rl DOCS_PPO at
  DOCS_PROMPT_LEN prompt columns. Each (preset, stage) tries ``mesh_candidates`` with
  ``microbatch_options`` (sl / pm; rl only those ``rl_batch_error`` accepts), pruned when
  the states alone exceed HBM.
  """
  topo = parse_topology(topology)
  train = TrainConfig(batch_size=2 * topo.devices, seq_len=DOCS_SEQ)
  groups, keys = [], []
  for name in presets:
    cfg = load_preset(name)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, DOCS_SEQ,
                                                   DOCS_PROMPT_LEN + DOCS_PPO.max_new_tokens))
    for stage in check_stages(stages):
      group = []
      for cand in mesh_candidates(topo.devices):
        dims = mesh_dims(cand, topo.devices)
        if stage == "rl" and rl_batch_error(DOCS_PPO, dims):
          continue
        options = [1] if stage == "rl" else microbatch_options(train.batch_size, dims, 1)
        for m in options:
          group.append(_job(cfg, cand, train, DOCS_PPO, OptimizerConfig(), [stage], m,
                            DOCS_PROMPT_LEN, topo.hbm_bytes, prune=True))
      groups.append(group)
      keys.append((name, stage))
  results = _call_child({"devices": topo.devices, "groups": groups})["results"]
  out: Dict[str, Dict[str, Any]] = {}
  for (name, stage), tried in zip(keys, results):
    found = tried[-1] if tried and tried[-1]["fits"] else None
    out.setdefault(name, {})[stage] = {"found": found, "tried": len(tried)}
  return out


def docs_table(topologies: Sequence[str] = DOCS_TOPOLOGIES,
               presets: Sequence[str] = DOCS_PRESETS, command: str = "") -> str:
  """Markdown of docs/PLAN.md: per stage, preset x topology -> the first mesh that fits."""
  t0 = time.perf_counter()
  found = {t: docs_search(t, presets) for t in topologies}
  minutes = (time.perf_counter() - t0) / 60
  topos = [parse_topology(t) for t in topologies]
  import jax
  lines = [
      "# Memory plan: which mesh each stage needs, per model preset and topology",
      "",
      "Generated by `cai_jax.plan` (nothing here is edited by hand):",
      "",
      "```",
      command or "python -m cai_jax.plan --docs > docs/PLAN.md",
      "```",
      "",
      "Each cell is the first mesh on which the stage fits the chip's memory, with its "
      "per-device total in GiB. Meshes are tried in this order: fsdp over all chips "
      "(`gin/mesh/fsdp.gin`), fsdp x tensor 4, fsdp x tensor 8 (`gin/mesh/fsdp_tp.gin`); "
      "for sl and pm each mesh first without gradient accumulation, then with one sequence "
      "per batch shard per microbatch (`N mb` = `TrainConfig.num_microbatches=N`). "
      "\"does not fit\" means none of them fits; `cai-jax plan` prints the numbers of any "
      "one configuration.",
      "",
      "Workload:",
      "",
      f"- sl: LM train step, global batch 2 x chips sequences of {DOCS_SEQ} tokens.",
      f"- pm: preference-model train step, global batch 2 x chips pairs (4 x chips sequences) "
      f"of {DOCS_SEQ} tokens.",
      f"- rl: PPO with rollout batch {DOCS_PPO.rollout_batch} x ({DOCS_PROMPT_LEN} prompt + "
      f"{DOCS_PPO.max_new_tokens} response) tokens, {DOCS_PPO.minibatches} minibatches of "
      f"{DOCS_PPO.rollout_batch // DOCS_PPO.minibatches} rows; policy and value model train, "
      "the frozen reference and preference model are resident, plus the sampler's KV cache; "
      "the programs compiled are the policy and value updates, the rollout scoring and the "
      "sampler's prefill + decode of the rollout batch (stacked-layer decode).",
      "- An sl / pm batch whose rows the batch shards (data x fsdp) do not divide is "
      "replicated, not split (a mesh axis that does not divide a dim is dropped). rl is "
      "planned only on meshes whose batch shards divide the "
      f"{DOCS_PPO.rollout_batch // DOCS_PPO.minibatches}-row PPO minibatches and the "
      f"{DOCS_PPO.rollout_batch}-row rollout batch: the rl stage refuses the others.",
      "- Presets as in `gin/models/` (bfloat16 compute, float32 parameters and AdamW state, "
      "full remat, scanned layers); default `OptimizerConfig` (AdamW + global-norm clipping).",
      "",
      "Chips: " + ", ".join(f"`{t.name}` = {t.devices} x {t.hbm_gib:g} GiB" for t in topos)
      + " (nominal HBM; the runtime reserves part of it, so keep some headroom).",
      "",
  ]
  lines += [
      "How it is measured: every step is compiled for that many fake CPU devices and "
      "sized by XLA's `memory_analysis()` (see `cai_jax/plan.py`). Parameter and optimizer "
      "bytes are exact; temporaries come from the CPU compiler, which widens bf16 "
      "arithmetic to f32 and keeps f32 copies of large bf16 buffers (for example the stack "
      "of layer inputs that full remat saves), so the totals run high for bf16 models and "
      "a TPU or GPU may fit a smaller mesh than listed.",
      "",
  ]
  for stage in STAGES:
    lines += [f"## {stage}", "",
              "| preset | params | " + " | ".join(f"`{t.name}`" for t in topos) + " |",
              "|---|---:|" + "---|" * len(topos)]
    for name in presets:
      cells = []
      for t in topologies:
        hit = found[t][name][stage]["found"]
        if hit is None:
          cells.append("does not fit")
        else:
          s = hit["stages"][stage]
          cells.append(f"{mesh_label(hit['mesh'], hit['microbatches'] if stage != 'rl' else None)}"
                       f" ({s['total_bytes'] / GIB:.1f})")
      count = load_preset(name).param_count()
      lines.append(f"| `{name}` | {count / 1e9:.2f}B | " + " | ".join(cells) + " |")
    lines.append("")
  compiled = sum(r["tried"] for t in found.values() for p in t.values() for r in p.values())
  load = os.getloadavg()[1] if hasattr(os, "getloadavg") else float("nan")
  lines += [f"Generated in {minutes:.1f} min ({compiled} mesh trials; a trial compiles each "
            f"program of its stage unless pruned) on {os.cpu_count()} CPU cores (5-minute load "
            f"average {load:.1f} at the end), jax {jax.__version__}.", ""]
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
  p = argparse.ArgumentParser(prog="python -m cai_jax.plan", description=__doc__.splitlines()[0])
  p.add_argument("--request", help="serve a JSON request ('-' reads stdin); used by run()")
  p.add_argument("--docs", action="store_true", help="print the markdown of docs/PLAN.md")
  p.add_argument("--topologies", default=",".join(DOCS_TOPOLOGIES),
                 help="comma-separated topologies of --docs")
  p.add_argument("--presets", default=",".join(DOCS_PRESETS),
                 help="comma-separated gin/models presets of --docs")
  args = p.parse_args(argv)
  if args.request is not None:
    _child_main(args.request)
  elif args.docs:
    command = "python -m cai_jax.plan --docs"
    if args.topologies != ",".join(DOCS_TOPOLOGIES):
      command += f" --topologies={args.topologies}"
    if args.presets != ",".join(DOCS_PRESETS):
      command += f" --presets={args.presets}"
    sys.stdout.write(docs_table([t for t in args.topologies.split(",") if t],
                                [x for x in args.presets.split(",") if x],
                                command + " > docs/PLAN.md"))
  else:
    p.error("give --request or --docs")


if __name__ == "__main__":
  main()
