"""How much memory one training step or one inference needs, and why, tensor by tensor.

`predict_memory` runs the real step (`ninlab.analysis.step`) once on fake tensors (`ninlab.analysis.trace.record_step`:
shapes and dtypes, no data) and replays what it recorded: every tensor storage, the op that made
it and the op after which it died. Adding and removing each storage's bytes op by op gives the
live-storage curve of the step; its maximum is the peak. Nothing is allocated, so NiN at batch
128 takes milliseconds, and every figure is tied to a tensor: which layer made it, and why
autograd keeps it.

What is counted (the steady state of training, the second step, when optimizer state exists):
what is alive when the step starts (parameters, buffers, the input batch and targets, the
previous step's gradients until `zero_grad(set_to_none=True)` frees them, optimizer state), and
everything the step allocates while it is alive. Each storage counts once, however many views of
it exist; its size is its real size in bytes (`untyped_storage().nbytes()`). This is the level
PyTorch's own `MemTracker` counts, and what `ninlab.analysis.measure` measures on real tensors.

Categories: every storage belongs to exactly one, checked in the order of `CATEGORIES`; see
`CATEGORY_MEANINGS` (and `describe_categories()`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from math import prod
from typing import Any, Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
)

from ninlab.analysis.allocator import cuda_fresh_block_bytes, peak_above_start_bytes
from ninlab.errors import NinlabError
from ninlab.analysis.step import DDPSpec, StepSpec, step_spec, valid_batch_size
from ninlab.analysis.trace import StepRecording, record_step
from ninlab.units import format_bytes, parse_bytes

__all__ = [
    "CATEGORIES",
    "CATEGORY_MEANINGS",
    "describe_categories",
    "saved_reason",
    "Breakdown",
    "PeakOp",
    "TimelinePoint",
    "PhaseSpan",
    "Timeline",
    "SavedRow",
    "SavedLayer",
    "ForumRule",
    "DDPBuckets",
    "AllocatorPeak",
    "MeasuredFallback",
    "MemoryReport",
    "BatchScaling",
    "BatchFit",
    "predict_memory",
    "memory_vs_batch",
    "fit_batch",
    "BatchStudy",
    "study_batch",
]

Level = Literal["live", "allocator"]

# The order is the precedence: a storage that is both a parameter and saved for backward (a conv
# keeps its weight) is a parameter; the input batch a first conv keeps is the input batch.
CATEGORIES: tuple[str, ...] = (
    "parameters",
    "buffers",
    "input",
    "targets",
    "gradients",
    "optimizer_state",
    "ddp_buckets",
    "saved_for_backward",
    "forward_temporaries",
    "backward_temporaries",
    "optimizer_temporaries",
    "other",
)

CATEGORY_MEANINGS: dict[str, str] = {
    "parameters": "the model's parameters (weights and biases), at the model's dtype",
    "buffers": "the model's buffers (batch norm's running mean and variance, its batch counter)",
    "input": "the input batch",
    "targets": "the class labels of the batch (int64), training only",
    "gradients": "parameter gradients: the previous step's until zero_grad(set_to_none=True) "
    "frees them, then this step's as backward makes them",
    "optimizer_state": "what the optimizer keeps between steps: momentum buffers, Adam's two "
    "moments and step counters, ...",
    "ddp_buckets": "DistributedDataParallel's flat gradient buckets (one copy of every trainable "
    "parameter's gradient), held for the whole run",
    "saved_for_backward": "activations autograd keeps for backward (a conv's input, a ReLU's "
    "output, max-pool indices, dropout masks, the log-softmax), alive from the op that makes "
    "them until backward has used them",
    "forward_temporaries": "outputs of forward and loss ops that autograd does not keep (a conv "
    "output a ReLU replaces, the logits, the loss); in inference, every activation",
    "backward_temporaries": "backward's own tensors other than parameter gradients: gradients "
    "with respect to activations, and intermediate results",
    "optimizer_temporaries": "tensors optimizer.step() makes and frees (Adam's denominator, "
    "foreach lists)",
    "other": "anything else (tensors made outside the phases above)",
}


def describe_categories() -> tuple[tuple[str, str], ...]:
    """(category, what it holds) for every category, in `CATEGORIES` order."""
    return tuple((name, CATEGORY_MEANINGS[name]) for name in CATEGORIES)


# -- why autograd keeps a tensor --------------------------------------------------------------

# (autograd node without its version digit, saved field) -> reason. The node and field names are
# PyTorch's (`grad_fn._saved_<field>`), so the table reads against derivatives.yaml.
_REASONS: dict[tuple[str, str], str] = {
    ("ConvolutionBackward", "input"): "conv keeps its input, to compute the weight gradient",
    ("ConvolutionBackward", "weight"): "conv keeps its weight, to compute the input gradient",
    ("ReluBackward", "result"): "ReLU keeps its output: the gradient passes where it is positive",
    ("HardtanhBackward", "self"): "ReLU6/hardtanh keeps its input: the gradient passes inside the clamp",
    ("LeakyReluBackward", "self"): "LeakyReLU keeps its input: its sign picks the slope",
    ("EluBackward", "self"): "ELU keeps its input",
    ("GeluBackward", "self"): "GELU keeps its input",
    ("SiluBackward", "self"): "SiLU keeps its input",
    ("SigmoidBackward", "result"): "sigmoid keeps its output (its derivative is y(1-y))",
    ("TanhBackward", "result"): "tanh keeps its output (its derivative is 1-y^2)",
    ("MaxPool1DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool2DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool3DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool1DWithIndicesBackward", "result1"): "max pool keeps the int64 index of each window's maximum",
    ("MaxPool2DWithIndicesBackward", "result1"): "max pool keeps the int64 index of each window's maximum",
    ("MaxPool3DWithIndicesBackward", "result1"): "max pool keeps the int64 index of each window's maximum",
    ("AdaptiveMaxPool2DBackward", "self"): "adaptive max pool keeps its input",
    ("AdaptiveMaxPool2DBackward", "result1"): "adaptive max pool keeps the int64 index of each maximum",
    ("AvgPool2DBackward", "self"): "average pool keeps its input (its backward reads the shape)",
    ("AdaptiveAvgPool2DBackward", "self"): "adaptive average pool keeps its input",
    ("NativeDropoutBackward", "result1"): "dropout keeps its mask (bool, the fused kernel CUDA uses)",
    ("LogSoftmaxBackward", "result"): "cross-entropy keeps its log-softmax",
    ("NllLossBackward", "self"): "cross-entropy keeps its log-softmax",
    ("NllLossBackward", "target"): "cross-entropy keeps the targets",
    ("NllLossBackward", "total_weight"): "cross-entropy keeps a scalar total weight",
    ("AddmmBackward", "mat1"): "linear keeps its input, to compute the weight gradient",
    ("AddmmBackward", "mat2"): "linear keeps its weight (transposed view), for the input gradient",
    ("MmBackward", "self"): "matmul keeps its left operand",
    ("MmBackward", "mat2"): "matmul keeps its right operand",
    ("NativeBatchNormBackward", "input"): "batch norm keeps its input",
    ("NativeBatchNormBackward", "weight"): "batch norm keeps its scale",
    ("NativeBatchNormBackward", "running_mean"): "batch norm keeps its running mean",
    ("NativeBatchNormBackward", "running_var"): "batch norm keeps its running variance",
    ("NativeBatchNormBackward", "result1"): "batch norm keeps each channel's batch mean",
    ("NativeBatchNormBackward", "result2"): "batch norm keeps each channel's inverse std",
    ("NativeBatchNormBackward", "save_mean"): "batch norm keeps each channel's batch mean",
    ("NativeBatchNormBackward", "save_invstd"): "batch norm keeps each channel's inverse std",
}


def saved_reason(node: str, field: str, *, module_type: str = "") -> str:
    """Why autograd node `node` (e.g. "ReluBackward0") keeps its saved `field`, in words.

    Dropout on CPU is a composite (a float mask made by bernoulli_, then input * mask), so its
    mask is a multiplication's saved `other`: `module_type` tells it apart from other products.
    """
    base = re.sub(r"\d+$", "", node)
    if base == "MulBackward" and module_type.startswith("Dropout"):
        return "dropout keeps its mask, scaled by 1/(1-p) (float on CPU; a bool on CUDA)"
    return _REASONS.get((base, field), f"{base} keeps its {field}")


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """Bytes alive per category (see `CATEGORY_MEANINGS`) at one moment; each storage counted once."""

    parameters_bytes: int = 0
    buffers_bytes: int = 0
    input_bytes: int = 0
    targets_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_state_bytes: int = 0
    ddp_buckets_bytes: int = 0
    saved_for_backward_bytes: int = 0
    forward_temporaries_bytes: int = 0
    backward_temporaries_bytes: int = 0
    optimizer_temporaries_bytes: int = 0
    other_bytes: int = 0

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> Breakdown:
        """From bytes in `CATEGORIES` order."""
        return cls(*counts)

    @property
    def total_bytes(self) -> int:
        return sum(self.counts())

    def counts(self) -> tuple[int, ...]:
        """Bytes in `CATEGORIES` order."""
        return tuple(getattr(self, f"{name}_bytes") for name in CATEGORIES)

    def of(self, category: str) -> int:
        if category not in CATEGORIES:
            raise NinlabError(f"unknown memory category {category!r}; choose one of {', '.join(CATEGORIES)}")
        return int(getattr(self, f"{category}_bytes"))



@dataclass(frozen=True)
class PeakOp:
    """The op during which the peak is reached: its outputs exist, nothing it leaves dead is freed yet."""

    step_op: int  # position among the analysed step's ops (0 = the step's first op)
    op: str  # aten op, e.g. "aten.threshold_backward.default"
    phase: str  # zero_grad, forward, loss, backward or optimizer
    module: str  # qualified module name ("" = code outside any module: the loss)
    module_type: str
    autograd_node: str  # in backward: the node running, e.g. "ReluBackward0"


@dataclass(frozen=True)
class TimelinePoint:
    """Bytes alive when op `step_op`'s outputs exist, before what dies after it is freed: the
    high point at that op. The maximum over the timeline is the peak."""

    step_op: int
    op: str
    phase: str
    module: str
    alive: Breakdown
    allocator_bytes: int  # what the allocator holds at the op's high point (see `AllocatorPeak`)

    @property
    def total_bytes(self) -> int:
        return self.alive.total_bytes


@dataclass(frozen=True)
class PhaseSpan:
    """Ops `first_op`..`last_op` (inclusive, step positions) ran in `phase`."""

    phase: str
    first_op: int
    last_op: int


@dataclass(frozen=True)
class Timeline:
    """The step op by op, for plotting as is: `series(category)` gives one value per op."""

    start: Breakdown  # alive before the step's first op
    points: tuple[TimelinePoint, ...]
    phases: tuple[PhaseSpan, ...]

    def series(self, category: str) -> tuple[int, ...]:
        return tuple(point.alive.of(category) for point in self.points)

    def totals(self) -> tuple[int, ...]:
        """Live bytes per op."""
        return tuple(point.total_bytes for point in self.points)

    def allocator_totals(self) -> tuple[int, ...]:
        return tuple(point.allocator_bytes for point in self.points)


@dataclass(frozen=True)
class SavedRow:
    """One tensor an autograd node keeps for backward.

    `counted_bytes` is the storage's size the first time it appears (a ReLU's output, which the
    next conv keeps as its input, is counted at the ReLU: `shared_with` names the row that counts
    it) and 0 when the storage is a parameter, buffer, the input batch or the targets (`category`
    says where those are counted). `share` is `counted_bytes` over all rows' `counted_bytes`.
    """

    module: str
    module_type: str
    node: str
    field: str
    reason: str
    shape: tuple[int, ...]
    dtype: str
    storage_bytes: int
    counted_bytes: int
    share: float
    category: str
    shared_with: str

    @property
    def label(self) -> str:
        """The row as `shared_with` names rows: "module node.field" ("(loss)" for the loss)."""
        return f"{self.module or '(loss)'} {self.node}.{self.field}"


@dataclass(frozen=True)
class SavedLayer:
    """What one layer keeps for backward: its rows' `counted_bytes` together, and why."""

    module: str
    module_type: str
    counted_bytes: int
    share: float
    reasons: tuple[str, ...]  # each distinct reason of its rows that count bytes
    # Rows elsewhere that keep one of the same storages (the next conv keeping a ReLU's output as
    # its input), as "module node.field": counted here, once.
    also_kept_by: tuple[str, ...]


