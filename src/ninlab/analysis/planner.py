"""How to fit a batch into a memory budget: the largest batch of the step as given, and under each
alternative that changes memory, each an exact prediction, with what it costs in compute.

The alternatives: bf16 autocast; activation checkpointing (`torch.utils.checkpoint`,
non-reentrant) of each top-level block that has parameters, and of all of them; gradient
accumulation in k micro-batches that keeps the requested global batch; SGD, SGD with momentum
and Adam state. Each is a real step (a `StepSpec` with a step function built here), predicted
like any other (`ninlab.analysis.batch.largest_batch`: `fit_batch`'s answer, without the peak
at the next size); its compute is the FLOPs of its recorded ops at the requested batch, as
`ninlab.analysis.flops` counts them (forward, backward and the recomputation).

The recommendation is the alternative that fits the requested batch with the least compute; on
a tie, the one that changes the least: accumulation (the same arithmetic, in parts), then bf16
(a precision), then checkpointing (recomputes), then another optimizer (another algorithm).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ninlab.analysis.batch import BatchFit, BudgetTooSmall, largest_batch
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.predict import trace_step
from ninlab.analysis.step import (
    StepFunction,
    StepSpec,
    batch_size_of,
    builtin_loss,
    call_model,
    model_arguments,
    step_spec,
    valid_model,
)
from ninlab.errors import NinlabError, shorten
from ninlab.optimizers import OptimizerSpec
from ninlab.units import budget_bytes, format_bytes, format_flops

__all__ = [
    "ALTERNATIVE_KINDS",
    "Alternative",
    "AlternativeKind",
    "BudgetPlan",
    "PlanOption",
    "plan_budget",
]

_OPTIMIZERS = ("sgd", "sgd-momentum", "adam")
# The most micro-batches accumulation tries: each is a forward and backward in the one recorded
# step, so a batch of a billion would otherwise be traced in a billion parts.
_MOST_MICRO_BATCHES = 1024


class Prediction(NamedTuple):
    """A step predicted at the requested batch, with the FLOPs of the ops it recorded: one trace
    gives both; `unprobed`: the same trace read without the kernel probe, where the probe measured
    a kernel (the batch search runs on such bounds, and guesses from them where to look)."""

    report: MemoryReport
    step_flops: int
    recomputed_flops: int
    unprobed: MemoryReport | None = None


class Alternative(NamedTuple):
    """A step to plan for: its name in the plan, its kind (`ALTERNATIVE_KINDS`), the step itself,
    for accumulation the number of micro-batches, and its prediction at the requested batch where
    building it already made one (None: the plan makes it)."""

    name: str
    kind: str
    spec: StepSpec
    micro_batches: int = 1
    prediction: Prediction | None = None


@dataclass(frozen=True)
class AlternativeKind:
    """A way to change a step's memory: `alternatives(model, spec, budget_bytes, batch_size)`
    builds its steps (none where it does not apply); on a tie in compute the recommendation
    takes the kind of the lowest `preference`, the one that changes the least."""

    kind: str
    preference: int
    alternatives: Callable[[nn.Module, StepSpec, int, int], list[Alternative]]


@dataclass(frozen=True)
class PlanOption:
    """One way to run the step: the largest batch that fits (`fit`; for accumulation, the global
    batch asked for, in `micro_batches` parts), and the compute of a step at the requested batch."""

    name: str  # "as given", "bf16 autocast", "checkpoint 0", "accumulate 4 x 32", "adam", ...
    kind: str  # "as given", or an `AlternativeKind`'s kind
    spec: StepSpec  # the step to run: predict, measure or train with it
    largest_batch: int  # 0: not even batch 1 fits
    peak_bytes: int  # the allocator's peak at the requested batch
    fits_requested: bool
    step_flops: int  # forward, backward, recomputation and update at the requested batch
    recomputed_flops: int
    micro_batches: int = 1
    # a kernel's workspace is unknown: at the requested batch the peak is at least `peak_bytes`;
    # at the largest batch, so that it is at most `largest_batch`
    peak_lower_bound: bool = False
    largest_at_most: bool = False


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    batch_size: int  # the global batch asked for
    spec: StepSpec
    options: tuple[PlanOption, ...]  # the step as given first
    recommendation: str
    # the alternatives the step cannot run, by name (or kind), and why: left out of `options`
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def recommended(self) -> PlanOption | None:
        fitting = [option for option in self.options if option.fits_requested]
        return min(fitting, key=_rank, default=None)


def _rank(option: PlanOption) -> tuple[int, int]:
    return option.step_flops, _PREFERENCE[option.kind]


def plan_budget(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    budget: int | str,
    batch_size: int | None = None,
    given_fit: BatchFit | None = None,
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> BudgetPlan:
    """The largest batch that fits `budget` (bytes or "8GiB") at the allocator level, for the step
    as given and each alternative, and which one to use for `batch_size` (None: the batch of
    the example tensors given as the input). `given_fit`: the step
    as given already fitted into this budget at the allocator level (`study_batch` fits it
    first), not searched again. `progress`: told what the plan works on next (a kind of
    alternative, then each alternative by name), for a command to show: a plan is many
    predictions, seconds to minutes."""
    if progress is not None and not callable(progress):
        raise NinlabError(
            f"progress must be a function of one string, got {shorten(repr(progress))}"
        )
    say = progress or (lambda _what: None)
    spec = step_spec(spec, model=valid_model(model), **fields)
    batch_size = batch_size_of(spec, batch_size)
    spec = spec.at_any_batch()
    if spec.mode != "train":
        raise NinlabError("the budget planner plans a training step; use mode 'train'")
    budget = budget_bytes(budget)
    if given_fit is not None and (given_fit.budget_bytes, given_fit.level) != (budget, "allocator"):
        raise NinlabError(
            f"the plan's budget is {budget:,} bytes at the allocator level, and the fit it was "
            f"given is of {given_fit.budget_bytes:,} at the {given_fit.level} level; give the fit "
            "of this budget, or none"
        )
    # The step as given first: a model that cannot run says so in its own words, not in those of
    # an alternative's step built here.
    say("as given")
    options = [
        _option(model, Alternative("as given", "as given", spec), budget, batch_size, given_fit)
    ]
    skipped: list[tuple[str, str]] = []
    for kind in ALTERNATIVE_KINDS:
        say(kind.kind)
        # An alternative the step cannot run (micro-batches of one sample through batch norm) is
        # left out of the plan, with the reason, rather than ending it.
        try:
            alternatives = kind.alternatives(model, spec, budget, batch_size)
        except NinlabError as error:
            skipped.append((kind.kind, str(error)))
            continue
        for alternative in alternatives:
            say(alternative.name)
            option = _as_given_renamed(alternative, options[0]) or _planned(
                model, alternative, budget, batch_size
            )
            if isinstance(option, str):
                skipped.append((alternative.name, option))
            else:
                options.append(option)
    plan = BudgetPlan(budget, batch_size, spec, tuple(options), "", tuple(skipped))
    return dataclasses.replace(plan, recommendation=_recommendation(plan))


def _planned(
    model: nn.Module, alternative: Alternative, budget: int, batch_size: int
) -> PlanOption | str:
    """An alternative's `_option`, or why the step cannot run it."""
    try:
        return _option(model, alternative, budget, batch_size)
    except NinlabError as error:
        return str(error)


