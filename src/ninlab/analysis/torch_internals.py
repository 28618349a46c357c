"""Every private PyTorch name ninlab uses, bound here once, with what it is used for.

ninlab reads PyTorch from the inside: fake tensors, the dispatcher, autograd's saved variables, the
profiler's records. The names for those are private and may change in any release, so each is
imported or bound here, once, with a note of what ninlab uses it for and the torch versions it was
checked on ("all": every release in `TESTED_TORCH`, which CI runs the accountant's tests under); a
new release is one file to check. `require_supported_torch` refuses, in one line, a torch outside
the range or one that lacks a name bound here. `tests/analysis/test_torch_internals.py` checks
that every name resolves on the installed torch, and `tests/test_private_torch_names.py` that no
other module of the package names a private torch name. ATen's own op names (`aten._softmax`)
are not bound here: they are the vocabulary of the recordings, not an API.

Names bound to module-level constants cost nothing per use: the recorder, on the hot path of every
prediction, reads them as it read `torch._C...` before. Attributes of the private classes bound
here are read where they are needed, and the test checks them too: a FakeTensor's `constant`,
`fake_device` and `fake_mode`, and a FakeTensorMode's `in_kernel_invocation`, `cache_enabled`,
`cpp_meta_supports_symint` and `fake_tensor_converter` (`set_tensor_memo`,
`add_constant_storage_mapping`).
"""

from __future__ import annotations

import functools
import importlib
import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._decomp import (
    decomposition_table,  # Python decompositions FakeTensorMode may run; checked on all
    meta_table,  # the Python meta kernels it prefers to them; checked on all
)
from torch._ops import OpOverload  # an aten op's type, in FLOP rules; checked on all
from torch._prims_common import (
    compute_elementwise_output_strides,  # TensorIterator's output layout; checked on 2.8, 2.14
    make_contiguous_strides_for,  # an elementwise output's strides; checked on all
    suggest_memory_format,  # the layout a CPU kernel picks (allocator rules); checked on all
)
from torch._subclasses.fake_tensor import (
    CONSTANT_NUMEL_LIMIT,  # largest real tensor a fake one keeps as constant; checked on all
    DataDependentOutputException,  # a model needs tensor values (refusals); checked on all
    DynamicOutputShapeException,  # a model needs a data-dependent shape; checked on all
    FakeTensor,  # what a step is recorded on: shapes, no data; checked on all
    FakeTensorMode,  # the mode that makes and runs fake tensors; checked on all
    UnsupportedFakeTensorException,  # fake tensors cannot run the model; checked on all
    UnsupportedOperatorException,  # an op has no fake kernel (refusals); checked on all
    torch_decomp_decompositions,  # whether FakeTensorMode decomposes an op; checked on all
)
from torch.nn.utils.stateless import (
    _reparametrize_module,  # fake parameters swapped in for a step; checked on all
)
from torch.torch_version import TorchVersion
from torch.utils._python_dispatch import (
    TorchDispatchMode,  # the base of the recorder and the measurer; checked on all
)
from torch.utils._pytree import tree_flatten  # an op's tensors (measurer); checked on all
from torch.utils._triton import has_triton  # torch.compile can run on CUDA; checked on all

from ninlab.errors import NinlabError

