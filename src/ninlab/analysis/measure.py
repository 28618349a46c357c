"""Measured memory of one real training step or one real inference on this machine's device.

The step is `ninlab.analysis.step`'s, the one the predictor traces, run for real: a training step is
run twice and the second is measured (steady state: gradients from step 1 live until `zero_grad`
frees them, optimizer state exists); inference is run twice too and the second measured.

Two levels are measured, each with a method that shares no code with the predictor:

* live tensor storage: on CPU, read from the profiler's allocation records of a measured step
  run with no dispatch mode active, because one changes the program: while a dispatch mode is
  active, PyTorch treats every tensor as a subclass, and autograd's engine sums two gradients of
  one tensor out of place instead of adding into the one it holds (a gradient-sized tensor more
  at every residual add and squeeze-excitation). A block is a tensor storage unless an op a
  dispatch mode would be handed (one with a kernel of its own, aten's or another library's such
  as `torchvision::deform_conv2d`; composite ops such as `conv2d`, or
  `max_pool2d` under `torch.inference_mode()`, count as their parts, so max pooling's int64
  indices are storages, and so does an overload of that kind under a name that also has
  kernels: `torch.where(mask, x, 0.0)`'s number is `scalar_tensor`'s output) allocates and
  frees it before returning: that is its workspace (so is a Python number wrapped as a tensor
  for one op's argument); under `torch.func.vmap` such an op is one a batching rule calls, not
  the call at vmap's level around it (`_transform_calls`). The level starts at the storages
  alive when the step starts, counted from the tensors themselves.
  On CUDA, a dispatch mode on the real tensors counts each storage an op returns once (views
  share it) and uncounts it when the storage dies (a weak reference on `untyped_storage()`), with
  the out-of-place sums that brings. The first step is always counted that way: what it leaves
  alive is the measured step's baseline.
* allocator: on CPU, the PyTorch profiler's allocation records (`profile_memory=True`), which the
  c10 CPU allocator emits for every block it hands out, tensor or not (oneDNN reorder buffers and
  scratchpads, wrapped scalars); the records are summed in time order over the measured step. On
  CUDA, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, which includes the
  caching allocator's 512-byte rounding and cuDNN workspaces, and `max_memory_reserved()`, the
  segments the allocator holds from the device (`reserved_peak_bytes`), over the second of two
  steps nothing watches (the live level's two steps under a dispatch mode come after them).

Both peaks include everything alive during the measured step: parameters (and those an
optimizer keeps that a step replaced on the model), buffers, gradients
(until `zero_grad(set_to_none=True)` frees them, then the new ones), optimizer state, the input
batch and targets, and all the step allocates; `baseline` itemises what was alive at its start.
The logits and the loss stay referenced until the step returns, as in d2l's training loop.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import gc
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ninlab.analysis.kernel_probe import allocation_records
from ninlab.analysis.lazy import copy_model
from ninlab.analysis.model_state import (
    attribute_tensors,
    captured_containers,
    captured_tensors,
    model_kept,
    swapped_in,
)
from ninlab.analysis.phases import StepPhases, annotation_phase
from ninlab.analysis.quiet_profiler import quiet_profile
from ninlab.analysis.refusals import cannot_run, check_traceable, out_of_memory, step_refused
from ninlab.analysis.step import (
    StepInputs,
    StepSpec,
    batch_size_of,
    builtin_targets,
    call_model,
    check_trains,
    example_inputs,
    inference_step,
    optimizer_state,
    optimizers_in,
    step_arguments,
    step_spec,
    valid_model,
)
from ninlab.analysis.torch_internals import (
    EventType,
    TensorMetadata,
    TorchDispatchMode,
    composite_kernel,
    custom_op_definitions,
    custom_op_kernels,
    require_supported_torch,
    runs_as_composite_parts,
    storage_address,
    tree_flatten,
    vmap_increment_nesting,
)
from ninlab.analysis.trace import collector_off
from ninlab.errors import NinlabError, checked_whole, one_line

__all__ = ["Baseline", "Measurement", "available_memory", "measure"]

_STEP_MARK = "ninlab.measured_step"
_LARGEST_SEED = 2**64 - 1  # what `torch.manual_seed` takes
_PHASE_MARK = "ninlab.phase."


@dataclass(frozen=True)
class Baseline:
    """Storage alive when the measured step starts, each storage counted once."""

    parameters_bytes: int
    buffers_bytes: int
    gradients_bytes: int  # from the previous step; `zero_grad(set_to_none=True)` frees them
    optimizer_state_bytes: int
    input_bytes: int
    targets_bytes: int
    other_bytes: int = 0  # anything else the first step left alive (a GradScaler's scale)

    @property
    def total_bytes(self) -> int:
        return (
            self.parameters_bytes
            + self.buffers_bytes
            + self.gradients_bytes
            + self.optimizer_state_bytes
            + self.input_bytes
            + self.targets_bytes
            + self.other_bytes
        )


@dataclass(frozen=True)
class Measurement:
    """Measured peaks of one step. `peaks()` gives them keyed by level, the same keys a
    prediction uses, so a table of measured, predicted and ratio is a zip."""

    spec: StepSpec
    batch_size: int
    device: str  # "cpu" or the GPU's name
    num_threads: int  # intra-op threads (CPU): oneDNN's scratchpads can depend on it
    baseline: Baseline
    live_peak_bytes: int
    # the op whose output set the peak, as the profiler names it ("aten::relu"; on CUDA
    # "aten.relu.default")
    live_peak_op: str
    live_peak_phase: str  # zero_grad, forward, loss, backward, optimizer
    allocator_peak_bytes: int
    allocator_peak_op: str  # innermost profiler op holding the peak ("" on CUDA: not attributed)
    allocator_peak_phase: str  # "" on CUDA
    allocator_method: str  # "cpu profiler allocation records" or "torch.cuda.max_memory_allocated"
    reserved_peak_bytes: int | None = None  # CUDA: max_memory_reserved() over the measured step

    def peaks(self) -> dict[str, int]:
        return {"live": self.live_peak_bytes, "allocator": self.allocator_peak_bytes}


class _LiveStorage(TorchDispatchMode):
    """Counts live tensor storage over real ops; see the module docstring."""

    def __init__(self, phases: StepPhases | None = None) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op = ""
        self.peak_phase = ""
        self.current_phase = "setup"
        self._phases = phases
        self._alive: dict[int, tuple[int, weakref.ref]] = {}  # StorageImpl address -> (bytes, ref)

    def survivors(self) -> list[torch.UntypedStorage]:
        """The storages counted so far that are still alive."""
        return [storage for _, ref in self._alive.values() if (storage := ref()) is not None]

    def count(self, tensor: torch.Tensor, op: str) -> None:
        self.count_storage(tensor.untyped_storage(), op)

    def count_storage(self, storage: torch.UntypedStorage, op: str) -> None:
        key = storage_address(storage)  # the C++ StorageImpl: one per storage, however many views
        if key in self._alive or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self._alive[key] = (nbytes, weakref.ref(storage, self._freed(key)))
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op, self.peak_phase = self.live_bytes, op, self.current_phase

    def _freed(self, key: int) -> Callable[[weakref.ref], None]:
        def freed(_ref: weakref.ref) -> None:
            nbytes, _ = self._alive.pop(key)
            self.live_bytes -= nbytes

        return freed

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Run a composite op as its C++ kernel would, under this mode so its parts are counted.
        # Not `func.decompose()`: that prefers Python decompositions (native_batch_norm becomes
        # _native_batch_norm_legit), which would change the program being measured.
        if runs_as_composite_parts(func.name()):
            with self:
                return composite_kernel(func)(*args, **kwargs)
        if func.namespace == "profiler":  # an annotation (optimizers mark their step): not work
            if self._phases is None:
                return func(*args, **kwargs)
            return self._phases.annotation(func, args, lambda: func(*args, **kwargs))
        if self._phases is not None:
            self.current_phase = self._phases.current
        output = func(*args, **kwargs)
        # Inputs first: a tensor made before the step and not in the baseline is still memory.
        for tensor in tree_flatten((args, kwargs, output))[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.count(tensor, str(func))
        return output


class _PhaseMarks:
    """Marks each phase of the step for the profiler (a `record_function` per phase), so a peak
    found in its records can be placed: `StepPhases` calls `mark` whenever the phase may have
    changed. The optimizers' own annotations are in the records already (`_placed` reads them).
    Nothing here changes the program (see `_profiled_live_peak`)."""

    def __init__(self) -> None:
        self._phase = ""
        self._mark: record_function | None = None

    def mark(self, phase: str) -> None:
        if phase != self._phase:
            self.close()
            self._phase, self._mark = phase, record_function(_PHASE_MARK + phase)
            self._mark.__enter__()

    def close(self) -> None:
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark, self._phase = None, ""


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage_address(storage) not in seen:
            seen.add(storage_address(storage))
            total += storage.nbytes()
    return total


def _baseline(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
    survivors: list[torch.UntypedStorage],
) -> Baseline:
    seen: set[int] = set()  # a storage shared by two roles (tied weights) counts once, first role
    parameters = _parameters(model, optimizers)
    counted = Baseline(
        parameters_bytes=_storage_bytes(parameters, seen),
        buffers_bytes=_storage_bytes(_buffers(model), seen),
        gradients_bytes=_storage_bytes([p.grad for p in parameters if p.grad is not None], seen),
        optimizer_state_bytes=_storage_bytes(optimizer_state(optimizers), seen),
        input_bytes=_storage_bytes(list(inputs), seen),
        targets_bytes=_storage_bytes([] if targets is None else [targets], seen),
    )
    other = sum(storage.nbytes() for storage in survivors if storage_address(storage) not in seen)
    return dataclasses.replace(counted, other_bytes=other)


def _step_span(events: list[Any]) -> tuple[int, int]:
    """Start and end (ns) of the measured step, from its mark among the profiler's events."""
    marks = [e for e in events if e.name() == _STEP_MARK]
    if len(marks) != 1:
        raise NinlabError(
            "the profiler did not record the measured step; is another profiler running?"
        )
    return marks[0].start_ns(), marks[0].end_ns()