def _as_given_renamed(alternative: Alternative, given: PlanOption) -> PlanOption | None:
    """The step as given's option under the alternative's name, where the alternative builds the
    very same step: another name of the given optimizer ("sgd-momentum" for "sgd:momentum=0.9"),
    every hyperparameter and the implementation alike. Traced and searched again, it would give
    every number of the step as given (four traces or more, for nothing)."""
    mine, theirs = alternative.spec.optimizer, given.spec.optimizer
    if alternative.kind != "optimizer" or not (
        isinstance(mine, OptimizerSpec) and isinstance(theirs, OptimizerSpec)
    ):
        return None
    if alternative.spec.replace(optimizer=theirs) != given.spec or _built(mine) != _built(theirs):
        return None
    return dataclasses.replace(
        given, name=alternative.name, kind=alternative.kind, spec=alternative.spec
    )


def _built(optimizer: OptimizerSpec) -> dict[str, Any]:
    """What the optimizer is built as: its class, every hyperparameter and the implementation."""
    return {key: value for key, value in optimizer.used().items() if key != "name"}


def _predicted(model: nn.Module, spec: StepSpec, batch_size: int) -> Prediction:
    """The step's exact prediction at `batch_size` and the FLOPs of the ops it recorded (the
    step as it runs, warm-up excluded), from one trace."""
    traced = trace_step(model, spec, batch_size=batch_size)
    if isinstance(traced, MemoryReport):
        assert traced.fallback is not None
        raise NinlabError(
            f"the budget planner traces each alternative on fake tensors, and the step cannot run "
            f"on them ({traced.fallback.reason}); fit its batch alone (fit_batch, an estimate "
            "from real runs)"
        )
    # Read before the probe measures into the recording: the bound the search would trace for.
    step = traced.step
    probed = any(op.cpu_call is not None for op in step.recording.ops[step.step_start :])
    unprobed = traced.report(probe_kernels=False) if probed else None
    report = traced.report(probe_kernels=True)
    ops = step.recording.ops[step.step_start :]
    flops = sum(op.flops for op in ops)
    recomputed = sum(op.flops for op in ops if op.phase == "recompute")
    return Prediction(report, flops, recomputed, unprobed)


