"""The one tracer: run real PyTorch code on fake tensors and record every aten op it dispatches.

Everything ninlab knows about a model (shapes, rounding, FLOPs, what memory lives when) comes from
one recording of the real ops, made under `FakeTensorMode`: tensors carry shapes, dtypes, strides
and a device but no data, so a training step of NiN at batch 128 allocates nothing and takes
milliseconds. The recording keeps, per op, the module that ran it (in backward too: the autograd
node being executed is mapped back to the module whose forward created it) and the phase of the
step, and per tensor storage, the op that created it and the op after which it died. Storage lives
are read from the fake tensors' own lifetimes (a weak reference per storage), so they follow
autograd's real decisions about what to keep.

Three pieces share the work: a `StorageLedger` keeps the storages (which exist, their bytes, when
each is created and freed), `harvest_saved_tensors` reads what autograd keeps for backward, and the
`Recorder`, a dispatch mode, records each op and hands what it makes to the ledger. `record_step`
runs a whole step under them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import weakref
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._decomp import decomposition_table, meta_table
from torch._subclasses.fake_tensor import (
    CONSTANT_NUMEL_LIMIT,
    FakeTensor,
    FakeTensorMode,
    torch_decomp_decompositions,
)
from torch.nn import functional as F
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import Self

from ninlab.analysis.allocator import KernelAllocation, cpu_kernel_allocations
from ninlab.analysis.flops import op_flops
from ninlab.analysis.geometry import AxisParams, AxisWindow, EmptyOutputError, axes_from_torch
from ninlab.analysis.kernel_probe import KernelCall
from ninlab.analysis.phases import StepPhases
from ninlab.analysis.step import (
    StepSpec,
    builtin_loss,
    builtin_loss_words,
    builtin_targets,
    example_inputs,
    inference_step,
    optimizer_state,
    optimizers_in,
    output_tensors,
)
from ninlab.errors import NinlabError

__all__ = [
    "LayerInputTooSmall",
    "OpRecord",
    "Recorder",
    "Recording",
    "SavedTensor",
    "StepRecording",
    "StorageLedger",
    "StorageRecord",
    "TensorMeta",
    "WindowOp",
    "collector_off",
    "fake_parameters",
    "harvest_saved_tensors",
    "record_step",
]

aten = torch.ops.aten
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd

_PRIM_DEVICE = torch.ops.prim.device.default
# Queries of metadata that FakeTensorMode answers without running a kernel; they are not ops.
_METADATA_OPS = {
    aten.is_contiguous.default,
    aten.is_contiguous.memory_format,
    aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default,
    aten.size.default,
    aten.sym_size.default,
    aten.stride.default,
    aten.sym_stride.default,
    aten.storage_offset.default,
    aten.sym_storage_offset.default,
    aten.numel.default,
    aten.sym_numel.default,
    aten.dim.default,
    torch.ops.prim.layout.default,
    torch.ops.prim.device.default,
}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage_key: int  # which storage it views (see StorageRecord)


@dataclass(frozen=True)
class WindowOp:
    """A convolution or pooling op's windows: one `AxisParams` per spatial axis, and the sizes."""

    kind: str  # "conv", "max_pool" or "avg_pool"
    axes: tuple[AxisParams, ...]
    input_spatial: tuple[int, ...]
    output_spatial: tuple[int, ...]

    def axis_windows(self) -> tuple[AxisWindow, ...]:
        """Where the windows fall along each spatial axis: one `AxisWindow` per axis."""
        return tuple(params.window(size) for params, size in zip(self.axes, self.input_spatial))


class LayerInputTooSmall(NinlabError):
    """A layer's input is too small for its window; carries the layer and the geometry error."""

    def __init__(self, module: str, module_type: str, error: EmptyOutputError) -> None:
        self.module, self.module_type, self.error = module, module_type, error
        super().__init__(f"layer {module or '(top level)'} ({module_type}): {error}")


@dataclass(frozen=True)
class OpRecord:
    index: int
    op: str  # e.g. "aten.convolution.default"
    phase: str
    module: str  # qualified name of the innermost module running it; "" for the top level
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    flops: int
    window: WindowOp | None
    autograd_node: str  # in backward: the autograd node being executed, e.g. "ReluBackward0"
    # On CPU, every block the kernel allocates and frees, outputs included
    # (`ninlab.analysis.allocator`); None: it allocates only its outputs, or its workspace is not
    # modelled (`cpu_unmodelled` says why).
    cpu_allocations: tuple[KernelAllocation, ...] | None = None
    cpu_unmodelled: str = ""
    # Where `cpu_unmodelled` gives a reason: the call as its kernel sees it, for
    # `ninlab.analysis.kernel_probe` to measure.
    cpu_call: KernelCall | None = None


@dataclass
class StorageRecord:
    """One storage's life: created by op `created_at` (-1: before recording), died after op
    `freed_after` (None: still alive when the recording ended). Views share their storage, so each
    storage is counted once whatever views of it exist."""

    key: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    created_at: int
    phase: str
    module: str
    freed_after: int | None = None
    role: str = ""  # set by whoever knows more: "parameter", "input", "gradient", ...


@dataclass(frozen=True)
class SavedTensor:
    """A tensor autograd keeps for backward: which node keeps it, under which name, for which layer."""

    storage_key: int
    node: str  # e.g. "ConvolutionBackward0"
    field: str  # e.g. "input", "result", "indices", "mask"
    module: str  # "" for the model's own forward and for code outside the model alike
    # The node was made while no module of the model ran: the loss (the model's own forward, a
    # `torch.flatten` in its root `forward`, is module "" too, but inside the model).
    outside_model: bool = False


@dataclass
class Recording:
    ops: list[OpRecord] = field(default_factory=list)
    # What autograd held as each backward call of the step began, read from the graph's saved
    # variables (gradient accumulation calls backward once per micro-batch).
    saved_for_backward: list[SavedTensor] = field(default_factory=list)
    storages: dict[int, StorageRecord] = field(default_factory=dict)
    # Each module's outputs (shape, dtype) at its first forward call, by qualified name.
    module_outputs: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]] = field(default_factory=dict)
    # Allocations and frees in the order they happened: ("alloc" | "free", storage key, op index).
    events: list[tuple[str, int, int]] = field(default_factory=list)


