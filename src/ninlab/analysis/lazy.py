"""Lazy modules (`nn.LazyConv2d`, `nn.LazyLinear`, `nn.LazyBatchNorm2d`, ...) made concrete on
meta tensors, the user's model left as it is.

A lazy module has no parameter shapes until its first forward, as d2l builds every network. The
tracer needs those shapes, so `materialized` copies the model onto the meta device (shapes and
dtypes, no data: nothing is allocated, whatever the model's size) and runs the copy once on meta
inputs of the step's size; each lazy module infers its shapes from what reaches it, exactly as its
first real forward would. The user's model is not run and stays lazy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from ninlab.analysis.step import (
    StepSpec,
    call_model,
    example_inputs,
    model_dtype,
    step_arguments,
)

__all__ = ["copy_model", "is_lazy_model", "materialized"]


def is_lazy_model(model: nn.Module) -> bool:
    return any(is_lazy(t) for t in [*model.parameters(), *model.buffers()])


def materialized(model: nn.Module, spec: StepSpec) -> nn.Module:
    """`model` itself if nothing in it is lazy; otherwise a copy on the meta device whose lazy
    modules have inferred their shapes from one forward of `spec`'s inputs."""
    if not is_lazy_model(model):
        return model
    return copy_model(model, spec, to_meta=True)


def copy_model(model: nn.Module, spec: StepSpec, *, to_meta: bool = False) -> nn.Module:
    """A deep copy of `model` (a plain `copy.deepcopy` refuses to copy an uninitialised
    parameter) whose lazy modules, if any, have inferred their shapes from one forward of `spec`'s
    inputs at batch 2 (batch norm accepts two in training mode). `to_meta`: every parameter and
    buffer becomes a meta tensor of its shape, so the copy holds no data."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if to_meta or is_lazy(tensor):
            memo[id(tensor)] = _copy(tensor, torch.device("meta") if to_meta else tensor.device)
    # A tensor a module computed from its parameters and keeps as an attribute (pruning's and
    # the old weight_norm's `weight`, remade by their forward pre-hooks) is no graph leaf, which
    # deepcopy refuses: the copy keeps its value, detached.
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().to(
                    torch.device("meta") if to_meta else value.device, copy=True
                )
    copied = copy.deepcopy(model, memo)
    if is_lazy_model(copied):
        # In the parameters' own dtype: a step's dtype is applied to the copy afterwards.
        first = spec.replace(dtype=model_dtype(copied))
        device = torch.device("meta") if to_meta else next(copied.parameters()).device
        copied.train(spec.mode == "train")
        with torch.no_grad():
            call_model(copied, step_arguments(first, example_inputs(first, 2, device)))
    return copied


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(tensor, UninitializedParameter):
        return UninitializedParameter(
            requires_grad=tensor.requires_grad, device=device, dtype=tensor.dtype
        )
    if isinstance(tensor, UninitializedBuffer):
        return UninitializedBuffer(requires_grad=False, device=device, dtype=tensor.dtype)
    meta = tensor.detach().to(device)
    return (
        nn.Parameter(meta, requires_grad=tensor.requires_grad)
        if isinstance(tensor, nn.Parameter)
        else meta
    )