__all__ = [
    "ANNOTATIONS_WITHOUT_TENSORS",
    "CONSTANT_NUMEL_LIMIT",
    "FAKE_TENSOR_LOGGER",
    "OLDEST_TORCH",
    "SAVED_FIELD_PREFIX",
    "TESTED_TORCH",
    "BatchNormBase",
    "DataDependentOutputException",
    "DisableTorchDispatch",
    "DisableTorchFunction",
    "DropoutBase",
    "DynamicOutputShapeException",
    "EventType",
    "FakeTensor",
    "FakeTensorMode",
    "OpOverload",
    "TensorMetadata",
    "TorchDispatchMode",
    "UnsupportedFakeTensorException",
    "UnsupportedOperatorException",
    "amx_tiles_supported",
    "autograd_sequence_nr",
    "compiled_by_dynamo",
    "composite_kernel",
    "compute_elementwise_output_strides",
    "current_autograd_node",
    "custom_op_definitions",
    "custom_op_kernels",
    "decomposition_table",
    "default_device_name",
    "has_triton",
    "make_contiguous_strides_for",
    "meta_table",
    "neg_view",
    "node_sequence_nr",
    "op_named",
    "op_schema",
    "raised_by_torch_compile",
    "record_function_enter",
    "record_function_exit",
    "reparametrize_module",
    "require_supported_torch",
    "runs_as_composite_parts",
    "select_conv_backend",
    "storage_address",
    "suggest_memory_format",
    "top_saved_tensors_hooks",
    "torch_decomp_decompositions",
    "tree_flatten",
    "view_base",
    "vmap_increment_nesting",
    "wraps_a_module",
]

# -- which torch ------------------------------------------------------------------------------
# The oldest release ninlab supports: 2.6 and 2.7 lack the saved-tensor hooks' getter
# (`_top_saved_tensors_default_hooks`, first in 2.8), and nothing public tells whether a checkpoint
# is packing what autograd saves.
OLDEST_TORCH = "2.8"
# The releases CI runs the accountant's tests under (.ci/torch_matrix); 2.13.0 is the reference.
TESTED_TORCH = ("2.8.0", "2.13.0", "2.14.1")
_MISSING: list[str] = []  # private names this torch lacks, dotted, in binding order


def _private(path: str) -> Any:
    """The private torch attribute at dotted `path` ("torch._C._foo"), or None, noted as missing,
    when this torch lacks it: importing ninlab still works, and its first call says what is
    missing (`require_supported_torch`) instead of failing inside the user's model."""
    owner_path, name = path.rsplit(".", 1)
    owner = functools.reduce(getattr, owner_path.split(".")[1:], torch)
    value = getattr(owner, name, None)
    if value is None:
        _MISSING.append(path)
    return value


def raised_by_torch_compile(error: BaseException) -> bool:
    """Whether `error` is one of torch.compile's own (its exceptions live in `torch._dynamo`);
    checked on 2.13 and 2.14.1 (inductor's BackendCompilerFailed)."""
    return type(error).__module__.startswith("torch._dynamo")


def compiled_by_dynamo(value: Any) -> bool:
    """Whether `value` is torch.compile's: its wrapper of a module (`wraps_a_module`), a module
    whose call was compiled in place (`module.compile()` sets `_compiled_call_impl`), or its
    wrapper of a function (marked `_torchdynamo_orig_callable`, as is one that
    `torch.compiler.disable` wraps, which is marked `_torchdynamo_disable` too). Checked on all."""
    if isinstance(value, nn.Module):
        return wraps_a_module(value) or getattr(value, "_compiled_call_impl", None) is not None
    if sys.modules.get("torch._dynamo.eval_frame") is None:
        return False
    marks = getattr(value, "__dict__", None)
    return (
        callable(value)
        and isinstance(marks, dict)
        and "_torchdynamo_orig_callable" in marks
        and "_torchdynamo_disable" not in marks
    )


def wraps_a_module(module: nn.Module) -> bool:
    """Whether `module` is torch.compile's wrapper of a module (an `OptimizedModule`, whose
    `_orig_mod` is the module given). False where torch.compile was never used: dynamo is not
    imported then, and is not imported here. Checked on all."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def require_supported_torch() -> None:
    """Raise one line when the installed torch is outside the supported range, or lacks a private
    name bound here; called before a step is traced or measured, so that neither failure surfaces
    inside the user's model as a complaint about its input."""
    found = TorchVersion(torch.__version__)
    tested = f"tested on {', '.join(TESTED_TORCH[:-1])} and {TESTED_TORCH[-1]}"
    if found < OLDEST_TORCH or found >= "3":
        raise NinlabError(
            f"ninlab needs torch >= {OLDEST_TORCH}, < 3 (found {found}; {tested}); "
            f"pip install 'torch>={OLDEST_TORCH},<3'"
        )
    if _MISSING:
        raise NinlabError(
            f"this torch ({found}) lacks {_MISSING[0]}, which ninlab uses to trace the step; "
            f"supported: torch >= {OLDEST_TORCH}, < 3, {tested}"
        )