def _placed(events: list[Any], time_ns: int) -> tuple[str, str]:
    """The innermost aten op running at `time_ns` and the step's phase then."""
    spans = [e for e in events if e.name() != "[memory]" and e.start_ns() <= time_ns <= e.end_ns()]
    ops = [e for e in spans if e.name().startswith("aten::")]
    # The innermost phase mark or optimizer annotation (an optimizer's step is its own phase).
    phases = [(e.start_ns(), phase) for e in spans if (phase := _phase_of(e.name())) is not None]
    innermost = max(ops, key=lambda e: e.start_ns()).name() if ops else ""
    phase = max(phases)[1] if phases else ""
    return innermost, phase


def _phase_of(name: str) -> str | None:
    """The phase a profiler event marks: one of ours, an optimizer's annotation, or none."""
    if name.startswith(_PHASE_MARK):
        return name[len(_PHASE_MARK) :]
    return annotation_phase(name)


def _profiled_live_peak(
    prof: profile,
    baseline_bytes: int,
    baseline_pointers: set[int],
    transform_calls: set[tuple[int, int, str]],
) -> tuple[int, str, str]:
    """Peak of live tensor storage over the marked step, read from the profiler's allocation
    records of a step run under no dispatch mode.

    A dispatch mode changes the program it watches: while one is active every tensor is
    "subclass-like" to PyTorch (ATen's TensorSubclassLikeUtils.h), and autograd's engine then sums
    two gradients of one tensor out of place instead of adding into the one it holds. So the
    measured step runs without one, and tensor storages are told from kernel workspaces by when
    they are freed: a block allocated inside an op a dispatch mode would be handed (an op with a
    kernel of its own; a CompositeImplicitAutograd-only op runs as its parts) and freed before
    that op returns is its workspace; every other block is a tensor storage. The level starts at
    `baseline_bytes`, the storages alive when the step starts, whose blocks are at
    `baseline_pointers`; `transform_calls` are the ops called at vmap's level (see
    `_transform_calls`). Returns (peak bytes, innermost op at the peak, phase at the peak).
    """
    events = list(prof.profiler.kineto_results.events())
    step_start, step_end = _step_span(events)
    tree = prof.profiler.kineto_results.experimental_event_tree()
    spans = sorted(_visible_op_spans(tree, transform_calls))
    starts = [start for start, _, _ in spans]
    changes: list[tuple[int, int]] = []  # (time, bytes allocated or, negative, freed)
    for allocated, freed, nbytes, pointer in _blocks(tree):
        if allocated is None or allocated < step_start:
            if (
                freed is not None
                and step_start <= freed <= step_end
                and pointer in baseline_pointers
            ):
                changes.append((freed, -nbytes))
            continue
        if allocated > step_end:
            continue
        if freed is not None and _workspace(spans, starts, allocated, freed):
            continue
        changes.append((allocated, nbytes))
        if freed is not None and freed <= step_end:
            changes.append((freed, -nbytes))
    changes.sort(key=lambda change: change[0])
    level = peak = baseline_bytes
    peak_time = step_start
    for time_ns, nbytes in changes:
        level += nbytes
        if level > peak:
            peak, peak_time = level, time_ns
    innermost, phase = _placed(events, peak_time)
    inside = bisect.bisect_right(starts, peak_time) - 1
    # The op whose output set the peak: the op a dispatch mode would be handed, not its parts.
    op = spans[inside][2] if inside >= 0 and peak_time <= spans[inside][1] else innermost
    return peak, op, phase


