"""Options shared by every command that analyses a model: which model, input, batch and dtype."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch
from torch import nn

from ninlab.errors import NinlabError
from ninlab.models import resolve_model
from ninlab.analysis.step import DTYPES

__all__ = ["ModelChoice", "add_model_options", "model_choice", "parse_input_size", "positive_int"]


@dataclass(frozen=True)
class ModelChoice:
    name: str
    model: nn.Module
    input_size: tuple[int, ...]
    batch_size: int
    dtype: torch.dtype


def parse_input_size(text: str) -> tuple[int, ...]:
    """'1x224x224' (channels first; 1 to 3 spatial sizes) -> (1, 224, 224)."""
    if not re.fullmatch(r"\d+(x\d+){1,3}", text.strip().lower()):
        raise NinlabError(f"cannot read input size {text!r}; write channels x height x width, e.g. 1x224x224")
    sizes = tuple(int(part) for part in text.strip().lower().split("x"))
    if min(sizes) < 1:
        raise NinlabError(f"input size {text!r} has a zero; every size must be at least 1, e.g. 1x224x224")
    return sizes


def positive_int(text: str) -> int:
    """argparse type for counts such as --batch; rejects 0 and negatives in one line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, batch: int = 128) -> None:
    parser.add_argument("--model", default="nin-d2l", help="registry name, variant (nin-d2l:num_1x1=1) or package.module:factory (default: nin-d2l)")
    parser.add_argument("--input", default="1x224x224", help="one sample's size, channels first (default: 1x224x224)")
    parser.add_argument("--batch", type=positive_int, default=batch, help=f"batch size (default: {batch})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and input dtype (default: float32)")


def model_choice(args: argparse.Namespace) -> ModelChoice:
    input_size = parse_input_size(args.input)
    return ModelChoice(args.model, resolve_model(args.model), input_size, args.batch, DTYPES[args.dtype])
