"""Tests for cai_jax.errors."""

import pytest

from cai_jax.errors import check_returned, first_line


def test_first_line_is_the_first_non_blank_line_or_the_type_name():
  assert first_line(ValueError("\n  bad value: x  \nTraceback detail")) == "bad value: x"
  assert first_line(ValueError("one line")) == "one line"
  assert first_line(KeyError()) == "KeyError"
  assert first_line(RuntimeError("   \n ")) == "RuntimeError"


def test_check_returned_passes_one_output_per_input_and_names_the_function_otherwise():
  outs = ["a", "b"]
  assert check_returned("generate_fn", outs, 2) is outs
  with pytest.raises(ValueError, match=r"^generate_fn returned 2 texts for 3 prompts$"):
    check_returned("generate_fn", outs, 3)