# -- the storage ledger ---------------------------------------------------------------------------


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class StorageLedger:
    """Which tensor storages exist, their bytes, and when each was created and freed.

    It owns the `storages` and `events` a `Recording` shows. Each storage is counted once, however
    many views share it, under a serial key. Its death is read from the storage's own lifetime (a
    weak reference), so it follows autograd's real decisions about what to keep; `clock` gives the
    index of the last op recorded when that happens.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self.storages: dict[int, StorageRecord] = {}
        self.events: list[tuple[str, int, int]] = []
        self._clock = clock
        self._alive: dict[int, tuple[int, weakref.ref]] = {}  # id(storage) -> (key, weak ref)
        self._next_key = 0
        # A sum of two gradients the engine would have made in place if its first term dies
        # right after: (op index, first term's key, id of the sum's storage, what to call then).
        self._accumulation: tuple[int, int, int, Callable[[int], None]] | None = None

    def note(
        self, tensor: torch.Tensor, *, created_at: int, phase: str, module: str
    ) -> StorageRecord | None:
        """The record of `tensor`'s storage, opened now if the storage is new; None for a tensor
        without a storage."""
        storage = _storage_of(tensor)
        if storage is None:
            return None
        alive = self._alive.get(id(storage))
        if alive is not None:
            return self.storages[alive[0]]
        # Storages get serial keys: a Python id can be reused once its storage has died.
        key = self._next_key
        self._next_key += 1
        record = StorageRecord(
            key=key,
            nbytes=storage.nbytes(),
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            created_at=created_at,
            phase=phase,
            module=module,
        )
        self.storages[key] = record
        self.events.append(("alloc", key, created_at))
        self._alive[id(storage)] = (key, weakref.ref(storage, self._on_free(id(storage), record)))
        return record

    def track(self, tensor: torch.Tensor, role: str, *, phase: str) -> None:
        """Register a tensor made before or outside recording (a parameter, the input batch, a
        gradient of the unrecorded first step); `role` "" leaves it to the phase to tell."""
        record = self.note(tensor, created_at=-1, phase=phase, module="")
        if record is not None and not record.role:
            record.role = role

    def key(self, tensor: torch.Tensor) -> int:
        """The serial key of a live tensor's storage (-1 if it was never seen)."""
        storage = _storage_of(tensor)
        alive = self._alive.get(id(storage)) if storage is not None else None
        return alive[0] if alive is not None else -1

    def accumulating(self, index: int, first: torch.Tensor, total: torch.Tensor, done: Callable[[int], None]) -> None:
        """Op `index` was the autograd engine summing two gradients of one tensor, `first` the one
        it held, into the new `total`. Under a dispatch mode (fake tensors are one) the engine
        always sums out of place; a plain run adds in place into `first` when the engine holds its
        last reference (torch/csrc/autograd/input_buffer.cpp, `accumulate`), which shows here as
        `first` dying right after the op. If it does, `total` continues `first`'s storage instead
        of being a new one, and `done(key of first)` is called."""
        storage = _storage_of(total)
        if storage is not None and id(storage) in self._alive:
            self._accumulation = (index, self.key(first), id(storage), done)

    def _continue_in_place(self, record: StorageRecord) -> bool:
        """`record`'s storage died: if it was the first term of the sum just made, the sum's
        storage becomes it (see `accumulating`); True if so."""
        assert self._accumulation is not None
        index, first_key, total_id, done = self._accumulation
        if index != self._clock():
            self._accumulation = None
            return False
        if first_key != record.key:
            return False
        self._accumulation = None
        total_key, total_ref = self._alive[total_id]
        storage = total_ref()
        if storage is None:
            return False
        del self.storages[total_key]
        self._drop_latest(("alloc", total_key, index))
        # The sum's own weak reference is dropped with its entry, so only this one fires.
        self._alive[total_id] = (record.key, weakref.ref(storage, self._on_free(total_id, record)))
        done(record.key)
        return True

    def _drop_latest(self, event: tuple[str, int, int]) -> None:
        """Remove `event`, made by one of the last ops: searched from the end, where it is
        (`list.remove` from the start, hundreds of times a step over tens of thousands of events,
        was 5% of DenseNet's prediction)."""
        for position in range(len(self.events) - 1, -1, -1):
            if self.events[position] == event:
                del self.events[position]
                return

    def _on_free(self, storage_id: int, record: StorageRecord) -> Callable[[weakref.ref], None]:
        # The ledger weakly: held strongly, every storage's callback would tie the ledger and its
        # recording into a cycle that only the cyclic collector frees, a full pass per prediction.
        ledger = weakref.ref(self)

        def freed(_ref: weakref.ref) -> None:
            listening = ledger()
            if listening is not None:
                listening._freed(storage_id, record)

        return freed

    def _freed(self, storage_id: int, record: StorageRecord) -> None:
        self._alive.pop(storage_id, None)
        if self._accumulation is not None and self._continue_in_place(record):
            return
        record.freed_after = self._clock()
        self.events.append(("free", record.key, record.freed_after))


# -- what autograd saved for backward -------------------------------------------------------------


def harvest_saved_tensors(
    node_owners: Mapping[Any, str],
    storage_key: Callable[[torch.Tensor], int],
    *,
    skip: Container[Any] = (),
    outside_model: Container[Any] = (),
) -> list[SavedTensor]:
    """What each autograd node in `node_owners` (node -> module) keeps for backward, read from its
    `_saved_<field>` attributes: one `SavedTensor` per saved tensor whose storage has a key. Nodes
    in `outside_model` were made while no module of the model ran (the loss).

    Unpacking a saved variable dispatches a detach, so a recorder pauses while this runs. Nodes in
    `skip` saved through saved-tensor hooks (activation checkpointing): unpacking theirs would run
    the recomputation now, so they are not read; they keep no activation anyway.
    """
    saved: list[SavedTensor] = []
    for node, module in node_owners.items():
        if node in skip:
            continue
        for field_name, tensor in _saved_by(node):
            key = storage_key(tensor)
            if key >= 0:
                saved.append(SavedTensor(key, type(node).__name__, field_name, module, node in outside_model))
    return saved