@dataclass(frozen=True)
class ForumRule:
    """The d2l forum reader's estimate (seed-forum-post.txt), computed for this model.

    Activations, as in the post: the input plus every layer's output, where a convolution and the
    activation function after it are one layer (activation modules from `torch.nn.modules.activation`
    are not counted separately), dropout and flatten included. Parameters: all of them, biases
    included (the post forgot the biases). Training: 2 x activations + 3 x parameters. Inference:
    parameters + the largest sum of two consecutive activations, dropout skipped (the post: "we
    also don't need the Dropout ACTIVS").
    """

    activations_bytes: int
    parameters_bytes: int
    largest_consecutive_pair_bytes: int
    train_bytes: int
    infer_bytes: int
    rule_bytes: int  # the estimate for this report's mode
    ratio: float  # rule_bytes / the predicted live peak
    # Where it goes wrong, from our prediction (training; 0 in inference): the rule holds a
    # gradient for every activation at once, where backward frees them as it goes (what is alive
    # at the peak), and it has no room for max pooling's int64 indices.
    activation_gradients_at_peak_bytes: int
    int64_indices_bytes: int


@dataclass(frozen=True)
class DDPBuckets:
    """Gradient buckets each DDP rank holds (torch/nn/parallel/distributed.py, reducer.cpp).

    The reducer allocates one flat tensor per bucket, together one copy of every trainable
    parameter, for the life of the DDP module. After the first iteration it rebuilds them in the
    order gradients became ready in backward, with a first bucket of at most
    `first_bucket_cap_bytes` and the rest of at most `bucket_cap_bytes` (a bucket holds whole
    parameters, so one larger than the cap gets its own). With `gradient_as_bucket_view` each
    `.grad` becomes a view into its bucket: a gradient backward makes is copied in and freed as
    soon as it is ready, so gradients cost nothing beyond the buckets; without it, gradients and
    buckets are two copies.
    """

    bucket_bytes: tuple[int, ...]
    first_bucket_cap_bytes: int
    bucket_cap_bytes: int
    gradient_as_bucket_view: bool

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_bytes)


