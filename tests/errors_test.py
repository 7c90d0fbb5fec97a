"""Tests for cai_jax.errors."""

from cai_jax.errors import first_line


def test_first_line_is_the_first_non_blank_line_or_the_type_name():
  assert first_line(ValueError("\n  bad value: x  \nTraceback detail")) == "bad value: x"
  assert first_line(ValueError("one line")) == "one line"
  assert first_line(KeyError()) == "KeyError"
  assert first_line(RuntimeError("   \n ")) == "RuntimeError"
