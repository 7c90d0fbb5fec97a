"""Kernels and HBM bytes written per decode step of the sampler, compiled for a GPU without one.

XLA's GPU compiler decides how many kernels a decode step launches and whether it copies
weights inside the loop; both set the batch-1 step time, which is far from the bandwidth
roofline when a step launches hundreds of small kernels. This script compiles the sampler's
batch program (``sampler._batch_program``: prefill + the decode while-loop) ahead of time for
an H100 or H200 target on a machine with no GPU (JAX's deviceless GPU compilation: the CUDA
plugin is installed, no device is used), reads the optimized HLO and reports, per decode step:

  * kernels: the fusions, custom calls and copies of the decode loop's body, a nested loop's
    counted once per trip (the scanned layers: n_layers trips);
  * MB written: the bytes of their outputs. A decode step should write little beyond the
    activations and the new KV entries; weight-sized outputs are copies of weight slices
    (a scanned loop's per-layer dynamic slices that feed GEMM kernels) or weight-sized
    products (a matrix-vector product XLA rewrote as multiply + reduce);
  * temp GB: XLA's temporary buffers of the whole program (the unrolled decode's per-layer
    weight slices live there).

for the decode loop as ``ModelConfig.unroll_decode`` False (scanned: the loop runs the
nn.scan over the stacked layers), True (unrolled over slices made once per batch), and True
with ``ModelConfig.decode_attention`` 'pallas' (each layer's attention one Triton kernel
that reads the stacked KV cache in place), and prints the scanned loop's kernel count over
each one's. These are compile-time counts, not timings: they
show what a step launches and writes, not how long it takes (bench/sample.py times it).

Needs the JAX CUDA plugin matching the installed jax, e.g. in a virtual environment that sees
this one's packages (about 3.7 GB):

  python -m venv --system-site-packages /tmp/gpuvenv
  /tmp/gpuvenv/bin/pip install "jax-cuda13-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')" \\
      "jax-cuda13-pjrt==$(python -c 'import jax; print(jax.__version__)')"
  /tmp/gpuvenv/bin/python bench/decode_kernels.py                      # tinyllama_1b bf16, H200
  /tmp/gpuvenv/bin/python bench/decode_kernels.py --target h100 --batch_sizes 1,8,32 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402  (no jax import)

# Instructions that launch nothing: a computation's plumbing and control flow (a while loop's
# body is counted by itself).
_FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast",
                       "while", "after-all", "partition-id", "replica-id", "opt-barrier"})
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}


# ------------------------------------------------------------------------ HLO text analysis


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  out_bytes: int
  line: str


def _out_bytes(type_text: str) -> int:
  """Bytes of an HLO result type: 'bf16[2,3]{1,0}' or a tuple '(f32[4]{0}, s32[])'."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", type_text):
    if dtype not in _BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def parse_hlo(text: str) -> Tuple[Dict[str, List[Instruction]], str]:
  """(computation name -> its instructions, name of the ENTRY computation) of HLO text."""
  comps: Dict[str, List[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?)\s([a-z][\w\-]*)\(", line)
    if m:
      comps[current].append(Instruction(m.group(1), m.group(3), _out_bytes(m.group(2)), line))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _while_body(inst: Instruction) -> Tuple[str, Optional[int]]:
  body = re.search(r"body=%?([\w.\-]+)", inst.line).group(1)
  trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.line)
  return body, int(trip.group(1)) if trip else None


def written_bytes(comps: Dict[str, List[Instruction]], inst: Instruction,
                  scope: List[Instruction]) -> int:
  """Bytes `inst` (an instruction of computation `scope`) writes: its output, except for a
  dynamic-update-slice (alone or as the root of a fusion), which updates its buffer in
  place and writes only the update."""
  if inst.op == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", inst.line)
    body = comps.get(called.group(1), []) if called else []
    root = next((i for i in body if i.line.lstrip().startswith("ROOT ")), None)
    if root is not None and root.op == "dynamic-update-slice":
      return written_bytes(comps, root, body)
  if inst.op == "dynamic-update-slice":
    operands = re.search(r"dynamic-update-slice\(([^)]*)\)", inst.line).group(1)
    update = operands.split(",")[1].strip().lstrip("%")
    found = next((i for i in scope if i.name == update), None)
    if found is not None:
      return found.out_bytes
  return inst.out_bytes


def step_cost(comps: Dict[str, List[Instruction]], name: str) -> Tuple[int, int]:
  """(kernels, bytes written) of one run of computation `name`: every instruction that
  launches work counts once with the bytes it writes (``written_bytes``); a nested while
  loop counts its body times its known trip count (ValueError when XLA does not know it)."""
  kernels = written = 0
  for inst in comps[name]:
    if inst.op == "while":
      body, trip = _while_body(inst)
      if trip is None:
        raise ValueError(f"{inst.name}: a loop inside the decode step has no known trip count")
      k, w = step_cost(comps, body)
      kernels, written = kernels + trip * k, written + trip * w
    elif inst.op not in _FREE_OPS:
      kernels, written = kernels + 1, written + written_bytes(comps, inst, comps[name])
  return kernels, written


def decode_loop_body(comps: Dict[str, List[Instruction]], entry: str,
                     op_name: str = "jit(_batch_program)/while") -> str:
  """The body of the one while loop in ENTRY whose op_name metadata is `op_name` (the
  sampler's decode loop; the scanned prefill's loops are '.../Decoder/while')."""
  loops = [i for i in comps[entry]
           if i.op == "while" and re.search(r'op_name="' + re.escape(op_name) + '"', i.line)]
  if len(loops) != 1:
    raise ValueError(f"expected one decode loop ({op_name!r}) in ENTRY, found {len(loops)}")
  return _while_body(loops[0])[0]


def decode_step_cost(hlo_text: str) -> Tuple[int, int]:
  """(kernels, bytes written) per decode step of a compiled batch program's HLO text."""
  comps, entry = parse_hlo(hlo_text)
  return step_cost(comps, decode_loop_body(comps, entry))


# ------------------------------------------------------------------------ compilation


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tinyllama_1b",
                 help=f"gin/models preset (one of {_presets.available()}; default tinyllama_1b)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                 help="parameter and compute dtype (default bfloat16)")
  p.add_argument("--target", default="h200", choices=("a100", "h100", "h200"),
                 help="GPU to compile for (default h200)")
  p.add_argument("--batch_sizes", default="1,32", help="rows of the batch program (default 1,32)")
  p.add_argument("--prompt_len", type=int, default=64, help="prompt bucket P (default 64)")
  p.add_argument("--max_new_tokens", type=int, default=64, help="N (default 64)")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  args = p.parse_args(argv)
  try:
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
      raise ValueError
  except ValueError:
    p.error(f"--batch_sizes must be comma-separated positive ints; got {args.batch_sizes!r}")
  if args.prompt_len < 1 or args.max_new_tokens < 2:
    p.error("--prompt_len must be >= 1 and --max_new_tokens >= 2")
  return args


def _deviceless_mesh(target: str):
  """A one-device mesh of the target GPU, from the CUDA plugin, with no GPU attached."""
  import jax
  import numpy as np

  from cai_jax import deviceless
  try:
    devices = deviceless.gpu_devices(target, 1)
  except RuntimeError as e:
    raise SystemExit(f"bench/decode_kernels.py: {e}") from None
  return jax.sharding.Mesh(np.array(devices), ("x",))


def compile_batch_program(cfg, batch: int, prompt_len: int, max_new_tokens: int, mesh):
  """The compiled sampler batch program (greedy, no prefix) of `batch` rows for the mesh's
  device: (HLO text, temp bytes)."""
  import jax
  import jax.numpy as jnp

  from cai_jax import models, sampler
  placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

  import flax.linen as nn
  params = jax.tree_util.tree_map(lambda a: spec(a.shape, a.dtype),
                                  nn.meta.unbox(models.abstract_params(cfg)))
  decode = sampler._DecodeSpec.of(sampler.SamplingParams(temperature=0.0,
                                                         max_new_tokens=max_new_tokens))
  program = jax.jit(functools.partial(sampler._batch_program, cfg, decode))
  compiled = program.lower(params, spec((batch, prompt_len), jnp.int32),
                           spec((batch, prompt_len), bool), spec((batch,), bool),
                           spec((batch,), jnp.int32), spec((), jnp.uint32), None, None).compile()
  return compiled.as_text(), int(compiled.memory_analysis().temp_size_in_bytes)


# Decode-loop variants: (label, ModelConfig.unroll_decode, ModelConfig.decode_attention).
VARIANTS = (("scanned", False, None), ("unrolled", True, None),
            ("unrolled, pallas attention", True, "pallas"))


def run(args: argparse.Namespace) -> Dict[str, Any]:
  import jax
  mesh = _deviceless_mesh(args.target)
  rows = []
  for batch in args.batches:
    for label, unroll, attention in VARIANTS:
      cfg = _presets.model_config(args.preset, dtype=args.dtype, param_dtype=args.dtype,
                                  unroll_decode=unroll, decode_attention=attention)
      text, temp = compile_batch_program(cfg, batch, args.prompt_len, args.max_new_tokens, mesh)
      kernels, written = decode_step_cost(text)
      rows.append({"batch": batch, "decode_loop": label, "kernels_per_step": kernels,
                   "mb_written_per_step": written / 1e6, "temp_gb": temp / 1e9})
  scanned = {r["batch"]: r["kernels_per_step"] for r in rows if r["decode_loop"] == "scanned"}
  for r in rows:
    r["kernels_vs_scanned"] = scanned[r["batch"]] / r["kernels_per_step"]
  from cai_jax import deviceless
  return {"preset": args.preset, "dtype": args.dtype,
          "target": deviceless.GPU_TARGETS[args.target]["name"],
          "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
          "jax": jax.__version__, "rows": rows}


def print_table(out: Dict[str, Any]) -> None:
  print(f"decode step of sampler._batch_program: {out['preset']} {out['dtype']}, P "
        f"{out['prompt_len']}, N {out['max_new_tokens']}, compiled for {out['target']} without a "
        f"GPU (jax {out['jax']})\n")
  head = ("batch", "decode loop", "kernels / step", "MB written / step", "temp GB",
          "kernels scanned / this")
  rows = [(str(r["batch"]), r["decode_loop"], str(r["kernels_per_step"]),
           f"{r['mb_written_per_step']:,.1f}", f"{r['temp_gb']:.2f}",
           f"{r['kernels_vs_scanned']:.2f}x") for r in out["rows"]]
  print(_presets.markdown_table(head, rows))


def main(argv: Optional[List[str]] = None) -> None:
  args = parse_args(argv)
  _presets.ensure_repo_on_path()
  from cai_jax import deviceless   # no jax import
  # No GPU is used: the CUDA plugin compiles for the target, the host runs nothing on it.
  env = deviceless.environ(os.environ)
  for key in set(os.environ) - set(env):
    del os.environ[key]
  os.environ.update(env)
  out = run(args)
  if args.json:
    print(json.dumps(out))
  else:
    print_table(out)


if __name__ == "__main__":
  main()
