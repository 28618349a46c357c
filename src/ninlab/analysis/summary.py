"""`summarize`: per-layer shapes with the rounding explained, parameters, FLOPs, receptive fields.

Everything is read from one recording of the real model's forward and backward on fake tensors
(see `ninlab.analysis.trace`), so it holds for any `nn.Module`: nested blocks, residual additions and
functional calls in `forward` are seen as the ops they dispatch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from ninlab.analysis.flops import CONVENTION
from ninlab.analysis.geometry import (
    INPUT_FIELD,
    AxisWindow,
    GeometryError,
    ReceptiveField,
    compose,
    explain_axes,
    influencing_positions,
    merge_fields,
    smallest_input_for_chain,
)
from ninlab.analysis.step import StepSpec, valid_batch_size
from ninlab.analysis.trace import LayerInputTooSmall, OpRecord, StepRecording, record_step
from ninlab.errors import NinlabError

__all__ = [
    "InputReach",
    "LayerSummary",
    "Summary",
    "SummaryTotals",
    "smallest_input_size",
    "summarize",
]



@dataclass(frozen=True)
class LayerSummary:
    """One module. Containers total their children; `depth` 0 is the model itself.

    FLOPs are those of the ops the module ran itself or through its children (`CONVENTION`);
    `backward_flops` are the ops autograd ran for it in backward. `axes` describes the module's
    convolution or pooling window along each spatial axis, one `AxisWindow` per axis (the first
    such op, if it ran several).
    """

    name: str
    type: str
    depth: int
    output_shape: tuple[int, ...] | None
    output_bytes: int
    weights: int
    biases: int
    trainable_parameters: int
    frozen_parameters: int
    buffer_elements: int
    forward_flops: int
    backward_flops: int
    axes: tuple[AxisWindow, ...]
    receptive_field: tuple[ReceptiveField, ...] | None
    is_leaf: bool

    @property
    def parameters(self) -> int:
        return self.trainable_parameters + self.frozen_parameters

    @property
    def rounding(self) -> str:
        """Short note: the unrounded size where it was rounded, and real pixels never read."""
        if not self.axes:
            return ""
        window = self.axes[0]
        if window.textbook_output == window.output_size and not window.unread_real:
            return ""
        note = f"{window.textbook_output:g} -> {window.output_size}"
        if window.trailing_unread_real:
            note += f", last {window.trailing_unread_real} real unread"
        elif window.trailing_unread_padding:
            note += ", only padding unread"
        if len({(w.input_size, w.params) for w in self.axes}) > 1:
            note += " (first axis)"
        return note

    @property
    def explanation(self) -> str:
        return explain_axes(self.axes) if self.axes else ""


@dataclass(frozen=True)
class SummaryTotals:
    parameters: int
    trainable_parameters: int
    frozen_parameters: int
    weights: int
    biases: int
    parameter_bytes: int
    buffer_elements: int
    buffer_bytes: int
    forward_flops: int  # one forward pass of the batch: what inference costs
    backward_flops: int
    training_step_flops: int  # forward + backward (the optimizer's update is not counted)
    layer_output_bytes: int  # sum of every leaf module's output: what the forum post calls activations


@dataclass(frozen=True)
class InputReach:
    """Which network-input positions can influence the output, along one spatial axis."""

    axis: str
    input_size: int
    first: int
    last: int
    count: int

    @property
    def never_read(self) -> int:
        return self.input_size - self.count


@dataclass(frozen=True)
class Summary:
    model: str
    input_size: tuple[int, ...]  # one sample: channels, then spatial sizes
    batch_size: int
    dtype: str
    layers: tuple[LayerSummary, ...]
    totals: SummaryTotals
    smallest_input_size: tuple[int, ...]  # channels, then the smallest valid size of each spatial axis
    input_reach: tuple[InputReach, ...]  # empty when the window ops do not form one chain
    flop_convention: str = CONVENTION


_AXIS_NAMES = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def summarize(
    model: nn.Module,
    *,
    input_size: Sequence[int],
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
) -> Summary:
    """Summarize `model` for a batch of `batch_size` inputs of `input_size` (channels first).

    Raises `NinlabError` when the input is too small for the network, naming the first layer
    whose output would be empty, its arithmetic and the smallest valid input.
    """
    batch_size = valid_batch_size(batch_size)
    trains = any(p.requires_grad for p in model.parameters())
    spec = StepSpec(input_size=tuple(input_size), mode="train" if trains else "infer", dtype=dtype)
    input_size = spec.input_size
    try:
        step = record_step(model, spec, batch_size, optimizer_step=False)
    except LayerInputTooSmall as error:
        smallest = smallest_input_size(model, input_size=input_size)
        raise NinlabError(
            f"input {_shape_text(input_size)} is too small: {error}; the smallest input this network "
            f"accepts is {_shape_text(smallest)}"
        ) from None
    except RuntimeError as error:  # the model itself rejects the input: wrong channels or rank
        reason = str(error).strip().splitlines()[0]
        raise NinlabError(
            f"the model cannot run on a batch of {_shape_text(input_size)} inputs ({reason}); "
            "give --input as channels x spatial sizes that the model expects, e.g. 1x224x224"
        ) from None
    chain = _window_chain(step)
    smallest = _smallest_from_chain(model, input_size, chain) if chain is not None else None
    if smallest is None:
        smallest = smallest_input_size(model, input_size=input_size)
    layers = _layers(model, step)
    return Summary(
        model=model_name or type(model).__name__,
        input_size=input_size,
        batch_size=batch_size,
        dtype=str(dtype).removeprefix("torch."),
        layers=layers,
        totals=_totals(model, step, layers),
        smallest_input_size=smallest,
        input_reach=_input_reach(input_size, chain) if chain else (),
    )


def _shape_text(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def _step_ops(step: StepRecording) -> list[OpRecord]:
    return step.recording.ops[step.step_start :]


def _layers(model: nn.Module, step: StepRecording) -> tuple[LayerSummary, ...]:
    ops = _step_ops(step)
    forward_flops: dict[str, int] = defaultdict(int)
    backward_flops: dict[str, int] = defaultdict(int)
    first_window: dict[str, OpRecord] = {}
    for op in ops:
        if op.phase == "backward":
            backward_flops[op.module] += op.flops
        elif op.phase == "forward":
            forward_flops[op.module] += op.flops
            if op.window is not None and op.module not in first_window:
                first_window[op.module] = op
    fields = _receptive_fields(step)
    rows = []
    for name, module in model.named_modules():
        within = [n for n in forward_flops.keys() | backward_flops.keys() if _inside(n, name)]
        counts = _parameter_counts(module)
        outputs = step.recording.module_outputs.get(name, ())
        window_op = first_window.get(name)
        rows.append(
            LayerSummary(
                name=name,
                type=type(module).__name__,
                depth=0 if not name else name.count(".") + 1,
                output_shape=outputs[0][0] if outputs else None,
                output_bytes=sum(prod(shape) * dtype.itemsize for shape, dtype in outputs),
                weights=counts["weights"],
                biases=counts["biases"],
                trainable_parameters=counts["trainable"],
                frozen_parameters=counts["frozen"],
                buffer_elements=sum(b.numel() for b in module.buffers()),
                forward_flops=sum(forward_flops[n] for n in within),
                backward_flops=sum(backward_flops[n] for n in within),
                axes=window_op.window.axis_windows() if window_op and window_op.window else (),
                receptive_field=fields.get(window_op.index) if window_op else None,
                is_leaf=not any(True for _ in module.children()),
            )
        )
    return tuple(rows)


def _parameter_counts(module: nn.Module) -> dict[str, int]:
    """Elements of the module's parameters (children's included, each shared one once), split
    into weights and biases (the forum post forgot the biases) and trainable and frozen."""
    counts = dict.fromkeys(("weights", "biases", "trainable", "frozen"), 0)
    for name, param in module.named_parameters():
        counts["biases" if name.rpartition(".")[2] == "bias" else "weights"] += param.numel()
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def _inside(name: str, ancestor: str) -> bool:
    return not ancestor or name == ancestor or name.startswith(ancestor + ".")



def _totals(model: nn.Module, step: StepRecording, layers: Sequence[LayerSummary]) -> SummaryTotals:
    counts = _parameter_counts(model)
    ops = _step_ops(step)
    forward = sum(op.flops for op in ops if op.phase == "forward")
    backward = sum(op.flops for op in ops if op.phase == "backward")
    storages = step.recording.storages
    buffers = list(model.buffers())
    return SummaryTotals(
        parameters=counts["trainable"] + counts["frozen"],
        trainable_parameters=counts["trainable"],
        frozen_parameters=counts["frozen"],
        weights=counts["weights"],
        biases=counts["biases"],
        # Bytes at the traced dtype: the fake copies were cast as model.to(dtype) would cast them.
        parameter_bytes=sum(s.nbytes for s in storages.values() if s.role == "parameter"),
        buffer_elements=sum(b.numel() for b in buffers),
        buffer_bytes=sum(s.nbytes for s in storages.values() if s.role == "buffer"),
        forward_flops=forward,
        backward_flops=backward,
        training_step_flops=forward + backward,
        layer_output_bytes=sum(layer.output_bytes for layer in layers if layer.is_leaf),
    )


# -- receptive fields and the chain of windows ------------------------------------------------------


def _receptive_fields(step: StepRecording) -> dict[int, tuple[ReceptiveField, ...]]:
    """The field of every window op's output, propagated through the forward ops by storage.

    Element-wise ops merge their inputs' fields (a residual sum sees what both branches see); an op
    that changes spatial sizes without being a window (adaptive pooling, interpolation) ends them.
    """
    spatial = len(step.spec.input_size) - 1
    field_of: dict[int, tuple[ReceptiveField, ...]] = {step.input_key: (INPUT_FIELD,) * spatial}
    found: dict[int, tuple[ReceptiveField, ...]] = {}
    for op in _step_ops(step):
        if op.phase != "forward" or not op.outputs:
            continue
        inputs = [field_of[t.storage_key] for t in op.inputs if t.storage_key in field_of]
        if not inputs:
            continue
        if op.window is not None:
            fields = tuple(compose(f, p) for f, p in zip(inputs[0], op.window.axes))
            found[op.index] = fields
        elif _keeps_spatial(op):
            try:
                fields = inputs[0]
                for other in inputs[1:]:
                    fields = tuple(merge_fields(a, b) for a, b in zip(fields, other))
            except GeometryError:
                continue
        else:
            continue
        for output in op.outputs:
            field_of[output.storage_key] = fields
    return found


def _keeps_spatial(op: OpRecord) -> bool:
    sizes = {t.shape[2:] for t in op.inputs + op.outputs if len(t.shape) >= 3}
    return len(sizes) == 1


def _window_chain(step: StepRecording) -> list[OpRecord] | None:
    """The window ops that lead from the input to the output, if they form a single chain."""
    lineage: dict[int, tuple[int, ...] | None] = {step.input_key: ()}
    last: tuple[int, ...] | None = None
    for op in _step_ops(step):
        if op.phase != "forward":
            continue
        known = [lineage[t.storage_key] for t in op.inputs if t.storage_key in lineage]
        if not known:
            continue
        if any(k is None for k in known) or len(set(known)) > 1:
            result: tuple[int, ...] | None = None  # branches that took different windows
        else:
            result = known[0] + (op.index,) if op.window is not None else known[0]
        for output in op.outputs:
            lineage[output.storage_key] = result
        last = result
    if last is None:
        return None
    ops = step.recording.ops
    return [ops[i] for i in last]


def _smallest_from_chain(model: nn.Module, input_size: tuple[int, ...], chain: list[OpRecord]) -> tuple[int, ...] | None:
    """Invert the chain per axis; trust it only if a trace at that size works and one below fails."""
    if not chain:
        return None
    spatial = len(input_size) - 1
    smallest = tuple(smallest_input_for_chain([op.window.axes[a] for op in chain if op.window]) for a in range(spatial))
    candidate = (input_size[0], *smallest)
    if not _accepts(model, candidate):
        return None
    for axis in range(spatial):
        if smallest[axis] > 1 and _accepts(model, _with_axis(candidate, axis, smallest[axis] - 1)):
            return None
    return candidate


def _with_axis(size: tuple[int, ...], axis: int, value: int) -> tuple[int, ...]:
    return (*size[: axis + 1], value, *size[axis + 2 :])


def _accepts(model: nn.Module, input_size: tuple[int, ...]) -> bool:
    try:
        record_step(model, StepSpec(input_size=input_size, mode="infer"), 1)
    except (LayerInputTooSmall, RuntimeError):
        return False
    return True


def smallest_input_size(model: nn.Module, *, input_size: Sequence[int]) -> tuple[int, ...]:
    """The smallest input the model accepts, axis by axis, found by tracing (any topology).

    First every spatial size doubles until the model accepts the input; then each axis in turn is
    binary-searched down while the others keep sizes already known to work. Output sizes never
    shrink as an input grows, so each search is exact.
    """
    size = tuple(int(s) for s in input_size)
    while not _accepts(model, size):
        if max(size[1:]) > 1 << 14:
            raise NinlabError(
                f"the model accepts no input of {size[0]} channels up to {'x'.join(map(str, size[1:]))}; "
                "check the channel count and number of spatial axes in --input"
            )
        size = (size[0], *(2 * s for s in size[1:]))
    for axis in range(len(size) - 1):
        low, high = 0, size[axis + 1]  # low fails (or is 0), high works
        while high - low > 1:
            middle = (low + high) // 2
            if _accepts(model, _with_axis(size, axis, middle)):
                high = middle
            else:
                low = middle
        size = _with_axis(size, axis, high)
    return size


def _input_reach(input_size: tuple[int, ...], chain: list[OpRecord]) -> tuple[InputReach, ...]:
    spatial = len(input_size) - 1
    reach = []
    for axis in range(spatial):
        windows = [op.window.axis_windows()[axis] for op in chain if op.window]
        positions = influencing_positions(windows)
        reach.append(
            InputReach(
                axis=_AXIS_NAMES.get(spatial, tuple(f"axis {i}" for i in range(spatial)))[axis],
                input_size=input_size[axis + 1],
                first=min(positions),
                last=max(positions),
                count=len(positions),
            )
        )
    return tuple(reach)