def _workspace(
    spans: list[tuple[int, int, str]], starts: list[int], allocated: int, freed: int
) -> bool:
    """Whether a block is an op's workspace, not a storage: made inside the op and freed before
    it returns, or made just before it (a Python number wrapped as a tensor for its argument)
    and freed before the op after it starts."""
    inside = bisect.bisect_right(starts, allocated) - 1
    if inside >= 0 and allocated <= spans[inside][1]:
        return freed <= spans[inside][1]
    following = inside + 2  # the op after the one the block was made for
    return inside + 1 < len(spans) and (following == len(spans) or freed < spans[following][0])


def _visible_op_spans(
    tree: list[Any], transform_calls: set[tuple[int, int, str]]
) -> list[tuple[int, int, str]]:
    """(start, end, name) of every op a dispatch mode would be handed: the outermost dispatcher
    ops that have kernels of their own, aten's or another library's (`torchvision::deform_conv2d`,
    whose columns buffer, made by an aten op inside it, is its workspace), found below the
    CompositeImplicitAutograd-only ops that run as their parts, below autocast's call of an op
    (see `_autocast_call`), below vmap's calls of an op (`transform_calls`, keyed as here) and
    below annotations (autograd's nodes, optimizers' steps, marks)."""
    spans: list[tuple[int, int, str]] = []
    pending = list(tree)
    while pending:
        event = pending.pop()
        if event.typed[0] != EventType.TorchOp:
            continue
        span = (event.start_time_ns, event.end_time_ns, event.name)
        if (
            _composite_name(event.name) is False
            and not _autocast_call(event)
            and not _composite_overload_call(event)
            and span not in transform_calls
        ):
            spans.append(span)
        else:
            pending += event.children
    return spans


