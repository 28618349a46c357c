"""What a memory prediction returns: frozen dataclasses, each figure saying what it includes.

`ninlab.analysis.predict.predict_memory` fills a `MemoryReport`: the live-storage peak and what is
alive at it by category (`Breakdown`, the categories from `ninlab.analysis.categories`), the op
where it is reached (`PeakOp`), the whole step op by op (`Timeline`), what autograd keeps and why
(`SavedRow`, `SavedLayer`), the allocator's level (`AllocatorPeak`), the forum's rule of thumb
beside it (`ForumRule`), DDP's buckets (`DDPBuckets`) and, for a model fake tensors cannot run,
how it was measured instead (`MeasuredFallback`). The types live apart from prediction so that
renderers and charts can read a report without importing the code that makes one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from ninlab.analysis.categories import CATEGORIES
from ninlab.analysis.step import StepSpec
from ninlab.errors import NinlabError

__all__ = [
    "ALLOCATOR_TOLERANCE",
    "EXACT",
    "LOSS_TYPE",
    "TRUST_KINDS",
    "AllocatorPeak",
    "Breakdown",
    "CudaMemory",
    "DDPBuckets",
    "ForumRule",
    "MeasuredFallback",
    "MemoryReport",
    "PeakOp",
    "PhaseSpan",
    "SavedLayer",
    "SavedRow",
    "Timeline",
    "TimelinePoint",
    "Trust",
    "Verification",
    "layer_label",
]

# The module type of what the loss keeps: it runs outside every module of the model.
LOSS_TYPE = "loss"


def layer_label(module: str, module_type: str) -> str:
    """A layer as the saved-tensor tables name it: its qualified name; the root module's own code
    (a `torch.flatten` or `F.relu` in the model's `forward`) "(model)", as the summary names the
    root; what the loss keeps "(loss)". Both have the qualified name ""."""
    if module:
        return module
    return "(loss)" if module_type == LOSS_TYPE else "(model)"


@dataclass(frozen=True)
class Breakdown:
    """Bytes alive per category (see `CATEGORY_MEANINGS`) at one moment; each storage counted
    once."""

    parameters_bytes: int = 0
    buffers_bytes: int = 0
    input_bytes: int = 0
    targets_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_state_bytes: int = 0
    ddp_buckets_bytes: int = 0
    saved_for_backward_bytes: int = 0
    recomputed_bytes: int = 0
    forward_temporaries_bytes: int = 0
    backward_temporaries_bytes: int = 0
    optimizer_temporaries_bytes: int = 0
    other_bytes: int = 0

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> Breakdown:
        """From bytes in `CATEGORIES` order, each to its category's field by name."""
        return cls(**dict(zip(_FIELDS, counts, strict=True)))

    @property
    def total_bytes(self) -> int:
        return sum(self.counts())

    def counts(self) -> tuple[int, ...]:
        """Bytes in `CATEGORIES` order."""
        return _COUNTS(self)

    def of(self, category: str) -> int:
        if category not in CATEGORIES:
            raise NinlabError(
                f"unknown memory category {category!r}; choose one of {', '.join(CATEGORIES)}"
            )
        return int(getattr(self, f"{category}_bytes"))


_FIELDS = tuple(f"{name}_bytes" for name in CATEGORIES)
# Read once per op of a timeline (its totals): one getter of all the fields, in order.
_COUNTS = attrgetter(*_FIELDS)


@dataclass(frozen=True)
class PeakOp:
    """The op during which the peak is reached: its outputs exist, nothing it leaves dead is
    freed yet."""

    step_op: int  # position among the analysed step's ops (0 = the step's first op)
    op: str  # aten op, e.g. "aten.threshold_backward.default"
    phase: str  # zero_grad, forward, loss, backward or optimizer
    module: (
        str  # qualified module name ("": the root module's own code, or code outside any module)
    )
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
    def layer(self) -> str:
        return layer_label(self.module, self.module_type)

    @property
    def label(self) -> str:
        """The row as `shared_with` names rows: "layer node.field" (the layer as `layer_label`)."""
        return f"{self.layer} {self.node}.{self.field}"


@dataclass(frozen=True)
class SavedLayer:
    """What one layer keeps for backward: its rows' `counted_bytes` together, and why."""

    module: str
    module_type: str
    counted_bytes: int
    share: float
    reasons: tuple[str, ...]  # each distinct reason of its rows that count bytes
    # Rows elsewhere that keep one of the same storages (the next conv keeping a ReLU's output as
    # its input), as "layer node.field": counted here, once.
    also_kept_by: tuple[str, ...]

    @property
    def layer(self) -> str:
        return layer_label(self.module, self.module_type)


@dataclass(frozen=True)
class ForumRule:
    """The d2l forum reader's estimate (seed-forum-post.txt), computed for this model.

    Activations, as in the post: the input plus every layer's output, where a convolution and the
    activation function after it are one layer (activation modules from
    `torch.nn.modules.activation` are not counted separately), dropout and flatten included.
    Parameters: all of them, biases included (the post forgot the biases). Training: 2 x
    activations + 3 x parameters. Inference: parameters + the largest sum of two consecutive
    activations, dropout skipped (the post: "we also don't need the Dropout ACTIVS").
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
    layouts; batch norm keeps temporaries); `ninlab.analysis.allocator` gives them per op, and an
    op's high point is what was alive before it plus the most it held at once. CUDA: the blocks the
    caching allocator hands out, simulated (`max_memory_allocated` counts blocks, not bytes; what
    it reserves is in `MemoryReport.cuda`). `method`
    states the rules; `unmodelled` lists the ops whose extra blocks are not known, `measured`
    those no rule knows, measured one call at a time on this CPU (`ninlab.analysis.kernel_probe`).
    """

    peak_bytes: int
    step_op: int
    op: str
    phase: str
    module: str
    module_type: str
    live_bytes: int  # tensor storage alive at that op (its outputs included)
    workspace_bytes: int  # CPU: kernel blocks beyond the live storage at the peak
    rounding_bytes: int  # CUDA: what blocks add to the live storage at the peak (512-byte
    # rounding, and blocks handed out whole when too little is left to split off)
    method: str
    unmodelled: tuple[str, ...]
    measured: tuple[str, ...] = ()

    @property
    def lower_bound(self) -> bool:
        """True when some op's extra blocks are unknown, so the allocator holds at least this."""
        return bool(self.unmodelled)


@dataclass(frozen=True)
class CudaMemory:
    """A CUDA step through the caching allocator (`ninlab.analysis.cuda_allocator`), as
    `torch.cuda` reports the steady step after `reset_peak_memory_stats()`, and what the process
    needs beyond it.

    `max_reserved_bytes` is what the allocator holds from the device (its segments), which is what
    runs out; `max_allocated_bytes` the blocks handed out at the peak (each request rounded to 512
    bytes, a block too small to split counted whole). The CUDA context comes on top, stated as a
    range with its source; `cudnn_workspace` says how cuDNN's workspace is handled.
    """

    max_allocated_bytes: int
    max_reserved_bytes: int
    small_segments: int  # 2 MiB each
    large_segments: int
    large_reserved_bytes: int
    context_bytes: tuple[int, int]  # (low, high)
    context_source: str
    cudnn_workspace: str

    @property
    def process_bytes(self) -> tuple[int, int]:
        """What the process needs on the device: the reserved peak and the context, low and high."""
        low, high = self.context_bytes
        return self.max_reserved_bytes + low, self.max_reserved_bytes + high


# What a figure is, from the most to the least certain (`Trust.kind`).
TRUST_KINDS = ("exact", "measured", "at least", "estimate")


@dataclass(frozen=True)
class Trust:
    """What one memory figure is, said with it wherever it is shown.

    "exact": predicted op by op from the recorded step; "measured": run for real at this batch on
    this machine (a step fake tensors cannot run); "at least": a lower bound, `reasons` says which
    kernels' blocks are unknown; "estimate": a line through the peaks measured at `batch_sizes`
    (where the peak is in `phase`), not measured at this batch, so with no error claimed: the
    misses of such a line at the other batches measured say nothing of its miss here (an MLP's
    line through batches 8 and 16 missed 2 and 4 by 15-24% and batch 100 by 3%, a LSTM's missed
    batch 40 by the opposite sign of its misses below); or, with no batches, a prediction whose
    program may differ from the real run's (`reasons`).
    """

    kind: str
    reasons: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    phase: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TRUST_KINDS:
            raise NinlabError(f"unknown trust kind {self.kind!r}; one of {', '.join(TRUST_KINDS)}")

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def words(self) -> str:
        """The kind in words, with what it rests on: "exact", "at least (...)", "estimate, ..."."""
        if self.kind == "exact":
            return "exact"
        if self.kind == "measured":
            return f"measured at batch {self.batch_sizes[0]} on this machine"
        if self.kind == "at least":
            return f"at least: {'; '.join(self.reasons)}"
        if not self.batch_sizes:  # not measured: an estimate for the reasons given
            return f"estimate: {'; '.join(self.reasons)}"
        batches = " and ".join(str(b) for b in self.batch_sizes)
        where = f"where the peak is in {self.phase}" if self.phase else ""
        line = f"estimate, a line through batches {batches} measured on this machine {where}"
        unchecked = "not measured at this batch, so its error is unknown (measure it there)"
        return "; ".join([line.strip(), unchecked, *self.reasons])


EXACT = Trust("exact")


@dataclass(frozen=True)
class MeasuredFallback:
    """When the step cannot run on fake tensors: real runs at `batch_sizes` on this machine, and
    the peak's phase at each (the measurer's), at both levels. A batch measured is its
    measurement; any other is an estimate from a line through the two measured batches nearest it
    whose peak is in the same phase as at the measured batch just above it (the largest one,
    beyond them all), because a line through batches where the peak is elsewhere (the optimizer's
    state at batch 1, backward at 64) misses by a fifth and more."""

    reason: str  # why tracing failed
    batch_sizes: tuple[int, ...]
    live_peaks_bytes: tuple[int, ...]
    live_phases: tuple[str, ...]
    allocator_peaks_bytes: tuple[int, ...]
    allocator_phases: tuple[str, ...]

    def live_at(self, batch_size: int) -> int:
        return self.at("live", batch_size)[0]

    def allocator_at(self, batch_size: int) -> int:
        return self.at("allocator", batch_size)[0]

    def at(self, level: str, batch_size: int) -> tuple[int, Trust]:
        """The peak at `level` ("live" or "allocator") at `batch_size`, and what it is."""
        peaks, phases = (
            (self.live_peaks_bytes, self.live_phases)
            if level == "live"
            else (self.allocator_peaks_bytes, self.allocator_phases)
        )
        sizes = self.batch_sizes
        if batch_size in sizes:
            return peaks[sizes.index(batch_size)], Trust("measured", batch_sizes=(batch_size,))
        if len(sizes) < 2:
            raise NinlabError(
                f"a step measured at batch {sizes[0]} alone cannot be scaled to batch "
                f"{batch_size}; measure it at that batch"
            )
        above = [i for i, size in enumerate(sizes) if size > batch_size]
        reference = above[0] if above else len(sizes) - 1
        phase = phases[reference]
        same = sorted(
            (i for i in range(len(sizes)) if phases[i] == phase),
            key=lambda i: abs(sizes[i] - batch_size),
        )
        reasons: tuple[str, ...] = ()
        if len(same) < 2:
            other = reference - 1 if reference else reference + 1
            same = [reference, other]
            reasons = (
                (
                    f"the peak is in {phases[other]} at batch {sizes[other]} and in {phase} at "
                    f"batch {sizes[reference]}: the line crosses phases"
                ),
            )
        first, second = sorted(same[:2])
        points = (sizes[first], sizes[second]), (peaks[first], peaks[second])
        return _line(*points, batch_size), Trust("estimate", reasons, points[0], phase)


def _line(xs: tuple[int, int], ys: tuple[int, int], x: int) -> int:
    return ys[0] + (ys[1] - ys[0]) * (x - xs[0]) // (xs[1] - xs[0])


@dataclass(frozen=True)
class Verification:
    """The step run for real at `batch_size` on this machine (`ninlab.analysis.verify`) beside
    the prediction at that batch, at both levels. `verified`: the live peak is equal and the
    allocator's within `ALLOCATOR_TOLERANCE` (or, where the prediction is a lower bound, below
    the measurement); otherwise `words` says by how much and at which op."""

    batch_size: int
    predicted_live_bytes: int
    measured_live_bytes: int
    predicted_allocator_bytes: int
    measured_allocator_bytes: int
    allocator_lower_bound: bool
    predicted_live_place: str  # "op in phase"
    measured_live_place: str
    predicted_allocator_place: str
    measured_allocator_place: str

    @property
    def live_ok(self) -> bool:
        return self.predicted_live_bytes == self.measured_live_bytes

    @property
    def allocator_ok(self) -> bool:
        predicted, measured = self.predicted_allocator_bytes, self.measured_allocator_bytes
        if self.allocator_lower_bound and predicted <= measured:
            return True
        return abs(predicted - measured) <= ALLOCATOR_TOLERANCE * measured

    @property
    def verified(self) -> bool:
        return self.live_ok and self.allocator_ok

    def words(self) -> str:
        if self.verified:
            return (
                f"verified at batch {self.batch_size} on this machine: live peak "
                f"{self.measured_live_bytes:,} bytes predicted and measured, allocator peak "
                f"{self.predicted_allocator_bytes:,} predicted, {self.measured_allocator_bytes:,} "
                "measured"
            )
        offs = []
        for level, ok, predicted, measured, place, measured_place in (
            (
                "live",
                self.live_ok,
                self.predicted_live_bytes,
                self.measured_live_bytes,
                self.predicted_live_place,
                self.measured_live_place,
            ),
            (
                "allocator",
                self.allocator_ok,
                self.predicted_allocator_bytes,
                self.measured_allocator_bytes,
                self.predicted_allocator_place,
                self.measured_allocator_place,
            ),
        ):
            if not ok:
                offs.append(
                    f"{level} off by {predicted - measured:+,} bytes "
                    f"({predicted / measured - 1:+.2%}: predicted {predicted:,} at {place}, "
                    f"measured {measured:,} at {measured_place})"
                )
        return f"NOT verified at batch {self.batch_size} on this machine: " + "; ".join(offs)


# How far the allocator level may be from the measurement and still be verified: the corpus's
# bar, since oneDNN's scratchpads move by a few blocks between runs.
ALLOCATOR_TOLERANCE = 0.01


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
    cuda: CudaMemory | None = None  # a CUDA step: the caching allocator simulated
    # The step run for real at a small batch beside the prediction there
    # (`ninlab.analysis.verify.verified`).
    verification: Verification | None = None
    # Why the recorded program may not be the one that runs: a library's decision by context the
    # trace could not take as the real run does (`ninlab.analysis.hugging_face.unreproduced`), a
    # backward formula that chooses by values or runs otherwise on fake tensors
    # (`ninlab.analysis.recorder.unfollowed_formulas`).
    unreproduced: tuple[str, ...] = ()

    @property
    def allocator_peak_bytes(self) -> int:
        """The allocator-level peak (for a measured fallback, measured or estimated from
        measurements: `allocator_trust` says which)."""
        if self.allocator is not None:
            return self.allocator.peak_bytes
        assert self.fallback is not None
        return self.fallback.allocator_at(self.batch_size)

    @property
    def live_trust(self) -> Trust:
        """What `live_peak_bytes` is: exact, or measured or estimated for a step fake tensors
        cannot run."""
        if self.fallback is not None:
            return self.fallback.at("live", self.batch_size)[1]
        if self.unreproduced:
            return Trust("estimate", self.unreproduced)
        return EXACT

    @property
    def allocator_trust(self) -> Trust:
        """What `allocator_peak_bytes` (and `held_peak_bytes`) is: exact; at least, where some
        kernel's blocks are unknown (`AllocatorPeak.unmodelled`: the reasons); or measured or
        estimated for a step fake tensors cannot run."""
        if self.fallback is not None:
            return self.fallback.at("allocator", self.batch_size)[1]
        if self.unreproduced:
            return Trust("estimate", self.unreproduced)
        if self.allocator is not None and self.allocator.lower_bound:
            return Trust("at least", self.allocator.unmodelled)
        return EXACT

    @property
    def held_peak_bytes(self) -> int:
        """What the allocator holds from the device at its peak, which is what runs out: on CUDA
        the caching allocator's reserved segments, elsewhere the allocator level."""
        return self.cuda.max_reserved_bytes if self.cuda is not None else self.allocator_peak_bytes

    @property
    def saved_total_bytes(self) -> int:
        return sum(row.counted_bytes for row in self.saved)

    def saved_by_layer(self) -> tuple[SavedLayer, ...]:
        """`saved` grouped by layer, in forward order; layers that keep nothing new are left out."""
        # By layer label: the root module's own code and the loss share the qualified name "".
        layers: dict[str, list[SavedRow]] = {}
        sharing: dict[str, list[str]] = {}  # counting row -> rows that keep the same storage
        for row in self.saved:
            layers.setdefault(row.layer, []).append(row)
            if row.shared_with:
                sharing.setdefault(row.shared_with, []).append(row.label)
        total = self.saved_total_bytes
        grouped = []
        for layer, rows in layers.items():
            counted = sum(row.counted_bytes for row in rows)
            if not counted:
                continue
            grouped.append(
                SavedLayer(
                    module=rows[0].module,
                    module_type=rows[0].module_type,
                    counted_bytes=counted,
                    share=counted / total if total else 0.0,
                    reasons=tuple(dict.fromkeys(row.reason for row in rows if row.counted_bytes)),
                    also_kept_by=tuple(
                        other
                        for row in rows
                        if row.counted_bytes
                        for other in sharing.get(row.label, ())
                        if not other.startswith(f"{layer} ")
                    ),
                )
            )
        return tuple(grouped)
