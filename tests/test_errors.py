"""ninlab.errors: how a foreign exception is quoted inside ninlab's one-line messages."""

from __future__ import annotations

from ninlab.errors import one_line, shorten


def test_one_line_quotes_type_and_first_line() -> None:
    assert one_line(RuntimeError("  shapes differ\n  at line 3\n")) == "RuntimeError: shapes differ"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("   \n ")) == "ValueError"


def test_one_line_is_cut_to_two_hundred_characters() -> None:
    quoted = one_line(OSError("x" * 500))
    assert len(quoted) == 200
    assert quoted.startswith("OSError: xxx") and quoted.endswith("x...")
    assert one_line(OSError("y" * 191)) == "OSError: " + "y" * 191  # 200 exactly: not cut


def test_shorten_echoes_a_value_on_one_line() -> None:
    assert shorten("a\nb\n  c") == "a b   c"
    long = shorten("line\n" * 100)
    assert "\n" not in long and long.endswith("... (499 characters)")