@dataclass(frozen=True)
class AllocatorPeak:
    """The second level: what the allocator holds, which is what a user sees and what runs out.

    CPU: the c10 allocator hands out a block for every tensor storage, and inside some kernels
    blocks that belong to no tensor (oneDNN reorders its inputs, weights and results into blocked
    layouts; batch norm keeps temporaries); `ninlab.analysis.allocator` gives them per op, and an op's
    high point is what was alive before it plus the most it held at once. CUDA: each storage is
    the caching allocator's block (`max_memory_allocated` counts blocks, not bytes). `method`
    states the rules; `unmodelled` lists the ops whose extra blocks are not known.
    """

    peak_bytes: int
    step_op: int
    op: str
    phase: str
    module: str
    module_type: str
    live_bytes: int  # tensor storage alive at that op (its outputs included)
    workspace_bytes: int  # CPU: kernel blocks beyond the live storage at the peak
    rounding_bytes: int  # CUDA: what block rounding adds to the live storage at the peak
    method: str
    unmodelled: tuple[str, ...]

    @property
    def lower_bound(self) -> bool:
        """True when some op's extra blocks are unknown, so the allocator holds at least this."""
        return bool(self.unmodelled)


@dataclass(frozen=True)
class MeasuredFallback:
    """When the model cannot run on fake tensors: real runs at small batches, scaled linearly."""

    reason: str  # why tracing failed
    batch_sizes: tuple[int, int]
    live_peaks_bytes: tuple[int, int]
    allocator_peaks_bytes: tuple[int, int]

    def live_at(self, batch_size: int) -> int:
        return _line(self.batch_sizes, self.live_peaks_bytes, batch_size)

    def allocator_at(self, batch_size: int) -> int:
        return _line(self.batch_sizes, self.allocator_peaks_bytes, batch_size)


