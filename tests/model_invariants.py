"""The invariant every ninlab call keeps: the user's model exactly as before, succeeded or
refused. `model_state` takes everything a call could change, module by module (both
registrations of a shared one): every attribute by identity, each tensor's values,
requires_grad, device, dtype and grad; `assert_kept` compares two of them. Used by
tests/analysis/test_model_kept.py and the API fuzz test (tests/analysis/test_api_hostile.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _valueless(tensor: torch.Tensor) -> bool:
    """A tensor whose values cannot be read or compared by value: on the meta device, sparse,
    nested or quantized. Such a tensor is compared by its metadata."""
    return (
        tensor.is_meta or tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized
    )


def _fingerprint(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            "tensor",
            id(value),
            type(value).__name__,
            value.requires_grad,
            value.device,
            value.dtype,
            tuple(value.shape),
            None if _valueless(value) else value.detach().clone(),
            None if not value.is_leaf or value.grad is None else id(value.grad),
        )
    if isinstance(value, dict):
        return ("dict", id(value), {k: _fingerprint(v) for k, v in value.items()})
    if isinstance(value, (list, tuple, set)):
        items = sorted(value, key=id) if isinstance(value, set) else value
        return (type(value).__name__, id(value), [_fingerprint(v) for v in items])
    return ("value", id(value), value if isinstance(value, (bool, int, float, str)) else None)


def model_state(model: nn.Module) -> list[Any]:
    """Everything a call could change, module by module, and each module's train/eval flag."""
    return [
        (name, id(module), module.training, {k: _fingerprint(v) for k, v in vars(module).items()})
        for name, module in model.named_modules(remove_duplicate=False)
    ]


def same(before: Any, after: Any) -> bool:
    """Whether two fingerprints (or real outputs) are equal, tensors by value."""
    if isinstance(before, torch.Tensor):
        return (
            isinstance(after, torch.Tensor)
            and type(after) is type(before)
            and before.shape == after.shape
            and torch.equal(before, after)
        )
    if isinstance(before, dict):
        return (
            isinstance(after, dict)
            and before.keys() == after.keys()
            and all(same(before[k], after[k]) for k in before)
        )
    if isinstance(before, (list, tuple)):
        return (
            isinstance(after, (list, tuple))
            and len(before) == len(after)
            and all(same(b, a) for b, a in zip(before, after))
        )
    return bool(before == after)


def assert_kept(before: list[Any], after: list[Any]) -> None:
    """Two `model_state`s of one model are the same, module by module and attribute by
    attribute (the failure names the first that differs)."""
    assert len(after) == len(before)
    for (name, module_id, training, attributes), (
        name_after,
        id_after,
        training_after,
        attributes_after,
    ) in zip(before, after):
        assert (name, module_id, training) == (name_after, id_after, training_after), name
        assert attributes.keys() == attributes_after.keys(), name
        for key in attributes:
            assert same(attributes[key], attributes_after[key]), f"{name}.{key}"
