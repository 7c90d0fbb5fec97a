"""One-line error messages: the line the CLI, the plan's child process and the file readers
show for an exception (imports nothing, so the CLI can use it before jax is loaded)."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
  """The first non-blank line of ``str(error)`` without its surrounding spaces, or the
  exception's type name when its text is blank."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0].strip()


def check_returned(fn_name: str, outputs, n_inputs: int):
  """`outputs` (a sequence) when it has one element per input, else ValueError
  '{fn_name} returned K texts for N prompts' (a caller-supplied generate function broke its
  contract)."""
  if len(outputs) != n_inputs:
    raise ValueError(f"{fn_name} returned {len(outputs)} texts for {n_inputs} prompts")
  return outputs