# -- fake tensors and the dispatcher --------------------------------------------------------------
# Silenced while recording: FakeTensorMode logs a rejected kernel's whole traceback to it.
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"  # checked on all
# The model's parameters swapped for fake ones around a whole step; checked on all.
reparametrize_module = _reparametrize_module
# Fakes made from metadata, constants computed, without dispatching to a mode; checked on all.
DisableTorchDispatch = _private("torch._C._DisableTorchDispatch")
# Torch-function modes kept from seeing a composite op's parts again; checked on all.
DisableTorchFunction = _private("torch._C.DisableTorchFunction")
# An op's arguments, returns and aliasing: what the fast path may remember; checked on all.
op_schema: Callable[[OpOverload], Any] = operator.attrgetter("_schema")
# The device ("cpu") of a factory op given none, part of what it makes; checked on all.
default_device_name: Callable[[], str] = _private("torch._C._get_default_device")
# The backend a convolution runs on (oneDNN, slow_conv2d...): its workspace; checked on all.
select_conv_backend = _private("torch._C._select_conv_backend")
# A tensor with its negative bit set, as a kernel probe's zeros of one are; checked on all.
neg_view = _private("torch._neg_view")
# Whether this CPU has AMX tiles: the bf16 oneDNN kernels the allocator rules were read off;
# checked on all.
amx_tiles_supported: Callable[[], bool] = _private("torch.cpu._is_amx_tile_supported")

_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_OWN_KERNELS = (
    torch._C.DispatchKey.CPU,
    torch._C.DispatchKey.CompositeExplicitAutograd,
    torch._C.DispatchKey.CompositeExplicitAutogradNonFunctional,
)


