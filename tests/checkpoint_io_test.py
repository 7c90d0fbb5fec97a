"""`cai-jax import` / `export`: HF folder -> model directory -> HF folder, logits preserved."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cai_jax import model_dir, models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "cai_jax.main", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=600)


def test_import_then_export_round_trip(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                 max_position_embeddings=128)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  out = _cli("import", f"--from={tmp_path / 'hf'}", f"--out={tmp_path / 'model'}")
  assert out.returncode == 0, out.stderr
  assert model_dir.is_model_dir(str(tmp_path / "model"))
  config, params = model_dir.load_model(str(tmp_path / "model"))
  ids = np.array([[1, 5, 9, 33, 70, 2]])
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(models.logits(params, config, ids)), ref, atol=1e-4)

  out = _cli("export", f"--from={tmp_path / 'model'}", f"--out={tmp_path / 'back'}")
  assert out.returncode == 0, out.stderr
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), ref, atol=1e-4)


def test_import_errors_name_the_source(tmp_path):
  out = _cli("import", f"--from={tmp_path / 'nothing'}", f"--out={tmp_path / 'm'}")
  assert out.returncode == 2 and "nothing" in out.stderr
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  out = _cli("import", f"--from={tmp_path / 'hf'}", f"--out={tmp_path / 'm'}")
  assert out.returncode == 2 and "GPT2LMHeadModel" in out.stderr
  assert not (tmp_path / "m").exists()
