"""Commands `import` and `export`: real checkpoints in and out.

`import`: a Hugging Face folder (config.json + safetensors), a .gguf file or a 'pkg:'
spec -> a model directory (model.json, params/, tokenizer/) that every stage reads.
`export`: a model directory -> a Hugging Face folder (config.json + safetensors +
tokenizer files) that transformers and other tools load. A model a stage trained records its
chat format (chat_format.txt); its export carries a chat template that renders that format
(``convert.export_chat_template``), so transformers' apply_chat_template prompts it as it
was trained, and its config.json's eos_token_id holds that format's end-of-turn token.
"""

from __future__ import annotations

import os
import sys

import jax

from cai_jax import convert, model_dir


def run_import(source: str, out: str) -> dict:
  if not source or not out:
    raise ValueError("import needs --from=PATH (HF folder or .gguf) and --out=DIR")
  config, params, tok = model_dir.load_any(source)
  path = model_dir.resolve_model_spec(source)
  head = model_dir.load_head(path) if model_dir.is_model_dir(path) else "lm"
  model_dir.save_model(out, config, params, tok, head=head)
  if tok is None and jax.process_index() == 0:
    print(f"import: warning: {source} holds no tokenizer (tokenizer.json or tokenizer.model); "
          f"{out} has none, so sampling it or training it needs a tokenizer given beside it "
          "(e.g. train_lm.tokenizer)", file=sys.stderr)
  return {"out": os.path.abspath(out), "source": source, "layers": config.n_layers,
          "d_model": config.d_model, "vocab": config.vocab_size,
          "tokenizer": tok is not None}


def run_export(source: str, out: str) -> dict:
  if not source or not out:
    raise ValueError("export needs --from=MODEL_DIR and --out=DIR")
  if not model_dir.is_model_dir(source):
    raise FileNotFoundError(f"{source}: not a {model_dir.MODEL_DIR_KIND}")
  if model_dir.load_head(source) != "lm":
    raise ValueError(f"{source}: only language models export to Hugging Face format")
  tok_dir = os.path.join(source, "tokenizer")
  tok_dir = tok_dir if os.path.isdir(tok_dir) else None
  chat_format = model_dir.trained_chat_format(source)
  template, what = convert.export_chat_template(
      tok_dir, chat_format, os.path.join(source, model_dir.CHAT_FORMAT_FILE))
  config, params = model_dir.load_model(source)
  convert.save_hf(params, config, out, tokenizer_dir=tok_dir, chat_template=template,
                  chat_format=chat_format)
  if jax.process_index() == 0:
    print(f"export: {what}", file=sys.stderr)
  return {"out": os.path.abspath(out), "source": source, "chat_template": what}