def _line(xs: tuple[int, int], ys: tuple[int, int], x: int) -> int:
    return ys[0] + (ys[1] - ys[0]) * (x - xs[0]) // (xs[1] - xs[0])


@dataclass(frozen=True)
class MemoryReport:
    """Predicted memory of one step. `live_peak_bytes` is the live-storage peak; `breakdown` is
    what is alive at it, by category; `timeline` the whole step; `saved` what autograd keeps.

    When the model could not run on fake tensors, `fallback` says so and how the peak was
    measured and scaled instead; the per-tensor fields are then empty.
    """

    model: str
    spec: StepSpec
    batch_size: int
    live_peak_bytes: int
    peak: PeakOp | None
    breakdown: Breakdown
    timeline: Timeline | None
    saved: tuple[SavedRow, ...]
    allocator: AllocatorPeak | None
    forum: ForumRule | None
    ddp: DDPBuckets | None
    fallback: MeasuredFallback | None
    notes: tuple[str, ...]

    @property
    def allocator_peak_bytes(self) -> int:
        """The allocator-level peak (for a measured fallback, the measured ones extrapolated)."""
        if self.allocator is not None:
            return self.allocator.peak_bytes
        assert self.fallback is not None
        return self.fallback.allocator_at(self.batch_size)

    @property
    def saved_total_bytes(self) -> int:
        return sum(row.counted_bytes for row in self.saved)

    def saved_by_layer(self) -> tuple[SavedLayer, ...]:
        """`saved` grouped by layer, in forward order; layers that keep nothing new are left out."""
        layers: dict[str, list[SavedRow]] = {}
        sharing: dict[str, list[str]] = {}  # counting row -> rows that keep the same storage
        for row in self.saved:
            layers.setdefault(row.module, []).append(row)
            if row.shared_with:
                sharing.setdefault(row.shared_with, []).append(row.label)
        total = self.saved_total_bytes
        grouped = []
        for module, rows in layers.items():
            counted = sum(row.counted_bytes for row in rows)
            if not counted:
                continue
            grouped.append(
                SavedLayer(
                    module=module,
                    module_type=rows[0].module_type,
                    counted_bytes=counted,
                    share=counted / total if total else 0.0,
                    reasons=tuple(dict.fromkeys(row.reason for row in rows if row.counted_bytes)),
                    also_kept_by=tuple(
                        other for row in rows if row.counted_bytes for other in sharing.get(row.label, ()) if not other.startswith(f"{row.module or '(loss)'} ")
                    ),
                )
            )
        return tuple(grouped)


@dataclass(frozen=True)
class BatchScaling:
    """Peak at `level` = `fixed_bytes` + `per_sample_bytes` x batch, from exact predictions at
    `batch_sizes`, and checked by an exact prediction at `check_batch_size`."""

    level: str  # "live" or "allocator"
    batch_sizes: tuple[int, int]
    peaks_bytes: tuple[int, int]
    fixed_bytes: float
    per_sample_bytes: float
    check_batch_size: int
    check_peak_bytes: int

    @property
    def check_predicted_bytes(self) -> float:
        return self.fixed_bytes + self.per_sample_bytes * self.check_batch_size

    @property
    def linear(self) -> bool:
        """True when the check lands on the line: the peak is the same op at all three sizes."""
        return abs(self.check_predicted_bytes - self.check_peak_bytes) < 0.5


@dataclass(frozen=True)
class BatchFit:
    """The largest batch whose predicted peak at `level` fits `budget_bytes`: exact predictions at
    `batch_size` (fits) and `batch_size + 1` (does not); `predictions` counts the traces run."""

    level: str  # "live" or "allocator"
    budget_bytes: int
    batch_size: int
    peak_bytes: int
    next_peak_bytes: int
    predictions: int


# -- prediction -------------------------------------------------------------------------------

# Ops a model may run that fake tensors cannot answer: data-dependent values and shapes.
_NOT_TRACEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
    UnsupportedFakeTensorException,
)


