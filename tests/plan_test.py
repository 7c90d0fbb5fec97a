"""cai_jax.plan: topologies, per-device bytes of the sl / rl plans, KV cache, mesh errors."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from cai_jax import deviceless, models, plan, steps
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, PPOConfig, TrainConfig

TINY = plan.load_preset("tiny")
MESH = MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp")
# fsdp_tp on a 1 x 4 x 2 mesh, written out by hand: logical axis -> (mesh axis, its size).
HAND_RULES = {"embed": ("fsdp", 4), "heads": ("tensor", 2), "kv_heads": ("tensor", 2),
              "mlp": ("tensor", 2), "vocab": ("tensor", 2)}


def _hand_param_bytes(cfg: ModelConfig, head: str) -> int:
  """Per-device parameter bytes: for each leaf, count x itemsize / product of its shards."""
  boxed = models.abstract_params(cfg, head)
  specs = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                    is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(boxed))
  assert len(specs) == len(leaves)
  total = 0
  for spec, leaf in zip(specs, leaves):
    shards, used = 1, set()
    for dim, name in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      if name in HAND_RULES:
        axis, size = HAND_RULES[name]
        if axis not in used and dim % size == 0:
          shards *= size
          used.add(axis)
    count = 1
    for d in leaf.shape:
      count *= d
    total += count * np.dtype(leaf.dtype).itemsize // shards
  return total


def test_parse_topology_families():
  cases = {
      "v4-8": (4, 32.0), "v4-2048": (1024, 32.0),
      "v5p-16": (8, 95.0), "V5P-256": (128, 95.0),
      "v5e-16": (16, 16.0), "v5litepod-4": (4, 16.0),
      "v6e-8": (8, 32.0),
      "h100x8": (8, 80.0), "H100x8": (8, 80.0), "h200x16": (16, 141.0), "a100x2": (2, 80.0),
  }
  for name, (devices, hbm) in cases.items():
    topo = plan.parse_topology(name)
    assert (topo.devices, topo.hbm_gib) == (devices, hbm), name
    assert topo.hbm_bytes == int(hbm * 2**30)
  assert plan.parse_topology("H100x8").name == "h100x8"
  assert [plan.parse_topology(n).gpu for n in ("h100x8", "H200x2", "a100x4", "v5p-16")] == [
      "h100", "h200", "a100", None]


@pytest.mark.parametrize("name", ["v5p", "tpu-8", "h100-8", "v5p-7", "v4-0", "h100x", "v7-8", ""])
def test_parse_topology_rejects(name):
  with pytest.raises(ValueError) as e:
    plan.parse_topology(name)
  msg = str(e.value)
  assert "\n" not in msg
  if name not in ("v5p-7", "v4-0"):
    assert "v5p-N" in msg and "h100xN" in msg and repr(name) in msg
  else:
    assert "even" in msg


def test_parse_preset_and_errors(tmp_path):
  fields = plan.parse_preset("# header\n\nModelConfig.d_model = 64  # width\n"
                             "ModelConfig.dtype = 'bfloat16'\n")
  assert fields == {"d_model": 64, "dtype": "bfloat16"}
  with pytest.raises(ValueError, match=r"p\.gin:2: expected"):
    plan.parse_preset("ModelConfig.d_model = 64\nd_ff = 3\n", "p.gin")
  with pytest.raises(ValueError, match=r"p\.gin:1: 'foo\(\)' is not a Python literal"):
    plan.parse_preset("ModelConfig.d_model = foo()\n", "p.gin")
  assert plan.preset_name(TINY) == "tiny"
  assert plan.preset_name(ModelConfig(d_model=96, n_heads=4)) is None
  with pytest.raises(FileNotFoundError, match="no_such"):
    plan.load_preset("no_such")


def test_mesh_that_does_not_divide_the_devices():
  with pytest.raises(ValueError, match="8 devices are not divisible by the fixed dims"):
    plan.run("v5p-16", TINY, MeshConfig(data=1, fsdp=-1, tensor=3, rules="fsdp_tp"))
  with pytest.raises(ValueError, match=r"3\*1\*1 = 3 does not use all 8 devices"):
    plan.run("v5p-16", TINY, MeshConfig(data=3, fsdp=1, tensor=1, rules="dp"))
  with pytest.raises(ValueError, match="16 but there are only 8 devices"):
    plan.run("h100x8", TINY, MeshConfig(data=1, fsdp=4, tensor=4, rules="fsdp_tp"))
  assert plan.mesh_dims(MeshConfig(data=1, fsdp=-1, tensor=8), 128) == (1, 16, 8)


def test_bad_stage_and_microbatches():
  with pytest.raises(ValueError, match="unknown stage"):
    plan.run("v5p-16", TINY, MESH, stages=("sl", "dpo"))
  with pytest.raises(ValueError, match="microbatches=3 does not divide TrainConfig.batch_size=8"):
    plan.run("v5p-16", TINY, MESH, TrainConfig(batch_size=8), stages=("sl",), microbatches=3)
  with pytest.raises(ValueError, match="max_seq_len=512"):
    plan.run("v5p-16", TINY, MESH, stages=("rl",), prompt_len=500)


def test_child_error_is_one_line_value_error():
  # The child sees 2 devices; a 1 x 4 x 2 mesh needs 8: its ValueError comes back as one line.
  job = plan._job(TINY, MESH, TrainConfig(), PPOConfig(), OptimizerConfig(), ["sl"], 1, None,
                  2**30, prune=False)
  with pytest.raises(ValueError, match=r"^plan: MeshConfig: data\*fsdp\*tensor = 8 but there are "
                                       r"only 2 devices$"):
    plan._call_child({"devices": 2, "groups": [[job]]})


def test_gpu_compiler_checks_and_child_environment():
  """compiler='gpu' wants a GPU topology and a known compiler name (checked before any child
  starts); its child claims no GPU and lets the CUDA plugin load; without the plugin (as
  here) a one-line error says what to install, before any child starts."""
  with pytest.raises(ValueError, match=r"compiler='gpu' needs a GPU topology .* got 'v5p-16'"):
    plan.run("v5p-16", TINY, MESH, stages=("sl",), compiler="gpu")
  with pytest.raises(ValueError, match=r"compiler='tpu'; expected one of \('cpu', 'gpu'\)"):
    plan.run("h100x8", TINY, MESH, stages=("sl",), compiler="tpu")
  cpu, gpu = plan.child_env(8), plan.child_env(8, "h100")
  assert cpu["JAX_PLATFORMS"] == "cpu" and "device_count=8" in cpu["XLA_FLAGS"]
  assert gpu["CUDA_VISIBLE_DEVICES"] == "-1" and "JAX_PLATFORMS" not in gpu
  assert "--xla_gpu_enable_triton_gemm=false" in gpu["XLA_FLAGS"]
  assert "triton" not in cpu["XLA_FLAGS"]
  assert gpu["PYTHONPATH"] == cpu["PYTHONPATH"]
  if deviceless.cuda_plugin_installed():
    pytest.skip("a JAX CUDA plugin is installed here")
  with pytest.raises(ValueError, match=r"^plan: compiler='gpu' compiles with XLA's GPU compiler: "
                                       r"this needs the JAX CUDA plugin of jax"):
    plan.run("h100x2", TINY, MeshConfig(data=1, fsdp=2, tensor=1), stages=("sl",),
             compiler="gpu")


def test_gpu_model_config_takes_the_fused_kernel_a_gpu_would():
  bf16 = ModelConfig(dtype="bfloat16")
  assert plan.gpu_model_config(bf16, "h100").attention_impl == "cudnn"
  # float32 (cuDNN's kernel takes 16-bit only): XLA's dense attention, as on the GPU, not the
  # CPU's query-chunked one this (CPU-backend) process would otherwise compile.
  assert plan.gpu_model_config(ModelConfig(), "h100").attention_impl == "xla"
  xla = ModelConfig(dtype="bfloat16", attention_impl="xla")
  assert plan.gpu_model_config(xla, "a100") is xla


def test_sl_plan_tiny_bytes_and_does_not_fit_a_tiny_hbm():
  """Child process on 8 fake devices: sharded bytes by hand, AdamW = 2 x params + counters.

  (The rl test below checks `fits` with a huge HBM.)
  """
  train = TrainConfig(batch_size=8, seq_len=32)
  result = plan.run("v5p-16", TINY, MESH, train, stages=("sl",), hbm_gib=1e-6, suggest=False)
  assert (result["devices"], result["mesh"], result["rules"]) == (8, [1, 4, 2], "fsdp_tp")
  assert result["model"]["name"] == "tiny" and result["model"]["params"] == 115008
  sl = result["stages"]["sl"]
  params = _hand_param_bytes(TINY, "lm")
  assert params == 57664   # 115,008 params x 4 bytes spread over 8 devices, norms replicated
  assert sl["params_bytes"] == params
  tx = steps.make_optimizer(OptimizerConfig())
  opt_tree = jax.eval_shape(tx.init, nn.meta.unbox(models.abstract_params(TINY)))
  counters = [x for x in jax.tree_util.tree_leaves(opt_tree) if x.shape == ()]
  assert 1 <= len(counters) <= 3
  assert sl["opt_state_bytes"] == 2 * params + 4 * len(counters)
  xla = sl["programs"]["train_step"]["xla"]
  assert sl["temp_bytes"] == xla["temp_size_in_bytes"] > 0
  assert sl["total_bytes"] == (xla["argument_size_in_bytes"] + xla["output_size_in_bytes"]
                               - xla["alias_size_in_bytes"] + xla["temp_size_in_bytes"]
                               + xla["generated_code_size_in_bytes"])
  assert sl["total_bytes"] > sl["params_bytes"] + sl["opt_state_bytes"] + sl["temp_bytes"] - 1
  assert sl["other_bytes"] >= 0
  assert result["hbm_gib"] == 1e-6 and sl["hbm_bytes"] == int(1e-6 * 2**30)
  assert sl["fits"] is False and result["fits"] is False
  assert sl["headroom_bytes"] == sl["hbm_bytes"] - sl["total_bytes"] < 0

  table = plan.format_table(result)
  row = [line for line in table.splitlines() if line.startswith("sl ")][0].split()
  assert row[:4] == ["sl", "8", "x", "32"] and row[-1] == "NO"
  assert row[-4] == f"{sl['total_bytes'] / 2**30:.2f}"



def test_rl_plan_kv_cache_matches_formula():
  ppo = PPOConfig(rollout_batch=8, minibatches=2, max_new_tokens=8)
  result = plan.run("v5p-16", TINY, MESH, ppo=ppo, stages=("rl",), prompt_len=24, hbm_gib=1024)
  rl = result["stages"]["rl"]
  b, slots = 8, 24 + 8 - 1                      # the sampler never feeds the last token back
  k_heads, dh, layers = TINY.n_kv_heads, TINY.dim_per_head, TINY.n_layers
  # k and v: [L, B, S, K, Dh] float32, batch over fsdp (4), kv heads over tensor (2); mask [B, S].
  expected = 2 * layers * (b // 4) * slots * (k_heads // 2) * dh * 4 + (b // 4) * slots
  assert expected == 15934
  assert rl["kv_cache_bytes"] == expected
  assert (rl["rows"], rl["seq"], rl["rollout_batch"], rl["sample_rows"]) == (4, 32, 8, 8)
  # Policy + reference (LM head), value model + PM (scalar head); two AdamW states.
  lm, scalar = _hand_param_bytes(TINY, "lm"), _hand_param_bytes(TINY, "scalar")
  assert rl["params_bytes"] == 2 * lm + 2 * scalar
  assert 2 * (lm + scalar) < rl["opt_state_bytes"] < 2 * (lm + scalar) + 64
  assert set(rl["programs"]) == {"policy_step", "value_step", "rollout", "sample"}
  # The sampler builds the cache inside its program: its temporaries hold at least the
  # hand-computed cache, and its needs beyond the resident ones are counted without it.
  sample = rl["programs"]["sample"]
  assert sample["xla"]["temp_size_in_bytes"] >= expected
  assert sample["resident_args_bytes"] == lm + expected
  assert sample["extra_bytes"] == sample["xla"]["total_bytes"] - lm - expected
  extra = max(p["extra_bytes"] for p in rl["programs"].values())
  assert rl["total_bytes"] == (rl["params_bytes"] + rl["opt_state_bytes"] + rl["kv_cache_bytes"]
                               + 8 + extra)    # + the two int32 step counters
  assert rl["fits"] is True and result["fits"] is True and "suggestion" not in result
  assert rl["headroom_bytes"] == 2**40 - rl["total_bytes"] > 0


def test_format_table_by_hand():
  stage = {"rows": 4, "seq": 640, "rollout_batch": 16, "params_bytes": 3 * 2**30,
           "opt_state_bytes": 6 * 2**30, "temp_bytes": int(1.5 * 2**30), "kv_cache_bytes": 2**29,
           "other_bytes": 0, "total_bytes": 11 * 2**30, "hbm_bytes": 16 * 2**30,
           "headroom_bytes": 5 * 2**30, "fits": True}
  result = {"model": {"name": "810m", "params": 824249856}, "topology": "v5e-16", "devices": 16,
            "hbm_gib": 16.0, "mesh": [1, 16, 1], "rules": "fsdp", "stages": {"rl": stage},
            "suggestion": {"mesh": [1, 2, 8], "rules": "fsdp_tp", "microbatches": 4}}
  lines = plan.format_table(result).splitlines()
  assert lines[0].startswith("plan: 810m (824,249,856 params) on v5e-16: 16 devices x 16.00 GiB")
  assert lines[3].split() == ["rl", "4", "x", "640", "(B", "16)", "3.00", "6.00", "1.50", "0.50",
                              "0.00", "11.00", "16.00", "5.00", "yes"]
  assert lines[4] == "suggestion: fsdp 2 x tp 8, 4 mb (fsdp_tp) fits every stage"
  assert plan.mesh_label([1, 128, 1]) == "fsdp 128"
  assert plan.microbatch_options(256, (1, 16, 8), 1) == [1, 16]
  assert plan.microbatch_options(8, (1, 8, 1), 1) == [1]
  assert [plan.mesh_dims(m, 8) for m in plan.mesh_candidates(8)] == [(1, 8, 1), (1, 2, 4),
                                                                     (1, 1, 8)]


def test_docs_table_cells(monkeypatch):
  """The markdown from fixed search results: first fitting mesh and its total per cell."""
  def fake_search(topology, presets=plan.DOCS_PRESETS, stages=plan.STAGES):
    assert topology == "h100x8" and list(presets) == ["810m", "52b"]
    fit = {"mesh": [1, 2, 4], "microbatches": 8, "fits": True,
           "stages": {s: {"total_bytes": int(12.25 * 2**30)} for s in plan.STAGES}}
    return {"810m": {s: {"found": fit, "tried": 3} for s in plan.STAGES},
            "52b": {s: {"found": None, "tried": 6} for s in plan.STAGES}}

  monkeypatch.setattr(plan, "docs_search", fake_search)
  text = plan.docs_table(["h100x8"], ["810m", "52b"], "python -m cai_jax.plan --docs X")
  lines = text.splitlines()
  assert "python -m cai_jax.plan --docs X" in lines
  sl = lines.index("## sl")
  assert lines[sl + 2] == "| preset | params | `h100x8` |"
  assert lines[sl + 4] == "| `810m` | 0.82B | fsdp 2 x tp 4, 8 mb (12.2) |"
  assert lines[sl + 5] == "| `52b` | 52.88B | does not fit |"
  rl = lines.index("## rl")
  assert lines[rl + 4] == "| `810m` | 0.82B | fsdp 2 x tp 4 (12.2) |"   # no microbatches in rl
  assert "27 mesh trials" in text     # 3 stages x (3 for 810m + 6 for 52b)
  assert ("rl is planned only on meshes whose batch shards divide the 16-row PPO minibatches "
          "and the 64-row rollout batch: the rl stage refuses the others") in text


def test_sampler_rows_pad_to_the_batch_shards():
  """As sampler.generate pads a batch of `batch_size` prompts: one row per shard at least."""
  import jax
  from cai_jax import sharding
  mesh, rules = sharding.mesh_and_rules(MESH)          # 4 batch shards (fsdp) on 8 devices
  assert [plan.sampler_rows(b, mesh, rules) for b in (1, 4, 6, 8, 64)] == [4, 4, 8, 8, 64]
  wide, rules = sharding.mesh_and_rules(MeshConfig(data=1, fsdp=8, tensor=1, rules="fsdp"))
  assert plan.sampler_rows(4, wide, rules) == 8 == jax.device_count()
  assert plan.sampler_rows(5, None, None) == 5


def test_sample_config_falls_back_to_the_stacked_decode():
  assert plan.sample_config(TINY).unroll_decode is False       # TINY leaves it None
  for unroll in (True, False):
    config = dataclasses.replace(TINY, unroll_decode=unroll)
    assert plan.sample_config(config) is config


@pytest.mark.parametrize("microbatches", [0, -2, 1.5])
def test_microbatches_must_be_a_positive_integer(microbatches):
  with pytest.raises(ValueError, match=r"^plan\.microbatches must be an integer >= 1, got "):
    plan.run("v5p-16", TINY, MESH, TrainConfig(batch_size=8), stages=("sl",),
             microbatches=microbatches)


def test_suggestion_skips_only_the_mesh_and_rules_already_tried(monkeypatch):
  """A run on fsdp 2 x tensor 4 with the 'fsdp' rules (nothing over tensor) that did not fit
  leaves the fsdp_tp candidate of the same dims in the search."""
  seen = []

  def fake_child(request):
    seen.extend(request["groups"][0])
    return {"results": [[{"fits": False}]]}

  monkeypatch.setattr(plan, "_call_child", fake_child)
  train = TrainConfig(batch_size=8, seq_len=16)
  assert plan.suggest_mesh("v5p-16", TINY, train, stages=("sl",), microbatches=1,
                           exclude=[((1, 2, 4), "fsdp", 1)]) is None
  tried = [((j["mesh"]["fsdp"], j["mesh"]["tensor"]), j["mesh"]["rules"], j["microbatches"])
           for j in seen]
  assert ((2, 4), "fsdp_tp", 1) in tried
  seen.clear()
  plan.suggest_mesh("v5p-16", TINY, train, stages=("sl",), microbatches=1,
                    exclude=[((1, 2, 4), "fsdp_tp", 1)])
  tried = [((j["mesh"]["fsdp"], j["mesh"]["tensor"]), j["mesh"]["rules"], j["microbatches"])
           for j in seen]
  assert ((2, 4), "fsdp_tp", 1) not in tried and ((2, 4), "fsdp_tp", 4) in tried


def test_run_passes_its_mesh_and_rules_to_the_suggestion(monkeypatch):
  asked = {}

  class Stop(Exception):
    pass

  def fake_suggest(*args, **kwargs):
    asked.update(kwargs)
    raise Stop

  monkeypatch.setattr(plan, "_call_child", lambda request: {"results": [[{"fits": False}]]})
  monkeypatch.setattr(plan, "suggest_mesh", fake_suggest)
  with pytest.raises(Stop):
    plan.run("v5p-16", TINY, MeshConfig(data=1, fsdp=2, tensor=4, rules="fsdp"),
             TrainConfig(batch_size=8), stages=("sl",), microbatches=2)
  assert [tuple(x) for x in asked["exclude"]] == [((1, 2, 4), "fsdp", 2)]


@pytest.mark.parametrize("name", ["v5p", "v5p-7", "h100x0"])
def test_run_names_the_topology_flag(name):
  with pytest.raises(ValueError, match=rf"^plan: --topology: .*{name!r}") as e:
    plan.run(name, TINY, MESH, stages=("sl",))
  assert "\n" not in str(e.value)


def test_sl_and_pm_refuse_a_batch_longer_than_the_context():
  """train.check_seq_len refuses seq_len > max_seq_len, so the plan does too (before any
  compile); rl alone does not read TrainConfig."""
  long = TrainConfig(batch_size=8, seq_len=TINY.max_seq_len + 1)
  for stage in ("sl", "pm"):
    with pytest.raises(ValueError, match=r"^plan: TrainConfig\.seq_len=513 is longer than the "
                                         r"max_seq_len=512 of ModelConfig \(its context\); sl and "
                                         r"pm refuse it$"):
      plan.run("v5p-16", TINY, MESH, long, stages=(stage,))
  with pytest.raises(ValueError, match="seq_len=513"):
    plan.plan_on_devices(TINY, MeshConfig(data=1, fsdp=1, tensor=1), 2**30, long,
                         stages=("sl",), devices=jax.devices()[:1])


def test_rl_is_planned_only_on_meshes_the_rl_stage_accepts(monkeypatch):
  """stages.rl refuses a rollout batch or minibatch its batch shards (data x fsdp) do not
  divide; the plan reports rl as refused there (without compiling it) and still plans the
  other stages, and its searches skip those meshes."""
  ppo = PPOConfig(rollout_batch=16, minibatches=4, max_new_tokens=8)    # 4-row minibatches
  seen = []

  def fake_child(request):
    seen.extend(request["groups"][0])
    return {"results": [[{"fits": False}]]}

  monkeypatch.setattr(plan, "_call_child", fake_child)
  reason = ("PPOConfig.rollout_batch=16 with PPOConfig.minibatches=4 (4 rows per minibatch) "
            "does not divide over the 8 batch shards (data x fsdp) of the mesh; rl refuses it "
            "(a rollout_batch that is a multiple of 32 runs, or leave rl out of plan.stages)")
  result = plan.run("v5p-16", TINY, MeshConfig(data=2, fsdp=4, tensor=1), ppo=ppo,
                    stages=("rl",), suggest=False)
  assert result["stages"] == {"rl": {"refused": reason}} and result["fits"] is False
  assert "\nrl refused: " + reason in plan.format_table(result)
  with pytest.raises(ValueError, match="^plan: " + re.escape(reason) + "$"):
    plan.plan_on_devices(TINY, MeshConfig(data=1, fsdp=8, tensor=1), 2**30, ppo=ppo,
                         stages=("rl",), prompt_len=24)
  assert not seen
  plan.suggest_mesh("v5p-16", TINY, ppo=ppo, stages=("sl", "rl"), prompt_len=24)
  assert {(j["mesh"]["fsdp"], j["mesh"]["tensor"]) for j in seen} == {(2, 4), (1, 8)}
  # docs/PLAN.md's rl workload (16-row minibatches) on 128 chips: only fsdp 16 x tensor 8.
  seen.clear()
  plan.docs_search("v5p-256", ["tiny"], stages=("rl",))
  assert [(j["mesh"]["fsdp"], j["mesh"]["tensor"]) for j in seen] == [(16, 8)]


def test_a_refused_rl_still_plans_the_other_stages_and_searches_a_mesh(monkeypatch):
  """On a mesh rl refuses, `run` compiles only sl, reports rl as refused in stage order, and
  (fits False) searches a mesh on which rl runs."""
  ppo = PPOConfig(rollout_batch=16, minibatches=4, max_new_tokens=8)
  jobs = []
  gib = 2**30
  sl = {"rows": 8, "seq": 64, "microbatches": 1, "params_bytes": gib, "opt_state_bytes": gib,
        "temp_bytes": gib, "kv_cache_bytes": 0, "other_bytes": 0, "total_bytes": 3 * gib,
        "hbm_bytes": 95 * gib, "headroom_bytes": 92 * gib, "fits": True}

  def fake_child(request):
    group = request["groups"][0]
    jobs.append(group)
    job = group[-1]
    return {"results": [[{"mesh": [job["mesh"]["data"], job["mesh"]["fsdp"], job["mesh"]["tensor"]],
                          "rules": job["mesh"]["rules"], "microbatches": job["microbatches"],
                          "stages": {s: dict(sl, total_bytes=s == "rl" and 4 * gib or 3 * gib)
                                     for s in job["stages"]}, "fits": True}]]}

  monkeypatch.setattr(plan, "_call_child", fake_child)
  result = plan.run("v5p-16", TINY, MeshConfig(data=1, fsdp=8, tensor=1), TrainConfig(batch_size=8),
                    ppo=ppo, stages=("rl", "sl"), prompt_len=24)
  assert list(jobs[0][0]["stages"]) == ["sl"]
  assert list(result["stages"]) == ["rl", "sl"] and "refused" in result["stages"]["rl"]
  assert result["stages"]["sl"]["fits"] and not result["fits"]
  found = result["suggestion"]
  assert found["total_bytes"] == {"rl": 4 * gib, "sl": 3 * gib}
  assert plan.rl_batch_error(ppo, found["mesh"]) is None
  table = plan.format_table(result)
  assert re.search(r"^rl +refused( +-)+ +NO$", table, re.M), table
  assert "suggestion: " in table and "fits every stage" in table