@contextlib.contextmanager
def _counting_vmaps() -> Iterator[list[int]]:
    """Count the vmap levels entered in the block (`torch.func.vmap`, `torch.vmap`, jacfwd's):
    each is entered through `vmap_increment_nesting`, which is called as it is."""
    entered: list[int] = []
    increment = vmap_increment_nesting.get()

    def counted(*args: Any, **kwargs: Any) -> Any:
        entered.append(1)
        return increment(*args, **kwargs)

    vmap_increment_nesting.set(counted)
    try:
        yield entered
    finally:
        vmap_increment_nesting.set(increment)


def _transform_calls(
    measured: profile, model: nn.Module, step: Callable[[], object]
) -> set[tuple[int, int, str]]:
    """The ops of the measured step called at a vmap level (`_transform_call`), as (start, end,
    name) in its profile. Which they are shows in their arguments (a BatchedTensor has no
    storage), which the profiler records with `record_shapes` only, and that keeps the tensors a
    BatchedTensor wraps alive until the profile ends (the profiler holds a weak reference to each
    argument's TensorImpl, and a BatchedTensor's frees its tensor only when destroyed): an
    ensemble's inference measured 44,576 bytes against 22,688. So the step runs once more, after
    the measured one, in a profile of its own recording arguments, and its ops are matched with
    the measured step's, one by one."""
    marks = _PhaseMarks()
    with (
        collector_off(),
        quiet_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as again,
        record_function(_STEP_MARK),
    ):
        try:
            with StepPhases(model, on_change=marks.mark):
                step()
        finally:
            marks.close()
    found: set[tuple[int, int, str]] = set()
    pairs = [(_step_mark(measured), _step_mark(again), [])]
    while pairs:
        ran, traced, above = pairs.pop()
        inputs = traced.typed[1].inputs
        ran_ops, traced_ops = _ops_below(ran), _ops_below(traced)
        if ran.name != traced.name or len(ran_ops) != len(traced_ops):
            raise NinlabError(
                "the step under torch.func.vmap ran other ops when run again, so its batching "
                "rules cannot be told from its kernels; measure a step that runs the same ops "
                "each time"
            )
        if _transform_call(traced, inputs, above):
            found.add((ran.start_time_ns, ran.end_time_ns, ran.name))
        pairs += [(a, b, inputs) for a, b in zip(ran_ops, traced_ops)]
    return found


def _step_mark(prof: profile) -> Any:
    """The event marking the step in `prof`'s tree."""
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.name == _STEP_MARK:
            return event
        pending += event.children
    raise NinlabError("the profiler did not record the measured step; is another profiler running?")


def _ops_below(event: Any) -> list[Any]:
    return [child for child in event.children if child.typed[0] == EventType.TorchOp]


def _transform_call(event: Any, inputs: list[Any], above: list[Any]) -> bool:
    """Whether a profiled op is called at a function transform's level (`torch.func.vmap`,
    `grad`): an argument is a functorch wrapper (a BatchedTensor, a TensorWrapper), which the
    profiler records as a strided tensor of some elements with no storage. A dispatch mode sits
    below the transforms and is handed only what their rules call on plain tensors, so the
    tensors a batching rule makes and frees are storages, not workspace (`addmm` of a batched
    weight is `mm`, `mul` and `add` under vmap: an ensemble's inference measured 512 bytes low).
    A transform that sends an op on to the next level by autograd (grad's) keeps the wrapped
    arguments on the stack below the unwrapped ones it calls the op with, and the profiler
    records the whole stack: a call whose inputs begin with its parent's has its own arguments
    after them. A Python tensor subclass (no storage either) is handed to a mode whole, and
    torch 2.13 on marks its dispatch with a "PythonSubclass" event."""
    if len(inputs) > len(above) and all(map(_same_input, inputs, above)):
        inputs = inputs[len(above) :]
    tensors = [t for i in inputs for t in (i if isinstance(i, list) else [i])]
    return any(
        isinstance(t, TensorMetadata)
        and t.layout == torch.strided
        and t.storage_data_ptr is None
        and 0 not in t.sizes
        for t in tensors
    ) and not any(child.name == "PythonSubclass" for child in event.children)


def _same_input(recorded: Any, other: Any) -> bool:
    """Whether two inputs the profiler recorded are the same argument: a tensor by its
    TensorImpl, a list element by element, anything else by value."""
    if isinstance(recorded, TensorMetadata) or isinstance(other, TensorMetadata):
        return (
            isinstance(recorded, TensorMetadata)
            and isinstance(other, TensorMetadata)
            and recorded.impl_ptr == other.impl_ptr
        )
    if isinstance(recorded, list) and isinstance(other, list):
        return len(recorded) == len(other) and all(map(_same_input, recorded, other))
    return type(recorded) is type(other) and recorded == other


