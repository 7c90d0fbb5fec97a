"""Model load time of cai_jax against transformers on the same files (GGUF and safetensors).

Every stage starts by loading its models, so their load time is paid once per stage process
(seven times in the default pipeline, more in the tests). Both sides load the same files
from the page cache (one untimed load first), each case timed `--repeats` times (median):

  * header: ``gguf_file.read_gguf`` (metadata and tensor index) against the ``gguf``
    package's ``GGUFReader`` on the same file;
  * gguf: ``model_dir.load_any(GGUF)`` (weights dequantized to float32 and placed on the
    JAX device, plus the tokenizer from the file's metadata) against transformers'
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` (float32) plus
    ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` (needs ``accelerate``);
  * safetensors: the weights exported once by ``convert.save_hf`` (and the tokenizer by
    ``tokenizer.save_tokenizer``) to a temporary Hugging Face folder, then ``model_dir.load_any``
    of that folder against ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer``.

Each side runs in its own child process (cai_jax first). Both tokenizers must give the same
ids for a test sentence (checked; a mismatch fails the run).

  python bench/model_load.py                 # the embedded SmolLM2-135M-Instruct GGUF
  python bench/model_load.py --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402

_presets.ensure_repo_on_path()

CASES = ("header", "gguf", "safetensors")
SENTENCE = "Hello world, what is 123+45? The capital of France is Paris."


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=_presets.DEFAULT_MODEL,
                 help="a .gguf file or 'pkg:' spec (default: the embedded SmolLM2-135M-Instruct)")
  p.add_argument("--repeats", type=int, default=3, help="timed loads per case (median)")
  p.add_argument("--json", action="store_true", help="also print one JSON line with everything")
  _presets.add_child_args(p)
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  return args


def run_ours(args: argparse.Namespace) -> Dict[str, Any]:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import gguf
  from cai_jax import convert, gguf_file, model_dir
  path = model_dir.resolve_model_spec(args.model)
  folder = os.path.join(args.workdir, "hf")

  def load(spec):
    def run():
      cfg, params, tok = model_dir.load_any(spec)
      jax.block_until_ready(params)
      return tok
    return run

  header = _presets.timed(lambda: gguf_file.read_gguf(path), args.repeats)
  reader = _presets.timed(lambda: gguf.GGUFReader(path), args.repeats)
  g = _presets.timed(load(args.model), args.repeats)
  from cai_jax.tokenizer import save_tokenizer
  cfg, params, tok = model_dir.load_any(args.model)
  save_tokenizer(tok, os.path.join(args.workdir, "tokenizer"))
  convert.save_hf(params, cfg, folder, os.path.join(args.workdir, "tokenizer"))  # read below
  st = _presets.timed(load(folder), args.repeats)
  return {"path": path, "folder": folder, "jax": jax.__version__,
          "ids": {"gguf": g["out"].encode(SENTENCE), "safetensors": st["out"].encode(SENTENCE)},
          "header": {k: v for k, v in header.items() if k != "out"},
          "header_peer": {k: v for k, v in reader.items() if k != "out"},
          "gguf": {k: v for k, v in g.items() if k != "out"},
          "safetensors": {k: v for k, v in st.items() if k != "out"}}


def run_peer(args: argparse.Namespace) -> Dict[str, Any]:
  import torch
  import transformers
  from cai_jax import model_dir
  path = model_dir.resolve_model_spec(args.model)
  folder = os.path.join(args.workdir, "hf")

  def load(directory, **kw):
    def run():
      model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw)
      tok = transformers.AutoTokenizer.from_pretrained(directory, **kw)
      return model, tok
    return run

  g = _presets.timed(load(os.path.dirname(path), gguf_file=os.path.basename(path)), args.repeats)
  st = _presets.timed(load(folder), args.repeats)
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "ids": {"gguf": g["out"][1].encode(SENTENCE, add_special_tokens=False),
                  "safetensors": st["out"][1].encode(SENTENCE, add_special_tokens=False)},
          "gguf": {k: v for k, v in g.items() if k != "out"},
          "safetensors": {k: v for k, v in st.items() if k != "out"}}


def main(argv: Optional[List[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if _presets.run_role(args, {"ours": run_ours, "peer": run_peer}):
    return
  ours, peer, machine, _ = _presets.run_both(__file__, argv, "cai_jax_load_bench_")
  for case in ("gguf", "safetensors"):
    if ours["ids"][case] != peer["ids"][case]:
      raise SystemExit(f"bench/model_load.py: the {case} tokenizers disagree on {SENTENCE!r}: "
                       f"{ours['ids'][case]} against {peer['ids'][case]}")
  rows = [("header (GGUF metadata + tensor index)", "gguf_file.read_gguf", "gguf.GGUFReader",
           ours["header"], ours["header_peer"]),
          ("GGUF -> float32 model + tokenizer", "model_dir.load_any", "from_pretrained(gguf_file=)",
           ours["gguf"], peer["gguf"]),
          ("HF safetensors folder -> model + tokenizer", "model_dir.load_any", "from_pretrained",
           ours["safetensors"], peer["safetensors"])]
  table = _presets.markdown_table(
      ["case", "ours", "peer", "ours s", "peer s", "peer / ours"],
      [[name, a, b, f"{o['median_s']:.3f}", f"{p['median_s']:.3f}",
        f"{p['median_s'] / o['median_s']:.2f}x"] for name, a, b, o, p in rows])
  print(f"model: {args.model} ({ours['path']}), median of {args.repeats} loads after one untimed load")
  print(f"jax {ours['jax']}; torch {peer['torch']}, transformers {peer['transformers']}")
  print(_presets.machine_line(machine))
  print(table)
  print("tokenizer ids agree on both paths")
  if args.json:
    print(json.dumps({"bench": "model_load", "model": args.model, "repeats": args.repeats,
                      "machine": machine, "ours": ours, "peer": peer}))


if __name__ == "__main__":
  main()
