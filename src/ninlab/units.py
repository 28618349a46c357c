"""Units in one place: bytes as binary multiples (KiB, MiB, GiB), FLOPs as decimal (GFLOP), and a
dtype as its name."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ninlab.errors import NinlabError

if TYPE_CHECKING:  # an annotation only: naming a dtype needs no torch
    import torch

__all__ = [
    "BYTE_UNITS",
    "FLOP_UNITS",
    "budget_bytes",
    "dtype_name",
    "format_bytes",
    "format_count",
    "format_flops",
    "parse_bytes",
]

# Each unit and its size, largest first; below the last, bytes are "B" and FLOPs "FLOP".
BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
FLOP_UNITS = (("TFLOP", 10**12), ("GFLOP", 10**9), ("MFLOP", 10**6), ("kFLOP", 10**3))
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}


def format_bytes(count: int) -> str:
    for unit, size in BYTE_UNITS:
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def format_flops(count: int) -> str:
    for unit, size in FLOP_UNITS:
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} FLOP"


def format_count(count: int) -> str:
    return f"{count:,}"


_MAX_BYTES = 2**63  # what a signed 64-bit byte count holds


def parse_bytes(text: str) -> int:
    """'8GiB', '500 MB', '1.5G' (bare K/M/G are binary, as in most tools), or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise NinlabError(
            f"cannot read memory size {text!r}; write a number and a unit, e.g. 8GiB, 500MB or 1.5G"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value >= _MAX_BYTES:  # 400 digits would be an infinite float
        raise NinlabError(
            f"memory size {text!r} is beyond any machine (over 8 EiB); give a size such as 8GiB"
        )
    if value < 1:
        raise NinlabError(
            f"memory size {text!r} is less than one byte; give a positive size such as 8GiB"
        )
    return int(value)


def budget_bytes(budget: object) -> int:
    """A memory budget as a byte count: text as `parse_bytes` reads it, or a whole number of bytes
    from 1 to 8 EiB; anything else (NaN, a fraction, True, None) is one line naming it."""
    if isinstance(budget, str):
        return parse_bytes(budget)
    if isinstance(budget, float) and budget.is_integer():
        budget = int(budget)
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise NinlabError(
            f"memory budget must be a whole number of bytes or a size such as '8GiB', not "
            f"{budget!r}"
        )
    if not 1 <= budget < _MAX_BYTES:
        raise NinlabError(
            f"memory budget must be from 1 byte to 8 EiB, got {budget:,} bytes; give a size such "
            "as '8GiB'"
        )
    return budget


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as a user writes it: "float32", "bfloat16", "int64"."""
    return str(dtype).removeprefix("torch.")