def _composite_overload_call(event: Any) -> bool:
    """Whether a profiled op is a CompositeImplicitAutograd-only overload of a name that also
    has kernels, running as its parts: it calls an overload of its own name among them
    (`torch.where(mask, 0.0, x)`, where.ScalarOther, is `scalar_tensor`, then where.self; a
    dispatch mode is handed the two, so the 0-d tensor is a storage, not where's workspace).
    The profiler names no overload, and a kernel does not call its own name again."""
    if not _COMPOSITE_OVERLOADS.get(event.name, False):
        return False
    return any(
        child.typed[0] == EventType.TorchOp and child.name == event.name for child in event.children
    )


def _autocast_call(event: Any) -> bool:
    """Whether a profiled op is autocast's call of it: its arguments cast (`aten::to`), then the
    op called again with autocast excluded (ATen's autocast_mode.h, `WrapFunction_`). Autocast's
    dispatch key is above a dispatch mode's, so a mode is handed the casts and the second call:
    the casts are tensor storages, though they die before the first call returns where nothing
    keeps them (`max_unpool2d`'s float32 copy of its bf16 values; any cast
    of an inference)."""
    inner = [child.name for child in event.children if child.typed[0] == EventType.TorchOp]
    return (
        bool(inner) and inner[-1] == event.name and all(name == "aten::to" for name in inner[:-1])
    )


def _blocks(tree: list[Any]) -> list[tuple[int | None, int | None, int, int]]:
    """Every block the profiler saw, as (allocated at, freed at, bytes, address); None where
    that happened outside the profile."""
    records = allocation_records(tree)
    open_blocks: dict[int, list[Any]] = {}
    blocks: list[list[Any]] = []
    for time_ns, pointer, size in records:
        if size > 0:
            block: list[Any] = [time_ns, None, size, pointer]
            open_blocks[pointer] = block
            blocks.append(block)
        elif (block := open_blocks.pop(pointer, None)) is not None:
            block[1] = time_ns
        else:
            blocks.append([None, time_ns, -size, pointer])
    return [tuple(block) for block in blocks]  # type: ignore[misc]


_COMPOSITE_NAMES: dict[str, bool | None] = {}
# The names of which some overloads, not all, run as their parts (`where`, `upsample_nearest2d`,
# `repeat_interleave`), filled in by `_composite_name`.
_COMPOSITE_OVERLOADS: dict[str, bool] = {}


def _composite_name(profiled: str) -> bool | None:
    """Whether the op the profiler names `profiled` ("aten::linear", "torchvision::roi_align")
    runs as its parts: every overload of it but `out` ones is CompositeImplicitAutograd-only (the
    profiler does not say which overload ran); None where the name is no dispatcher op (an
    annotation, "autograd::engine::evaluate_function: ...")."""
    if profiled in _COMPOSITE_NAMES:
        return _COMPOSITE_NAMES[profiled]
    namespace, _, name = profiled.partition("::")
    packet = None
    if namespace.isidentifier() and name.isidentifier():
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            packet = None
    known: bool | None = None
    if packet is not None or namespace == "aten":  # an aten name is an op the profiler saw
        overloads = packet.overloads() if packet is not None else []
        names = [getattr(packet, o).name() for o in overloads if "out" not in o]
        kinds = [kind for kind in map(_composite_kind, names) if kind is not None]
        known = bool(kinds) and all(kinds)
        _COMPOSITE_OVERLOADS[profiled] = any(kinds) and not known
    _COMPOSITE_NAMES[profiled] = known
    return known


def _composite_kind(name: str) -> bool | None:
    """`runs_as_composite_parts` of an overload; None for one the dispatcher does not have (some
    exist for TorchScript only, such as to.prim_Device)."""
    try:
        return runs_as_composite_parts(name)
    except RuntimeError:
        return None


def _profiled_peak(prof: profile, start_level_bytes: int) -> tuple[int, str, str]:
    """Peak of the CPU allocator's level over the marked step, from the profiler's records.

    `start_level_bytes` is what was allocated before profiling began and outlives it (the model,
    input and targets; the caches a step replaces are left out of it), so level = start + the
    blocks allocated while profiling, less those of them freed. A free of a block allocated
    before is not counted: the profiler records one only where its table still holds the size
    of an earlier session's block at that address, which depends on where the allocator put
    things (RAFT's inference read 163,840 bytes less one run in a few: the pyramid levels the
    previous step left, freed twice). Returns (peak bytes, innermost op at the peak, phase at
    the peak).
    """
    events = list(prof.profiler.kineto_results.events())
    step_start, step_end = _step_span(events)
    made: set[int] = set()
    level = peak = start_level_bytes
    peak_time = step_start
    for time_ns, pointer, nbytes in allocation_records(
        prof.profiler.kineto_results.experimental_event_tree()
    ):
        if nbytes > 0:
            made.add(pointer)
        elif pointer in made:
            made.discard(pointer)
        else:
            continue
        level += nbytes
        if step_start <= time_ns <= step_end and level > peak:
            peak, peak_time = level, time_ns
    return (peak, *_placed(events, peak_time))


