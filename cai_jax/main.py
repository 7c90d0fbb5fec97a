"""The `cai-jax` command line: `cai-jax COMMAND [--gin_file=F ...] [--gin.KEY=VALUE ...]`.

Gin is used here and nowhere else: this module registers the config dataclasses
and the stage runners as configurables, parses the gin files and bindings, writes
the effective config beside the outputs, and calls the stage.
"""

from __future__ import annotations

import importlib
import importlib.util  # noqa: F401  (gin 0.5.0's relative includes need it imported)
import functools
import json
import math
import os
import re
import sys
import tokenize
import traceback
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from absl import app, flags, logging

from cai_jax import resources
from cai_jax.errors import first_line

GIN_DIR = resources.GIN_DIR

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); relative includes resolve against gin/.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings KEY=VALUE (also written --gin.KEY=VALUE).")
flags.DEFINE_multi_string("gin_search_path", [], "Extra directories searched for gin files.")
flags.DEFINE_string("out_dir", None, "Output directory (binds COMMAND.out_dir).")
flags.DEFINE_string("out", None, "Output file or directory (binds COMMAND.out).")
flags.DEFINE_string("from", None, "Source checkpoint (binds COMMAND.source).")
flags.DEFINE_string("policy", None, "Policy model spec (binds COMMAND.policy).")
flags.DEFINE_string("records", None, "critique_revision output (binds COMMAND.records).")
flags.DEFINE_string("prompts", None, "Input prompts JSONL (binds COMMAND.prompts).")
flags.DEFINE_string("model", None, "Model: directory, .gguf, HF folder or pkg: spec (binds COMMAND.model).")
flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy (binds COMMAND.temperature).")
flags.DEFINE_integer("max_new_tokens", None, "Most new tokens per prompt (binds COMMAND.max_new_tokens).")
flags.DEFINE_enum("distributed", "auto", ["none", "auto", "explicit"],
                  "Multi-process runs (jax.distributed): 'auto' starts one only under a multi-process "
                  "launch (SLURM, Cloud TPU pod, the flags below or CAI_* variables); see "
                  "cai_jax/distributed.py.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's jax.distributed coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.DEFINE_string("data", None, "Evaluation data file or directory (binds COMMAND.data).")
flags.DEFINE_string("topology", None, "plan: accelerator topology, e.g. v5p-256, h100x8 "
                    "(binds plan.topology).")
flags.DEFINE_string("compilation_cache", None, "Directory of the persistent XLA compilation "
                    "cache, or 'none' to turn it off (default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/cai_jax/xla); see cai_jax/compilation_cache.py.")
flags.DEFINE_bool("skip_if_complete", False, "Do nothing when the command's out_dir holds a "
                  "finished run with the same effective config and input models (used by "
                  "`pipeline`).")

# Convenience flags and the runner argument each binds.
_FLAG_ARGS = {"out_dir": "out_dir", "out": "out", "from": "source", "prompts": "prompts", "records": "records", "policy": "policy",
              "model": "model", "temperature": "temperature", "max_new_tokens": "max_new_tokens",
              "data": "data", "topology": "topology"}


class CliError(Exception):
  """A usage or input error reported as one line, exit status 2."""


class Command(NamedTuple):
  help: str
  default_gin: Optional[str]
  runner: Callable[[], Callable]     # returns the (gin-configurable) function to call
  writes_out_dir: bool
  gin_name: Optional[str] = None   # configurable name when the command is a gin keyword
  positional: Tuple[str, ...] = ()  # runner arguments given as positional words

  def configurable(self, command: str) -> str:
    return self.gin_name or command


def _stage(module: str, attr: str = "run") -> Callable[[], Callable]:
  """A loader of cai_jax.stages.<module>.<attr>, imported only when the command runs."""
  def load():
    return getattr(importlib.import_module(f"cai_jax.stages.{module}"), attr)
  return load


@functools.lru_cache(maxsize=None)   # one object: gin refuses a second, different registration
def _constitution():
  from cai_jax import constitution

  def constitution_command(action: str = "", path: str = "") -> dict:
    """`cai-jax constitution check [PATH]`: validate a constitution (default: the shipped one)
    and print its counts."""
    if action != "check":
      what = f"unknown action {action!r}" if action else "no action given"
      raise CliError(f"constitution: {what}; usage: cai-jax constitution check [PATH]")
    return constitution.check(path or constitution.DEFAULT_PATH)
  return constitution_command


@functools.lru_cache(maxsize=None)
def _info():
  from cai_jax.configs import ModelConfig

  def info(model: ModelConfig = ModelConfig()) -> dict:  # model: built by gin (see main)
    """Shape and exact parameter count of a model config (eval_shape; nothing allocated)."""
    from cai_jax import models
    return {"params": models.count_params(model), "layers": model.n_layers,
            "d_model": model.d_model, "heads": model.n_heads, "kv_heads": model.n_kv_heads,
            "head_dim": model.dim_per_head, "d_ff": model.d_ff, "vocab": model.vocab_size,
            "tie_embeddings": model.tie_embeddings}
  return info


COMMANDS: Dict[str, Command] = {
    "train_lm": Command("fine-tune a decoder on a JSONL or TFDS text/conversation dataset",
                        "experiments/tiny_cpu.gin", _stage("train_lm", "run"), True),
    "constitution": Command("`constitution check [PATH]`: validate a constitution (our format or "
                            "Anthropic's prompts/ folder; default: the shipped one) and print its "
                            "counts",
                            None, _constitution, False, positional=("action", "path")),
    "redteam_prompts": Command("expand the red-team prompt set with the model itself (few-shot; "
                               "length, refusal and duplicate filters) into --out=FILE.jsonl",
                               "experiments/smollm2_135m_cpu.gin", _stage("redteam_prompts", "run"), False),
    "critique_revision": Command("sample responses, then n rounds of critique -> revision with "
                                 "random principles; sharded, resumable output in --out_dir",
                                 "experiments/smollm2_135m_cpu.gin", _stage("critique_revision", "run"), True),
    "feedback": Command("AI feedback: two policy responses per harmful prompt, labelled by the "
                        "feedback model with a soft p_A; sharded, resumable output in --out_dir",
                        "experiments/smollm2_135m_cpu.gin", _stage("feedback", "run"), True),
    "sl": Command("SL-CAI: fine-tune the pretrained model on critique_revision output (every "
                  "round's revisions + helpful samples)",
                  "experiments/smollm2_135m_cpu.gin", _stage("sl", "run"), True),
    "pm": Command("preference model: decoder + zero-initialised scalar head trained with soft "
                  "Bradley-Terry on AI harmlessness (+ human helpfulness) comparisons",
                  "experiments/smollm2_135m_cpu.gin", _stage("pm", "run"), True),
    "rl": Command("RL-CAI: PPO from the SL-CAI policy against the preference model, reward = PM "
                  "score - beta * KL(policy || SL-CAI); snapshots for evaluation",
                  "experiments/smollm2_135m_cpu.gin", _stage("rl", "run"), True),
    "dpo": Command("DPO on the AI-labelled comparisons (soft labels) against a frozen reference: "
                   "the lighter alternative to pm + rl",
                   "experiments/smollm2_135m_cpu.gin", _stage("dpo", "run"), True),
    "sample": Command("complete each {\"prompt\"} or {\"messages\"} line of --prompts=FILE.jsonl "
                      "into --out=FILE.jsonl "
                      "(an interrupted run resumes from FILE.jsonl.parts/)",
                      "experiments/smollm2_135m_cpu.gin", _stage("sample", "run"), False),
    "import": Command("HF folder or .gguf (--from=PATH) -> model directory (--out=DIR)",
                      None, _stage("checkpoint_io", "run_import"), False, "import_checkpoint"),
    "export": Command("model directory (--from=DIR) -> Hugging Face safetensors folder (--out=DIR)",
                      None, _stage("checkpoint_io", "run_export"), False, "export_checkpoint"),
    "evaluate": Command("Elo of the base, SL-CAI and RL-CAI snapshots on helpfulness and "
                        "harmlessness, judged by the feedback model and/or the PM; monitors, "
                        "absolute harmfulness, HHH; writes report.html + report.json",
                        "experiments/smollm2_135m_cpu.gin", _stage("evaluate", "run"), True),
    "evaluate_hhh": Command("`evaluate hhh --data=FILE|DIR`: HHH accuracy and calibration of a "
                            "feedback model (multiple choice) or a PM on Anthropic evals "
                            "JSONL or BIG-bench task.json (a folder: every */task.json); "
                            "files in --out_dir when given",
                            "experiments/smollm2_135m_cpu.gin", _stage("evaluate_hhh", "run"),
                            False),
    "harm_model": Command("absolute harmfulness: a 0-4 regression head trained on labelled "
                          "conversations (data/harm_labels.jsonl format)",
                          "experiments/smollm2_135m_cpu.gin", _stage("harm_model", "run"), True),
    "pipeline": Command("the whole method: critique_revision -> sl -> feedback -> pm -> rl -> "
                        "harm_model -> evaluate (pipeline.stages of the default gin), skipping "
                        "finished stages, ending with the report",
                        "experiments/smollm2_135m_cpu.gin", _stage("pipeline", "run"), False),
    "plan": Command("per-device memory of the sl / pm / rl steps on --topology=v5p-256 (v4-N, "
                    "v5e-N, v6e-N, h100xN, ...) from a compile on fake devices; fits or not",
                    "models/tiny.gin", lambda: importlib.import_module("cai_jax.plan").run,
                    False),
    "info": Command("print a model config's shape and exact parameter count as one JSON line",
                    "models/tiny.gin", _info, False),
}

# Commands that run as one program over several processes (jax.distributed): every process
# computes the same results on one global mesh and process 0 alone writes the outputs.
# Others refuse a multi-process run.
MULTI_HOST_COMMANDS = ("train_lm", "sl", "sample", "critique_revision", "feedback", "pm", "rl", "dpo",
                       "harm_model", "evaluate", "evaluate_hhh", "redteam_prompts")
_PROCESS = {"index": 0, "count": 1}
# `pipeline`: the --distributed* flags its stages get, and this process's index when known
# before any stage runs (None: a cluster launch whose index only jax detects).
_PIPELINE: Dict[str, object] = {"distributed_args": [], "process_id": 0}

# `cai-jax WORD1 WORD2` spellings of commands whose name has an underscore.
_SUBCOMMANDS = {("evaluate", "hhh"): "evaluate_hhh"}


def usage() -> str:
  lines = ["usage: cai-jax COMMAND [--gin_file=FILE ...] [--gin.KEY=VALUE ...] [--out_dir=DIR]",
           "", "Constitutional AI in JAX. Commands:"]
  for name, cmd in COMMANDS.items():
    default = f" (default gin: gin/{cmd.default_gin})" if cmd.default_gin else ""
    lines.append(f"  {_spelled(name):<18} {cmd.help}{default}")
  lines += ["", "Flags:",
            "  --version              print the versions of cai-jax, jax, flax and python",
            "  --gin_file=FILE        gin file (repeatable); without one, the command's default",
            "  --gin.KEY=VALUE        a gin binding, e.g. --gin.TrainConfig.num_steps=20; one",
            "                         of another command's runner (--gin.pm.X to rl) is an",
            "                         error (gin files may bind every command)",
            "  --out_dir=DIR          output directory of the command; for pipeline, the root",
            "                         every stage's output is moved under",
            "  --from=PATH --out=PATH source and destination of import / export (--out is written",
            "                         whole, then swapped in; it may only replace an empty",
            "                         directory or an earlier output of the same kind); --out is",
            "                         the output file of sample and redteam_prompts",
            "  --prompts=FILE --model=SPEC --policy=SPEC --records=DIR --temperature=T",
            "  --max_new_tokens=N     bind the command's argument of that name, e.g. --model of",
            "                         sample, critique_revision or sl (an unknown one is an error)",
            "  --data=FILE|DIR        evaluation data of `evaluate hhh`; labelled data of harm_model",
            "  --topology=NAME        accelerator topology of `plan` (v5p-256, v4-64, h100x8, ...);",
            "                         --gin.plan.compiler=\"'gpu'\" compiles a GPU topology with",
            "                         XLA's GPU compiler without a GPU (needs the JAX CUDA plugin)",
            "  --gin_search_path=DIR  extra directory for gin includes",
            "  --compilation_cache=DIR|none   persistent XLA compilation cache shared by every",
            "                         command (default: $JAX_COMPILATION_CACHE_DIR, else",
            "                         $XDG_CACHE_HOME/cai_jax/xla or ~/.cache/cai_jax/xla; at most",
            "                         $JAX_COMPILATION_CACHE_MAX_SIZE bytes, default 8 GiB)",
            "  --distributed=auto|none|explicit --coordinator_address=HOST:PORT",
            "  --num_processes=N --process_id=I   multi-process runs through jax.distributed",
            "                         (auto: SLURM, Cloud TPU pods, CAI_* variables)",
            "  --skip_if_complete     do nothing when --out_dir holds a finished run of the same",
            "                         config and input models (pipeline passes it to each stage)",
            "", "Examples:",
            "  cai-jax pipeline       # the whole method on SmolLM2-135M-Instruct, then the report",
            "  cai-jax evaluate hhh --data=path/to/evals.jsonl",
            "  cai-jax plan --gin_file=gin/models/52b.gin --gin_file=gin/mesh/fsdp_tp.gin "
            "--topology=v5p-256",
            "  cai-jax info --gin_file=gin/models/smollm2_135m.gin",
            "  cai-jax sample --prompts=data/sample_prompts.jsonl --out=out.jsonl --temperature=0"]
  return "\n".join(lines)


def _command_words(argv: List[str]) -> List[str]:
  """The words of argv[1:] that are not flags, `evaluate hhh` read as evaluate_hhh."""
  args = [a for a in argv[1:] if not a.startswith("-")]
  if tuple(args[:2]) in _SUBCOMMANDS:
    args = [_SUBCOMMANDS[tuple(args[:2])]] + args[2:]
  return args


def _doc_args(doc: str, names) -> Dict[str, str]:
  """{argument: first line of its description} from a docstring's "Args:" section: each
  'NAME: text' of an argument in ``names`` at the start of a line or after '. ' or '; ' (as
  in 'prompts: input JSONL path. out: output JSONL path.'), up to the next such entry."""
  lines = (doc or "").splitlines()
  start = next((i for i, l in enumerate(lines) if l.strip() == "Args:"), None)
  if start is None:
    return {}
  indent = len(lines[start]) - len(lines[start].lstrip())
  found = {}
  for line in lines[start + 1:]:
    if line.strip() and len(line) - len(line.lstrip()) <= indent:
      break   # the next section (Returns:, ...)
    entries = [m for m in re.finditer(r"(?:^\s*|(?<=[.;])\s+)(\w+): ", line)
               if m.group(1) in names]
    for m, nxt in zip(entries, entries[1:] + [None]):
      found.setdefault(m.group(1), line[m.end():nxt.start() if nxt else None].strip(" ;"))
  return found


def command_usage(command: str) -> str:
  """`cai-jax COMMAND --help`: the command's line of the global help, its direct flags, and
  every argument of its runner as the --gin binding (and flag) that sets it, with the
  runner's default and the first line of its docstring's description. Imports the runner's
  module (a stage's imports jax)."""
  import inspect
  cmd = COMMANDS[command]
  spelled = _spelled(command)
  name = cmd.configurable(command)
  fn = cmd.runner()
  params = inspect.signature(fn).parameters
  docs = _doc_args(inspect.getdoc(fn), params)
  configs = _config_classes()
  flag_of = {arg: flag for flag, arg in _FLAG_ARGS.items()
             if arg in params and not isinstance(params[arg].default, configs)}
  words = " ".join(f"[{w.upper()}]" if params[w].default is not inspect.Parameter.empty
                   else w.upper() for w in cmd.positional)
  lines = [f"usage: cai-jax {spelled} {words + ' ' if words else ''}[--gin_file=FILE ...] "
           f"[--gin.{name}.NAME=VALUE ...] [--FLAG=VALUE ...]", "", cmd.help + "."]
  lines += ["", "Flags:"]
  for arg, flag in flag_of.items():
    lines.append(f"  --{flag}=VALUE".ljust(26) + FLAGS[flag].help.replace("COMMAND.", f"{name}."))
  lines.append("  --gin_file=FILE".ljust(26) + "gin file (repeatable); without one, "
               + (f"gin/{cmd.default_gin}" if cmd.default_gin else "no gin file"))
  lines.append("  --gin_search_path=DIR".ljust(26) + "extra directory for gin includes")
  lines.append("  --compilation_cache=DIR|none".ljust(26) + " persistent XLA compilation cache")
  if cmd.writes_out_dir:
    lines.append("  --skip_if_complete".ljust(26) + "do nothing when --out_dir holds a finished "
                 "run of the same config and input models")
  if command in MULTI_HOST_COMMANDS:
    lines.append("  --distributed=auto|none|explicit and --coordinator_address, --num_processes, "
                 "--process_id: multi-process runs")
  lines += ["", f"Settings of {name} (the runner's defaults; a gin file may bind them too; a "
                f"string value needs quotes: --gin.{name}.NAME=\"'text'\"):"]
  for arg, p in params.items():
    how = f"--gin.{name}.{arg}=VALUE"
    if arg in flag_of:
      how += f" or --{flag_of[arg]}=VALUE"
    if arg in cmd.positional:
      how += f" or the word {arg.upper()}"
    if p.default is inspect.Parameter.empty:
      default = "required"
    elif isinstance(p.default, configs):
      cls = type(p.default).__name__
      how = f"--gin.{cls}.FIELD=VALUE"
      default = f"{arg}: the {cls} that gin builds"
    else:
      default = f"default: {p.default!r}"
    lines.append(f"  {how}   {default}")
    if docs.get(arg):
      lines.append(f"      {docs[arg]}")
  lines += ["", "`cai-jax --help` lists every command and flag."]
  return "\n".join(lines)


def _unknown_flag_text(argv: List[str], e: Exception) -> str:
  """absl's first line for a bad flag; for an unknown --NAME=VALUE where NAME is an argument
  of the command's runner, the --gin binding to use instead (imports the runner's module)."""
  text = first_line(e)
  words = _command_words(argv)
  if not isinstance(e, flags.UnrecognizedFlagError) or not words or words[0] not in COMMANDS:
    return text
  import ast
  import inspect
  command = words[0]
  try:
    params = inspect.signature(COMMANDS[command].runner()).parameters
  except Exception:   # noqa: BLE001  (the hint is optional; absl's message stands alone)
    return text
  if e.flagname not in params or isinstance(params[e.flagname].default, _config_classes()):
    return text
  arg = str(e.flagvalue)
  value = arg.split("=", 1)[1] if "=" in arg else "..."
  if value != "...":
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = f"\"{value!r}\""
  name = COMMANDS[command].configurable(command)
  spelled = _spelled(command)
  return (f"unknown flag --{e.flagname}: {e.flagname} is a setting of {name}; use "
          f"--gin.{name}.{e.flagname}={value} (`cai-jax {spelled} --help` lists them)")


def version_line() -> str:
  """'cai-jax 0.1.0 (jax 0.10.2, flax 0.12.8, python 3.11.7)': what `--version` prints."""
  from importlib import metadata
  import platform
  from cai_jax import __version__
  found = []
  for dist in ("jax", "flax"):
    try:
      found.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      found.append(f"{dist} not installed")
  return f"cai-jax {__version__} ({', '.join(found)}, python {platform.python_version()})"


def _spelled(command: str) -> str:
  """How a user types `command` ('evaluate hhh' for evaluate_hhh)."""
  return next((" ".join(k) for k, v in _SUBCOMMANDS.items() if v == command), command)


def check_command_bindings(command: str, bindings: List[str]) -> None:
  """CliError for a command-line binding of another command's runner (e.g. --gin.pm.mix_ratio
  given to `cai-jax rl`): a command's parse skips the other commands' bindings, which the
  gin files shared by every command hold, so on the command line it would change nothing.
  The same for a binding of a config class the command's runner does not take (e.g.
  --gin.ModelConfig.dtype given to `cai-jax import`, which reads the checkpoint's own)."""
  if command not in COMMANDS:
    return
  own = COMMANDS[command].configurable(command)
  others = {c.configurable(n): _spelled(n) for n, c in COMMANDS.items()
            if c.configurable(n) != own}
  name, command = command, _spelled(command)
  read = None   # the config classes the command's runner takes, found when first needed
  for binding in bindings:
    key = binding.split("=", 1)[0].strip()
    scope, _, selector = key.rpartition("/")
    target = selector.rsplit(".", 1)[0] if "." in selector else ""
    if target in others:
      raise CliError(f"--gin.{key} binds `cai-jax {others[target]}`, which `cai-jax {command}` "
                     f"does not run; pass it to `cai-jax {others[target]}`, or put it in a gin "
                     "file")
    if target in {c.__name__ for c in _config_classes()} and scope in ("", own):
      if read is None:
        import inspect
        params = inspect.signature(COMMANDS[name].runner()).parameters.values()
        read = {type(p.default).__name__ for p in params
                if isinstance(p.default, _config_classes())}
      if target not in read:
        raise CliError(f"--gin.{key} binds {target}, which `cai-jax {command}` does not read "
                       f"(it takes {', '.join(sorted(read)) or 'no config class'}; "
                       f"`cai-jax {command} --help` lists its settings)")


def rewrite_gin_args(argv: List[str]) -> List[str]:
  """t5x style: --gin.KEY=VALUE -> --gin_bindings=KEY=VALUE."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      key, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={key} = {value}")
    else:
      out.append(arg)
  return out


def _config_classes():
  from cai_jax import configs
  return (configs.ModelConfig, configs.MeshConfig, configs.OptimizerConfig, configs.TrainConfig,
          configs.PPOConfig)


def _register_configurables(gin, command: str):
  """Registers the config classes and the command's runner.

  Returns (configured runner, wrapped config classes, {argument: config class} for the
  runner arguments whose default is a config dataclass, [required argument names]).
  ``parse_gin`` builds the unbound config arguments with gin (so `ModelConfig.d_model = ...`
  lines apply without `runner.model = @ModelConfig()`) and names unbound required ones.
  """
  import inspect
  wrapped = {cls: gin.external_configurable(cls, cls.__name__) for cls in _config_classes()}
  fn = COMMANDS[command].runner()
  params = inspect.signature(fn).parameters
  defaults = {name: type(p.default) for name, p in params.items() if type(p.default) in wrapped}
  required = [name for name, p in params.items() if p.default is inspect.Parameter.empty]
  configured = gin.external_configurable(fn, COMMANDS[command].configurable(command))
  return configured, wrapped, defaults, required


_GIN_ERRORS = (ValueError, KeyError, TypeError, SyntaxError, IOError, tokenize.TokenError)
_QUOTE_HINT = "a string value needs quotes inside the flag, e.g. --gin.sample.model=\"'/path'\""


def _gin_error_text(e: BaseException) -> str:
  """One line for a gin parse error: the file and line of a gin-file syntax error, gin's
  'Failed to parse token' detail where it has one, and words for an unclosed bracket or
  quote (Python's tokenizer error, which gin lets through)."""
  if isinstance(e, tokenize.TokenError):
    return "unexpected end of input (an unclosed bracket or quote?)"
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
  detail = next((l for l in lines if l.startswith("Failed to parse token")), lines[0])
  if isinstance(e, SyntaxError) and e.filename and e.filename != "bindings string":
    detail = re.sub(r" \([^()]*, line \d+\)$", "", detail)
    return f"{e.filename}, line {e.lineno}: {detail}"
  return detail


def _failing_part(gin, files: List[str], bindings: List[str], others: List[str]) -> str:
  """' (in FILE)' or ' (binding ...)' naming the first gin file, then the first binding,
  that gin cannot parse on its own, with the quoting hint when the binding's value did not
  parse; '' when none fails alone. The config is left cleared (the caller raises)."""
  def fails(files_, bindings_):
    try:
      gin.clear_config()
      gin.parse_config_files_and_bindings(files_, bindings_, finalize_config=False,
                                          skip_unknown=others)
    except _GIN_ERRORS as e:
      return e
    return None
  try:
    for f in files:
      if fails([f], []) is not None:
        return f" (in {f})"
    for b in bindings:
      e = fails(files, [b])
      if e is not None:
        parse = isinstance(e, (SyntaxError, tokenize.TokenError))
        return f" (binding {b!r}{'; ' + _QUOTE_HINT if parse else ''})"
  finally:
    gin.clear_config()
  return ""


def _tolerant(exists: Callable[[str], bool]) -> Callable[[str], bool]:
  """`exists` answering False where it raises: gin's package-resource reader imports an
  include's folder ('models' of 'models/tiny.gin') as a Python package, and a plain folder
  of that name in the working directory or on sys.path (a namespace package, no file)
  makes it raise TypeError, failing every gin file that includes a preset."""
  def check(path: str) -> bool:
    try:
      return bool(exists(path))
    except Exception:   # noqa: BLE001  (the reader's own import machinery: no such resource)
      return False
  check.tolerant = True
  return check


def _import_gin():
  """gin, with its file readers' existence checks made ``_tolerant`` (once per process)."""
  import gin
  import gin.config
  readers = gin.config._FILE_READERS   # gin 0.5.0 keeps [(reader, exists), ...] here
  readers[:] = [(r, e if getattr(e, "tolerant", False) else _tolerant(e)) for r, e in readers]
  return gin


def parse_gin(command: str, gin_files: List[str], bindings: List[str], search_paths: List[str]):
  """Registers configurables, parses files + bindings; returns the configured runner."""
  gin = _import_gin()
  gin.clear_config()
  for path in search_paths:
    if not os.path.isdir(path):
      raise CliError(f"--gin_search_path={path}: no such directory")
  for path in [GIN_DIR, os.getcwd()] + list(search_paths):
    gin.add_config_file_search_path(path)
  fn, wrapped, config_args, required = _register_configurables(gin, command)
  files = list(gin_files) or ([os.path.join(GIN_DIR, COMMANDS[command].default_gin)]
                              if COMMANDS[command].default_gin else [])
  for f in files:
    if not os.path.exists(f) and not os.path.exists(os.path.join(GIN_DIR, f)):
      raise CliError(f"gin file not found: {f}")
  files = [f if os.path.exists(f) else os.path.join(GIN_DIR, f) for f in files]
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)  # gin logs an ERROR per include before trying search paths
  try:
    # A shared experiment file binds every command; skip the other commands' bindings.
    others = [c.configurable(n) for n, c in COMMANDS.items() if n != command]
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False,
                                        skip_unknown=others)
  except _GIN_ERRORS as e:
    where = "" if isinstance(e, SyntaxError) and e.filename not in (None, "bindings string") \
        else _failing_part(gin, files, bindings, others)
    raise CliError(f"gin: {_gin_error_text(e)}{where}") from None
  finally:
    logging.set_verbosity(level)
  name = COMMANDS[command].configurable(command)
  bound = gin.get_bindings(name)
  missing = [arg for arg in required if arg not in bound]
  if missing:
    flag_of = {arg: flag for flag, arg in _FLAG_ARGS.items()}
    how = ", ".join(f"--{flag_of[a]}" if a in flag_of else f"--gin.{name}.{a}=..." for a in missing)
    raise CliError(f"{command}: {', '.join(missing)} not set (pass {how})")
  for arg, cls in config_args.items():   # e.g. info.model = 'path': its model is a ModelConfig
    value = bound.get(arg)
    if value is not None and not isinstance(value, cls):
      raise CliError(f"{name}.{arg} must be a {cls.__name__}, got {value!r}; set its fields "
                     f"with --gin.{cls.__name__}.FIELD=VALUE")
  kwargs = {arg: wrapped[cls]() for arg, cls in config_args.items() if arg not in bound}
  return gin, functools.partial(fn, **kwargs)