def _saved_by(node: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(field, tensor) for each tensor an autograd node saved."""
    for attribute in _saved_fields(node):
        try:
            value = getattr(node, attribute)
        except RuntimeError:  # already freed by an earlier backward
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, torch.Tensor):
                yield attribute.removeprefix("_saved_"), item


def _saved_fields(node: Any) -> list[str]:
    """The `_saved_<field>` attributes of a node: those of its class for a C++ node (asked once per
    class: `dir` is slow), read afresh from a Python function's node, which may have its own."""
    if hasattr(node, "__dict__"):
        return [attribute for attribute in dir(node) if attribute.startswith("_saved_")]
    fields = _SAVED_FIELDS.get(type(node))
    if fields is None:
        fields = _SAVED_FIELDS[type(node)] = [attribute for attribute in dir(node) if attribute.startswith("_saved_")]
    return fields


_SAVED_FIELDS: dict[type, list[str]] = {}


# -- the op recorder ------------------------------------------------------------------------------


_POOLS = {
    aten.max_pool1d_with_indices: ("max_pool", 1),
    aten.max_pool2d_with_indices: ("max_pool", 2),
    aten.max_pool3d_with_indices: ("max_pool", 3),
    aten.avg_pool2d: ("avg_pool", 2),
    aten.avg_pool3d: ("avg_pool", 3),
}


def _window_params(func: Any, args: tuple[Any, ...]) -> tuple[str, tuple[AxisParams, ...]] | None:
    """The window of a conv/pool op, read from its aten arguments before it runs."""
    packet = func.overloadpacket
    if packet is aten.convolution and not args[6]:  # a transposed convolution is not a window
        x, weight = args[0], args[1]
        spatial = x.dim() - 2
        axes = axes_from_torch(
            ndim=spatial, kind="conv", kernel_size=tuple(weight.shape[2:]), stride=args[3], padding=args[4], dilation=args[5]
        )
        return "conv", axes
    if packet in _POOLS:
        kind, spatial = _POOLS[packet]
        # max_pool: (self, kernel, stride, padding, dilation, ceil_mode);
        # avg_pool: (self, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override).
        stride = args[2] if len(args) > 2 else None
        padding = args[3] if len(args) > 3 else 0
        if kind == "max_pool":
            dilation = args[4] if len(args) > 4 else 1
            ceil_mode = bool(args[5]) if len(args) > 5 else False
        else:
            dilation, ceil_mode = 1, bool(args[4]) if len(args) > 4 else False
        axes = axes_from_torch(
            ndim=spatial, kind="pool", kernel_size=args[1], stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode
        )
        return kind, axes
    return None


class _ModuleStack:
    """The innermost module running, in forward (hooks) and in backward (autograd node owners)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {module: name for name, module in model.named_modules()}
        self.types = {name: type(module).__name__ for module, name in self.names.items()}
        self.stack: list[str] = []
        self.outputs: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]] = {}
        self.node_owner: dict[Any, str] = {}  # autograd node -> module whose forward created it
        self.hooked: set[Any] = set()  # nodes made under saved-tensor hooks (checkpointing)
        self.outside: set[Any] = set()  # nodes made while no module ran (the loss)
        self.param_owner: dict[int, str] = {
            id(param): name.rpartition(".")[0] for name, param in model.named_parameters()
        }
        self._handles: list[Any] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def __enter__(self) -> Self:
        def pre_hook(module: nn.Module, _inputs: Any) -> None:
            if module in self.names:
                self.stack.append(self.names[module])

        def post_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if module in self.names and self.stack:
                name = self.stack.pop()
                if name not in self.outputs:
                    tensors = output_tensors(output)
                    self.outputs[name] = tuple((tuple(t.shape), t.dtype) for t in tensors)

        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(pre_hook),
            nn.modules.module.register_module_forward_hook(post_hook),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def adopt_inner_nodes(self) -> None:
        """Give each autograd node made inside one composite call (cross_entropy's log-softmax),
        never returned to Python, the module of the node that leads to it, so its saved tensors
        and backward ops are attributed to a layer too."""
        pending = list(self.node_owner)
        while pending:
            node = pending.pop()
            for child, _ in node.next_functions:
                # An AccumulateGrad node has a `variable`: it belongs to its parameter's module.
                adopt = child is not None and not hasattr(child, "variable")
                if adopt and child not in self.node_owner:
                    self.node_owner[child] = self.node_owner[node]
                    if node in self.hooked:
                        self.hooked.add(child)
                    if node in self.outside:
                        self.outside.add(child)
                    pending.append(child)

    def owner_of_node(self, node: Any) -> str:
        owner = self.node_owner.get(node)
        if owner is not None:
            return owner
        variable = getattr(node, "variable", None)  # AccumulateGrad: the parameter it accumulates
        return self.param_owner.get(id(variable), "") if variable is not None else ""


class _NodeOwners(TorchFunctionMode):
    """Remembers which module's forward created each autograd node, so backward ops can be
    attributed to layers. It sits above autograd, where outputs already carry their grad_fn.

    When a CUDA step is emulated on a CPU-only build, it also makes dropout take CUDA's path: the
    fused kernel, which keeps a bool mask where the CPU composite keeps a float one.
    """

    def __init__(self, modules: _ModuleStack, *, emulate_cuda: bool) -> None:
        super().__init__()
        self.modules = modules
        self.emulate_cuda = emulate_cuda

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.emulate_cuda and func is F.dropout:
            output = _cuda_dropout(*args, **kwargs)
        else:
            output = func(*args, **kwargs)
        hooked = torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
        for value in _tensors((output,)):
            node = value.grad_fn
            if node is not None and node not in self.modules.node_owner:
                # "" is the root module's own forward, or code outside any module: the loss.
                self.modules.node_owner[node] = self.modules.current()
                if not self.modules.stack:
                    self.modules.outside.add(node)
                if hooked:
                    self.modules.hooked.add(node)
        return output


# Normalisations whose CPU kernels keep their statistics in float32 when reduced-precision input
# meets float32 weights (autocast), by the position of the weight among their arguments.
_MIXED_PRECISION_STATISTICS = {
    aten.native_batch_norm.default: 1,
    aten.native_layer_norm.default: 2,
    aten.native_group_norm.default: 1,
}


def _float32_statistics(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """A normalisation's saved mean and inverse std in float32 when reduced-precision input meets
    float32 weights (autocast), as the real kernels keep them (measured on CPU: batch norm, layer
    norm, group norm; batch norm on CUDA too); the fake kernel would give them the input's
    dtype, half their bytes."""
    weight_at = _MIXED_PRECISION_STATISTICS.get(func)
    if weight_at is None:
        return output
    x, weight = args[0], args[weight_at]
    if x.dtype not in (torch.bfloat16, torch.float16) or weight is None or weight.dtype != torch.float32:
        return output
    result, mean, inverse_std = output
    return result, mean.to(torch.float32), inverse_std.to(torch.float32)


def _cpu_batch_norm_grad_layout(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """CPU batch norm backward's grad_input in the input's channels-last layout, as the real
    kernel writes it (measured: channels-last input, NCHW grad_output); the fake kernel gives it
    grad_output's, and the convolution backward after it would be predicted to copy its
    grad_output into channels-last (mbconv, MobileNet: 32 KB over at batch 4)."""
    if func is not aten.native_batch_norm_backward.default or output[0] is None:
        return output
    x, grad_input = args[1], output[0]
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.device.type != "cpu" or not channels_last or grad_input.is_contiguous(memory_format=torch.channels_last):
        return output
    return (torch.empty_like(grad_input, memory_format=torch.channels_last), *output[1:])


def _elementwise_layout(args: tuple[Any, ...], output: Any) -> Any:
    """An elementwise op's output in contiguous strides where TensorIterator's fast setup gives
    them: every tensor operand of the output's shape and contiguous. Sizes of 1 make a tensor
    contiguous in both layouts (a (N, C, 1, 1) map after global pooling), and there the fake
    kernel keeps a channels-last input's strides where the real one does not; the strides decide
    which layout a later kernel runs in (NiN's dropout feeds a max-pool backward that copies
    grad_input when they disagree, 884,736 bytes at batch 128 in bf16)."""
    if not isinstance(output, FakeTensor) or output.dim() < 3 or 1 not in output.shape[2:]:
        return output
    contiguous = torch._prims_common.make_contiguous_strides_for(output.shape)
    if output.stride() == tuple(contiguous) or not output.is_contiguous():
        return output
    operands = [a for a in args if isinstance(a, torch.Tensor)]
    if not all(a.shape == output.shape and a.is_contiguous() for a in operands):
        return output
    return torch.empty_like(output, memory_format=torch.contiguous_format)


def _sums_gradients(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an `add` may be the autograd engine accumulating two gradients of one tensor:
    while a backward node runs without grad mode (not create_graph, not a checkpoint's
    recomputation), two tensors alike, nothing else; the engine adds in place only into a dense
    one (`can_accumulate_inplace`)."""
    if kwargs or len(args) != 2 or torch.is_grad_enabled() or torch._C._current_autograd_node() is None:
        return False
    first, second = args
    return (
        isinstance(first, FakeTensor)
        and isinstance(second, FakeTensor)
        and first.shape == second.shape
        and first.dtype == second.dtype
        and first.layout == torch.strided
        and aten.is_non_overlapping_and_dense.default(first)
    )


def _window_op(window: tuple[str, tuple[AxisParams, ...]], x: torch.Tensor, output: torch.Tensor) -> WindowOp:
    kind, axes = window
    spatial = len(axes)
    return WindowOp(kind, axes, tuple(x.shape[-spatial:]), tuple(output.shape[-spatial:]))


def _cuda_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    # CUDA's dropout uses native_dropout when 0 < p < 1 and training (ATen's is_fused_kernel_acceptable).
    if not training or inplace or not 0 < p < 1:
        return F.dropout(input, p, training, inplace)
    return torch.ops.aten.native_dropout(input, p, True)[0]


class Recorder(TorchDispatchMode):
    """Records every op a step dispatches, in order, as an `OpRecord`: its phase (read from the
    step as it runs, `ninlab.analysis.phases`), the module running it, its inputs and outputs,
    FLOPs, window and CPU allocations.

    The storages ops make go to its `StorageLedger`; as backward begins, what autograd saved is
    harvested (`harvest_saved_tensors`). `recording` holds all of it.
    """

    def __init__(self, model: nn.Module, fake_mode: FakeTensorMode, *, emulate_cuda: bool = False) -> None:
        super().__init__()
        self.emulate_cuda = emulate_cuda
        self._paused = False
        self._warming_up = False
        self._entered = False
        self._overflow_flags: set[int] = set()  # storage keys of GradScaler's found-inf flags
        self.modules = _ModuleStack(model)
        # No reference back to the recorder from what it holds, so that it and its recording die
        # by reference counts (see `StepRecording.recorder`).
        harvest = weakref.WeakMethod(self._harvest_saved_tensors)

        def on_backward() -> None:
            harvest()()  # a recorder is alive while it records

        self.phases = StepPhases(model, on_backward=on_backward)
        self._fake_outputs = _FakeOutputs(fake_mode)
        ops: list[OpRecord] = []
        self.ledger = StorageLedger(clock=lambda: len(ops) - 1)
        self.recording = Recording(
            ops=ops,
            storages=self.ledger.storages,
            events=self.ledger.events,
            module_outputs=self.modules.outputs,
        )

    @property
    def current_phase(self) -> str:
        """The phase an op dispatched now belongs to (see `ninlab.analysis.phases`): "setup"
        before the recorder is entered, "warm-up" during a warm-up step."""
        if self._warming_up:
            return "warm-up"
        return self.phases.current if self._entered else "setup"

    def track(self, tensor: torch.Tensor, role: str) -> None:
        """Register, in the current phase, a tensor made before or outside recording (see
        `StorageLedger.track`)."""
        self.ledger.track(tensor, role, phase=self.current_phase)

    def storage_key(self, tensor: torch.Tensor) -> int:
        """The serial key of a live tensor's storage (-1 if it was never seen)."""
        return self.ledger.key(tensor)

    # -- what autograd saved, pauses, the warm-up -----------------------------------------------
    def _harvest_saved_tensors(self) -> None:
        """As each backward begins, while its whole graph is still there: what autograd saved,
        added to what earlier backward calls of the step saw (gradient accumulation runs several)."""
        if self._paused or self._warming_up:
            return
        self.modules.adopt_inner_nodes()
        with self.paused():  # unpacking a saved variable dispatches a detach: not part of the step
            harvested = harvest_saved_tensors(
                self.modules.node_owner, self.ledger.key, skip=self.modules.hooked, outside_model=self.modules.outside
            )
        saved = self.recording.saved_for_backward
        seen = set(saved)
        saved += [entry for entry in harvested if entry not in seen]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run as usual but are not recorded, and the storages they make are not tracked."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Ops run but are not recorded; the storages they make are tracked (phase "warm-up"), so
        whatever a first step leaves alive (gradients, optimizer state, a GradScaler's scale) is
        alive when the recorded step starts."""
        self._warming_up = True
        try:
            yield
        finally:
            self._warming_up = False
            # The warm-up's autograd nodes are let go, as its graph is for real: a custom
            # Function's node keeps its ctx, and what the ctx holds (a reentrant checkpoint's
            # generator state) would outlive the warm-up only here.
            self.modules.node_owner.clear()
            self.modules.hooked.clear()
            self.modules.outside.clear()

    @contextlib.contextmanager
    def noting_rng_states(self) -> Iterator[None]:
        """Note each copy of the CPU generator's state the step takes (activation checkpointing
        keeps one per checkpoint until backward, 5056 bytes): a real tensor, made by no op, so
        the recorder would not see it otherwise. Made when the next op runs."""
        take_state = torch.get_rng_state

        def noted_state() -> torch.Tensor:
            state = take_state()
            if not self._paused:
                created_at = -1 if self._warming_up else len(self.recording.ops)
                self.ledger.note(state, created_at=created_at, phase=self.current_phase, module=self.modules.current())
            return state

        torch.get_rng_state = noted_state
        try:
            yield
        finally:
            torch.get_rng_state = take_state

    # -- dispatch ---------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.modules.__enter__()
        self._node_owners = _NodeOwners(self.modules, emulate_cuda=self.emulate_cuda)
        self._node_owners.__enter__()
        self.phases.__enter__()
        self._entered = True
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._entered = False
        self.phases.__exit__(*exc)
        self._node_owners.__exit__(*exc)
        self.modules.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _PRIM_DEVICE and type(args[0]) is FakeTensor:
            return _fake_device(args[0])
        kwargs = kwargs or {}
        traits = _traits(func)
        if traits.metadata:
            return func(*args, **kwargs)
        # An in-place op's output is its first argument, shape and all: the fake kernel would
        # only check broadcasting, so it is skipped (a third of a training step's ops are these,
        # most of them the optimizer's). Not for a tensor holding a real constant (Adam's step
        # count): the fake kernel computes its new value.
        skip_kernel = traits.returns_self and getattr(args[0], "constant", None) is None
        if self._paused:
            return args[0] if skip_kernel else self._fake_outputs.run(func, args, kwargs)
        if func is aten._local_scalar_dense.default and self.ledger.key(args[0]) in self._overflow_flags:
            # A GradScaler asks whether unscaling found an inf or NaN: the steady state has none,
            # so the optimizer steps. Any other value a step reads needs real data.
            return 0.0
        if func is aten._amp_foreach_non_finite_check_and_unscale_.default:
            self._overflow_flags.add(self.ledger.key(args[1]))
        if self._warming_up:
            output = args[0] if skip_kernel else self._fake_outputs.run(func, args, kwargs)
            for tensor in _tensors((output,)):
                self.ledger.note(tensor, created_at=-1, phase="warm-up", module="")
            return output
        # Composite ops (conv2d, max_pool2d under inference_mode, ...) run as their parts, as
        # they do for real; recording the parts shows what they allocate (max-pool indices).
        # The C++ composite kernel, not a Python decomposition (`func.decompose` prefers those), so
        # the parts are the kernels PyTorch really runs. Torch-function modes sit above autograd
        # and must not see the parts again.
        if traits.composite:
            with self, torch._C.DisableTorchFunction():
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        window = _window_params(func, args)
        if window is not None:
            self._check_window_fits(window, args[0])
        if skip_kernel:
            output = args[0]
        else:
            output = _float32_statistics(func, args, self._fake_outputs.run(func, args, kwargs))
            output = _cpu_batch_norm_grad_layout(func, args, output)
            if traits.pointwise:
                output = _elementwise_layout(args, output)
        self._record(func, traits.name, args, kwargs, output, window)
        if func is aten.add.Tensor and _sums_gradients(args, kwargs):
            self.ledger.accumulating(len(self.recording.ops) - 1, args[0], output, self._added_in_place)
        return output

    def _added_in_place(self, key: int) -> None:
        """The last op, a sum of gradients, is recorded as the engine runs it without a dispatch
        mode: added in place into its first term, storage `key` (`StorageLedger.accumulating`)."""
        op = self.recording.ops[-1]
        (total,) = op.outputs
        self.recording.ops[-1] = dataclasses.replace(
            op, op=str(aten.add_.Tensor), outputs=(dataclasses.replace(total, storage_key=key),)
        )

    def _check_window_fits(
        self, window: tuple[str, tuple[AxisParams, ...]], x: torch.Tensor
    ) -> None:
        """Check the geometry before the op runs, to name the layer and its arithmetic if the
        input is too small."""
        kind, axes = window
        try:
            for params, size in zip(axes, x.shape[x.dim() - len(axes):]):
                params.window(size)
        except EmptyOutputError as error:
            module = self._module_now()[0]
            raise LayerInputTooSmall(module, self.modules.types.get(module, kind), error) from None

    def _module_now(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.modules.current(), ""
        return self.modules.owner_of_node(node), type(node).__name__

    def _record(
        self,
        func: Any,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        window: tuple[str, tuple[AxisParams, ...]] | None,
    ) -> None:
        index = len(self.recording.ops)
        module, node = self._module_now()
        in_tensors = _tensors(args) + (_tensors(tuple(kwargs.values())) if kwargs else [])
        outputs = tuple(_tensors((output,)))
        phase = self.current_phase
        note = self.ledger.note
        output_records = [note(tensor, created_at=index, phase=phase, module=module) for tensor in outputs]
        output_tuple = output if isinstance(output, (tuple, list)) else (output,)
        # A CUDA step emulated on CPU tensors runs CUDA's kernels, not these.
        on_cpu = not self.emulate_cuda and all(_device_type(t) == "cpu" for t in outputs)
        allocations, unmodelled = cpu_kernel_allocations(name, args) if on_cpu else (None, "")
        meta = self._meta
        self.recording.ops.append(
            OpRecord(
                index=index,
                op=name,
                phase=phase,
                module=module,
                inputs=tuple(meta(t) for t in in_tensors),
                outputs=tuple(
                    TensorMeta(tuple(t.shape), t.dtype, -1 if record is None else record.key)
                    for t, record in zip(outputs, output_records)
                ),
                flops=op_flops(func, args, tuple(output_tuple)),
                window=None if window is None else _window_op(window, args[0], outputs[0]),
                autograd_node=node,
                cpu_allocations=allocations,
                cpu_unmodelled=unmodelled,
                cpu_call=KernelCall.of(name, args, outputs) if unmodelled else None,
            )
        )

    def _meta(self, tensor: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(tensor.shape), tensor.dtype, self.ledger.key(tensor))


def _fake_device(tensor: FakeTensor) -> torch.device:
    """`prim.device` of a fake tensor: asked by C++ (the autograd engine) of every fake tensor,
    thousands of times a step, and answered here as FakeTensor itself answers it, one mode sooner."""
    return torch.device("meta") if tensor.fake_mode.in_kernel_invocation else tensor.fake_device


class OffRecord(TorchDispatchMode):
    """Runs ops on fake tensors the quick way the recorder runs them (in-place ops skip the fake
    kernel, outputs made from `_FakeOutputs`), recording nothing: for what a step needs made
    before it is recorded (the fake parameters, the input batch, the probe forward that fits the
    loss), and for the parts of an op that FakeTensorMode decomposes. Entered over `fake_mode`."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self._fake_outputs = _FakeOutputs(fake_mode)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _PRIM_DEVICE and type(args[0]) is FakeTensor:
            return _fake_device(args[0])
        kwargs = kwargs or {}
        traits = _traits(func)
        if traits.metadata:
            return func(*args, **kwargs)
        if traits.returns_self and getattr(args[0], "constant", None) is None:
            return args[0]
        return self._fake_outputs.run(func, args, kwargs)


@dataclass(frozen=True)
class _OpTraits:
    """What the recorder needs to know of an aten op before running it, found once per op."""

    name: str  # as OpRecord.op names it
    metadata: bool  # a query FakeTensorMode answers without a kernel: not an op
    composite: bool  # CompositeImplicitAutograd: runs as its parts
    returns_self: bool  # in place on its first argument, which it returns, metadata unchanged
    pointwise: bool  # a TensorIterator op, elementwise


_TRAITS: dict[Any, _OpTraits] = {}


def _traits(func: Any) -> _OpTraits:
    traits = _TRAITS.get(func)
    if traits is None:
        schema = func._schema
        first = schema.arguments[0].alias_info if schema.arguments else None
        returned = schema.returns[0].alias_info if len(schema.returns) == 1 else None
        in_place = (
            first is not None
            and first.is_write
            and returned is not None
            and returned.is_write
            and set(returned.before_set) == set(first.before_set)
            and torch.Tag.inplace_view not in func.tags
        )
        metadata = func in _METADATA_OPS  # prim ops among them have no dispatch table to ask
        traits = _OpTraits(
            name=str(func),
            metadata=metadata,
            composite=not metadata and _runs_as_parts(func.name()),
            returns_self=in_place,
            pointwise=torch.Tag.pointwise in func.tags,
        )
        _TRAITS[func] = traits
    return traits


def _runs_as_parts(name: str) -> bool:
    """Whether the CPU runs op `name` as its CompositeImplicitAutograd parts: it has that kernel
    and none of its own. A few ops have both (silu_backward, mish_backward,
    native_channel_shuffle), and the dispatcher prefers the CPU kernel: their parts would be
    temporaries the real step never makes."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return has_kernel(name, _COMPOSITE) and not any(has_kernel(name, key) for key in _OWN_KERNELS)


_OWN_KERNELS = (
    torch._C.DispatchKey.CPU,
    torch._C.DispatchKey.CompositeExplicitAutograd,
    torch._C.DispatchKey.CompositeExplicitAutogradNonFunctional,
)


class _FakeOutputs:
    """Runs an op on fake tensors, remembering what its outputs look like for the arguments'
    metadata, so that the next call with the same shapes, strides, dtypes and other arguments
    makes its outputs directly instead of going through `FakeTensorMode` again.

    FakeTensorMode has a cache of its own, but it hashes every argument in depth on every call,
    which costs more than the meta kernel it saves; a step repeats the same few calls many times
    (each block of a network, each parameter in the optimizer), and this key is cheap. Remembered:
    fresh outputs, and one output viewing the first argument (a view op's), made again on its
    storage; not other outputs aliasing an input, not mutating ops, not outputs or inputs holding real constant
    values (FakeTensorMode computes those for real), not ops that raise (data-dependent ones).

    What is remembered outlives one recording (`_KNOWN_OUTPUTS`): outputs' metadata follows from
    the arguments' alone, so a second prediction of a model, or one at another batch size (whose
    optimizer ops see the same parameter shapes), makes most outputs directly.

    An op FakeTensorMode runs as a Python decomposition (batch norm, its backward) is decomposed
    here the same way, each part through this memory: at a new batch size, the parts on
    per-channel statistics are known already, and only those on the batch are new.

    Ops on real constants alone (Adam's step count: `step += 1`, `step.item()`) are computed
    here on the constants, as FakeTensorMode would compute them, without its slow path; so is the
    count itself made (`torch.tensor(0.0)`).
    """

    def __init__(self, mode: FakeTensorMode) -> None:
        self._mode = mode
        # What a factory op without a dtype or device makes depends on the defaults.
        defaults = (torch.get_default_dtype(), torch._C._get_default_device())
        if sum(len(known) for known in _KNOWN_OUTPUTS.values()) > _KNOWN_OUTPUTS_LIMIT:
            _KNOWN_OUTPUTS.clear()
        self._known = _KNOWN_OUTPUTS.setdefault(defaults, {})
        # Runs the parts of an op FakeTensorMode decomposes in Python, so that they are
        # remembered too (made when first needed).
        self._parts: OffRecord | None = None

    def run(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = _key(func, args, kwargs)
        if key is None:
            if _on_constants(func, args, kwargs):
                return _run_on_constants(func, args)
            if func is aten.lift_fresh.default and _small_real_tensor(args[0]):
                return _fake_constant(self._mode, args[0])
            return func(*args, **kwargs)
        entry = self._known.get(key)
        if entry is not None:
            views, made = entry
            return _make_view(args[0], *made) if views else _make_fakes(self._mode, *made)
        decomposition = _python_decomposition(self._mode, func)
        if decomposition is None:
            output = func(*args, **kwargs)
        else:
            if self._parts is None:
                self._parts = OffRecord(self._mode)
            with self._parts:
                output = decomposition(*args, **kwargs)
        fresh = None if func.is_view else _fresh_outputs(output, args, kwargs)
        if fresh is not None:
            self._known[key] = (False, fresh)
        elif args:
            # A view op, or one whose output views its input all the same (`_unsafe_view`).
            view = _view_output(output, args[0])
            if view is not None:
                self._known[key] = (True, view)
        return output


def _python_decomposition(mode: FakeTensorMode, func: Any) -> Callable[..., Any] | None:
    """The Python decomposition FakeTensorMode runs for `func` instead of a meta kernel (batch
    norm and its backward, `slice`, `threshold_backward`, `_softmax`: its `_dispatch_impl` for
    an op with neither a Python meta nor a symbolic C++ one), or None. Found once per op."""
    if func not in _DECOMPOSITIONS:
        decomposed = (
            func not in meta_table
            and not mode.cpp_meta_supports_symint(func)
            and func in decomposition_table
            and torch_decomp_decompositions(func)
        )
        _DECOMPOSITIONS[func] = decomposition_table[func] if decomposed else None
    return _DECOMPOSITIONS[func]


_DECOMPOSITIONS: dict[Any, Callable[..., Any] | None] = {}


def _small_real_tensor(value: Any) -> bool:
    """A plain CPU tensor FakeTensorMode keeps as a constant when `torch.tensor` makes one."""
    return (
        type(value) is torch.Tensor
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.requires_grad
        and value.numel() <= CONSTANT_NUMEL_LIMIT
    )


def _fake_constant(mode: FakeTensorMode, real: torch.Tensor) -> FakeTensor:
    """`torch.tensor(0.0)` under `mode` (Adam's step count, one per parameter): a fake tensor
    holding a copy of the value as its constant, registered with the mode's converter, as
    FakeTensorMode's `lift_fresh` makes it, without converting through its general machinery."""
    with torch._C._DisableTorchDispatch():
        constant = real.clone()
        empty = torch.empty_strided(tuple(real.shape), real.stride(), dtype=real.dtype, device="meta")
    fake = FakeTensor(mode, empty, real.device, constant=constant)
    mode.fake_tensor_converter.set_tensor_memo(constant, fake)
    mode.fake_tensor_converter.add_constant_storage_mapping(fake)
    return fake


# (default dtype, default device) -> key -> (whether the output views the first argument, what
# `_make_view` or `_make_fakes` needs; no fake mode: the outputs belong to the recording that
# makes them). Cleared when it holds more than
# _KNOWN_OUTPUTS_LIMIT keys in all, so that a long session's memory stays bounded.
_KNOWN_OUTPUTS: dict[tuple[Any, ...], dict[tuple[Any, ...], Any]] = {}
_KNOWN_OUTPUTS_LIMIT = 200_000
_CACHEABLE: dict[Any, bool] = {}


def _key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    cacheable = _CACHEABLE.get(func)
    if cacheable is None:
        schema = func._schema
        # A view op is remembered only when it returns one tensor viewing its first argument.
        one_view = len(schema.returns) == 1 and str(schema.returns[0].type) == "Tensor" and bool(
            schema.arguments and schema.arguments[0].alias_info is not None
        )
        cacheable = not ((func.is_view and not one_view) or schema.is_mutable)
        cacheable = cacheable and torch.Tag.dynamic_output_shape not in func.tags
        _CACHEABLE[func] = cacheable
    if not cacheable:
        return None
    parts: list[Any] = [func]
    for value in (*args, *kwargs.items()) if kwargs else args:
        part = _key_part(value)
        if part is None:
            return None
        parts.append(part)
    return tuple(parts)


def _on_constants(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether FakeTensorMode would compute this op on real constants and return either a Python
    number (`item()`) or its first argument (an in-place op): every tensor argument, at the top
    level, a fake tensor holding a constant, the op neither random nor changing shapes in place."""
    if kwargs or not args or not (func is aten._local_scalar_dense.default or _traits(func).returns_self):
        return False
    if torch.Tag.nondeterministic_seeded in func.tags:
        return False
    tensors = [value for value in args if isinstance(value, torch.Tensor)]
    if any(isinstance(value, (tuple, list)) for value in args) or not tensors:
        return False
    return all(type(t) is FakeTensor and t.constant is not None for t in tensors)


def _run_on_constants(func: Any, args: tuple[Any, ...]) -> Any:
    """The op computed on the constants, as FakeTensorMode computes it (without dispatch to any
    mode); an in-place op's output is its first (fake) argument, whose constant it updated."""
    constants = [value.constant if isinstance(value, FakeTensor) else value for value in args]
    with torch._C._DisableTorchDispatch():
        output = func(*constants)
    return args[0] if isinstance(output, torch.Tensor) else output


_PLAIN = (int, float, bool, str, torch.dtype, torch.device, torch.memory_format, torch.layout, type(None))


def _key_part(value: Any) -> Any:
    """A hashable stand-in for an op argument, or None when the argument cannot be keyed."""
    if isinstance(value, FakeTensor):
        if value.constant is not None:
            return None
        return (value.shape, value.stride(), value.dtype, value.storage_offset(), value.fake_device)
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        parts = tuple(_key_part(item) for item in value)
        return None if None in parts else ("seq", parts)
    return None


def _fresh_outputs(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `_make_fakes` needs to make outputs like these again, or None when they are not all
    fresh fake tensors (or None) without constants."""
    container = list if isinstance(output, list) else tuple if isinstance(output, tuple) else None
    outputs = tuple(output) if container is not None else (output,)
    described: list[tuple[Any, ...] | None] = []
    for tensor in outputs:
        if tensor is None:
            described.append(None)
            continue
        if type(tensor) is not FakeTensor or tensor.constant is not None or tensor.requires_grad:
            return None
        described.append((tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.fake_device))
    if all(entry is None for entry in described):
        return None
    inputs = {id(t.untyped_storage()) for t in _tensors((*args, *kwargs.values()))}
    if any(t is not None and id(t.untyped_storage()) in inputs for t in outputs):
        return None
    return tuple(described), container


def _make_fakes(mode: FakeTensorMode, described: tuple[Any, ...], container: type | None) -> Any:
    made = []
    for entry in described:
        if entry is None:
            made.append(None)
            continue
        shape, stride, dtype, device = entry
        with torch._C._DisableTorchDispatch():
            empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        made.append(FakeTensor(mode, empty, device))
    return container(made) if container is not None else made[0]


def _device_type(tensor: torch.Tensor) -> str:
    """A tensor's device type; a fake tensor's is read without dispatching `prim.device`."""
    fake_device = getattr(tensor, "fake_device", None)
    return (fake_device or tensor.device).type


def _view_output(output: Any, base: Any) -> tuple[Any, ...] | None:
    """What `_make_view` needs to make this view of `base` again, or None."""
    if type(output) is not FakeTensor or type(base) is not FakeTensor or output.constant is not None:
        return None
    if output.untyped_storage() is not base.untyped_storage() or output.requires_grad:
        return None
    return tuple(output.shape), output.stride(), output.storage_offset(), output.dtype, output.fake_device


def _make_view(
    base: FakeTensor, shape: tuple[int, ...], stride: tuple[int, ...], offset: int, dtype: torch.dtype, device: torch.device
) -> FakeTensor:
    """A fake tensor viewing `base`'s storage, as FakeTensorMode's cache makes one."""
    with torch._C._DisableTorchDispatch():
        view = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        view.set_(base.untyped_storage(), offset, shape, stride)
    return FakeTensor(base.fake_mode, view, device)


def _tensors(values: tuple[Any, ...] | list[Any]) -> list[torch.Tensor]:
    """The tensors among `values`, in order, looking into lists and tuples (an aten op's
    arguments and outputs; a torch function's output, such as an LSTM's (out, (h, c)))."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += _tensors(value)
    return found


def fake_parameters(
    model: nn.Module,
    fake_mode: FakeTensorMode,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """Fake copies of a model's parameters and buffers (no data is copied or allocated).

    Parameters stay `nn.Parameter`s so optimizers and autograd treat them as leaves. Floating
    tensors are cast to `dtype` when given, as `model.to(dtype)` would, and 4-d ones laid out
    channels-last when asked, as `model.to(memory_format=torch.channels_last)` would.
    """
    fakes: dict[str, torch.Tensor] = {}
    with fake_mode, OffRecord(fake_mode):
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            if memory_format == torch.contiguous_format:
                fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=target_dtype, device=device)
            else:
                fake = _empty(tuple(tensor.shape), target_dtype, device, memory_format)
            if isinstance(tensor, nn.Parameter):
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            fakes[name] = fake
    return fakes


def _empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, memory_format: torch.memory_format
) -> torch.Tensor:
    """An empty tensor in `memory_format` where it applies (4-d), else contiguous, as `.to()` does."""
    if memory_format == torch.channels_last and len(shape) == 4:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector off: storages die by reference counts alone, as in a real
    step (`ninlab.analysis.measure` measures with it off), and a recording pays no full
    collection of everything the process holds (torch's own objects: a third of a second)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class StepRecording:
    recording: Recording
    spec: StepSpec
    batch_size: int
    step_start: int  # index of the recorded step's first op (after any warm-up step)
    parameter_keys: dict[str, int]  # parameter name -> storage key
    gradient_keys: dict[str, int]  # parameter name -> storage key of its .grad after the step
    optimizer_state_keys: tuple[int, ...]
    input_keys: tuple[int, ...]  # one per input of the model
    target_key: int  # -1: no targets (an inference, or a loss that needs none)
    gradient_order: tuple[str, ...] = ()  # parameter names, as backward accumulated their gradients
    loss: str = ""  # what the training step's loss was (`builtin_loss_words`); "" for an inference
    # The recorder lives as long as its recording: what it holds (the autograd nodes it mapped to
    # modules, with their saved tensors) dies after the recording is read, not as the step
    # returns, when its ledger would record those storages freed after the step's last op.
    recorder: Recorder | None = field(default=None, repr=False, compare=False)


@collector_off()
def record_step(
    model: nn.Module, spec: StepSpec, batch_size: int, *, optimizer_step: bool = True
) -> StepRecording:
    """Run one step of `model` on fake tensors and record it.

    A training step (the built-in one or `spec.step`) runs twice: the first as a warm-up (not
    recorded; whatever it leaves alive, gradients and optimizer state, is tracked) and the second,
    analysed: the steady state, when optimizer state exists. Without `optimizer_step`, one forward,
    cross-entropy and backward are recorded and nothing else (what FLOP counts cover).

    The model's own parameters are not touched: fake copies stand in for them, swapped into the
    model for the duration of the step (as `torch.func.functional_call` does), so the step calls
    `model(inputs)` as it would for real, and the optimizer is built over the fakes.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    # The recorder remembers op outputs itself (`_FakeOutputs`); FakeTensorMode's own cache only
    # repeats it, hashing every argument of each call that still reaches it (a new shape).
    fake_mode.cache_enabled = False
    # Autograd cannot hold fake CUDA tensors in a build without CUDA: such a step runs on fake CPU
    # tensors with CUDA's choices made explicitly (foreach optimizers, fused dropout, autocast).
    emulate_cuda = spec.device_type == "cuda" and not torch.cuda.is_available()
    device = torch.device("cpu" if emulate_cuda else spec.device_type)
    memory_format = spec.torch_memory_format
    fakes = fake_parameters(model, fake_mode, dtype=spec.dtype, device=device, memory_format=memory_format)
    trains = spec.mode == "train"
    recorder = Recorder(model, fake_mode, emulate_cuda=emulate_cuda)
    was_training = model.training
    model.train(trains)
    # A kernel that rejects its fake inputs raises, and the caller turns that into one clear line;
    # FakeTensorMode would also log the whole traceback first.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    log_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        def forward(*x: torch.Tensor) -> Any:
            return torch.func.functional_call(model, fakes, x, tie_weights=True, strict=False)

        with fake_mode, OffRecord(fake_mode):
            inputs = example_inputs(spec, batch_size, device)
            # The loss fits the output, so its targets (if any) follow a forward's output.
            targets = builtin_targets(_probe(forward, inputs), device) if trains else None
        for tensor in fakes.values():
            recorder.track(tensor, "parameter" if isinstance(tensor, nn.Parameter) else "buffer")
        for tensor in inputs:
            recorder.track(tensor, "input")
        if targets is not None:
            recorder.track(targets, "targets")
        trainable = [t for t in fakes.values() if isinstance(t, nn.Parameter) and t.requires_grad]
        names = {id(t): name for name, t in fakes.items()}
        gradient_order: list[str] = []
        optimizers: list[torch.optim.Optimizer] = []
        step_start = 0
        with fake_mode, _reparametrize_module(model, fakes, tie_weights=True, strict=False), recorder, recorder.noting_rng_states():
            if not trains:
                inference_step(model, inputs, autocast_dtype=spec.autocast_dtype, grad_mode=spec.grad_mode)
            elif not optimizer_step:
                _forward_backward(model, inputs, targets, spec.autocast_dtype)
            else:
                optimizer = spec.make_optimizers(model, device_type=spec.device_type)
                optimizers = optimizers_in(optimizer)
                step = spec.step_function()
                # A model of one input gets one tensor, as the user's loop passes it.
                step_inputs = inputs[0] if len(inputs) == 1 else inputs
                with recorder.warming_up():
                    # Held while the recorded step runs, as a loop's `loss = step(...)` holds it.
                    previous = step(model, optimizer, step_inputs, targets)
                _name_survivors(recorder, trainable, optimizers)
                step_start = len(recorder.recording.ops)
                # The order in which backward finishes each parameter's gradient (DDP's buckets follow it).
                hooks = [p.register_post_accumulate_grad_hook(lambda p: gradient_order.append(names[id(p)])) for p in trainable]
                step(model, optimizer, step_inputs, targets)
                for hook in hooks:
                    hook.remove()
                del previous
    finally:
        model.train(was_training)
        fake_log.setLevel(log_level)
    if trains and optimizer_step and not recorder.phases.backward_calls:
        raise NinlabError(
            f"the step {spec.step_name} never calls backward(), so it trains nothing; call "
            "loss.backward() in it, or predict mode='infer'"
        )
    state_keys = [recorder.storage_key(t) for t in optimizer_state(optimizers)]
    return StepRecording(
        recorder=recorder,
        recording=recorder.recording,
        spec=spec,
        batch_size=batch_size,
        step_start=step_start,
        parameter_keys={name: recorder.storage_key(t) for name, t in fakes.items() if isinstance(t, nn.Parameter)},
        gradient_keys={names[id(p)]: recorder.storage_key(p.grad) for p in trainable if p.grad is not None},
        optimizer_state_keys=tuple(k for k in state_keys if k >= 0),
        input_keys=tuple(recorder.storage_key(tensor) for tensor in inputs),
        target_key=recorder.storage_key(targets) if targets is not None else -1,
        gradient_order=tuple(gradient_order),
        loss=(builtin_loss_words(targets) if spec.step is None else f"the step {spec.step_name}'s own") if trains else "",
    )


def _probe(forward: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Any:
    """The model's output on `inputs`, without autograd, to fit the loss to it."""
    with torch.no_grad():
        return forward(*inputs)


def _name_survivors(
    recorder: Recorder, parameters: list[nn.Parameter], optimizers: list[torch.optim.Optimizer]
) -> None:
    """Give what the warm-up left alive its role: gradients and optimizer state; the rest (a
    GradScaler's scale, anything the step keeps) stays the warm-up's. A function of its own, so
    no loop variable outlives it holding a gradient that zero_grad must free."""
    for tensors, role in (([p.grad for p in parameters if p.grad is not None], "gradient"), (optimizer_state(optimizers), "optimizer_state")):
        for tensor in tensors:
            key = recorder.storage_key(tensor)
            if key >= 0:
                recorder.recording.storages[key].role = role


def _forward_backward(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
    autocast_dtype: torch.dtype | None,
) -> None:
    """Forward, loss and backward without an optimizer: what FLOP counts of a step cover."""
    with torch.autocast(inputs[0].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(*inputs)
        loss = builtin_loss(logits, targets)
    del logits
    loss.backward()