def _option(
    model: nn.Module,
    alternative: Alternative,
    budget: int,
    batch_size: int,
    fit: BatchFit | None = None,
) -> PlanOption:
    """`alternative` at the requested batch and its largest; `fit`: its fit, already made."""
    name, kind, spec, micro_batches, prediction = alternative
    if prediction is None:
        prediction = _predicted(model, spec, batch_size)
    report = prediction.report
    peak = report.allocator_peak_bytes
    at_most = False
    if kind == "accumulation":
        largest = batch_size if peak <= budget else 0
    elif fit is not None:
        largest, at_most = fit.batch_size, fit.lower_bound
    else:
        try:
            largest, trust = largest_batch(
                model,
                spec,
                budget=budget,
                predicted=(report,),
                unprobed=() if prediction.unprobed is None else (prediction.unprobed,),
            )
            at_most = trust.kind == "at least"
        except BudgetTooSmall:
            largest, at_most = 0, False
    assert report.allocator is not None
    return PlanOption(
        name,
        kind,
        spec,
        largest,
        peak,
        peak <= budget,
        prediction.step_flops,
        prediction.recomputed_flops,
        micro_batches,
        peak_lower_bound=report.allocator.lower_bound,
        largest_at_most=at_most,
    )


# -- the alternatives ----------------------------------------------------------------------------


def _bf16_autocast(
    model: nn.Module, spec: StepSpec, budget: int, batch_size: int
) -> list[Alternative]:
    if spec.amp is not None:
        return []
    if spec.step is None:
        return [Alternative("bf16 autocast", "autocast", spec.replace(amp="bf16"))]
    return [Alternative("bf16 autocast", "autocast", spec.replace(step=_under_autocast(spec.step)))]


def _checkpointing(
    model: nn.Module, spec: StepSpec, budget: int, batch_size: int
) -> list[Alternative]:
    blocks = tuple(
        name for name, child in model.named_children() if any(True for _ in child.parameters())
    )
    if not blocks:
        return []
    step = spec.step_function()
    alternatives = [
        Alternative(
            f"checkpoint {name}", "checkpointing", _with_step(spec, _checkpointed((name,), step))
        )
        for name in blocks
    ]
    if len(blocks) > 1:
        alternatives.append(
            Alternative(
                "checkpoint all blocks",
                "checkpointing",
                _with_step(spec, _checkpointed(blocks, step)),
            )
        )
    return alternatives