def predict_memory(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int,
    model_name: str | None = None,
    **fields: Any,
) -> MemoryReport:
    """Predict the memory of one step of `model` at `batch_size`: a training step (the second,
    steady-state step of zero_grad, forward, cross-entropy, backward and `optimizer.step()`) or
    one inference, as `spec` describes it.

    Instead of a `StepSpec`, its fields may be given as keywords (`input_size=(1, 224, 224),
    optimizer="adam", amp="bf16"`); see `ninlab.analysis.step.StepSpec`.
    """
    spec = step_spec(spec, **fields)
    return _predict(model, spec, valid_batch_size(batch_size), model_name or type(model).__name__)


def _predict(model: nn.Module, spec: StepSpec, batch_size: int, name: str) -> MemoryReport:
    if spec.mode == "train" and not any(p.requires_grad for p in model.parameters()):
        raise NinlabError("the model has no trainable parameters, so a training step has nothing to update; predict mode='infer'")
    try:
        step = record_step(model, spec, batch_size)
    except _NOT_TRACEABLE as error:
        return _measured_report(model, spec, batch_size, name, error)
    except RuntimeError as error:  # the model itself rejects the batch: wrong channels, rank or output
        reason = str(error).strip().splitlines()[0]
        size = "x".join(map(str, spec.input_size))
        raise NinlabError(
            f"the model cannot run a {spec.mode} step on a batch of {size} inputs ({reason}); give the "
            "input size it expects, channels first (training also needs (batch, classes) logits for cross-entropy)"
        ) from None
    module_types = {qualified: type(module).__name__ for qualified, module in model.named_modules()}
    categories = _categorize(step)
    buckets = _ddp_buckets(step, spec.ddp) if spec.ddp else None
    replay = _replay(step, categories, buckets)
    timeline = replay.timeline
    if not timeline.points:
        raise NinlabError("the model ran no op on its input; there is no step to predict memory for")
    breakdown = timeline.points[replay.live_peak].alive
    op = step.recording.ops[step.step_start + replay.live_peak]
    peak = PeakOp(replay.live_peak, op.op, op.phase, op.module, module_types.get(op.module, ""), op.autograd_node)
    saved = _saved_rows(step, categories, module_types) if spec.mode == "train" else ()
    return MemoryReport(
        model=name,
        spec=spec,
        batch_size=batch_size,
        live_peak_bytes=breakdown.total_bytes,
        peak=peak,
        breakdown=breakdown,
        timeline=timeline,
        saved=saved,
        allocator=_allocator_peak(step, replay, module_types),
        forum=_forum_rule(model, step, breakdown, saved),
        ddp=buckets,
        fallback=None,
        notes=(),
    )


def _categorize(step: StepRecording) -> dict[int, int]:
    """Storage key -> index into CATEGORIES, for every storage alive at or after the step's start."""
    storages = step.recording.storages
    start = step.step_start
    saved = {s.storage_key for s in step.recording.saved_for_backward}
    state = set(step.optimizer_state_keys)
    gradients = set(step.gradient_keys.values())
    # train_step's locals (logits, loss) die when it returns, so what the warm-up step leaves
    # alive besides optimizer state is its parameters' gradients.
    for record in storages.values():
        survives = record.freed_after is None or record.freed_after >= start
        if record.phase == "warm-up" and survives and record.key not in state:
            gradients.add(record.key)
    roles = {"parameter": "parameters", "buffer": "buffers", "input": "input", "targets": "targets"}
    index = {name: i for i, name in enumerate(CATEGORIES)}
    phases = {"forward": "forward_temporaries", "loss": "forward_temporaries", "backward": "backward_temporaries", "optimizer": "optimizer_temporaries"}
    categories: dict[int, int] = {}
    for key, record in storages.items():
        if record.freed_after is not None and record.freed_after < start:
            continue
        if record.role in roles:
            name = roles[record.role]
        elif key in gradients:
            name = "gradients"
        elif key in state:
            name = "optimizer_state"
        elif key in saved:
            name = "saved_for_backward"
        else:
            name = phases.get(record.phase, "other")
        categories[key] = index[name]
    return categories