def measure(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    **fields: Any,
) -> Measurement:
    """Run the step `spec` describes (or its fields, as keywords; `step=fn` runs the user's own
    step function) for real on its device type at `batch_size` (None: the example inputs'
    batch), and measure its memory peaks.

    The model is copied (and cast to the spec's dtype, by default its own, and memory format),
    and kept (`model_kept`), so the caller's model is left exactly as it was.
    """
    valid_model(model)
    seed = checked_whole("seed", seed, 0, _LARGEST_SEED)
    with model_kept(model):
        try:
            return _measure(model, spec, batch_size=batch_size, seed=seed, **fields)
        except NinlabError:
            raise
        except Exception as error:
            if not out_of_memory(error):
                raise
            raise NinlabError(
                f"measuring this step ran out of memory on this machine ({one_line(error)}); "
                "measure a smaller batch, or predict this one (predict_memory)"
            ) from None


def _measure(
    model: nn.Module, spec: StepSpec | None, *, batch_size: int | None, seed: int, **fields: Any
) -> Measurement:
    require_supported_torch()
    spec = step_spec(spec, model=model, **fields)
    batch_size = batch_size_of(spec, batch_size)
    # What the step writes into the lists and dicts it reaches (a loss history) is undone, as a
    # prediction undoes it: a call leaves the user's state as it found it.
    with (
        swapped_in([], [], captured_containers(spec.step) if spec.step is not None else []),
        _custom_ops_marked(),
    ):
        return _measured(model, spec, batch_size, seed)


@contextlib.contextmanager
def _custom_ops_marked() -> Iterator[None]:
    """Each Python custom op's kernels (`torch.library.custom_op`) marked for the profiler by the
    op's name, for the measurement: a dispatch mode is handed the op whole, so the blocks its
    Python kernel makes and frees are its workspace, but once the op has run under another
    profile (the kernel probe's) the profiler records it no more (torch 2.14.1), so the ops
    inside it looked like the step's own (an inference measured 84,008 live bytes against the
    51,240 a dispatch mode sees). Which kernel runs is unchanged: each is called as it was,
    inside a `record_function`."""
    marked = []
    for name, definition in list(custom_op_definitions.items()):
        kernels = custom_op_kernels(definition)
        for device, kernel in list(kernels.items()):
            marked.append((kernels, device, kernel))
            kernels[device] = _marked(name, kernel)
    try:
        yield
    finally:
        for kernels, device, kernel in marked:
            kernels[device] = kernel