def _accumulation(
    model: nn.Module, spec: StepSpec, budget: int, batch_size: int
) -> list[Alternative]:
    """The fewest micro-batches (2, 4, 8, ...) whose step fits the requested batch; accumulation is
    built from the built-in step, so a step function of the user's gets none."""
    if spec.step is not None or batch_size < 2:
        return []
    tried: dict[int, tuple[StepSpec, Prediction]] = {}
    micro_batches = 2
    while micro_batches <= min(batch_size, _MOST_MICRO_BATCHES):
        alternative = _with_step(spec, _accumulating(micro_batches, spec.autocast_dtype))
        try:
            tried[micro_batches] = alternative, _predicted(model, alternative, batch_size)
        except NinlabError as error:
            if micro_batches == 2:
                smallest = batch_size // 2
                raise NinlabError(
                    f"micro-batches of {smallest} sample{'s' * (smallest > 1)}: {error}"
                ) from None
            micro_batches //= 2  # the smaller parts cannot run: the most that can
            break
        if tried[micro_batches][1].report.allocator_peak_bytes <= budget:
            break
        micro_batches *= 2
    micro_batches = min(micro_batches, batch_size, _MOST_MICRO_BATCHES)
    alternative, prediction = tried.get(micro_batches) or (
        _with_step(spec, _accumulating(micro_batches, spec.autocast_dtype)),
        None,
    )
    size = -(-batch_size // micro_batches)
    return [
        Alternative(
            f"accumulate {micro_batches} x {size}",
            "accumulation",
            alternative,
            micro_batches,
            prediction,
        )
    ]


def _optimizers(
    model: nn.Module, spec: StepSpec, budget: int, batch_size: int
) -> list[Alternative]:
    if not isinstance(spec.optimizer, OptimizerSpec):
        return []  # a factory of the user's: its optimizers are its own
    return [
        Alternative(
            name,
            "optimizer",
            spec.replace(optimizer=OptimizerSpec(name=name, lr=spec.optimizer.lr)),
        )
        for name in _OPTIMIZERS
        if name != spec.optimizer.name
    ]


# Every kind of alternative, in the order the plan lists them; a new way to save memory is a
# function above and a row here.
ALTERNATIVE_KINDS: tuple[AlternativeKind, ...] = (
    AlternativeKind("autocast", 2, _bf16_autocast),
    AlternativeKind("checkpointing", 3, _checkpointing),
    AlternativeKind("accumulation", 1, _accumulation),
    AlternativeKind("optimizer", 4, _optimizers),
)
_PREFERENCE = {"as given": 0, **{kind.kind: kind.preference for kind in ALTERNATIVE_KINDS}}


def _with_step(spec: StepSpec, step: StepFunction) -> StepSpec:
    """`spec` running `step`, its autocast moved into the step (a step function runs its own)."""
    return spec.replace(step=step, amp=None)


# -- the step functions the alternatives run -----------------------------------------------------


def _under_autocast(step: StepFunction) -> StepFunction:
    def autocast_step(
        model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> object:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
            return step(model, optimizer, inputs, targets)

    return autocast_step


def _checkpointed(blocks: tuple[str, ...], step: StepFunction) -> StepFunction:
    """`step` with each of `blocks` (top-level children) run under non-reentrant checkpointing:
    the blocks keep only their input, and their forward runs again in backward."""

    def checkpointing_step(
        model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> object:
        modules = [model.get_submodule(name) for name in blocks]
        for module in modules:
            # An instance attribute over the class's forward, removed afterwards.
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
        try:
            return step(model, optimizer, inputs, targets)
        finally:
            for module in modules:
                del module.forward

    return checkpointing_step


def _accumulating(micro_batches: int, autocast_dtype: torch.dtype | None) -> StepFunction:
    """The built-in step in `micro_batches` parts: each part's mean loss over `micro_batches`
    backward, gradients summed, one update."""

    def accumulating_step(
        model: nn.Module, optimizer: Any, inputs: Any, targets: torch.Tensor | None
    ) -> None:
        args, keywords = model_arguments(inputs)
        arguments = (*args, *keywords.values())
        parts = zip(*(argument.chunk(micro_batches) for argument in arguments))
        target_parts = [None] * micro_batches if targets is None else targets.chunk(micro_batches)
        device_type = arguments[0].device.type
        optimizer.zero_grad(set_to_none=True)
        for part, part_targets in zip(parts, target_parts):
            with torch.autocast(
                device_type,
                dtype=autocast_dtype or torch.bfloat16,
                enabled=autocast_dtype is not None,
            ):
                part_inputs = dict(zip(keywords, part)) if keywords else part
                loss = builtin_loss(call_model(model, part_inputs), part_targets) / micro_batches
            loss.backward()
        optimizer.step()

    return accumulating_step


# -- the recommendation ----------------------------------------------------------------------------


def _recommendation(plan: BudgetPlan) -> str:
    advice = _advice(plan)
    if not plan.skipped:
        return advice
    skipped = "; ".join(f"{name}: {reason}" for name, reason in plan.skipped)
    return f"{advice} (not planned, the step cannot run them: {skipped})"


def _advice(plan: BudgetPlan) -> str:
    given = plan.options[0]
    budget = format_bytes(plan.budget_bytes)
    if given.fits_requested:
        return (
            f"batch {plan.batch_size} fits {budget} as given (largest {given.largest_batch}, peak "
            f"{format_bytes(given.peak_bytes)}); nothing to change"
        )
    best = plan.recommended
    if best is None:
        return (
            f"batch {plan.batch_size} fits {budget} under no alternative; the largest batch is "
            f"{max(option.largest_batch for option in plan.options)}: lower the batch or combine "
            "alternatives"
        )
    extra = best.step_flops - given.step_flops
    cost = f"{format_flops(extra)} more compute per step" if extra > 0 else "no extra compute"
    return (
        f"use {best.name}: batch {plan.batch_size} fits {budget} (peak "
        f"{format_bytes(best.peak_bytes)}), {cost}"
    )