def _replay(step: StepRecording, categories: dict[int, int], buckets: DDPBuckets | None) -> _Replay:
    """Walk the step's ops, adding each storage's bytes when its op runs and removing them after
    the op it died after, at both levels (see `AllocatorPeak` for the allocator's)."""
    ops = step.recording.ops
    start = step.step_start
    storages = step.recording.storages
    cuda = step.spec.device_type == "cuda"
    born: dict[int, list[int]] = {}
    died: dict[int, list[int]] = {}
    counts = [0] * len(CATEGORIES)
    blocks = 0  # CUDA: the same storages as caching-allocator blocks
    gradients = CATEGORIES.index("gradients")
    as_views = buckets is not None and buckets.gradient_as_bucket_view
    if buckets is not None:
        counts[CATEGORIES.index("ddp_buckets")] = buckets.total_bytes
        blocks += sum(cuda_fresh_block_bytes(nbytes) for nbytes in buckets.bucket_bytes)
    for key, category in categories.items():
        record = storages[key]
        freed_after = record.freed_after
        if as_views and category == gradients:
            if record.created_at < start:
                continue  # the previous step's gradients were views into the buckets
            freed_after = record.created_at  # copied into its bucket as soon as it is ready
        if record.created_at < start:
            counts[category] += record.nbytes
            blocks += cuda_fresh_block_bytes(record.nbytes) if cuda else 0
        else:
            born.setdefault(record.created_at, []).append(key)
        if freed_after is not None:
            died.setdefault(freed_after, []).append(key)
    start_breakdown = Breakdown.from_counts(counts)
    points: list[TimelinePoint] = []
    phases: list[PhaseSpan] = []
    live_best = allocator_best = 0
    live_best_bytes = allocator_best_bytes = -1
    for position, op in enumerate(ops[start:]):
        index = start + position
        before = sum(counts)
        for key in born.get(index, ()):
            nbytes = storages[key].nbytes
            counts[categories[key]] += nbytes
            blocks += cuda_fresh_block_bytes(nbytes) if cuda else 0
        total = sum(counts)
        if cuda:
            allocator = blocks
        elif op.cpu_allocations:
            # The kernel's own blocks come and go inside the op: its high point is what was
            # alive before it plus the most it held at once.
            allocator = max(total, before + peak_above_start_bytes(op.cpu_allocations))
        else:
            allocator = total
        if total > live_best_bytes:
            live_best, live_best_bytes = position, total
        if allocator > allocator_best_bytes:
            allocator_best, allocator_best_bytes = position, allocator
        points.append(TimelinePoint(position, op.op, op.phase, op.module, Breakdown.from_counts(counts), allocator))
        if phases and phases[-1].phase == op.phase:
            phases[-1] = PhaseSpan(op.phase, phases[-1].first_op, position)
        else:
            phases.append(PhaseSpan(op.phase, position, position))
        for key in died.get(index, ()):
            nbytes = storages[key].nbytes
            counts[categories[key]] -= nbytes
            blocks -= cuda_fresh_block_bytes(nbytes) if cuda else 0
    return _Replay(Timeline(start_breakdown, tuple(points), tuple(phases)), live_best, allocator_best)


@dataclass(frozen=True)
class _Replay:
    timeline: Timeline
    live_peak: int  # positions in the timeline
    allocator_peak: int


def _allocator_peak(step: StepRecording, replay: _Replay, module_types: dict[str, str]) -> AllocatorPeak:
    point = replay.timeline.points[replay.allocator_peak]
    live = point.total_bytes
    cuda = step.spec.device_type == "cuda"
    unmodelled: dict[str, int] = {}
    if not cuda:
        for op in step.recording.ops[step.step_start :]:
            if op.cpu_unmodelled:
                note = f"{op.op}: {op.cpu_unmodelled}"
                unmodelled[note] = unmodelled.get(note, 0) + 1
    return AllocatorPeak(
        peak_bytes=point.allocator_bytes,
        step_op=point.step_op,
        op=point.op,
        phase=point.phase,
        module=point.module,
        module_type=module_types.get(point.module, ""),
        live_bytes=live,
        workspace_bytes=0 if cuda else point.allocator_bytes - live,
        rounding_bytes=point.allocator_bytes - live if cuda else 0,
        method=_CUDA_METHOD if cuda else _CPU_METHOD,
        unmodelled=tuple(f"{note} ({count}x)" for note, count in unmodelled.items()),
    )


_CPU_METHOD = (
    "CPU allocator: live storage plus the blocks kernels allocate for themselves inside an op "
    "(oneDNN's blocked copies of inputs, weights and results; batch norm's temporaries), from "
    "ninlab.analysis.allocator's per-op rules"
)
_CUDA_METHOD = (
    "CUDA caching allocator: every storage as the block it occupies (rounded up to 512 bytes; "
    "a large block that leaves at most 1 MiB of its segment gets the whole segment), as "
    "max_memory_allocated counts them; cuDNN workspaces and the CUDA context are not included"
)


def _saved_rows(step: StepRecording, categories: dict[int, int], module_types: dict[str, str]) -> tuple[SavedRow, ...]:
    storages = step.recording.storages
    saved_category = CATEGORIES.index("saved_for_backward")
    entries = step.recording.saved_for_backward
    # A storage two nodes keep is counted once: at the node whose own output it is (a ReLU's
    # `result`, which the next conv keeps as its `input`), else at the first in forward order.
    def rank(position: int) -> tuple[bool, int]:
        return not entries[position].field.startswith("result"), position

    owner: dict[int, int] = {}
    for position, entry in enumerate(entries):
        if entry.storage_key not in owner or rank(position) < rank(owner[entry.storage_key]):
            owner[entry.storage_key] = position
    counted_total = sum(
        storages[key].nbytes for key in owner if categories.get(key) == saved_category
    )
    rows = []
    for position, entry in enumerate(entries):
        record = storages[entry.storage_key]
        category = CATEGORIES[categories.get(entry.storage_key, saved_category)]
        first = owner[entry.storage_key]
        counted = record.nbytes if position == first and category == "saved_for_backward" else 0
        shared_with = ""
        if position != first:
            other = entries[first]
            shared_with = f"{other.module or '(loss)'} {other.node}.{other.field}"  # SavedRow.label
        # The loss runs outside every module; the targets are only the loss's.
        in_loss = record.phase == "loss" or record.role == "targets"
        module_type = "loss" if in_loss else module_types.get(entry.module, "")
        rows.append(
            SavedRow(
                module=entry.module,
                module_type=module_type,
                node=entry.node,
                field=entry.field,
                reason=saved_reason(entry.node, entry.field, module_type=module_type),
                shape=record.shape,
                dtype=str(record.dtype).removeprefix("torch."),
                storage_bytes=record.nbytes,
                counted_bytes=counted,
                share=counted / counted_total if counted_total else 0.0,
                category=category,
                shared_with=shared_with,
            )
        )
    return tuple(rows)