def _marked(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(kernel)
    def marked(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return kernel(*args, **kwargs)

    return marked


def _measured(model: nn.Module, spec: StepSpec, batch_size: int, seed: int) -> Measurement:
    check_traceable(model)
    check_trains(model, spec)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise NinlabError(
            "the model's weights are on the meta device (shapes, no values), and a measurement "
            "runs it: give it real weights (model.to_empty(device='cpu') and initialise them, or "
            "resolve_model(name)), or predict it (predict_memory), which needs none"
        )
    if spec.ddp is not None:
        raise NinlabError("a measurement runs one process without DDP; measure without ddp")
    device = torch.device(spec.device_type)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NinlabError(
            "measuring on cuda needs a GPU, and this machine has none; use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise NinlabError(f"cannot measure on {device.type!r}; use cpu or cuda")
    torch.manual_seed(seed)
    try:
        model = copy_model(model, spec)
    except Exception as error:  # noqa: BLE001 - whatever deepcopy meets in the user's model
        raise NinlabError(
            f"the model cannot be copied ({one_line(error)}), and a measurement runs a copy so "
            "that yours is left as it was; keep only leaf tensors on it (a weight computed from a "
            "parameter is computed in forward, as torch.nn.utils.parametrize does)"
        ) from None
    model = model.to(device=device, dtype=spec.dtype, memory_format=spec.torch_memory_format)
    inputs = example_inputs(spec, batch_size, device)
    step_inputs = step_arguments(spec, inputs)
    targets: torch.Tensor | None = None
    optimizers: list[torch.optim.Optimizer] = []
    made: Any = None  # what the optimizer factory returned
    if spec.mode == "train":
        model.train()
        # The loss fits the output (lazy modules get their shapes here).
        targets = builtin_targets(_checked_forward(model, step_inputs, spec), device)
        _release_probe_blocks(device)
        optimizer = made = spec.make_optimizers(model)
        optimizers = optimizers_in(optimizer)
        train = spec.step_function()

        def step() -> object:
            try:
                return train(model, optimizer, step_inputs, targets)
            except NinlabError:
                raise
            except Exception as error:  # noqa: BLE001 - the step may raise anything: one line naming it
                if spec.step is None:
                    raise cannot_run(error, model, spec) from None
                raise step_refused(
                    error, model, spec, f"real tensors, batch {batch_size}"
                ) from None

    else:
        model.eval()
        # Lazy modules get their shapes before the baseline counts them.
        _checked_forward(model, step_inputs, spec)
        _release_probe_blocks(device)

        def step() -> object:
            # The logits are dropped at once, as the predictor's one inference drops them.
            inference_step(
                model, step_inputs, autocast_dtype=spec.autocast_dtype, grad_mode=spec.grad_mode
            )
            return None

    marks = _PhaseMarks()
    phases = StepPhases(model, on_change=marks.mark)
    # The first step runs under a counter of its own: what it leaves alive besides gradients and
    # optimizer state (a GradScaler's scale; what it returns, held while the next step runs as a
    # loop's `loss = step(...)` holds it) is alive when the measured step starts.
    first = _LiveStorage()
    if device.type == "cpu":
        start_level = _baseline(model, optimizers, inputs, targets, []).total_bytes
        # A tensor a forward caches in an attribute is replaced by the steps, and the profiler
        # does not see a block made before it freed: only those still held count from the start.
        held_before = _attribute_storages(model)
        start_level -= sum(nbytes for nbytes, _ in held_before.values())
        counted_before = {
            t.untyped_storage().data_ptr()
            for t in _baseline_tensors(model, optimizers, inputs, targets)
        }
        # The level is the start plus the records, so nothing made before may be freed while
        # profiling: garbage from earlier work is collected now, and the collector stays off
        # (a collection in the step freed a caller's cyclic garbage: 8% less, measured).
        gc.collect()
        with (
            collector_off(),
            quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            with first, _counting_rng_states(first):
                previous = step()
            _count_held(first, model, made, spec.step)
            survivors = first.survivors()
            baseline = _baseline(model, optimizers, inputs, targets, survivors)
            pointers = {
                t.untyped_storage().data_ptr()
                for t in _baseline_tensors(model, optimizers, inputs, targets)
            }
            pointers |= {storage.data_ptr() for storage in survivors}
            survivor_blocks = {storage.data_ptr(): storage.nbytes() for storage in survivors}
            del survivors  # strong references: the step's zero_grad must be able to free gradients
            with record_function(_STEP_MARK), _counting_vmaps() as vmaps:
                try:
                    with phases:
                        step()
                finally:
                    marks.close()
        # The same tensor, not only the same address: a new cache of the old one's size often
        # takes the block the old one freed (which the records show), and counted from the
        # start as well it was counted twice (128 bytes over in 960, one run in a few).
        held_now = _attribute_storages(model)
        start_level += sum(
            nbytes
            for pointer, (nbytes, tensors) in held_before.items()
            if pointer in held_now and _still_held(tensors, held_now[pointer][1])
        )
        # What the step uses from outside the model and was made before profiling (a frozen
        # teacher in its closure) is held all along, as the live level counts it.
        tree = prof.profiler.kineto_results.experimental_event_tree()
        made = {pointer for allocated, _, _, pointer in _blocks(tree) if allocated is not None}
        start_level += sum(
            nbytes
            for pointer, nbytes in survivor_blocks.items()
            if pointer not in made and pointer not in counted_before
        )
        # Under vmap, the ops a dispatch mode is handed are told from the batching rules around
        # them by their arguments, which this profile did not record (see `_transform_calls`):
        # one more step, once what the measured one left in the model has been read.
        transform_calls = _transform_calls(prof, model, step) if vmaps else set()
        allocator_bytes, allocator_op, allocator_phase = _profiled_peak(prof, start_level)
        live_bytes, live_op, live_phase = _profiled_live_peak(
            prof, baseline.total_bytes, pointers, transform_calls
        )
        method, device_name = "cpu profiler allocation records", "cpu"
        reserved_bytes = None
    else:
        # The allocator's levels come from steps nothing watches, as a loop runs them (a loop's
        # `loss = step(...)` holding the last loss): under a dispatch mode autograd would sum
        # gradients out of place and the caching allocator would cache those blocks too.
        previous = step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        previous = step()
        torch.cuda.synchronize(device)
        allocator_bytes, allocator_op, allocator_phase = (
            torch.cuda.max_memory_allocated(device),
            "",
            "",
        )
        reserved_bytes = torch.cuda.max_memory_reserved(device)
        # The live level is counted by a dispatch mode (the profiler's CUDA records are not read),
        # on two more steps: its sums of gradients are out of place, so a network that uses a
        # tensor twice (a residual) reads up to one gradient-sized tensor above the real step.
        live = _LiveStorage(phases)
        with first:
            previous = step()
        _count_held(first, model, made, spec.step)
        survivors = first.survivors()
        torch.cuda.synchronize(device)
        baseline = _baseline(model, optimizers, inputs, targets, survivors)
        _count_baseline(live, model, optimizers, inputs, targets, survivors)
        del survivors  # strong references: the step's zero_grad must be able to free gradients
        try:
            with phases, live:
                step()
        finally:
            marks.close()
        torch.cuda.synchronize(device)
        live_bytes, live_op, live_phase = live.peak_bytes, live.peak_op, live.peak_phase
        method, device_name = "torch.cuda.max_memory_allocated", torch.cuda.get_device_name(device)
    del previous
    if spec.mode == "train" and not phases.backward_calls:
        raise NinlabError(
            f"the step {spec.step_name} never calls backward(), so it trains nothing; call "
            "loss.backward() in it, or measure mode='infer'"
        )
    return Measurement(
        spec=spec,
        batch_size=batch_size,
        device=device_name,
        num_threads=torch.get_num_threads(),
        baseline=baseline,
        live_peak_bytes=live_bytes,
        live_peak_op=live_op,
        live_peak_phase=live_phase,
        allocator_peak_bytes=allocator_bytes,
        allocator_peak_op=allocator_op,
        allocator_peak_phase=allocator_phase,
        allocator_method=method,
        reserved_peak_bytes=reserved_bytes,
    )


def _checked_forward(model: nn.Module, inputs: StepInputs, spec: StepSpec) -> Any:
    """One forward without autograd; a model that rejects the batch says why in one line."""
    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, as one line naming why
        raise cannot_run(error, model, spec) from None


def _release_probe_blocks(device: torch.device) -> None:
    """The probe's freed blocks would stay cached in CUDA segments a real training loop never
    makes; return them so the reserved memory measured is the steps' own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _count_baseline(
    live: _LiveStorage,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
    survivors: list[torch.UntypedStorage],
) -> None:
    for tensor in _baseline_tensors(model, optimizers, inputs, targets):
        live.count(tensor, "baseline")
    for storage in survivors:
        live.count_storage(storage, "baseline")


def _parameters(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The model's parameters, and those its optimizers hold that it no longer does (a step that
    replaces a parameter: the optimizer keeps the one it was given alive)."""
    held = {id(p) for p in model.parameters()}
    kept = [
        p
        for optimizer in optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in held
    ]
    return [*model.parameters(), *kept]


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's buffers and the tensors its modules hold as plain attributes (the tracer
    counts them as buffers too)."""
    return [*model.buffers(), *(found.tensor for found in attribute_tensors(model))]


def _attribute_storages(
    model: nn.Module,
) -> dict[int, tuple[int, list[weakref.ReferenceType[torch.Tensor]]]]:
    """Address -> bytes of each storage held by a plain tensor attribute (and no parameter or
    buffer) of the model, and weak references to the tensors that hold it (strong ones would
    keep a replaced cache alive through the step)."""
    registered = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, tuple[int, list[weakref.ReferenceType[torch.Tensor]]]] = {}
    for attribute in attribute_tensors(model):
        storage = attribute.tensor.untyped_storage()
        if storage.data_ptr() not in registered:
            entry = storages.setdefault(storage.data_ptr(), (storage.nbytes(), []))
            entry[1].append(weakref.ref(attribute.tensor))
    return storages


def _still_held(
    before: list[weakref.ReferenceType[torch.Tensor]],
    now: list[weakref.ReferenceType[torch.Tensor]],
) -> bool:
    """Whether a tensor that held a storage before the step still holds it (the same tensor, not
    a new one given the freed block)."""
    held = {id(ref()) for ref in now}
    return any(ref() is not None and id(ref()) in held for ref in before)


@contextlib.contextmanager
def _counting_rng_states(first: _LiveStorage) -> Iterator[None]:
    """Count each copy of the CPU generator's state the first step takes: a tensor made by no
    op, which the dispatch mode never sees. A reentrant checkpoint keeps one (5056 bytes) in its
    autograd context, which the loss the step returns holds while the measured step runs."""
    take_state = torch.get_rng_state

    def counted_state() -> torch.Tensor:
        state = take_state()
        first.count(state, "get_rng_state")
        return state

    torch.get_rng_state = counted_state
    try:
        yield
    finally:
        torch.get_rng_state = take_state


def _count_held(first: _LiveStorage, model: nn.Module, made: Any, step: Any) -> None:
    """Count, as alive from the first step, what the step keeps whether or not one of its ops
    reads it, as the predictor counts it: the tensors of the modules an optimizer factory
    returned beside its optimizers (an EMA copy of the model, whose batch norm statistics are
    never updated) and the plain tensors the step function reaches (a loss history it appends
    to, made before profiling)."""
    values = made if isinstance(made, (tuple, list)) else (made,)
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    held = [place.value for place in captured_tensors(step, model)] if step is not None else []
    for module in (v for v in values if isinstance(v, nn.Module) and v is not model):
        held += [*module.parameters(), *_buffers(module)]
    for tensor in held:
        if id(tensor) not in own and tensor.device.type != "meta":
            first.count(tensor, "held")


def _baseline_tensors(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The tensors alive when the measured step starts, besides what the first step left."""
    parameters = _parameters(model, optimizers)
    tensors = [*parameters, *_buffers(model), *inputs]
    tensors += [p.grad for p in parameters if p.grad is not None]
    tensors += optimizer_state(optimizers)
    if targets is not None:
        tensors.append(targets)
    return tensors


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device` now, or None where the system does not say:
    CUDA's free memory; on the CPU, Linux's MemAvailable (free plus reclaimable caches), else the
    free physical pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
