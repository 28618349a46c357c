"""The CPU allocations of one op call that no rule in `ninlab.analysis.allocator` knows, measured.

oneDNN sizes its brgemm scratchpads (bfloat16 convolutions and matrix multiplies on AMX, and a few
float32 convolution kinds) and the padding of its reordered weights from blocking heuristics that
depend on the CPU's instruction set, the thread count and the shape; they do not even grow
monotonically with the image. A rule read off one CPU would be wrong on the next. So for each such
call the recording keeps its signature (`KernelCall`: the op and its arguments' sizes, strides and
dtypes), and `measured_allocations` runs that one op once, on zeros of the same layout, under the
profiler's allocation records (`profile_memory=True`): every block the kernel allocates and frees,
in order, on this machine, with its outputs found by address. A call is measured once per machine
and thread count: kept in this process (the same call at the same batch size costs nothing the
second time) and on disk for the next processes (`ninlab.analysis.kernel_cache`, keyed by the CPU,
its instruction set, the thread count and torch's build; `ninlab cache clear` empties it). A
step's unknown calls are measured together (`measure_together`): one profile, each call in a
span of its own.

That allocates the op's own arguments and outputs, one op at a time (a small part of the step the
prediction is about), and runs its arithmetic once: 0.8 s for the 24 convolution calls of NiN as
the `cpu` preset trains it (bf16, channels-last, 72x72, batch 128), the first time. A call whose
tensors exceed `PROBE_LIMIT_BYTES` is not run, nor, by the predictor, any other call of its step
(the figure is a lower bound either way); the report gives the reason.

Why one call alone tells what it does inside a step: oneDNN keeps no state between calls that
changes its blocks (the first call of a kernel allocates exactly what later ones do), and the
blocks depend on the arguments' layouts, which the recording gives as the CPU kernels make them.
tests/analysis/test_kernel_probe.py checks whole steps built of such calls against measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function

from ninlab.analysis import kernel_cache
from ninlab.analysis.allocator.blocks import KernelAllocation
from ninlab.analysis.allocator.rnn import lstm_workspace_bytes
from ninlab.analysis.fake_fast_path import tensors_in
from ninlab.analysis.quiet_profiler import quiet_profile
from ninlab.analysis.torch_internals import EventType, neg_view
from ninlab.units import format_bytes

__all__ = [
    "PROBE_LIMIT_BYTES",
    "KernelCall",
    "MissingKernel",
    "TensorLayout",
    "allocation_records",
    "measure_together",
    "measured_allocations",
    "too_large_to_measure",
]

PROBE_LIMIT_BYTES = 256 << 20
"""A call whose arguments and outputs together take more than this (256 MiB) is not run: its
arithmetic would take seconds, and the batch planner asks at many large batch sizes. NiN's
largest call at batch 128 and 224x224 under bf16 autocast, a 1x1 convolution on 54x54 maps,
takes 143 MB."""


@dataclass(frozen=True)
class TensorLayout:
    """What a kernel sees of a tensor argument: enough to make a real one that takes its path,
    its conjugate and negative bits included (a kernel given a lazily conjugated tensor, `x *
    y.conj()`, copies it resolved first: 16,384 bytes for a 16x128 complex64 operand, which
    zeros without the bit do not take)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    conj: bool = False
    neg: bool = False

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorLayout:
        return TensorLayout(
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
            tensor.is_conj(),
            tensor.is_neg(),
        )

    def __repr__(self) -> str:
        # A call's repr keys the kernel cache: the bits are named only where set, so the calls
        # measured before they were known keep their keys.
        bits = "".join(f", {name}=True" for name in ("conj", "neg") if getattr(self, name))
        return f"TensorLayout(shape={self.shape}, stride={self.stride}, dtype={self.dtype}{bits})"

    @property
    def nbytes(self) -> int:
        """The bytes of the smallest storage that holds it."""
        if 0 in self.shape:
            return 0
        extent = 1 + sum(
            (size - 1) * stride for size, stride in zip(self.shape, self.stride, strict=True)
        )
        return extent * self.dtype.itemsize

    def zeros(self) -> torch.Tensor:
        storage = torch.zeros(self.nbytes // self.dtype.itemsize, dtype=self.dtype)
        tensor = storage.as_strided(self.shape, self.stride)
        tensor = tensor.conj() if self.conj else tensor
        return neg_view(tensor) if self.neg else tensor


@dataclass(frozen=True)
class KernelCall:
    """One op call as a kernel sees it: the op ("aten.convolution.default"), its arguments with
    every tensor as its `TensorLayout` (lists as tuples, so the call can key a cache), the
    bytes of its outputs, and whether grad mode was on (oneDNN's LSTM layer returns the
    workspace for its backward only then)."""

    op: str
    args: tuple[Any, ...]
    output_bytes: int
    grad_enabled: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def of(
        op: str,
        args: Sequence[Any],
        outputs: Sequence[torch.Tensor],
        kwargs: Mapping[str, Any] | None = None,
    ) -> KernelCall:
        """The call of `op` on `args` and keyword-only `kwargs` (fake or real tensors; a flash
        attention's mask) that returned `outputs`, in the grad mode of now. An output that is one
        of its arguments (an in-place op's) was allocated before the call, so it counts no bytes."""
        arguments = [*args, *(kwargs or {}).values()]
        return KernelCall(
            op,
            _layouts(tuple(args)),
            sum(
                _bytes(t)
                for t in outputs
                if isinstance(t, torch.Tensor) and not any(t is a for a in arguments)
            ),
            torch.is_grad_enabled(),
            tuple((name, _layouts(value)) for name, value in (kwargs or {}).items()),
        )

    @property
    def nbytes(self) -> int:
        """What running it allocates beyond the kernel's own blocks: arguments and outputs."""
        arguments = (*self.args, *(value for _, value in self.kwargs))
        return self.output_bytes + sum(layout.nbytes for layout in _flat_layouts(arguments))


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _layouts(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorLayout.of(value)
    if isinstance(value, (list, tuple)):
        return tuple(_layouts(item) for item in value)
    if isinstance(value, torch.ScriptObject):
        return OpaqueArgument(value)
    return value


class OpaqueArgument:
    """An argument passed to the kernel as it is and compared by identity: a TorchScript object
    (a dynamically quantized LSTM's packed weights, `quantized_lstm`'s argument), whose own `==`
    raises, so a call holding it could not key the cache of calls measured."""

    __slots__ = ("value",)

    def __init__(self, value: torch.ScriptObject) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OpaqueArgument) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:  # its address: a call holding it is never kept on disk
        return repr(self.value)


def _flat_layouts(value: Any) -> list[TensorLayout]:
    if isinstance(value, TensorLayout):
        return [value]
    if isinstance(value, tuple):
        return [layout for item in value for layout in _flat_layouts(item)]
    return []


def _real(value: Any) -> Any:
    """The argument a kernel is called with: zeros for a layout, a list for a tuple (aten's
    list arguments; no aten op this module is asked about takes a tuple of tensors)."""
    if isinstance(value, TensorLayout):
        return value.zeros()
    if isinstance(value, tuple):
        return [_real(item) for item in value]
    if isinstance(value, OpaqueArgument):
        return value.value
    return value


class MissingKernel(Exception):
    """This PyTorch has no CPU kernel for the call's dtypes (`avg_pool3d` of bfloat16, which
    `nn.LocalResponseNorm` runs): the real step fails at that op, so no figure of it stands.
    Raised from the kernel's own `NotImplementedError`."""


_MEASURED: dict[tuple[KernelCall, int], tuple[KernelAllocation, ...] | str] = {}


def measured_allocations(call: KernelCall) -> tuple[KernelAllocation, ...] | str:
    """Every block `call` allocates and frees on this CPU, in order, its outputs marked
    (`KernelAllocation.output`); or, where it was not measured, why (a lower bound stays)."""
    key = (call, torch.get_num_threads())
    if key not in _MEASURED:
        measure_together([call])
    return _MEASURED[key]


def measure_together(calls: Iterable[KernelCall]) -> None:
    """Measure every call of `calls` this process does not know yet, for `measured_allocations`
    to read: what an earlier process measured on this machine (`ninlab.analysis.kernel_cache`),
    else measured now, all in one profile, and kept for the next process. One profile, not one a
    call: a profile's start costs milliseconds (most of them at its first op), more than many a
    small call itself, and each call's blocks are read from its own span of the profile, as if
    it ran alone."""
    threads = torch.get_num_threads()
    to_run = []
    for call in dict.fromkeys(calls):
        if (call, threads) in _MEASURED:
            continue
        stored = _stored(call)
        if stored is None:
            to_run.append(call)
        else:
            _MEASURED[call, threads] = stored
    if not to_run:
        return
    for call, measured in zip(to_run, _measure(to_run), strict=True):
        _MEASURED[call, threads] = measured
        if not isinstance(measured, str):
            kernel_cache.store(repr(call), measured)


def _stored(call: KernelCall) -> tuple[KernelAllocation, ...] | str | None:
    """What an earlier process measured of `call` on this machine, or why it is not run; None:
    it is to be measured."""
    if _reads_its_values(call):
        return "not run: its blocks depend on the values of its arguments, which zeros would fake"
    return kernel_cache.load(repr(call), call.output_bytes)


def too_large_to_measure(calls: Sequence[KernelCall]) -> str:
    """Why these calls are not measured ("" when every one is small enough to run)."""
    if any(call.nbytes > PROBE_LIMIT_BYTES for call in calls):
        return (
            f"not measured: a call of the step takes over {format_bytes(PROBE_LIMIT_BYTES)} of "
            "tensors"
        )
    return ""


def _refusal(call: KernelCall) -> str:
    """Why `call` is not run ("" where it is)."""
    if too_large := too_large_to_measure([call]):
        return too_large
    if call.op == "aten.mkldnn_rnn_layer_backward.default" and not _lstm_workspace_is_the_kernels(
        call.args
    ):
        return "not run: its LSTM workspace is not the size this torch's forward gives"
    return ""


@dataclass(frozen=True)
class _Run:
    """One call run inside the profile: the name of its span, where its outputs are (address ->
    index of the output) and the bytes of the outputs it made (not an argument it returned)."""

    span: str
    outputs: dict[int, int]
    made_bytes: int


def _measure(calls: Sequence[KernelCall]) -> list[tuple[KernelAllocation, ...] | str]:
    """Each call's blocks, or why it was not measured: every call run in one profile, each in a
    span of its own, its arguments made and its outputs freed outside it."""
    results: list[tuple[KernelAllocation, ...] | str] = [_refusal(call) for call in calls]
    runs: dict[int, _Run | str] = {}
    if all(results):
        return results
    try:
        # The op as recorded: autocast already chose its dtypes.
        with (
            torch.autocast("cpu", enabled=False),
            quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            for index, call in enumerate(calls):
                if not results[index]:
                    runs[index] = _run(call, f"ninlab kernel probe {index}")
    except MissingKernel:
        raise  # the step's own failure: no figure of it stands
    except Exception as error:  # noqa: BLE001 - another profiler running
        return [
            result or f"could not be run on its own ({type(error).__name__})" for result in results
        ]
    tree = prof.profiler.kineto_results.experimental_event_tree()
    records = allocation_records(tree)
    spans = _spans(tree)
    for index, run in runs.items():
        if isinstance(run, str):
            results[index] = run
        else:
            start, end = spans[run.span]
            results[index] = _blocks(run, [r for r in records if start <= r[0] <= end])
    return results


def _run(call: KernelCall, span: str) -> _Run | str:
    """`call` run on zeros of its layouts, in a span named `span`; or why it could not be."""
    namespace, name, overload = call.op.split(".")
    func = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    args = [_real(arg) for arg in call.args]
    kwargs = {name: _real(value) for name, value in call.kwargs}
    # A random op (dropout's mask, `randperm`) draws from the generator the user's step draws
    # from next: the draw is put back, so a prediction changes no random number of theirs.
    generator_state = torch.random.get_rng_state()
    try:
        # No argument asks for a graph (zeros need no gradient), but grad mode is the kernel's to
        # read.
        with torch.set_grad_enabled(call.grad_enabled), record_function(span):
            result = func(*args, **kwargs)
    except NotImplementedError as error:
        if "not implemented for '" in str(error):
            raise MissingKernel(call.op) from error
        return f"could not be run on its own ({type(error).__name__})"
    except Exception as error:  # noqa: BLE001 - a kernel refusing zeros
        return f"could not be run on its own ({type(error).__name__})"
    finally:
        torch.random.set_rng_state(generator_state)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    # What stays allocated must be the real outputs: those of the recording may differ from
    # them where a fake kernel does (torch 2.8's layer norm backward gives float32 weights
    # float32 gradients of a bf16 input; its fake kernel, bf16 ones).
    given = {t.untyped_storage().data_ptr() for t in tensors_in([*args, *kwargs.values()])}
    made = {
        t.untyped_storage().data_ptr(): _bytes(t)
        for t in tensors_in(outputs)
        if t.untyped_storage().data_ptr() not in given
    }
    addresses = {
        t.untyped_storage().data_ptr(): index
        for index, t in enumerate(outputs)
        if isinstance(t, torch.Tensor) and _bytes(t) > 0
    }
    return _Run(span, addresses, sum(made.values()))


def _spans(tree: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """Each span's (start, end) in ns, by name, in a finished profile's event tree."""
    spans: dict[str, tuple[int, int]] = {}
    pending = list(tree)
    while pending:
        event = pending.pop()
        if event.name.startswith("ninlab kernel probe "):
            spans[event.name] = event.start_time_ns, event.end_time_ns
        pending += event.children
    return spans


def _blocks(
    run: _Run, records: Sequence[tuple[int, int, int]]
) -> tuple[KernelAllocation, ...] | str:
    """A call's blocks from the allocator records of its span, its outputs found by address."""
    # An output is the last block allocated at its address (an earlier one there was workspace).
    last_at = {pointer: position for position, (_, pointer, size) in enumerate(records) if size > 0}
    allocations = []
    for position, (_, pointer, size) in enumerate(records):
        output = run.outputs.get(pointer) if last_at.get(pointer) == position else None
        what = "free" if size < 0 else "workspace (measured)" if output is None else "output"
        allocations.append(KernelAllocation(size, what, output))
    if sum(a.delta_bytes for a in allocations) != run.made_bytes:
        return "measured on its own, it kept blocks beyond its outputs"
    return tuple(allocations)


# Kernels whose blocks depend on their arguments' values, by the position of the argument that
# says so and its values that do: an embedding bag's backward in max mode (2) keeps the indices
# that won each bag's maximum (`nonzero`), all of them on zeros (measured on 2.14.1: 3,200 bytes
# on zeros where a real step's bag of 12 ids among 50 takes 3,600).
_VALUE_DEPENDENT = {
    "aten._embedding_bag_backward.default": (8, {2}),
    "aten._embedding_bag_dense_backward.default": (7, {2}),
}
# Kernels whose blocks depend on their tensors' values at every call: `masked_scatter`'s backward
# selects the gradient where its mask is true (`masked_select`), which on an all-false mask of
# zeros skips the index buffers it makes otherwise (a 16x256 gradient broadcast by a sum: 65,536
# bytes more on real values, a step's allocator peak 0.64 of the measured, torch 2.14.1);
# `matrix_exp` picks the degree of its approximation, and so how many matrix products it keeps,
# by the matrix's norm: zeros take the lowest (a 16x16 matrix: 5,136 bytes on zeros, 13,336 on
# an orthogonal parametrization's weight; its step's allocator peak 0.47 of the measured).
_READS_ITS_VALUES = frozenset(
    {"aten.masked_scatter_backward.default", "aten.linalg_matrix_exp.default"}
)


# `_grouped_mm` on CPU multiplies group by group (`mm` into its output's rows), where `offs`
# (a mixture of experts' routing: how many rows each expert got) says how many rows a group has:
# zeros make every group empty and run no product. In float32 the products take no blocks; in
# bfloat16 and float16 each takes a scratch block sized by its group (18,176 bytes more at a
# tiny expert layer's backward, with 16 rows a group), which routing decides as the step runs.
_GROUPED_MM_OP = "aten._grouped_mm.default"
_SCRATCH_PER_GROUP_DTYPES = frozenset({torch.bfloat16, torch.float16})


def _reads_its_values(call: KernelCall) -> bool:
    if call.op in _READS_ITS_VALUES:
        return True
    if call.op == _GROUPED_MM_OP:
        return call.args[0].dtype in _SCRATCH_PER_GROUP_DTYPES
    position, values = _VALUE_DEPENDENT.get(call.op, (None, set()))
    return position is not None and len(call.args) > position and call.args[position] in values


def _lstm_workspace_is_the_kernels(args: tuple[Any, ...]) -> bool:
    """Whether the workspace an LSTM layer's backward is given is the size its forward returns on
    this torch: oneDNN reads the whole of it, and a smaller one kills the process."""
    x, cx, workspace = args[0], args[6], args[-1]
    return workspace.shape == (
        lstm_workspace_bytes(
            sequence=x.shape[0],
            batch=x.shape[1],
            input_size=x.shape[2],
            hidden_size=args[15],
            dtype=x.dtype,
            cell_dtype=cx.dtype,
        ),
    )


def allocation_records(tree: Sequence[Any]) -> list[tuple[int, int, int]]:
    """Every allocator record in a finished profile's event tree, in time order: (time in ns,
    address, bytes, negative for a free)."""
    records: list[tuple[int, int, int]] = []
    pending = list(tree)
    while pending:
        event = pending.pop()
        if event.typed[0] == EventType.Allocation:
            fields = event.typed[1]
            records.append((event.start_time_ns, fields.ptr, fields.alloc_size))
        pending += event.children
    records.sort()
    return records