def _forum_rule(model: nn.Module, step: StepRecording, breakdown: Breakdown, saved: Sequence[SavedRow]) -> ForumRule:
    modules = dict(model.named_modules())
    storages = step.recording.storages
    input_record = storages[step.input_key]
    layers: list[tuple[int, bool]] = [(input_record.nbytes, False)]  # (bytes, is dropout)
    for name, outputs in step.recording.module_outputs.items():
        module = modules.get(name)
        if module is None or any(True for _ in module.children()):
            continue
        if type(module).__module__ == "torch.nn.modules.activation":
            continue  # the post counts a conv and its ReLU as one layer
        nbytes = sum(prod(shape) * dtype.itemsize for shape, dtype in outputs)
        layers.append((nbytes, isinstance(module, nn.modules.dropout._DropoutNd)))
    activations = sum(nbytes for nbytes, _ in layers)
    parameters = sum(record.nbytes for record in storages.values() if record.role == "parameter")
    kept = [nbytes for nbytes, dropout in layers if not dropout]
    pair = max((a + b for a, b in pairwise(kept)), default=kept[0] if kept else 0)
    train = 2 * activations + 3 * parameters
    infer = parameters + pair
    rule = train if step.spec.mode == "train" else infer
    indices = sum(row.counted_bytes for row in saved if row.dtype == "int64")
    return ForumRule(
        activations, parameters, pair, train, infer, rule, rule / breakdown.total_bytes,
        breakdown.backward_temporaries_bytes, indices,
    )



def _ddp_buckets(step: StepRecording, spec: DDPSpec) -> DDPBuckets:
    """Buckets as DDP's reducer rebuilds them after the first iteration: parameters in the order
    backward accumulated their gradients (its autograd hooks fire then), grouped by torch's own
    `_compute_bucket_assignment_by_size`."""
    import torch.distributed as dist

    if not dist.is_available():
        raise NinlabError("this PyTorch build has no torch.distributed, so DDP's buckets cannot be laid out; drop --ddp")
    mib = 1024 * 1024
    # _BucketCapacityConfig in torch/nn/parallel/distributed.py: the default cap is 25 MiB with a
    # 1 MiB first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES); a cap the user sets applies to all.
    cap = int((25 if spec.bucket_cap_mb is None else spec.bucket_cap_mb) * mib)
    first_cap = dist._DEFAULT_FIRST_BUCKET_BYTES if spec.bucket_cap_mb is None else cap
    storages = step.recording.storages
    params = [storages[step.parameter_keys[name]] for name in step.gradient_order]
    tensors = [torch.empty(record.shape, dtype=record.dtype, device="meta") for record in params]
    groups, _ = dist._compute_bucket_assignment_by_size(tensors, [first_cap, cap], [False] * len(tensors))
    sizes = tuple(sum(params[i].nbytes for i in group) for group in groups)
    return DDPBuckets(sizes, first_cap, cap, spec.gradient_as_bucket_view)


def _measured_report(model: nn.Module, spec: StepSpec, batch_size: int, name: str, error: Exception) -> MemoryReport:
    """The model does something fake tensors cannot (a value-dependent branch, a data-dependent
    shape): measure it for real at batch 1 and 2 on this machine and extrapolate linearly."""
    from ninlab.analysis.measure import measure

    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if spec.device_type == "cuda" and not torch.cuda.is_available():
        raise NinlabError(
            f"the model cannot run on fake tensors ({reason}), and measuring it instead needs a GPU "
            "this machine lacks; predict for --device-type cpu or run on a machine with CUDA"
        )
    if spec.ddp is not None:
        trainable = sum(
            p.numel() * (spec.dtype.itemsize if p.is_floating_point() else p.element_size())
            for p in model.parameters()
            if p.requires_grad
        )
        raise NinlabError(
            f"the model cannot run on fake tensors ({reason}), so DDP's buckets cannot be laid out; "
            f"predict without DDP and add one copy of the trainable parameters, {trainable:,} bytes, per rank"
        )
    sizes = (1, 2)
    measured = [measure(model, spec, batch_size=size) for size in sizes]
    fallback = MeasuredFallback(
        reason,
        sizes,
        (measured[0].live_peak_bytes, measured[1].live_peak_bytes),
        (measured[0].allocator_peak_bytes, measured[1].allocator_peak_bytes),
    )
    per_sample = fallback.live_at(2) - fallback.live_at(1)
    note = (
        f"the model cannot run on fake tensors ({reason}); measured for real at batch 1 and 2 on "
        f"this machine and extrapolated linearly ({format_bytes(fallback.live_at(0))} fixed + "
        f"{format_bytes(per_sample)} per sample): no per-tensor breakdown"
    )
    return MemoryReport(
        model=name,
        spec=spec,
        batch_size=batch_size,
        live_peak_bytes=fallback.live_at(batch_size),
        peak=None,
        breakdown=Breakdown(),
        timeline=None,
        saved=(),
        allocator=None,
        forum=None,
        ddp=None,
        fallback=fallback,
        notes=(note,),
    )


