"""ninlab.units: bytes, FLOPs and dtypes in words, and memory sizes read back."""

from __future__ import annotations

import pytest
import torch

from ninlab.errors import NinlabError
from ninlab.units import dtype_name, format_bytes, format_flops, parse_bytes


def test_dtype_name_is_the_name_a_user_writes() -> None:
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.int64)] == [
        "float32",
        "bfloat16",
        "int64",
    ]


def test_bytes_and_flops_in_words() -> None:
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(3 << 29) == "1.50 GiB"
    assert format_flops(576_773_068_800) == "576.77 GFLOP"
    assert parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("500 MB") == 500_000_000
    with pytest.raises(NinlabError, match="cannot read memory size"):
        parse_bytes("eight gigs")