def runs_as_composite_parts(name: str) -> bool:
    """Whether the CPU runs op `name` as its CompositeImplicitAutograd parts: it has that kernel
    and none of its own. A few ops have both (silu_backward, mish_backward,
    native_channel_shuffle), and the dispatcher prefers the CPU kernel: their parts would be
    temporaries the real step never makes. Checked on all."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return has_kernel(name, _COMPOSITE) and not any(has_kernel(name, key) for key in _OWN_KERNELS)


@functools.cache
def op_named(name: str) -> OpOverload | None:
    """The op a recording names "aten.relu.default" (as a dispatch mode names it), or None where
    this torch has no such op. Checked on all."""
    namespace, _, rest = name.partition(".")
    packet, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError):
        return None


def composite_kernel(func: OpOverload) -> Callable[..., Any]:
    """Op `func`'s C++ CompositeImplicitAutograd kernel, which runs it as its parts under the
    modes active; not `func.decompose`, which prefers Python decompositions, whose parts are not
    the kernels PyTorch really runs. Checked on all."""
    return functools.partial(func._op_dk, _COMPOSITE)


# -- autograd ------------------------------------------------------------------------------------
# The node backward is running (None outside it): an op's phase and layer; checked on all.
current_autograd_node = _private("torch._C._current_autograd_node")
# How many autograd nodes this thread has made (which module made a node): checked on all.
autograd_sequence_nr: Callable[[], int] = _private("torch._C._autograd._get_sequence_nr")
# A node's own number, given as it is made, before its op is dispatched; checked on all.
node_sequence_nr: Callable[[Any], int] = operator.methodcaller("_sequence_nr")
# The tensor a view was made from, which autograd keeps alive with it (None: not a view): the
# engine adds into a gradient only where it holds its storage alone; checked on 2.13.0 and 2.14.1.
view_base: Callable[[torch.Tensor], torch.Tensor | None] = operator.attrgetter("_base")
# The innermost saved-tensor hooks (None: none), set by checkpointing; checked on all.
top_saved_tensors_hooks = _private("torch._C._autograd._top_saved_tensors_default_hooks")
# A node shows what it saved for backward as `_saved_<field>` attributes; checked on all.
SAVED_FIELD_PREFIX = "_saved_"

# -- the profiler --------------------------------------------------------------------------------
# The kinds of the profiler's events, allocations among them; checked on all.
EventType = _private("torch._C._profiler._EventType")


class _ModuleGlobal:
    """A global of a torch module that a caller may replace for a while (`get`, `set`): its
    module looks it up at each use. Noted as missing, like `_private`'s names, where this torch
    lacks it."""

    def __init__(self, module: str, name: str) -> None:
        self._module = importlib.import_module(module)
        self._name = name
        if not hasattr(self._module, name):
            _MISSING.append(f"{module}.{name}")

    def get(self) -> Any:
        return getattr(self._module, self._name)

    def set(self, value: Any) -> None:
        setattr(self._module, self._name, value)


# How torch.func.vmap enters a vmap level: its `vmap_increment_nesting` calls this global of
# torch/_functorch/vmap.py (the measurer counts the levels a step enters); checked on all.
vmap_increment_nesting = _ModuleGlobal("torch._functorch.vmap", "_vmap_increment_nesting")
# A tensor argument of a profiled op (`record_shapes=True`): its TensorImpl, its storage's address
# (None: it has none, a functorch wrapper's), layout and sizes, read by the measurer to find a
# function transform's calls; checked on all.
TensorMetadata = _private("torch._C._profiler._TensorMetadata")
# The op opening an annotation: an optimizer's step or zero_grad, its phase; checked on all.
record_function_enter = torch.ops.profiler._record_function_enter_new
# The op closing an annotation, where an optimizer's phase ends; checked on all.
record_function_exit = torch.ops.profiler._record_function_exit
# The annotation overloads that take and return no tensor, only a RecordFunction object (enter,
# and exit on that object); checked on all.
ANNOTATIONS_WITHOUT_TENSORS = frozenset(
    {record_function_enter.default, record_function_exit._RecordFunction}
)
# A storage's C++ StorageImpl, one however many views (measurer); checked on all.
storage_address: Callable[[torch.UntypedStorage], int] = operator.attrgetter("_cdata")

# The Python custom ops (`torch.library.custom_op`) defined in this process, by qualified name;
# checked on all.
custom_op_definitions = _private("torch._library.custom_ops.OPDEFS")
# A custom op's Python kernels by device type, which its dispatcher kernel looks up at each call
# (the measurer marks them for the profiler); checked on all.
custom_op_kernels: Callable[[Any], dict[str | None, Callable[..., Any]]] = operator.attrgetter(
    "_backend_fns"
)

# -- modules -------------------------------------------------------------------------------------
# Every dropout layer's base (the forum's rule counts their outputs apart); checked on all.
DropoutBase = nn.modules.dropout._DropoutNd
# Every batch norm layer's base (a batch of one cannot train one); checked on all.
BatchNormBase = nn.modules.batchnorm._BatchNorm

# -- resolved when first asked for ---------------------------------------------------------------
# torch._inductor takes seconds to import, and only `--compile` needs it; torch.distributed's
# names are missing from builds without it, and are asked for after `dist.is_available()`.
_ON_FIRST_USE = {
    # The C++ compiler torch.compile would use on the CPU; checked on all.
    "cpp_builder": ("torch._inductor.cpp_builder", None),
    # What `cpp_builder.get_cpp_compiler` raises without a working compiler; checked on all.
    "InvalidCxxCompiler": ("torch._inductor.exc", "InvalidCxxCompiler"),
    # DDP's first bucket's cap (1 MiB); checked on all.
    "DEFAULT_FIRST_BUCKET_BYTES": ("torch.distributed", "_DEFAULT_FIRST_BUCKET_BYTES"),
    # DDP's assignment of gradients to buckets; checked on all.
    "compute_bucket_assignment_by_size": (
        "torch.distributed",
        "_compute_bucket_assignment_by_size",
    ),
}
__all__ += list(_ON_FIRST_USE)


def __getattr__(name: str) -> Any:
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _ON_FIRST_USE[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