def execute(command: str, gin_files: List[str], bindings: List[str],
            search_paths: List[str] = (), flag_args: Optional[Dict[str, object]] = None,
            skip_if_complete: bool = False):
  """Runs one command and returns its result (a JSON-able dict).

  flag_args: {runner argument: value} from the convenience flags (--out_dir, --from, ...).
  skip_if_complete: return {"pipeline_status": "skipped", "out_dir": ...} without running when out_dir
    holds a finished run whose config.gin equals this run's effective config.
  A command with an out_dir records the fingerprints of the models it reads in
  out_dir/inputs.json and raises CliError, before writing anything, when one recorded there
  has changed since (``model_dir.changed_inputs``); such a run is never skipped.
  """
  if command not in COMMANDS:
    raise CliError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  name = COMMANDS[command].configurable(command)
  flag_of = {arg: flag for flag, arg in _FLAG_ARGS.items()}
  for arg, value in (flag_args or {}).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise CliError(f"--{flag_of.get(arg, arg)}={value}: not a finite number")
  if flag_args:
    import inspect
    params = inspect.signature(COMMANDS[command].runner()).parameters
    for arg, value in flag_args.items():
      default = params[arg].default if arg in params else None
      if isinstance(default, _config_classes()):   # e.g. --model=PATH to info or train_lm
        cls = type(default).__name__
        start = (f"; to start from the model at {value}, --gin.{name}.init_from='{value}'"
                 if "init_from" in params else "")
        raise CliError(f"--{flag_of.get(arg, arg)}={value}: `cai-jax {command}` takes no such flag "
                       f"(its {arg} is a {cls}: set its fields with --gin.{cls}.FIELD=VALUE{start})")
      if arg not in params:   # a convenience flag of other commands, e.g. --data to evaluate
        takers = [_spelled(c) for c, spec in COMMANDS.items() if c != command
                  and arg in inspect.signature(spec.runner()).parameters]
        raise CliError(f"--{flag_of.get(arg, arg)}: `cai-jax {_spelled(command)}` takes no such "
                       f"flag" + (f" (`cai-jax {takers[0]}` does)" if len(takers) == 1 else
                                  f" (it is a flag of {', '.join(takers)})" if takers else ""))
  bindings = list(bindings) + [f"{name}.{arg} = {value!r}" for arg, value in (flag_args or {}).items()]
  if command == "pipeline":
    cli_args = pipeline_stage_args(gin_files, bindings, search_paths)
    gin, fn = parse_gin(command, gin_files, bindings, search_paths)   # the stages' parses cleared it
    return fn(cli_args=cli_args + list(_PIPELINE["distributed_args"]),
              commands=[c for c in COMMANDS if c != "pipeline"], process_id=_PIPELINE["process_id"])
  gin, fn = parse_gin(command, gin_files, bindings, search_paths)
  if command in ("import", "export"):
    _check_import_export_out(command, gin.get_bindings(name))
  if COMMANDS[command].writes_out_dir:
    bound = gin.get_bindings(name).get("out_dir")
    if not bound:
      raise CliError(f"no output directory: pass --out_dir=DIR or bind {command}.out_dir")
    config_text = gin.config_str()
    from cai_jax import distributed, model_dir
    from cai_jax.stages import pipeline
    inputs = model_dir.input_fingerprints(_runner_values(command, gin), bound)
    changed = model_dir.changed_inputs(bound, inputs)
    if skip_if_complete:
      skip = (not changed and pipeline.is_complete(bound)
              and pipeline.same_config(bound, config_text))
      distributed.barrier(f"skip_if_complete:{bound}")  # every process decided before config.gin changes
      if skip:
        return {"pipeline_status": "skipped", "out_dir": bound}
    if changed:
      raise CliError(
          f"{command}: {bound} holds a run made from other input models: {', '.join(changed)} "
          f"changed since (see {os.path.join(bound, model_dir.INPUTS_FILE)}); use a new "
          f"--out_dir, or delete {bound} to redo it from the current inputs")
    marker = os.path.join(bound, pipeline.UNFINISHED)
    os.makedirs(bound, exist_ok=True)
    lock = None
    try:
      if _PROCESS["index"] == 0:
        try:
          lock = pipeline.lock_out_dir(bound, command)
        except RuntimeError as e:
          raise CliError(str(e)) from None
        with open(marker, "w", encoding="utf-8") as f:
          f.write(f"cai-jax {command} started here and has not finished; its config:\n\n"
                  f"{config_text}")
        model_dir.record_inputs(bound, inputs)
      if _PROCESS["count"] > 1:
        distributed.barrier(f"started:{bound}")   # a failed write stops every process here
      result = fn()
      if _PROCESS["index"] == 0:
        # The config of the outputs here: written once they are complete, so a run that
        # failed or was refused leaves the previous run's config.gin beside its outputs.
        from cai_jax.shards import write_atomic
        write_atomic(os.path.join(bound, "config.gin"), config_text)
        os.remove(marker)
      return result
    finally:
      if lock is not None:
        pipeline.unlock_out_dir(bound, lock)
  return fn()


