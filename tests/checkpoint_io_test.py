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


# --------------------------------------------------------------------------- chat templates

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there \n"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
]


def _byte_bpe_tokenizer(chat_template, add_bos_token=False):
  """A byte-level HFTokenizer with the chatml and llama3 turn markers as special tokens."""
  from tokenizers import Tokenizer, decoders, pre_tokenizers
  from tokenizers import models as tok_models
  from cai_jax.tokenizer import HFTokenizer
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = Tokenizer(tok_models.BPE(vocab, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(specials)
  return HFTokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                     add_bos_token=add_bos_token, chat_template=chat_template)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  """A tiny model directory (never trained: no chat_format.txt) whose tokenizer carries
  SmolLM2's ChatML template, default system message included."""
  import jax
  from cai_jax.configs import ModelConfig
  tok = _byte_bpe_tokenizer(SMOL_TEMPLATE)
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=32, max_seq_len=64)
  path = str(tmp_path_factory.mktemp("chat") / "model")
  model_dir.save_model(path, cfg, models.init(cfg, jax.random.PRNGKey(0)), tok)
  return path


def _trained_copy(chat_model, tmp_path, chat_format, template=SMOL_TEMPLATE, add_bos_token=False):
  import shutil
  path = str(tmp_path / "trained")
  shutil.copytree(chat_model, path)
  if template != SMOL_TEMPLATE or add_bos_token:
    _byte_bpe_tokenizer(template, add_bos_token).save(os.path.join(path, "tokenizer"))
  if chat_format:
    with open(os.path.join(path, model_dir.CHAT_FORMAT_FILE), "w") as f:
      f.write(chat_format + "\n")
  return path


def _export(path, tmp_path):
  from cai_jax.stages import checkpoint_io
  out = str(tmp_path / "export")
  result = checkpoint_io.run_export(path, out)
  return out, result


@pytest.mark.parametrize("chat_format,template", [
    ("raw", SMOL_TEMPLATE), ("llama3", SMOL_TEMPLATE), ("chatml", LLAMA3_TEMPLATE),
    ("chatml", None)], ids=["raw", "llama3", "chatml-over-llama3", "chatml-over-none"])
def test_export_chat_template_renders_the_trained_format(chat_model, tmp_path, chat_format,
                                                         template):
  """The exported tokenizer's apply_chat_template is render_chat of the format the model was
  trained in, not the checkpoint's own template's format."""
  from cai_jax.tokenizer import render_chat_text
  path = _trained_copy(chat_model, tmp_path, chat_format, template)
  before = open(os.path.join(path, "tokenizer", "tokenizer_config.json")).read()
  out, result = _export(path, tmp_path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  for messages in CONVERSATIONS:
    for prompt in (True, False):
      assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) \
          == render_chat_text(messages, chat_format, add_generation_prompt=prompt)
  assert open(os.path.join(path, "tokenizer", "tokenizer_config.json")).read() == before
  assert repr(chat_format) in result["chat_template"]


def test_export_chat_template_puts_the_bos_the_model_was_trained_with(chat_model, tmp_path):
  """A tokenizer that expects a BOS: the exported template's ids are encode_chat's."""
  from cai_jax.tokenizer import encode_chat, load_tokenizer
  path = _trained_copy(chat_model, tmp_path, "raw", add_bos_token=True)
  out, _ = _export(path, tmp_path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = load_tokenizer(os.path.join(path, "tokenizer"))
  for messages in CONVERSATIONS:
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(ours, messages, "raw", add_generation_prompt=True)[0]


@pytest.mark.parametrize("chat_format", [None, "chatml"])
def test_export_keeps_the_checkpoints_template_when_untrained_or_of_the_trained_format(
    chat_model, tmp_path, chat_format):
  """No chat_format.txt (an import), or a model trained in the template's own format: the
  checkpoint's template is exported unchanged (its default system message included)."""
  path = _trained_copy(chat_model, tmp_path, chat_format)
  out, _ = _export(path, tmp_path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.chat_template == SMOL_TEMPLATE
  assert "SmolLM" in hf_tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)


def test_export_refuses_an_unknown_recorded_chat_format(chat_model, tmp_path):
  path = _trained_copy(chat_model, tmp_path, "vicuna")
  with pytest.raises(ValueError, match=r"chat_format\.txt.*'vicuna'"):
    _export(path, tmp_path)
  assert not (tmp_path / "export").exists()


def test_export_generation_stops_at_the_trained_formats_end_of_turn(chat_model, tmp_path):
  """A model trained in llama3 whose tokenizer's EOS is another token: transformers'
  generate() stops at <|eot_id|> too, as the sampler does (stop_token_ids)."""
  from cai_jax.tokenizer import load_tokenizer, stop_token_ids
  path = _trained_copy(chat_model, tmp_path, "llama3", LLAMA3_TEMPLATE)
  out, _ = _export(path, tmp_path)
  tok = load_tokenizer(os.path.join(path, "tokenizer"))
  gen = transformers.AutoModelForCausalLM.from_pretrained(out).generation_config
  assert sorted(gen.eos_token_id) == stop_token_ids(tok, "llama3")
  assert tok.token_to_id("<|eot_id|>") in gen.eos_token_id != tok.eos_id


def test_import_of_a_folder_without_a_tokenizer_says_so(tmp_path, capsys):
  """A Hugging Face folder with weights but no tokenizer imports (a tokenizer can be given
  beside the model later), with a warning naming the folder and a summary that says so."""
  import jax
  from cai_jax import convert, models
  from cai_jax.configs import ModelConfig
  from cai_jax.stages import checkpoint_io
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=32)
  convert.save_hf(models.init(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path / "hf"))
  result = checkpoint_io.run_import(str(tmp_path / "hf"), str(tmp_path / "m"))
  assert result["tokenizer"] is False
  err = capsys.readouterr().err
  assert f"import: warning: {tmp_path / 'hf'} holds no tokenizer" in err
  assert not (tmp_path / "m" / "tokenizer").exists()
