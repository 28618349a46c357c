"""`summarize`: per-layer shapes with the rounding explained, parameters, FLOPs, receptive fields.

Everything is read from recordings of the real model on fake tensors (see `ninlab.analysis.trace`),
so it holds for any `nn.Module`: nested blocks, residual additions and functional calls in
`forward` are seen as the ops they dispatch. Shapes and parameters come from one forward pass,
which needs no loss; FLOPs from the step summarized: an inference's forward, or a training step,
whose built-in loss fits the output (`ninlab.analysis.step.builtin_loss`) and is named in the
result. The two forwards may run different ops: PyTorch's fused inference paths of
`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` run only without gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import nn

from ninlab.analysis.flops import CONVENTION, uncounted_products
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
from ninlab.analysis.lazy import materialized
from ninlab.analysis.recording import LayerInputTooSmall, OpRecord
from ninlab.analysis.refusals import cannot_run, check_traceable
from ninlab.analysis.step import (
    Mode,
    StepSpec,
    batch_size_of,
    check_trains,
    input_dtype_words,
    step_spec,
    valid_model,
)
from ninlab.analysis.torch_internals import op_named
from ninlab.analysis.trace import StepRecording, record_step
from ninlab.errors import NinlabError, checked_name
from ninlab.units import dtype_name

__all__ = [
    "InputReach",
    "InputTooSmall",
    "LayerSummary",
    "Summary",
    "SummaryTotals",
    "default_mode",
    "is_bias",
    "smallest_input_size",
    "summarize",
]


@dataclass(frozen=True)
class LayerSummary:
    """One module. Containers total their children; `depth` 0 is the model itself.

    FLOPs are those of the ops the module ran itself or through its children (`CONVENTION`);
    `backward_flops` are the ops autograd ran for it in backward (a checkpoint's
    recomputation of its forward included). `output_shapes` holds one shape
    per tensor the module returned (a tuple's, dict's or dataclass's, in order). `axes` describes
    the module's convolution or pooling window along each spatial axis, one `AxisWindow` per axis
    (the first such op, if it ran several).
    """

    name: str
    type: str
    depth: int
    output_shapes: tuple[tuple[int, ...], ...]  # empty: the module did not run
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
    def output_shape(self) -> tuple[int, ...] | None:
        """The first output's shape (the only one, for most layers)."""
        return self.output_shapes[0] if self.output_shapes else None

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
    forward_flops: int  # one forward pass of the batch, as the step summarized runs it
    backward_flops: int  # 0 without a training step
    training_step_flops: (
        int  # forward + backward (the optimizer's update is not counted); 0 without one
    )
    layer_output_bytes: (
        int  # sum of every leaf module's output: what the forum post calls activations
    )
    # Matrix products the step ran inside kernels the convention counts as 0 ("fused
    # attention"): the FLOPs above leave them out, as FlopCounterMode does.
    uncounted_products: tuple[str, ...] = ()


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
    input_sizes: tuple[tuple[int, ...], ...]  # one sample of each input (an image: channels first)
    input_dtype: str  # "int64", or for inputs of several dtypes "float32 and int64"
    batch_size: int
    dtype: str
    layers: tuple[LayerSummary, ...]
    totals: SummaryTotals
    # Channels, then the smallest valid size of each spatial axis; None where there is nothing to
    # say: no convolution or pooling window, or several inputs.
    smallest_input_size: tuple[int, ...] | None
    input_reach: tuple[InputReach, ...]  # empty when the window ops do not form one chain
    loss: str  # the training step's loss (`builtin_loss_words`); "" when nothing trains
    flop_convention: str = CONVENTION

    @property
    def input_size(self) -> tuple[int, ...]:
        """The first (for most models the only) input's size."""
        return self.input_sizes[0]


_AXIS_NAMES = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def summarize(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    **fields: Any,
) -> Summary:
    """Summarize `model` for a batch of `batch_size` inputs of the step `spec` describes (or its
    fields, as keywords: `input_size`, `input_names`, `input_dtype`, `input_range`, `dtype`,
    `mode`).

    The summary reads the step's inputs (one sample's size of any rank, one size per input for a
    model of several, a dict of sizes by name for a model called with keywords, or example
    tensors, which also give the batch; `input_dtype` and `input_range`, one or one per input,
    for integer inputs such as token ids), its dtype (by default the model's own) and its mode:
    "train" adds the built-in training step's backward FLOPs, "infer" records the forward only.
    Given as fields, the mode defaults to `default_mode(model)`. The optimizer, autocast, device,
    memory format and a step function change the memory of a step (`predict_memory`), not its
    layers, and are not read here.

    Raises `NinlabError` when the input is too small for the network, naming the first layer
    whose output would be empty, its arithmetic and the smallest valid input; or when the model
    cannot run, naming why (`ninlab.analysis.refusals`).
    """
    valid_model(model)
    check_traceable(model)
    if spec is None and fields.get("mode") is None:
        fields["mode"] = default_mode(model)
    given = step_spec(spec, model=model, **fields)
    batch_size = batch_size_of(given, batch_size)
    model_name = checked_name("model_name", model_name)
    check_trains(model, given)
    spec = StepSpec(
        input_size=given.input_size,
        input_names=given.input_names,
        input_dtype=given.input_dtype,
        input_range=given.input_range,
        mode=given.mode,
        dtype=given.dtype,
    )
    forward_spec = spec.inference()
    try:
        model = materialized(model, spec)
        forward = record_step(model, forward_spec, batch_size)
    except LayerInputTooSmall as error:
        raise _too_small(model, forward_spec, error) from None
    except Exception as error:  # noqa: BLE001 - whatever the model raises, as one line naming why
        raise cannot_run(error, model, forward_spec) from None
    if (
        not forward.recording.module_outputs.get("")
        and type(model).__call__ is not nn.Module.__call__
    ):
        raise NinlabError(
            f"{type(model).__name__} overrides __call__, so calling it bypasses nn.Module's call "
            "and its hooks, which show the summary the model's output; put that code in forward"
        )
    if not forward.recording.module_outputs.get(""):
        raise NinlabError(
            f"{type(model).__name__}.forward returned no tensor; ninlab accounts for models that "
            "return tensors, or tuples, lists, dicts or dataclasses of them"
        )
    training = None
    if spec.mode == "train":
        try:
            training = record_step(model, spec, batch_size, optimizer_step=False)
        except Exception as error:  # noqa: BLE001 - as above; the forward alone ran
            raise cannot_run(error, model, spec) from None
    chain = _window_chain(forward)
    smallest = None
    # Geometry speaks only where windows slide over the one input's own spatial axes.
    # A chain over other axes (a 1-d conv over embedded tokens) leaves nothing to say.
    one_image = len(spec.input_sizes) == 1 and len(spec.input_sizes[0]) >= 2
    if one_image and _has_windows(forward) and (chain is None or _fits(chain, spec)):
        if chain is not None:
            smallest = _smallest_from_chain(model, forward_spec, chain, forward)
        if smallest is None:
            smallest = _smallest_input(model, forward_spec, guess=_smallest_guess(forward))
    layers = _layers(model, forward, training)
    return Summary(
        model=model_name or type(model).__name__,
        input_sizes=spec.input_sizes,
        input_dtype=input_dtype_words(spec.input_dtypes),
        batch_size=batch_size,
        dtype=dtype_name(spec.dtype),
        layers=layers,
        totals=_totals(model, forward, training, layers),
        smallest_input_size=smallest,
        input_reach=_input_reach(spec.input_sizes[0], chain)
        if chain and _fits(chain, spec)
        else (),
        loss=training.loss if training is not None else "",
    )


class InputTooSmall(NinlabError):
    """The input is smaller than some layer's window; `smallest` is the smallest input the network
    accepts (channels, then each spatial axis), when there is one input with spatial axes."""

    def __init__(self, message: str, smallest: tuple[int, ...] | None) -> None:
        super().__init__(message)
        self.smallest = smallest


def default_mode(model: nn.Module) -> Mode:
    """The step a summary shows unless told: a training step when any parameter trains, else an
    inference."""
    return "train" if any(p.requires_grad for p in model.parameters()) else "infer"


def _too_small(model: nn.Module, spec: StepSpec, error: LayerInputTooSmall) -> InputTooSmall:
    message = f"input {_shape_text(spec.input_sizes[0])} is too small: {error}"
    smallest = None
    if len(spec.input_sizes) == 1 and len(spec.input_sizes[0]) >= 2:
        smallest = _smallest_input(model, spec)
        message += f"; the smallest input this network accepts is {_shape_text(smallest)}"
    return InputTooSmall(message, smallest)


def _has_windows(step: StepRecording) -> bool:
    return any(op.window is not None for op in _step_ops(step) if op.phase == "forward")


def _shape_text(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def _step_ops(step: StepRecording) -> list[OpRecord]:
    return step.recording.ops[step.step_start :]


# What autograd runs in backward: its own ops, and a checkpoint's forward run again there (as
# PyTorch's FlopCounterMode counts a backward, and the machine computes it).
_BACKWARD_PHASES = ("backward", "recompute")


def _layers(
    model: nn.Module, step: StepRecording, training: StepRecording | None
) -> tuple[LayerSummary, ...]:
    """One row per module: windows from the forward `step`, outputs and FLOPs from the
    `training` step where there is one, else from the forward. (The forward runs as an inference,
    in eval mode: a `nn.TransformerEncoderLayer` there takes its fused path, which calls none of
    its linear layers, so a training summary read their outputs as nothing.)"""
    forward_flops: dict[str, int] = defaultdict(int)
    backward_flops: dict[str, int] = defaultdict(int)
    first_window: dict[str, OpRecord] = {}
    for op in _step_ops(step):
        if op.phase == "forward" and op.window is not None and op.module not in first_window:
            first_window[op.module] = op
    for op in _step_ops(training if training is not None else step):
        if op.phase == "forward":
            forward_flops[op.module] += op.flops
        elif op.phase in _BACKWARD_PHASES:
            backward_flops[op.module] += op.flops
    fields = _receptive_fields(step)
    module_outputs = (training if training is not None else step).recording.module_outputs
    rows = []
    for name, module in model.named_modules():
        within = [n for n in forward_flops.keys() | backward_flops.keys() if _inside(n, name)]
        counts = _parameter_counts(module)
        outputs = module_outputs.get(name, ())
        window_op = first_window.get(name)
        rows.append(
            LayerSummary(
                name=name,
                type=type(module).__name__,
                depth=0 if not name else name.count(".") + 1,
                output_shapes=tuple(shape for shape, _ in outputs),
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


def is_bias(name: str) -> bool:
    """Whether the parameter `name` (qualified or not) is a bias: "bias" is one of the words,
    split at "_", of its own name. PyTorch names every bias so: `bias` (Linear, Conv, LayerNorm,
    BatchNorm), `bias_ih_l0` and `bias_hh_l0_reverse` (LSTM, GRU, RNN), `in_proj_bias`, `bias_k`
    and `bias_v` (MultiheadAttention); and no weight (`weight_ih_l0`, `in_proj_weight`)."""
    return "bias" in name.rpartition(".")[2].split("_")


def _parameter_counts(module: nn.Module) -> dict[str, int]:
    """Elements of the module's parameters (children's included, each shared one once), split
    into weights and biases (`is_bias`; the forum post forgot the biases) and trainable
    and frozen."""
    counts = dict.fromkeys(("weights", "biases", "trainable", "frozen"), 0)
    for name, param in module.named_parameters():
        counts["biases" if is_bias(name) else "weights"] += param.numel()
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def _inside(name: str, ancestor: str) -> bool:
    return not ancestor or name == ancestor or name.startswith(ancestor + ".")


def _totals(
    model: nn.Module,
    step: StepRecording,
    training: StepRecording | None,
    layers: Sequence[LayerSummary],
) -> SummaryTotals:
    counts = _parameter_counts(model)
    # A training step's forward is the one its FLOPs count: with gradients, attention takes no
    # fused inference path (whose kernel neither ninlab nor FlopCounterMode counts).
    ops = _step_ops(training if training is not None else step)
    forward = sum(op.flops for op in ops if op.phase == "forward")
    backward = sum(op.flops for op in ops if op.phase in _BACKWARD_PHASES)
    training_step = forward + backward if training is not None else 0
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
        training_step_flops=training_step,
        layer_output_bytes=sum(layer.output_bytes for layer in layers if layer.is_leaf),
        uncounted_products=uncounted_products(op.op for op in ops),
    )


# -- receptive fields and the chain of windows -----------------------------------------------------


def _receptive_fields(step: StepRecording) -> dict[int, tuple[ReceptiveField, ...]]:
    """The field of every window op's output, propagated through the forward ops by storage.

    Element-wise ops merge their inputs' fields (a residual sum sees what both branches see); an op
    that changes spatial sizes without being a window (adaptive pooling, interpolation) ends them.
    """
    field_of: dict[int, tuple[ReceptiveField, ...]] = {
        key: (INPUT_FIELD,) * (len(size) - 1)
        for key, size in zip(step.input_keys, step.spec.input_sizes)
    }
    found: dict[int, tuple[ReceptiveField, ...]] = {}
    for op in _step_ops(step):
        if op.phase != "forward" or not op.outputs:
            continue
        inputs = [field_of[t.storage_key] for t in op.inputs if t.storage_key in field_of]
        if not inputs:
            continue
        if op.window is not None:
            if len(inputs[0]) != len(op.window.axes):  # the input's axes are not this window's
                continue
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
    lineage: dict[int, tuple[int, ...] | None] = dict.fromkeys(step.input_keys, ())
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


def _smallest_from_chain(
    model: nn.Module, spec: StepSpec, chain: list[OpRecord], step: StepRecording
) -> tuple[int, ...] | None:
    """Invert the chain per axis; trust it only if a trace at that size works and one
    below fails (which the chain's arithmetic alone decides where `_chain_sees_the_input`, and
    the first too where the sizes also end in the chain: `_sizes_end_in_the_chain`)."""
    if not chain or not _fits(chain, spec):
        return None
    input_size = spec.input_sizes[0]
    spatial = len(input_size) - 1
    smallest = tuple(
        smallest_input_for_chain([op.window.axes[a] for op in chain if op.window])
        for a in range(spatial)
    )
    candidate = (input_size[0], *smallest)
    sees_the_input = _chain_sees_the_input(step, chain)
    if not (sees_the_input and _sizes_end_in_the_chain(step, chain)) and not _accepts(
        model, spec, candidate
    ):
        return None
    if sees_the_input:
        return candidate
    for axis in range(spatial):
        if smallest[axis] > 1 and _accepts(
            model, spec, _with_axis(candidate, axis, smallest[axis] - 1)
        ):
            return None
    return candidate


# Ops that give their input's shape back whatever that shape is, beside the pointwise ones.
_SHAPE_KEEPING = frozenset(
    f"aten.{name}"
    for name in (
        "native_batch_norm.default",
        "_native_batch_norm_legit.default",
        "_native_batch_norm_legit_no_training.default",
        "native_layer_norm.default",
        "native_group_norm.default",
        "native_dropout.default",
        "clone.default",
        "_to_copy.default",
    )
)


def _chain_sees_the_input(step: StepRecording, chain: list[OpRecord]) -> bool:
    """Whether every op the input passes through before the chain's last window keeps its
    spatial sizes at any input size (pointwise, normalisation, dropout, a copy) and each window
    reads what the window before it wrote: then, below the chain's smallest input, one of the
    chain's windows has an empty output at every size, so the model refuses it without a trace.
    Anything else on the way (a pad, a resize, a crop, a reshape) may change the sizes the
    windows see, and the sizes below are traced."""
    last = chain[-1].index
    on_path = set(step.input_keys)
    for op in _step_ops(step):
        if op.index > last:
            break
        if op.phase != "forward" or not any(t.storage_key in on_path for t in op.inputs):
            continue
        if op.window is None and not (op.op in _SHAPE_KEEPING or _pointwise(op.op)):
            return False
        on_path.update(t.storage_key for t in op.outputs)
    spatial = len(step.spec.input_sizes[0]) - 1
    seen = step.spec.input_sizes[0][1:]
    for op in chain:
        if op.inputs[0].shape[-spatial:] != seen:
            return False
        seen = op.outputs[0].shape[-spatial:]
    return True


# Ops whose output's spatial sizes are their own whatever their input's (at least 1): adaptive
# pooling. (A 1x1 adaptive average is a spatial mean: see `_spatial_mean`.)
_SIZES_OF_THEIR_OWN = frozenset(
    f"aten.{name}"
    for name in (
        "_adaptive_avg_pool2d.default",
        "_adaptive_avg_pool3d.default",
        "adaptive_max_pool2d.default",
        "adaptive_max_pool3d.default",
    )
)

# Reductions that, over every spatial axis and keeping them as 1s, end the input's sizes.
_REDUCTIONS = frozenset(
    f"aten.{name}" for name in ("mean.dim", "sum.dim_IntList", "amax.default", "amin.default")
)


def _sizes_end_in_the_chain(step: StepRecording, chain: list[OpRecord]) -> bool:
    """Whether the input's spatial sizes reach nothing past the chain's last window but ops
    that take any size: pointwise ones, normalisation, dropout, and the adaptive pooling or
    spatial mean that ends them (NiN's global average), after which every tensor has the same
    shape at every input size. Then the chain's smallest input runs the whole network, as far
    as its ops decide (a check in the model's Python on `x.shape` is not an op, and is not
    seen here, nor where `_chain_sees_the_input` spares the trace below)."""
    last = chain[-1].index
    spatial = len(step.spec.input_sizes[0]) - 1
    on_path = {t.storage_key for t in chain[-1].outputs}
    for op in _step_ops(step):
        if op.index <= last or op.phase != "forward":
            continue
        if not any(t.storage_key in on_path for t in op.inputs):
            continue
        if op.op in _SIZES_OF_THEIR_OWN or _spatial_mean(op, spatial):
            continue
        if op.window is not None or not (op.op in _SHAPE_KEEPING or _pointwise(op.op)):
            return False
        on_path.update(t.storage_key for t in op.outputs)
    return True


def _spatial_mean(op: OpRecord, spatial: int) -> bool:
    """A reduction over every spatial axis, kept as 1s (`x.mean((2, 3), keepdim=True)`), told by
    its shapes: where each spatial size was above 1, only a reduction over it makes it 1."""
    if op.op not in _REDUCTIONS or not op.inputs or len(op.outputs) != 1:
        return False
    given, made = op.inputs[0].shape, op.outputs[0].shape
    return (
        len(given) == len(made) > spatial
        and given[:-spatial] == made[:-spatial]
        and all(size > 1 for size in given[-spatial:])
        and all(size == 1 for size in made[-spatial:])
    )


def _pointwise(op_name: str) -> bool:
    op = op_named(op_name)
    return op is not None and torch.Tag.pointwise in op.tags


def _fits(chain: list[OpRecord], spec: StepSpec) -> bool:
    """Whether there is one input and the chain's windows slide along its own spatial axes."""
    spatial = len(spec.input_sizes[0]) - 1
    return len(spec.input_sizes) == 1 and all(
        op.window is None or len(op.window.axes) == spatial for op in chain
    )


def _with_axis(size: tuple[int, ...], axis: int, value: int) -> tuple[int, ...]:
    return (*size[: axis + 1], value, *size[axis + 2 :])


def _accepts(model: nn.Module, spec: StepSpec, input_size: tuple[int, ...]) -> bool:
    try:
        record_step(model, spec.replace(input_size=input_size, mode="infer"), 1, warm_up=False)
    except Exception:  # noqa: BLE001 - whatever the model raises at this size, it does not accept it
        return False
    return True


def smallest_input_size(model: nn.Module, *, input_size: Sequence[int]) -> tuple[int, ...]:
    """The smallest input the model accepts, axis by axis, found by tracing (any topology).

    First every spatial size doubles until the model accepts the input; then each axis in turn is
    searched down while the others keep sizes already known to work: size 1 first, then a binary
    search. Output sizes never shrink as an input grows, so each search is exact.
    """
    return _smallest_input(model, StepSpec(input_size=input_size, mode="infer").for_model(model))


def _smallest_input(
    model: nn.Module, spec: StepSpec, guess: Sequence[int] | None = None
) -> tuple[int, ...]:
    """`smallest_input_size`'s search; `guess`, a size per spatial axis (`_smallest_guess`),
    is asked first, with the size below it: where right, an axis costs two traces, not a
    search's eight, and where wrong, the search goes on from what they found."""
    size = spec.input_sizes[0]
    if len(size) < 2:
        raise NinlabError(
            f"input {_shape_text(size)} has no spatial axis to search; give channels then spatial "
            "sizes"
        )
    while not _accepts(model, spec, size):
        if max(size[1:]) > 1 << 14:
            raise NinlabError(
                f"the model accepts no input of {size[0]} channels up to "
                f"{'x'.join(map(str, size[1:]))}; check the channel count and number of spatial "
                "axes in --input"
            )
        size = (size[0], *(2 * s for s in size[1:]))
    for axis in range(len(size) - 1):
        # Most networks pad their windows and run on one pixel: asked first, that answer costs
        # one trace, not a search's eight (MobileNetV2's summary: 15 traces, 2.0 s, then 3).
        first = min(guess[axis], size[axis + 1]) if guess else 1
        low, high = 0, size[axis + 1]  # low fails (or is 0), high works
        if _accepts(model, spec, _with_axis(size, axis, first)):
            high = first
            if first > 1 and not _accepts(model, spec, _with_axis(size, axis, first - 1)):
                low = first - 1
        else:
            low = first
        while high - low > 1:
            middle = (low + high) // 2
            if _accepts(model, spec, _with_axis(size, axis, middle)):
                high = middle
            else:
                low = middle
        size = _with_axis(size, axis, high)
    return size


# Past this many paths of windows from the input to one tensor, the guess stops looking.
_MOST_PATHS = 256


def _smallest_guess(step: StepRecording) -> tuple[int, ...]:
    """A guess at the smallest input along each spatial axis where the windows do not form one
    chain (branches, concatenations): the largest input that some path of windows from the
    input needs (each path's chain inverted, `smallest_input_for_chain`). Only a guess, which
    the search checks: paths may merge, resize or crop."""
    spatial = len(step.spec.input_sizes[0]) - 1
    ops = step.recording.ops
    paths: dict[int, frozenset[tuple[int, ...]]] = dict.fromkeys(step.input_keys, frozenset({()}))
    need = [1] * spatial
    for op in _step_ops(step):
        if op.phase != "forward" or not op.outputs:
            continue
        found = [paths[t.storage_key] for t in op.inputs if t.storage_key in paths]
        if not found:
            continue
        if op.window is not None and len(op.window.axes) == spatial:
            if _keeps_its_size(op, spatial):
                made = found[0]
            else:
                made = frozenset((*chain, op.index) for chain in found[0])
            for chain in made:
                for axis in range(spatial):
                    windows = [ops[i].window.axes[axis] for i in chain]  # type: ignore[union-attr]
                    need[axis] = max(need[axis], smallest_input_for_chain(windows))
        elif _keeps_spatial(op):
            made = frozenset().union(*found)
        else:
            continue  # a resize, a reshape, a global pool: the sizes past it are not the input's
        if len(made) > _MOST_PATHS:
            break
        for output in op.outputs:
            paths[output.storage_key] = made
    return tuple(need)


def _keeps_its_size(op: OpRecord, spatial: int) -> bool:
    """A window of stride 1 whose output is its input's size (a padded 3x3 convolution): so at
    every size, since nothing rounds; such windows need nothing of the input but itself."""
    return (
        all(axis.stride == 1 for axis in op.window.axes)
        and (  # type: ignore[union-attr]
            op.inputs[0].shape[-spatial:] == op.outputs[0].shape[-spatial:]
        )
    )


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
