"""How much memory one training step or one inference needs, and why, tensor by tensor.

`predict_memory` runs the real step (`ninlab.analysis.step`) once on fake tensors
(`ninlab.analysis.trace.record_step`: shapes and dtypes, no data) and replays what it recorded:
every tensor storage, the op that made it and the op after which it died. Adding and removing
each storage's bytes op by op gives the live-storage curve of the step; its maximum is the peak.
Nothing is allocated, so NiN at batch 128 takes milliseconds, and every figure is tied to a
tensor: which layer made it, and why autograd keeps it.

What is counted (the steady state of training, the second step, when optimizer state exists):
what is alive when the step starts (parameters, buffers, the input batch and targets, the
previous step's gradients until `zero_grad(set_to_none=True)` frees them, optimizer state), and
everything the step allocates while it is alive. Each storage counts once, however many views of
it exist; its size is its real size in bytes (`untyped_storage().nbytes()`). This is the level
PyTorch's own `MemTracker` counts, and what `ninlab.analysis.measure` measures on real tensors.

Categories: every storage belongs to exactly one, checked in the order of `CATEGORIES`; see
`ninlab.analysis.categories`. The result types are in `ninlab.analysis.memory_report`, batch
sizes (the peak against the batch, the largest batch that fits) in `ninlab.analysis.batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import groupby, pairwise
from math import prod
from typing import Any

import torch
from torch import nn

from ninlab.analysis.allocator import peak_above_start_bytes
from ninlab.analysis.categories import CATEGORIES, categorize, saved_reason
from ninlab.analysis.compiled import compiled_code
from ninlab.analysis.cuda_allocator import (
    CUDA_CONTEXT_BYTES,
    CUDA_CONTEXT_SOURCE,
    CUDNN_WORKSPACE_NOTE,
    CudaLevels,
    simulate_step,
    step_events,
)
from ninlab.analysis.hugging_face import unreproduced
from ninlab.analysis.kernel_probe import (
    MissingKernel,
    measure_together,
    measured_allocations,
    too_large_to_measure,
)
from ninlab.analysis.lazy import materialized
from ninlab.analysis.measure import available_memory, measure
from ninlab.analysis.memory_report import (
    LOSS_TYPE,
    AllocatorPeak,
    Breakdown,
    CudaMemory,
    DDPBuckets,
    ForumRule,
    MeasuredFallback,
    MemoryReport,
    PeakOp,
    PhaseSpan,
    SavedRow,
    Timeline,
    TimelinePoint,
    layer_label,
)
from ninlab.analysis.recorder import temporaries_kept_out_of_place, unfollowed_formulas
from ninlab.analysis.recording import OpRecord, SavedTensor
from ninlab.analysis.refusals import NOT_TRACEABLE, cannot_run, check_traceable, step_refused
from ninlab.analysis.step import (
    DDPSpec,
    StepSpec,
    batch_size_of,
    check_trains,
    step_spec,
    valid_model,
)
from ninlab.analysis.torch_internals import DropoutBase
from ninlab.analysis.trace import StepRecording, collector_off, record_step
from ninlab.analysis.verify import verification, verify_batch_size
from ninlab.errors import NinlabError, checked_flag, checked_name, one_line
from ninlab.units import dtype_name, format_bytes

__all__ = [
    "FALLBACK_LADDER",
    "TracedStep",
    "measured_fallback",
    "predict_memory",
    "predict_recorded",
    "trace_step",
]

# Where a step fake tensors cannot run is measured to estimate the batches a fit or a line asks
# for: each a real run, a few seconds on a small model. Batch 1 is left out: its peak is the most
# often elsewhere (in the update, where the parameters' state dominates).
FALLBACK_LADDER = (2, 4, 8, 16)


def predict_memory(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    probe_kernels: bool = True,
    verify: bool = False,
    **fields: Any,
) -> MemoryReport:
    """Predict the memory of one step of `model` at `batch_size`: a training step (the second,
    steady-state step of zero_grad, forward, the built-in loss, backward and `optimizer.step()`)
    or one inference, as `spec` describes it. Lazy modules get their shapes from the step's input
    (`ninlab.analysis.lazy`); the model itself is left as it is.

    Instead of a `StepSpec`, its fields may be given as keywords (`input_size=(1, 224, 224),
    optimizer="adam", amp="bf16"`); see `ninlab.analysis.step.StepSpec`.

    `probe_kernels=False` runs no CPU kernel that no rule knows (`ninlab.analysis.kernel_probe`):
    their blocks stay unknown, so the allocator figure is a lower bound (`allocator_trust` "at
    least") of the one they give, every other figure the same; the batch search narrows its
    range with it, since a probe at a large batch costs as much as a real step.

    `verify=True` also runs the step for real at a small batch on this machine and sets it beside
    the prediction at that batch (`ninlab.analysis.verify`): the report's `verification`; its
    figures stay those of `batch_size`. The model then needs its real weights (not meta).
    """
    spec = step_spec(spec, model=valid_model(model), **fields)
    model_name = checked_name("model_name", model_name)
    probe_kernels = checked_flag("probe_kernels", probe_kernels)
    verify = checked_flag("verify", verify)
    report = predict_recorded(
        model, spec, batch_size=batch_size, model_name=model_name, probe_kernels=probe_kernels
    )[0]
    if verify:
        small = verify_batch_size(report.batch_size)
        at_small = (
            report
            if small == report.batch_size
            else predict_recorded(
                model,
                spec.at_any_batch(),
                batch_size=small,
                model_name=model_name,
                probe_kernels=probe_kernels,
            )[0]
        )
        report = replace(report, verification=verification(model, at_small))
    return report


def predict_recorded(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    probe_kernels: bool = True,
    **fields: Any,
) -> tuple[MemoryReport, StepRecording | None]:
    """`predict_memory`, with the recording it read (None where the step was measured for real
    instead): for a caller that also reads the step's ops (the budget planner its FLOPs), so that
    the step is traced once."""
    traced = trace_step(model, spec, batch_size=batch_size, model_name=model_name, **fields)
    if isinstance(traced, MemoryReport):
        return traced, None
    return traced.report(probe_kernels=probe_kernels), traced.step


@dataclass(frozen=True)
class TracedStep:
    """A step traced on fake tensors, to be read into a report with or without the kernel probe,
    and again: the batch search reads it without the probe (a lower bound), and where it then
    needs the exact figure at that batch, probes this recording instead of tracing the step
    again (a trace at a batch size is the same every time)."""

    model: nn.Module  # as traced: its lazy modules materialized
    step: StepRecording
    name: str
    notes: tuple[str, ...]  # how the step may differ from step to step (`_varies`, `_saves`)

    def report(self, *, probe_kernels: bool) -> MemoryReport:
        """`predict_memory`'s report of this trace (`probe_kernels` as there); probing measures
        the unknown calls into the recording itself, so a later report also has them."""
        # Tens of thousands of report objects, all freed by reference counts: without the cyclic
        # collector, as the recording runs, they trigger none of its full passes over the process.
        with collector_off():
            if probe_kernels:
                try:
                    _measure_unknown_kernels(self.step)
                except MissingKernel as error:
                    # The real step fails there too: refused as `measure` refuses it.
                    raise cannot_run(error.__cause__ or error, self.model, self.step.spec) from None
            report = _report(self.model, self.step, self.name)
        return replace(report, notes=(*report.notes, *self.notes))


def trace_step(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    **fields: Any,
) -> TracedStep | MemoryReport:
    """The step traced at `batch_size`, not yet read (`TracedStep.report`); for a step fake
    tensors cannot run, the report of its real runs (`predict_memory`'s fallback) instead."""
    spec = step_spec(spec, model=valid_model(model), **fields)
    batch_size = batch_size_of(spec, batch_size)
    name = model_name or type(model).__name__
    check_trains(model, spec)
    check_traceable(model)
    try:
        traced = materialized(model, spec)
        step = record_step(traced, spec, batch_size)
    except NOT_TRACEABLE as error:
        return _measured_report(model, spec, batch_size, name, error)
    except NinlabError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the step or model raises, as one line naming why
        if spec.step is not None:
            raise step_refused(error, model, spec, "fake tensors") from None
        raise cannot_run(error, model, spec) from None
    varies = _varies(step) + _saves(step)
    return TracedStep(traced, step, name, varies)


# -- a step that may not be the same every time -----------------------------------------------


def _varies(step: StepRecording) -> tuple[str, ...]:
    """A note, where the step drew from Python's (or NumPy's) random numbers. On fake tensors a
    step can branch only on Python values (a branch on a tensor's value needs `.item()`, which
    is measured instead), so a draw is how a traced step can differ from step to step; the
    prediction is of one draw, the recorded step, and says so."""
    if not step.drew_python_random:
        return ()
    subject = "the model" if step.spec.step is None else f"the step {step.spec.step_name}"
    note = (
        f"{subject} draws from Python's random numbers (random or numpy.random): if it branches "
        "on them, its memory differs from step to step, and this prediction is of one draw; "
        "seed them, or predict each branch"
    )
    return (note,)


def _saves(step: StepRecording) -> tuple[str, ...]:
    """A note, where the step calls `torch.save`: skipped in the trace (`trace._saves_skipped`)."""
    if not step.saves_skipped:
        return ()
    note = (
        "the step calls torch.save: not run on fake tensors, which have no bytes to write; a "
        "save writes the tensors' storages as they are and makes no tensor of the step's device, "
        "so the figures stand"
    )
    return (note,)


def _measure_unknown_kernels(step: StepRecording) -> None:
    """Where no rule knows the blocks a CPU kernel allocates for itself, measure that one call on
    zeros of its sizes (`ninlab.analysis.kernel_probe`), or say why it stays a lower bound. All
    or none: when one call is too large to run, the step's figure is a lower bound whatever the
    others give, so they are not run either (the batch planner asks at large batch sizes)."""
    ops = step.recording.ops
    unknown = [
        index for index in range(step.step_start, len(ops)) if ops[index].cpu_call is not None
    ]
    too_large = too_large_to_measure([ops[index].cpu_call for index in unknown])
    if not too_large:
        measure_together(ops[index].cpu_call for index in unknown)  # in one profile
    for index in unknown:
        op = ops[index]
        measured = too_large or measured_allocations(op.cpu_call)
        if isinstance(measured, str):
            ops[index] = replace(op, cpu_unmodelled=f"{op.cpu_unmodelled}; {measured}")
        else:
            # The measured call made its input casts too: they are among its blocks.
            ops[index] = replace(
                op, cpu_allocations=measured, cpu_unmodelled="", cpu_scalar_bytes=0
            )


def _report(model: nn.Module, step: StepRecording, name: str) -> MemoryReport:
    """Account for a recorded step: each storage's category, the step replayed op by op, and what
    the peak is made of."""
    spec = step.spec
    module_types = {qualified: type(module).__name__ for qualified, module in model.named_modules()}
    categories = categorize(step)
    buckets = _ddp_buckets(step, spec.ddp) if spec.ddp else None
    timeline, cuda = _replay(step, categories, buckets)
    if not timeline.points:
        raise NinlabError(
            "the model ran no op on its input (its forward returns it unchanged, or the step runs "
            "it in another thread, which ninlab cannot follow: run it in the calling thread); "
            "there is no step to predict memory for"
        )
    live_peak = _first_max(timeline.totals())
    breakdown = timeline.points[live_peak].alive
    op = step.recording.ops[step.step_start + live_peak]
    module_type = module_types.get(op.module, "")
    peak = PeakOp(live_peak, op.op, op.phase, op.module, module_type, op.autograd_node)
    saved = _saved_rows(step, categories, module_types) if spec.mode == "train" else ()
    return MemoryReport(
        model=name,
        spec=spec,
        batch_size=step.batch_size,
        live_peak_bytes=breakdown.total_bytes,
        peak=peak,
        breakdown=breakdown,
        timeline=timeline,
        saved=saved,
        allocator=_allocator_peak(step, timeline, module_types),
        forum=_forum_rule(model, step, breakdown, saved),
        ddp=buckets,
        fallback=None,
        # Cross-entropy is what a classifier trains with; anything else is ninlab's stand-in.
        notes=(f"loss: {step.loss}",) if step.loss and step.target_key < 0 else (),
        cuda=None if cuda is None else _cuda_memory(cuda),
        unreproduced=(
            *compiled_code(model, spec.step),
            *unreproduced(model),
            *unfollowed_formulas(step.recording.ops),
            *temporaries_kept_out_of_place(step.recording),
            *step.recording.unsure,
        ),
    )


# -- the replay: what is alive at every op ----------------------------------------------------


def _replay(
    step: StepRecording, categories: dict[int, int], buckets: DDPBuckets | None
) -> tuple[Timeline, CudaLevels | None]:
    """Walk the step's ops, adding each storage's bytes when its op runs and removing them after
    the op it died after, at both levels (see `AllocatorPeak` for the allocator's). A CUDA step
    also goes through the caching allocator, whose allocated level is its allocator level."""
    storages = step.recording.storages
    at_start, born, died = _lifetimes(step, categories, buckets)
    cuda = None
    if step.spec.device_type == "cuda":
        bucket_bytes = buckets.bucket_bytes if buckets is not None else ()
        cuda = simulate_step(step_events(step, at_start, born, died, bucket_bytes))
    alive = _Alive()
    for nbytes in buckets.bucket_bytes if buckets is not None else ():
        alive.add(CATEGORIES.index("ddp_buckets"), nbytes)
    for key in at_start:
        alive.add(categories[key], storages[key].nbytes)
    start = Breakdown.from_counts(alive.counts)
    points: list[TimelinePoint] = []
    for position, op in enumerate(step.recording.ops[step.step_start :]):
        index = step.step_start + position
        before = alive.total_bytes
        for key in born.get(index, ()):
            alive.add(categories[key], storages[key].nbytes)
        breakdown = Breakdown.from_counts(alive.counts)
        if cuda is None:
            allocator = alive.allocator_bytes(op, before)
        else:
            allocator = cuda.allocated_bytes[position]
        points.append(TimelinePoint(position, op.op, op.phase, op.module, breakdown, allocator))
        for key in died.get(index, ()):
            alive.remove(categories[key], storages[key].nbytes)
    return Timeline(start, tuple(points), _phase_spans(points)), cuda


def _lifetimes(
    step: StepRecording, categories: dict[int, int], buckets: DDPBuckets | None
) -> tuple[list[int], dict[int, list[int]], dict[int, list[int]]]:
    """The storages alive when the step starts, and by op index those the op makes and those
    freed after it."""
    start = step.step_start
    storages = step.recording.storages
    gradients = CATEGORIES.index("gradients")
    as_views = buckets is not None and buckets.gradient_as_bucket_view
    at_start: list[int] = []
    born: dict[int, list[int]] = {}
    died: dict[int, list[int]] = {}
    for key, category in categories.items():
        record = storages[key]
        freed_after = record.freed_after
        if as_views and category == gradients:
            if record.created_at < start:
                continue  # the previous step's gradients were views into the buckets
            freed_after = record.created_at  # copied into its bucket as soon as it is ready
        if record.created_at < start:
            at_start.append(key)
        else:
            born.setdefault(record.created_at, []).append(key)
        if freed_after is not None:
            died.setdefault(freed_after, []).append(key)
    return at_start, born, died


class _Alive:
    """Bytes alive per category."""

    def __init__(self) -> None:
        self.counts = [0] * len(CATEGORIES)

    @property
    def total_bytes(self) -> int:
        return sum(self.counts)

    def add(self, category: int, nbytes: int) -> None:
        self.counts[category] += nbytes

    def remove(self, category: int, nbytes: int) -> None:
        self.counts[category] -= nbytes

    def allocator_bytes(self, op: OpRecord, before: int) -> int:
        """What the CPU allocator holds at `op`'s high point, its outputs alive; `before` is the
        live bytes before the op ran."""
        scalars = op.cpu_scalar_bytes
        if op.cpu_allocations:
            # The kernel's own blocks come and go inside the op: its high point is what was
            # alive before it plus the most it held at once.
            return scalars + max(
                self.total_bytes, before + peak_above_start_bytes(op.cpu_allocations)
            )
        return scalars + self.total_bytes


def _phase_spans(points: Sequence[TimelinePoint]) -> tuple[PhaseSpan, ...]:
    """Each run of consecutive ops in one phase as one span."""
    spans = []
    for phase, run in groupby(points, key=lambda point: point.phase):
        ops = [point.step_op for point in run]
        spans.append(PhaseSpan(phase, ops[0], ops[-1]))
    return tuple(spans)


def _first_max(values: Sequence[int]) -> int:
    """The position of the first largest value (0 when there is none): the op where a peak is
    first reached."""
    return max(range(len(values)), key=values.__getitem__, default=0)


# -- the allocator's level ----------------------------------------------------------------------


def _allocator_peak(
    step: StepRecording, timeline: Timeline, module_types: dict[str, str]
) -> AllocatorPeak:
    point = timeline.points[_first_max(timeline.allocator_totals())]
    live = point.total_bytes
    cuda = step.spec.device_type == "cuda"
    unmodelled: dict[str, int] = {}
    measured: dict[str, int] = {}
    if not cuda:
        for op in step.recording.ops[step.step_start :]:
            if op.cpu_unmodelled:
                note = f"{op.op}: {op.cpu_unmodelled}"
                unmodelled[note] = unmodelled.get(note, 0) + 1
            elif op.cpu_call is not None:
                measured[op.op] = measured.get(op.op, 0) + 1
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
        measured=tuple(f"{op} ({count}x)" for op, count in measured.items()),
    )


_CPU_METHOD = (
    "CPU allocator: live storage plus the blocks kernels allocate for themselves inside an op "
    "(oneDNN's blocked copies of inputs, weights and results; batch norm's temporaries), from "
    "ninlab.analysis.allocator's per-op rules, or, for a kernel no rule knows, measured on zeros "
    "of the call's sizes (ninlab.analysis.kernel_probe)"
)
_CUDA_METHOD = (
    "CUDA caching allocator, simulated (ninlab.analysis.cuda_allocator): the step's allocations "
    "and frees replayed through its pools, 2 MiB and 20 MiB segments, 512-byte rounding, best-fit "
    "reuse, splitting and merging, after a warm-up step; the blocks handed out, as "
    "max_memory_allocated counts them; cuDNN's workspace and the CUDA context are not included"
)


def _cuda_memory(levels: CudaLevels) -> CudaMemory:
    return CudaMemory(
        max_allocated_bytes=levels.max_allocated_bytes,
        max_reserved_bytes=levels.max_reserved_bytes,
        small_segments=levels.small_segments,
        large_segments=levels.large_segments,
        large_reserved_bytes=levels.large_reserved_bytes,
        context_bytes=CUDA_CONTEXT_BYTES,
        context_source=CUDA_CONTEXT_SOURCE,
        cudnn_workspace=CUDNN_WORKSPACE_NOTE,
    )


# -- what autograd keeps, the forum's rule, DDP's buckets -------------------------------------


def _saved_rows(
    step: StepRecording, categories: dict[int, int], module_types: dict[str, str]
) -> tuple[SavedRow, ...]:
    storages = step.recording.storages
    saved_category = CATEGORIES.index("saved_for_backward")
    entries = step.recording.saved_for_backward
    owner = _counting_entries(entries)
    counted_total = sum(
        storages[key].nbytes for key in owner if categories.get(key) == saved_category
    )

    def module_type(entry: SavedTensor) -> str:
        # The loss runs outside every module; the targets are only the loss's.
        in_loss = entry.outside_model or storages[entry.storage_key].role == "targets"
        return LOSS_TYPE if in_loss else module_types.get(entry.module, "")

    rows = []
    for position, entry in enumerate(entries):
        record = storages[entry.storage_key]
        category = CATEGORIES[categories.get(entry.storage_key, saved_category)]
        first = owner[entry.storage_key]
        counted = record.nbytes if position == first and category == "saved_for_backward" else 0
        shared_with = ""
        if position != first:
            other = entries[first]
            # SavedRow.label
            shared_with = (
                f"{layer_label(other.module, module_type(other))} {other.node}.{other.field}"
            )
        rows.append(
            SavedRow(
                module=entry.module,
                module_type=module_type(entry),
                node=entry.node,
                field=entry.field,
                reason=saved_reason(entry.node, entry.field, module_type=module_type(entry)),
                shape=record.shape,
                dtype=dtype_name(record.dtype),
                storage_bytes=record.nbytes,
                counted_bytes=counted,
                share=counted / counted_total if counted_total else 0.0,
                category=category,
                shared_with=shared_with,
            )
        )
    return tuple(rows)


def _counting_entries(entries: Sequence[SavedTensor]) -> dict[int, int]:
    """Storage key -> the position of the saved entry that counts it. A storage two nodes keep is
    counted once: at the node whose own output it is (a ReLU's `result`, which the next conv
    keeps as its `input`), else at the first in forward order."""

    def rank(position: int) -> tuple[bool, int]:
        return not entries[position].field.startswith("result"), position

    owner: dict[int, int] = {}
    for position, entry in enumerate(entries):
        if entry.storage_key not in owner or rank(position) < rank(owner[entry.storage_key]):
            owner[entry.storage_key] = position
    return owner


def _forum_rule(
    model: nn.Module, step: StepRecording, breakdown: Breakdown, saved: Sequence[SavedRow]
) -> ForumRule:
    modules = dict(model.named_modules())
    storages = step.recording.storages
    inputs = sum(storages[key].nbytes for key in step.input_keys)
    layers: list[tuple[int, bool]] = [(inputs, False)]  # (bytes, is dropout)
    for name, outputs in step.recording.module_outputs.items():
        module = modules.get(name)
        if module is None or any(True for _ in module.children()):
            continue
        if type(module).__module__ == "torch.nn.modules.activation":
            continue  # the post counts a conv and its ReLU as one layer
        nbytes = sum(prod(shape) * dtype.itemsize for shape, dtype in outputs)
        layers.append((nbytes, isinstance(module, DropoutBase)))
    activations = sum(nbytes for nbytes, _ in layers)
    parameters = sum(record.nbytes for record in storages.values() if record.role == "parameter")
    kept = [nbytes for nbytes, dropout in layers if not dropout]
    pair = max((a + b for a, b in pairwise(kept)), default=kept[0] if kept else 0)
    train = 2 * activations + 3 * parameters
    infer = parameters + pair
    rule = train if step.spec.mode == "train" else infer
    indices = sum(row.counted_bytes for row in saved if row.dtype == "int64")
    return ForumRule(
        activations,
        parameters,
        pair,
        train,
        infer,
        rule,
        rule / breakdown.total_bytes,
        breakdown.backward_temporaries_bytes,
        indices,
    )


def _ddp_buckets(step: StepRecording, spec: DDPSpec) -> DDPBuckets:
    """Buckets as DDP's reducer rebuilds them after the first iteration: parameters in the order
    backward accumulated their gradients (its autograd hooks fire then), grouped by torch's own
    `_compute_bucket_assignment_by_size`."""
    import torch.distributed as dist

    if not dist.is_available():
        raise NinlabError(
            "this PyTorch build has no torch.distributed, so DDP's buckets cannot be laid out; "
            "drop --ddp"
        )
    from ninlab.analysis.torch_internals import (
        DEFAULT_FIRST_BUCKET_BYTES,
        compute_bucket_assignment_by_size,
    )

    mib = 1024 * 1024
    # _BucketCapacityConfig in torch/nn/parallel/distributed.py: the default cap is 25 MiB with a
    # 1 MiB first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES); a cap the user sets applies to all.
    cap = int((25 if spec.bucket_cap_mb is None else spec.bucket_cap_mb) * mib)
    first_cap = DEFAULT_FIRST_BUCKET_BYTES if spec.bucket_cap_mb is None else cap
    storages = step.recording.storages
    params = [storages[step.parameter_keys[name]] for name in step.gradient_order]
    tensors = [torch.empty(record.shape, dtype=record.dtype, device="meta") for record in params]
    groups, _ = compute_bucket_assignment_by_size(tensors, [first_cap, cap], [False] * len(tensors))
    sizes = tuple(sum(params[i].nbytes for i in group) for group in groups)
    return DDPBuckets(sizes, first_cap, cap, spec.gradient_as_bucket_view)


# -- models fake tensors cannot run -------------------------------------------------------------


def _measured_report(
    model: nn.Module, spec: StepSpec, batch_size: int, name: str, error: Exception
) -> MemoryReport:
    """The model does something fake tensors cannot (a value-dependent branch, a data-dependent
    shape): measure it for real on this machine at the batch asked for. Not a line through a
    ladder of smaller batches: where the peak moves to another op as the batch grows (the
    matrix multiplies' blocks of an MLP from batch 12), such a line missed batch 100 by 12%, and
    the misses at the ladder's own batches said nothing of it. Other batches (a fit, the line
    around it) are read from `measured_fallback`'s ladder."""
    reason = one_line(error)
    subject = "the model" if spec.step is None else f"the step {spec.step_name}"
    if spec.device_type == "cuda" and not torch.cuda.is_available():
        raise NinlabError(
            f"{subject} cannot run on fake tensors ({reason}), and measuring it instead needs a "
            "GPU this machine lacks; predict for device cpu (--device cpu) or run on a machine "
            "with CUDA"
        )
    if spec.ddp is not None:
        trainable = sum(
            p.numel() * (spec.dtype.itemsize if p.is_floating_point() else p.element_size())
            for p in model.parameters()
            if p.requires_grad
        )
        raise NinlabError(
            f"{subject} cannot run on fake tensors ({reason}), so DDP's buckets cannot be laid "
            "out; predict without DDP and add one copy of the trainable parameters, "
            f"{trainable:,} bytes, per rank"
        )
    fallback = _fallback_at(model, spec, batch_size, reason)
    ran = ", ".join(map(str, fallback.batch_sizes))
    note = (
        f"{subject} cannot run on fake tensors ({reason}); run for real on this machine at "
        f"batch {ran} instead: no per-tensor breakdown"
    )
    if batch_size not in fallback.batch_sizes:
        note += (
            f"; batch {batch_size} itself was not run: by the line through them it takes about "
            f"{format_bytes(fallback.allocator_at(batch_size))}, more than half of what this "
            "machine has free (or the machine does not say)"
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


def _fallback_at(
    model: nn.Module, spec: StepSpec, batch_size: int, reason: str
) -> MeasuredFallback:
    """Real runs for `_measured_report`: at the batch asked for, when it is within the ladder or
    when the line through the ladder says it takes at most half the memory available now (a real
    step of a batch far beyond it could exhaust the machine); else the ladder alone, whose line
    estimates that batch."""
    if batch_size <= FALLBACK_LADDER[-1]:
        return measured_fallback(model, spec, (batch_size,), reason)
    ladder = measured_fallback(model, spec, FALLBACK_LADDER, reason)
    available = available_memory(torch.device(spec.device_type))
    if available is None or ladder.allocator_at(batch_size) > available // 2:
        return ladder
    return measured_fallback(model, spec, (batch_size,), reason, ladder)


def measured_fallback(
    model: nn.Module,
    spec: StepSpec,
    sizes: tuple[int, ...],
    reason: str,
    measured: MeasuredFallback | None = None,
) -> MeasuredFallback:
    """The step run for real on this machine at each of `sizes` (a batch `measured` already ran
    is kept, not run again), for a step fake tensors cannot run (`reason`)."""
    kept = {}
    if measured is not None:
        for i, size in enumerate(measured.batch_sizes):
            kept[size] = (
                measured.live_peaks_bytes[i],
                measured.live_phases[i],
                measured.allocator_peaks_bytes[i],
                measured.allocator_phases[i],
            )
    sizes = tuple(sorted({*sizes, *kept}))
    for size in sizes:
        if size not in kept:
            run = measure(model, spec, batch_size=size)
            kept[size] = (
                run.live_peak_bytes,
                run.live_peak_phase,
                run.allocator_peak_bytes,
                run.allocator_peak_phase,
            )
    live, live_phases, allocator, allocator_phases = zip(*(kept[size] for size in sizes))
    return MeasuredFallback(reason, sizes, live, live_phases, allocator, allocator_phases)