# -- batch size -------------------------------------------------------------------------------


def memory_vs_batch(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_sizes: tuple[int, int] = (64, 128),
    check_batch_size: int = 256,
    level: Level = "live",
    **fields: Any,
) -> BatchScaling:
    """The peak (live storage, or what the allocator holds) as fixed + per-sample bytes, from
    exact predictions at two batch sizes, checked at a third (`linear`: it lands on the line)."""
    spec = step_spec(spec, **fields)
    first, second = (valid_batch_size(b) for b in batch_sizes)
    if first == second:
        raise NinlabError(f"memory vs batch needs two different batch sizes, got {first} twice")
    level = _level(level)
    peaks = (_peak(model, spec, first, level), _peak(model, spec, second, level))
    per_sample = (peaks[1] - peaks[0]) / (second - first)
    fixed = peaks[0] - per_sample * first
    check = valid_batch_size(check_batch_size)
    return BatchScaling(level, (first, second), peaks, fixed, per_sample, check, _peak(model, spec, check, level))


def _peak(model: nn.Module, spec: StepSpec, batch_size: int, level: Level) -> int:
    report = _predict(model, spec, batch_size, "")
    return report.allocator_peak_bytes if level == "allocator" else report.live_peak_bytes


def _level(level: str) -> Level:
    if level not in ("live", "allocator"):
        raise NinlabError(f"memory level must be 'live' or 'allocator', not {level!r}")
    return level  # type: ignore[return-value]


def fit_batch(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    budget: int | str,
    level: Level = "allocator",
    max_batch_size: int = 1 << 24,
    **fields: Any,
) -> BatchFit:
    """The largest batch whose predicted peak fits `budget` (bytes, or text such as "8GiB",
    "500MB", "1.5 GiB"). The answer is found by exact predictions, extrapolation only proposing
    where to look: the result holds the exact peaks at the answer (fits) and the next size (does
    not). `level` "allocator" (the default) fits what the allocator holds, which is what runs
    out; "live" fits tensor storage alone."""
    level = _level(level)
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    if budget_bytes < 1:
        raise NinlabError(f"memory budget must be positive, got {budget_bytes} bytes")
    spec = step_spec(spec, **fields)
    known: dict[int, int] = {}

    def peak(batch_size: int) -> int:
        if batch_size not in known:
            known[batch_size] = _peak(model, spec, batch_size, level)
        return known[batch_size]

    if peak(1) > budget_bytes:
        raise NinlabError(
            f"budget {budget_bytes:,} bytes ({format_bytes(budget_bytes)}) is too small for batch 1, which needs "
            f"{peak(1):,} bytes ({format_bytes(peak(1))} at the {level} level): {peak(1) - budget_bytes:,} bytes more"
        )

    def fits(batch_size: int) -> bool:
        return peak(batch_size) <= budget_bytes

    # Newton steps on the exact peak: the slope between a batch and the next is the per-sample
    # cost where the peak is, so once a guess lands in the answer's linear stretch the next is exact.
    batch_size = 1
    for _ in range(4):
        slope = peak(batch_size + 1) - peak(batch_size)
        if slope <= 0:
            break
        batch_size = min(max(batch_size + (budget_bytes - peak(batch_size)) // slope, 1), max_batch_size)
        if fits(batch_size) and (batch_size == max_batch_size or not fits(batch_size + 1)):
            break
    # Where the steps did not settle (the peak moved to another op), bisect between the largest
    # size known to fit and the smallest known not to.
    low = max(b for b in known if fits(b))
    high = min((b for b in known if not fits(b)), default=max_batch_size + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    if low == max_batch_size:
        raise NinlabError(
            f"budget {format_bytes(budget_bytes)} fits even batch {max_batch_size:,}; "
            "raise max_batch_size if you mean it"
        )
    return BatchFit(level, budget_bytes, low, peak(low), peak(low + 1), len(known))


# -- batch size against a budget ----------------------------------------------------------------


@dataclass(frozen=True)
class BatchStudy:
    """The largest batch that fits a budget, and the peak's line measured around it."""

    fit: BatchFit
    scaling: BatchScaling


def study_batch(model: nn.Module, spec: StepSpec | None = None, *, budget: int | str, **fields: Any) -> BatchStudy:
    """`fit_batch`, then `memory_vs_batch` at a quarter, half and three quarters of the answer, so
    the line is measured where the question is; both count what the allocator holds, which is
    what runs out."""
    spec = step_spec(spec, **fields)
    fit = fit_batch(model, spec, budget=budget, level="allocator")
    quarter = max(1, fit.batch_size // 4)
    half = max(quarter + 1, fit.batch_size // 2)
    three_quarters = max(half + 1, 3 * fit.batch_size // 4)
    scaling = memory_vs_batch(
        model, spec, batch_sizes=(quarter, half), check_batch_size=three_quarters, level="allocator"
    )
    return BatchStudy(fit, scaling)
