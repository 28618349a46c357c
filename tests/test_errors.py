"""ninlab.errors: how a foreign exception is quoted inside ninlab's one-line messages, and how a
typed argument of the library is checked."""

from __future__ import annotations

import pytest

from ninlab.errors import NinlabError, checked_flag, checked_name, checked_whole, one_line, shorten


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


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda: checked_flag("verify", "yes"), "verify must be True or False, got 'yes'"),
        (lambda: checked_flag("verify", 0), "verify must be True or False, got 0"),
        (lambda: checked_whole("seed", 1.5, 0, 9), "seed must be a whole number, got 1.5"),
        (lambda: checked_whole("seed", True, 0, 9), "seed must be a whole number, got True"),
        (lambda: checked_whole("seed", -1, 0, 9), "seed must be 0 to 9, got -1"),
        (lambda: checked_name("model_name", 3), "model_name must be a string, got 3"),
    ],
)
def test_a_typed_argument_of_the_wrong_kind_is_one_line(check, message) -> None:
    # Each was taken as it came: "yes" and 0 as truth values, 1.5 truncated, -1 wrapped.
    with pytest.raises(NinlabError) as raised:
        check()
    assert str(raised.value) == message


def test_a_typed_argument_of_the_right_kind_is_given_back() -> None:
    assert checked_flag("verify", False) is False
    assert checked_whole("seed", 7, 0, 9) == 7
    assert checked_name("model_name", None) is None
