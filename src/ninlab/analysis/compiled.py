"""torch.compile'd code in a step, which a prediction traces as its eager program.

While a step is recorded a dispatch mode is on the stack, and torch.compile (dynamo) then runs a
compiled module or function as its eager Python code ("non-infra torch dispatch mode present"),
so what ninlab traces, exactly, is the eager program. The compiled one allocates otherwise:
inductor fuses pointwise ops into kernels that make no intermediate tensors, keeps other
tensors for backward (recomputing cheap ones) and runs its own buffer reuse. So a prediction of
a step that runs compiled code is an estimate, which says where the compiled code was found,
never a figure printed as exact; `model._orig_mod`, the module given to `torch.compile`, is the
eager program, predicted exactly.

Found where a step reaches it, without running it: a module of the model that torch.compile
wrapped (`OptimizedModule`) or compiled in place (`module.compile()`), a compiled function among
its classes' attributes (a compiled `forward`) and in the globals of the Python modules that
define them, an instance's attribute (`model.forward = torch.compile(model.forward)`), and what
the user's step function reaches by name. Compiled code a step reaches only through another
library's code is not found.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ninlab.analysis.model_state import model_namespaces, reached_by_step
from ninlab.analysis.torch_internals import compiled_by_dynamo, wraps_a_module

__all__ = ["compiled_code"]


def compiled_code(model: nn.Module, step: Any = None) -> tuple[str, ...]:
    """Why a prediction of `model`'s step (`step`: the user's step function, or None) is an
    estimate, where it runs torch.compile'd code; empty where it does not."""
    compiled = [
        (name, module) for name, module in model.named_modules() if compiled_by_dynamo(module)
    ]
    found = [f"module {name!r}" if name else "the model" for name, _ in compiled]
    wrappers = {id(module) for _, module in compiled}  # their own attributes are their code
    namespaces = [
        *model_namespaces(model),
        *(vars(module) for module in model.modules() if id(module) not in wrappers),
    ]
    values = [value for namespace in namespaces for value in list(namespace.values())]
    values += reached_by_step(step) if step is not None else []
    functions = {
        getattr(value, "__name__", type(value).__name__)
        for value in values
        if not isinstance(value, nn.Module) and compiled_by_dynamo(value)
    }
    found += [f"function {name}" for name in sorted(functions)]
    if not found:
        return ()
    eager = (
        "; model._orig_mod, the module given to torch.compile, is that eager program"
        if wraps_a_module(model)
        else ""
    )
    reason = (
        f"its code holds torch.compile'd code ({', '.join(found)}), traced as its eager "
        "program: the compiled program fuses ops and keeps other tensors for backward, so its "
        f"peaks differ{eager}"
    )
    return (reason,)
