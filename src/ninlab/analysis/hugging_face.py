"""Hugging Face transformers' decisions by context, taken on fake tensors as the real run does.

Why a module for one library: transformers asks `is_tracing(tensor)` before it reads a tensor's
values (whether the attention mask has padding, whether the position ids pack several
sequences), and `is_tracing` is true for any `FakeTensor` (an `isinstance` check). So on fake
tensors it builds the causal mask and hands it to attention, where the real run, seeing no
padding, builds none and calls SDPA with `is_causal=True`: the trace would follow another
program (GPT-2 and Llama 0.4-1.5% high). No general mechanism can make a fake tensor pass an
`isinstance` check as a real one, so while a step is recorded each transformers module's
`is_tracing` is answered as the real run answers it for a tensor whose values ninlab knows
(`KnownValues`: the inputs it made with set values, position ids made by `arange`, and what is
computed from them), which then reads those values; for any other tensor it stays true, the
branch that assumes padding. `tests/analysis/test_hugging_face.py` pins both sides on the
installed transformers. Where transformers no longer has the helper where it is looked for,
`unreproduced` says so, and the prediction is flagged rather than printed as exact.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

from torch import nn

from ninlab.analysis.known_values import KnownValues
from ninlab.analysis.torch_internals import FakeTensor

# Where transformers defines the check and the module that decides on attention masks with it.
HELPER_MODULE = "transformers.utils.import_utils"
HELPER = "is_tracing"
MASKING_MODULE = "transformers.masking_utils"


def _helper() -> object | None:
    """transformers' `is_tracing`, where it is loaded and found where it is looked for."""
    module = sys.modules.get(HELPER_MODULE)
    return getattr(module, HELPER, None) if module is not None else None


@contextlib.contextmanager
def tracing_answered(known: KnownValues) -> Iterator[None]:
    """While recording: every loaded transformers module's `is_tracing`, answered for a fake
    tensor of known values as for a real one (the context alone: compiling, scripting, a CUDA
    graph capture); put back after."""
    original = _helper()
    if original is None or not callable(original):
        yield
        return

    def is_tracing(tensor: object = None) -> bool:
        if isinstance(tensor, FakeTensor) and known.value(tensor) is not None:
            return bool(original())
        return bool(original(tensor))

    bound = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("transformers") and getattr(module, HELPER, None) is original
    ]
    for module in bound:
        setattr(module, HELPER, is_tracing)
    try:
        yield
    finally:
        for module in bound:
            setattr(module, HELPER, original)


def unreproduced(model: nn.Module) -> tuple[str, ...]:
    """Why a prediction of a transformers model may follow another program than the real run's:
    transformers' `is_tracing` is not where it is looked for (a new release), so its decisions
    (build the causal mask or not) are taken on fake tensors as when tracing. Empty otherwise,
    and for any model not built from transformers."""
    if not any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        return ()
    try:
        masking = importlib.import_module(MASKING_MODULE)
    except ImportError:
        masking = None
    helper = _helper()
    if helper is not None and getattr(masking, HELPER, None) is helper:
        return ()
    return (
        (
            f"transformers' {HELPER} (in {HELPER_MODULE}, used by {MASKING_MODULE}) was not "
            "found: its attention-mask decisions are taken as when tracing, which can build a "
            "mask the real run skips"
        ),
    )
