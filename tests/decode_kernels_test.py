"""bench/decode_kernels.py: the per-step kernel and byte counts it reads from HLO text.

The counting is checked against a hand-written HLO module whose totals are worked out
below, and against a real CPU compile of the sampler's batch program (the decode loop is
found by its metadata; the scanned loop's layer loop is counted n_layers times). The
deviceless GPU compile itself needs the JAX CUDA plugin, which the test environment lacks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import pytest

from cai_jax.configs import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dk():
  spec = importlib.util.spec_from_file_location("decode_kernels", REPO / "bench" / "decode_kernels.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module          # its dataclass looks its module up
  spec.loader.exec_module(module)
  return module


# A decode loop whose body runs 2 kernels, then a 3-trip layer loop of 2 kernels (one an
# in-place cache update), and a prefill loop in ENTRY that the count must skip.
HLO = """HloModule m

%fused_update (p0: bf16[4,8,16], p1: bf16[4,1,16], p2: s32[]) -> bf16[4,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = bf16[4,1,16]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = bf16[4,8,16]{2,1,0} dynamic-update-slice(%p0, %p1, %c0, %p2, %c0)
}

%layer_body (x: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %x = (s32[], f32[2,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%x), index=0
  %h = f32[2,16]{1,0} get-tuple-element(%x), index=1
  %mm = f32[2,16]{1,0} fusion(%h), kind=kCustom, calls=%some_gemm
  %cache = bf16[4,8,16]{2,1,0} fusion(%h), kind=kLoop, calls=%fused_update
  ROOT %t = (s32[], f32[2,16]{1,0}) tuple(%i, %mm)
}

%decode_body (y: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %y = (s32[], f32[2,16]{1,0}) parameter(0)
  %n = f32[2]{0} fusion(%y), kind=kInput, calls=%norm
  %tok = (s32[2]{0}, f32[2]{0}) fusion(%y), kind=kLoop, calls=%pick
  %layers = (s32[], f32[2,16]{1,0}) while(%y), condition=%c, body=%layer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = (s32[], f32[2,16]{1,0}) tuple(%layers)
}

ENTRY %main (a: f32[2,16]) -> (s32[], f32[2,16]) {
  %a = f32[2,16]{1,0} parameter(0)
  %pre = (s32[], f32[2,16]{1,0}) while(%a), condition=%c, body=%layer_body, metadata={op_name="jit(_batch_program)/Decoder/while"}, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %loop = (s32[], f32[2,16]{1,0}) while(%pre), condition=%c, body=%decode_body, metadata={op_name="jit(_batch_program)/while"}
}
"""


def test_step_cost_of_a_hand_written_module(dk):
  comps, entry = dk.parse_hlo(HLO)
  assert entry == "main" and dk.decode_loop_body(comps, entry) == "decode_body"
  kernels, written = dk.decode_step_cost(HLO)
  assert kernels == 2 + 3 * 2
  # norm: 2 f32; pick: 2 s32 + 2 f32; per layer: the gemm's 2x16 f32 and the in-place cache
  # update's [4,1,16] bf16 (not its [4,8,16] buffer).
  assert written == (2 * 4) + (2 * 4 + 2 * 4) + 3 * (2 * 16 * 4 + 4 * 16 * 2)


def test_a_loop_without_trip_count_or_a_missing_decode_loop_is_an_error(dk):
  no_trip = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}\n  ROOT %r', "\n  ROOT %r")
  with pytest.raises(ValueError, match="no known trip count"):
    dk.decode_step_cost(no_trip)
  with pytest.raises(ValueError, match="expected one decode loop"):
    dk.decode_step_cost(HLO.replace('op_name="jit(_batch_program)/while"', 'op_name="other"'))


def test_real_cpu_compile_of_the_batch_program(dk):
  """On this CPU: the scanned decode step holds the n_layers-trip layer loop, the unrolled
  one none, and both are found and counted."""
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
  cfg = ModelConfig(n_layers=3)
  costs = {}
  for unroll in (False, True):
    text, temp = dk.compile_batch_program(dataclasses.replace(cfg, unroll_decode=unroll), 2, 8,
                                          4, mesh)
    comps, entry = dk.parse_hlo(text)
    body = dk.decode_loop_body(comps, entry)
    trips = [dk._while_body(i)[1] for i in comps[body] if i.op == "while"]
    assert trips == ([] if unroll else [3])
    costs[unroll] = dk.decode_step_cost(text)
    assert costs[unroll][0] > 0 and costs[unroll][1] > 0 and temp >= 0