def _check_import_export_out(command: str, bound: Dict[str, object]) -> None:
  """Before `import` / `export` reads anything: ValueError when --out overlaps --from
  (``model_dir.check_apart``) or is something the command would not replace (a file, or a
  non-empty directory that is not a model directory / Hugging Face folder)."""
  from cai_jax import model_dir
  source, out = bound.get("source"), bound.get("out")
  if not isinstance(source, str) or not isinstance(out, str) or not source or not out:
    return   # the runner reports the missing flag
  model_dir.check_apart(source, out)
  if command == "import":
    model_dir.check_replaceable(os.path.realpath(out), model_dir.is_model_dir,
                                model_dir.MODEL_DIR_KIND)
  else:
    from cai_jax import convert
    model_dir.check_replaceable(os.path.realpath(out), convert.is_hf_folder,
                                convert.HF_FOLDER_KIND)


def _runner_values(command: str, gin) -> Dict[str, object]:
  """{argument: value} of a command's runner: its defaults, then the bound values (gin has
  resolved macros)."""
  import inspect
  fn = COMMANDS[command].runner()
  values = {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}
  values.update(gin.get_bindings(COMMANDS[command].configurable(command)))
  return values


def _gin_values(gin) -> Dict[str, object]:
  """{binding key: value} of the parsed config: 'sl.records', 'pm/TrainConfig.batch_size', and
  'NAME' for a macro (gin 0.5.0 keeps them in config._CONFIG by (scope, full selector))."""
  out = {}
  for (scope, selector), params in gin.config._CONFIG.items():
    for param, value in params.items():
      if selector == "gin.macro" and param == "value":
        out[scope] = value
      else:
        out[f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{param}"] = value
  return out


def pipeline_stage_args(gin_files: List[str], bindings: List[str],
                        search_paths: List[str]) -> List[str]:
  """The gin arguments of every stage process of `cai-jax pipeline`: the pipeline's gin files
  (its default one when none is given, so that no stage falls back to a default of its
  own), its bindings except pipeline.*, the bindings that move the stages' outputs under
  pipeline.out_dir (``_pipeline_moves``), and its search paths. Parses gin (and clears it)."""
  gin_files = list(gin_files) or [os.path.join(GIN_DIR, COMMANDS["pipeline"].default_gin)]
  parse_gin("pipeline", gin_files, bindings, search_paths)
  stage_bindings = [b for b in bindings if not b.startswith("pipeline.")]
  moved = _pipeline_moves(COMMANDS["pipeline"].configurable("pipeline"), gin_files,
                          stage_bindings, search_paths)
  return ([f"--gin_file={f}" for f in gin_files]
          + [f"--gin_bindings={b}" for b in stage_bindings + moved]
          + [f"--gin_search_path={p}" for p in search_paths])


def _pipeline_moves(name: str, gin_files: List[str], bindings: List[str],
                    search_paths: List[str]) -> List[str]:
  """The gin bindings that move the output of every stage that runs under pipeline.out_dir
  (see `pipeline.relocate`), from each command's own parse of the same files and bindings.

  A command whose config does not parse is left out here; when it is a stage, its own process
  reports the error when the pipeline reaches it."""
  import gin
  from cai_jax.stages import pipeline
  bound = gin.get_bindings(name)
  root = bound.get("out_dir") or ""
  if not root:
    return []
  stages = list(bound.get("stages", pipeline.DEFAULT_STAGES))
  stage_dirs, values = {}, {}
  for command, cmd in COMMANDS.items():
    if command == "pipeline":
      continue
    try:
      parse_gin(command, gin_files, bindings, search_paths)
    except CliError:
      continue
    command_bound = gin.get_bindings(cmd.configurable(command))
    out = command_bound.get("out_dir") or command_bound.get("out")   # a directory, or a file
    if out:
      stage_dirs[command] = out
      values.update(_gin_values(gin))
  try:
    moves = pipeline.relocate(stage_dirs, values, root, stages)
  except ValueError as e:
    raise CliError(str(e)) from None
  if moves:
    common = pipeline.common_dir(stage_dirs, root)
    print(f"pipeline: stage outputs under {common} are written under {root} instead",
          file=sys.stderr, flush=True)
  return [f"{key} = {value!r}" for key, value in sorted(moves.items())]


def _distributed_args() -> List[str]:
  """The --distributed* flags as given, for the stage processes of a pipeline."""
  out = [f"--distributed={FLAGS.distributed}"]
  for name in ("coordinator_address", "num_processes", "process_id"):
    if FLAGS[name].value is not None:
      out.append(f"--{name}={FLAGS[name].value}")
  return out


def _main(argv: List[str]) -> None:
  from cai_jax import compilation_cache, distributed
  compilation_cache.configure(FLAGS.compilation_cache)   # before any compile; stages inherit it
  args = _command_words(argv)
  if args[:1] == ["pipeline"]:
    # Each stage process joins the multi-process run itself; the pipeline only forwards the
    # flags (and the environment), so it must not hold the coordinator.
    launch = distributed.detect_launch(FLAGS.distributed, FLAGS.coordinator_address,
                                       FLAGS.num_processes, FLAGS.process_id)
    _PIPELINE.update(distributed_args=_distributed_args(),
                     process_id=0 if launch is None else launch.process_id)
    info = None
  else:
    info = distributed.main_flags_hook(FLAGS)  # before any jax use; no-op in single-process runs
  if not args:
    raise CliError("no command given; `cai-jax --help` lists the commands")
  if info and info["process_count"] > 1:
    _PROCESS.update(index=info["process_index"], count=info["process_count"])
    distributed.watch_failures(_end_for_peer)
    if args[0] not in MULTI_HOST_COMMANDS:
      raise CliError(f"{args[0]} runs in one process; a multi-process run "
                     f"({info['process_count']} processes) supports {', '.join(MULTI_HOST_COMMANDS)} "
                     "(pass --distributed=none to run it on one host)")
  command = COMMANDS.get(args[0])
  positional = command.positional if command else ()
  if len(args) - 1 > len(positional):
    raise CliError(f"unexpected arguments {args[1 + len(positional):]}; "
                   "flags take the form --name=value")
  flag_args = {arg: FLAGS[name].value for name, arg in _FLAG_ARGS.items()
               if FLAGS[name].value is not None}
  flag_args.update(zip(positional, args[1:]))
  from cai_jax.stages import pipeline
  if args[0] != "pipeline" and not os.environ.get(pipeline.STAGE_ENV):
    check_command_bindings(args[0], FLAGS.gin_bindings)
  result = execute(args[0], FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_path, flag_args,
                   skip_if_complete=FLAGS.skip_if_complete)
  if result is not None:
    if _PROCESS["count"] > 1:
      # Every process prints its result, saying which it is, in one write on a line of its
      # own: the collectives runtime prints to the same stdout from its own buffers.
      result = dict(result, process_index=_PROCESS["index"], process_count=_PROCESS["count"])
      sys.stdout.flush()
      os.write(sys.stdout.fileno(), ("\n" + json.dumps(result, sort_keys=True) + "\n").encode())
    else:
      print(json.dumps(result, sort_keys=True))


# Errors that mean "bad input": reported as one line, no traceback.
_USER_ERRORS = (CliError, ValueError, FileNotFoundError, FloatingPointError, IsADirectoryError,
                NotADirectoryError, PermissionError)


def _end_for_peer(message: str) -> None:
  """Another process of a multi-process run failed: one line, exit status 1, at once."""
  print(f"cai-jax: error: {message}", file=sys.stderr)
  from cai_jax import distributed
  distributed.end_run(1)
  sys.exit(1)


def run(argv: Optional[List[str]] = None) -> None:
  """Console-script entry point."""
  if os.environ.get("CAI_JAX_PIPELINE_PID"):   # a stage process of `cai-jax pipeline`
    from cai_jax.stages import pipeline
    pipeline.end_with_pipeline()
  argv = list(sys.argv if argv is None else argv)
  if len(argv) == 1 or argv[1:2] == ["help"] or any(
      a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv[1:]):
    words = _command_words(argv)
    print(command_usage(words[0]) if words[:1] and words[0] in COMMANDS else usage())
    sys.exit(0)
  if "--version" in argv[1:]:
    print(version_line())
    sys.exit(0)
  argv = rewrite_gin_args(argv)
  try:   # absl's own report of a bad flag is two lines and exit status 1
    remaining = FLAGS(argv)
  except flags.Error as e:
    print(f"cai-jax: error: {_unknown_flag_text(argv, e)}", file=sys.stderr)
    sys.exit(2)

  def main(parsed):
    if not any(a.startswith(("--verbosity", "-v")) for a in argv):
      logging.set_verbosity(logging.WARNING)  # orbax / absl INFO chatter off by default
    from cai_jax import distributed
    try:
      _main(parsed)
    except distributed.PeerFailed as e:  # another process failed; its own error is printed there
      if not distributed.claim_end():   # the failure watcher is ending this process already
        distributed.wait_for_end()
      _end_for_peer(first_line(e))
    except (Exception, KeyboardInterrupt) as e:
      if not distributed.claim_end():
        distributed.wait_for_end()
      peers = distributed.peer_failures(e)
      if peers:   # e.g. a collective broke because that process ended: name its error
        _end_for_peer("; ".join(peers) + f" (this process stopped for it: {type(e).__name__})")
      # Multi-process runs: the others stop for this one and every process ends through
      # distributed.end_run (no jax shutdown barrier); single-process runs end as usual.
      distributed.report_failure(e)
      from cai_jax.stages.pipeline import StageFailed
      if isinstance(e, _USER_ERRORS):
        kind = "" if isinstance(e, CliError) else type(e).__name__ + ": "
        print(f"cai-jax: error: {kind}{first_line(e)}", file=sys.stderr)
        status = 2
      elif isinstance(e, StageFailed):
        print(f"cai-jax: error: {first_line(e)}", file=sys.stderr)   # the stage printed its own
        status = e.exit_status
      elif isinstance(e, KeyboardInterrupt):
        words = _command_words(list(parsed))
        spec = COMMANDS.get(words[0]) if words else None
        resumes = spec is not None and (spec.writes_out_dir or words[0] in ("pipeline", "sample"))
        print("cai-jax: interrupted" + ("; the same command resumes where this one stopped"
                                        if resumes else ""), file=sys.stderr)
        status = 130
      else:
        if _PROCESS["count"] > 1:
          traceback.print_exc()
          distributed.end_run(1)
        raise
      distributed.end_run(status)
      sys.exit(status)

  app.run(main, argv=argv, flags_parser=lambda _: remaining)   # flags parsed once, above


if __name__ == "__main__":
  run()
