"""Memory against the batch size: the peak as fixed + per-sample bytes (`memory_vs_batch`) and the
largest batch that fits a budget (`fit_batch`); `ninlab.studies.memory` asks both together.

Every figure is an exact prediction (`ninlab.analysis.predict.predict_memory`) at one batch size.
A line through two of them only proposes where to look, because the peak can move to another op
as the batch grows (NiN with Adam: the update at batch 1 and 2, backward from batch 3), and then
the peak is not one line. The results live here, beside the questions they answer.

The allocator level is what the allocator holds from the device, which is what runs out: on CUDA
the caching allocator's reserved segments (`MemoryReport.held_peak_bytes`), so a CUDA fit is a
fit of `max_memory_reserved`.

A step fake tensors cannot run (`.item()`, `nonzero` routing) is measured for real instead
(`MeasuredFallback`): once, on its ladder of batch sizes, and every other batch is read from that
one measurement, so that a fit costs a few real runs, not one per batch it tries; its figures are
then estimates, and the answer's `trust` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from torch import nn

from ninlab.analysis.memory_report import EXACT, Breakdown, MeasuredFallback, MemoryReport, Trust
from ninlab.analysis.predict import FALLBACK_LADDER, TracedStep, measured_fallback, trace_step
from ninlab.analysis.step import StepSpec, step_spec, valid_batch_size, valid_model
from ninlab.errors import NinlabError, shorten
from ninlab.units import budget_bytes, format_bytes

__all__ = [
    "BatchFit",
    "BatchScaling",
    "BudgetTooLarge",
    "BudgetTooSmall",
    "fit_batch",
    "largest_batch",
    "memory_vs_batch",
]

Level = Literal["live", "allocator"]


@dataclass(frozen=True)
class BatchScaling:
    """Peak at `level` = `fixed_bytes` + `per_sample_bytes` x batch, from predictions at
    `batch_sizes`, and checked by a prediction at `check_batch_size`; `trust`: what the peaks are
    (exact, or, for a step fake tensors cannot run, measured or estimated)."""

    level: str  # "live" or "allocator"
    batch_sizes: tuple[int, int]
    peaks_bytes: tuple[int, int]
    fixed_bytes: float
    per_sample_bytes: float
    check_batch_size: int
    check_peak_bytes: int
    trust: Trust = EXACT

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
    `batch_size` (fits) and `batch_size + 1` (does not); `predictions` counts the exact
    predictions run (lower bounds, which narrow the search, are not counted).
    `lower_bound`: the peak at `batch_size` is only a lower bound (a kernel's workspace is
    unknown there), so the largest batch is at most `batch_size`. `trust`: what the peak at
    `batch_size` is (`Trust`: exact, at least, or an estimate from real runs)."""

    level: str  # "live" or "allocator"
    budget_bytes: int
    batch_size: int
    peak_bytes: int
    next_peak_bytes: int
    predictions: int
    lower_bound: bool = False
    trust: Trust = EXACT
    # A step fake tensors cannot run: the real runs the peaks were read from, for a later question
    # at other batches (`memory_vs_batch(fallback=...)`) to read without running them again.
    fallback: MeasuredFallback | None = None
    # The exact peaks at `level` the search found (batch size -> peak and trust), the answer and
    # the next size among them, for a later question at the same level to read
    # (`memory_vs_batch(known=...)`); which sizes depends on the search's path.
    known: Mapping[int, tuple[int, Trust]] = field(default_factory=dict, repr=False, compare=False)


_LARGEST_SEARCHED = 1 << 24
"""The largest batch a search looks at unless told otherwise (`fit_batch(max_batch_size=)`)."""


def memory_vs_batch(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    batch_sizes: tuple[int, int] = (64, 128),
    check_batch_size: int = 256,
    level: Level = "live",
    fallback: MeasuredFallback | None = None,
    known: Mapping[int, tuple[int, Trust]] | None = None,
    **fields: Any,
) -> BatchScaling:
    """The peak (live storage, or what the allocator holds) as fixed + per-sample bytes, from
    exact predictions at two batch sizes, checked at a third (`linear`: it lands on the line).
    `fallback`: a step fake tensors cannot run, already measured (`BatchFit.fallback`); `known`:
    exact peaks of this step at `level` already found (`BatchFit.known`), read, not predicted."""
    spec = step_spec(spec, model=model, **fields).at_any_batch()
    if not isinstance(batch_sizes, (tuple, list)) or len(batch_sizes) != 2:
        raise NinlabError(
            "batch_sizes must be two batch sizes, such as (64, 128), got "
            f"{shorten(repr(batch_sizes))}"
        )
    first, second = (valid_batch_size(b) for b in batch_sizes)
    if first == second:
        raise NinlabError(f"memory vs batch needs two different batch sizes, got {first} twice")
    peak = _Peaks(model, spec, _level(level), fallback)
    peak.known.update(known or {})
    peaks = (peak(first), peak(second))
    per_sample = (peaks[1] - peaks[0]) / (second - first)
    fixed = peaks[0] - per_sample * first
    check = valid_batch_size(check_batch_size)
    check_peak = peak(check)
    trusts = [peak.trust(b) for b in (first, second, check)]
    trust = next((t for t in trusts if not t.exact), EXACT)
    return BatchScaling(
        peak.level, (first, second), peaks, fixed, per_sample, check, check_peak, trust
    )


class _Peaks:
    """The peak at one level by batch size, each asked once: an exact prediction, or for a step
    fake tensors cannot run, read from one `MeasuredFallback` over the whole ladder. `bound`
    gives a lower bound for less: the prediction without the kernel probe, which at a large
    batch costs as much as a real step (where that prediction has nothing to probe, it is the
    exact one, and is kept as such). `predicted`: reports of this step the caller already has,
    read instead of predicting their batch sizes again, and only where the search asks for them
    (so it asks what it would ask without them); `unprobed`: the same without the kernel probe
    (`predict_memory(probe_kernels=False)` of the same trace), read as those sizes' bounds."""

    def __init__(
        self,
        model: nn.Module,
        spec: StepSpec,
        level: Level,
        fallback: MeasuredFallback | None = None,
        predicted: Iterable[MemoryReport] = (),
        unprobed: Iterable[MemoryReport] = (),
    ) -> None:
        self.model, self.spec, self.level = model, spec, level
        self.known: dict[int, tuple[int, Trust]] = {}
        self.bounds: dict[int, int] = {}
        self.fallback = fallback
        self.predicted = {report.batch_size: report for report in predicted}
        self.unprobed = {report.batch_size: report for report in unprobed}
        self.traced: dict[int, TracedStep] = {}
        # Every report read, op by op, for the search's guesses (`guess`): the bounds' where
        # there are both, since the search runs on bounds.
        self.profiles: dict[int, _Profile] = {}
        for report in (*self.predicted.values(), *self.unprobed.values()):
            self._profile(report)

    def __call__(self, batch_size: int) -> int:
        return self._at(batch_size)[0]

    def trust(self, batch_size: int) -> Trust:
        return self._at(batch_size)[1]

    @property
    def predictions(self) -> int:
        """The exact predictions made (the bounds that were not exact are not counted)."""
        return len(self.known)

    def given(self, above: int) -> tuple[int, int] | None:
        """The largest batch above `above` of the reports the caller gave, and its peak: where
        the search's first slope reaches, at no cost."""
        larger = [size for size in self.predicted if size > above]
        if not larger:
            return None
        return max(larger), self._peak(self.predicted[max(larger)])

    def bound(self, batch_size: int) -> int:
        """At most the peak at `batch_size`: exact where known, else a prediction that runs no
        kernel (`predict_memory(probe_kernels=False)`); every size asked is kept in `bounds`, and
        the trace of a bound that is not exact in `traced`, for the exact peak to read."""
        if batch_size not in self.bounds:
            if batch_size in self.known or self.fallback is not None:
                self.bounds[batch_size] = self(batch_size)
            else:
                report = self._predict(batch_size, probe_kernels=False)
                if report.fallback is not None or self._trust(report).exact:
                    self.bounds[batch_size] = self._keep(batch_size, report)[0]
                else:
                    self.bounds[batch_size] = self._peak(report)
        return self.bounds[batch_size]

    def guess(self, budget: int, sizes: tuple[int, ...]) -> int | None:
        """The largest batch at which every op's peak, read from the reports at `sizes`, stays
        within `budget`: where the search looks next, only a proposal, checked by predicting there
        (a batch the step was not traced at may run other ops). Two sizes whose reports ran the
        same ops: each op's bytes on the line through them, which holds wherever the ops stay the
        same and their sizes grow in step with the batch. One size: each op's bytes beside the
        parameters, their gradients, the optimizer's state and the kernels' own blocks grow in
        proportion to the batch.
        The peak may be another op at another batch (NiN with Adam: the update at batch 1,
        backward from batch 3), which a line through two peaks misses. None where the reports
        do not say (their ops differ, none grows with the batch)."""
        profiles = [self.profiles.get(size) for size in sizes]
        if any(profile is None for profile in profiles):
            return None
        if len({profile.ops for profile in profiles if profile is not None}) != 1:
            return None
        # Each op's line: (a batch, its bytes there, the rise over a run of batches).
        if len(sizes) == 1:
            ((size,), (one,)) = sizes, profiles
            assert one is not None
            lines = [(0, fixed, total - fixed, size) for fixed, total in zip(one.fixed, one.totals)]
        else:
            ((first, second), (low, high)) = sizes, profiles
            assert low is not None and high is not None
            lines = [(first, a, b - a, second - first) for a, b in zip(low.totals, high.totals)]
        limits = [
            batch + (budget - at) * run // rise for batch, at, rise, run in lines if rise * run > 0
        ]
        return min(limits, default=None)

    def _profile(self, report: MemoryReport) -> None:
        """Keep `report`'s bytes op by op at this level, for `guess`: not where the level's peak
        is not the top of its timeline (a step measured for real, CUDA's reserved segments)."""
        if report.timeline is None:
            return
        timeline = report.timeline
        totals = timeline.totals() if self.level == "live" else timeline.allocator_totals()
        if not totals or max(totals) != self._peak(report):
            return
        ops = tuple(point.op for point in timeline.points)
        # A kernel's own blocks taken as fixed too (oneDNN's copy of a weight), so that the guess
        # from one report errs high rather than low: a guess one over is settled by the size
        # below it, one under needs another guess.
        fixed = tuple(
            _fixed_bytes(point.alive) + total - point.total_bytes
            for point, total in zip(timeline.points, totals)
        )
        self.profiles[report.batch_size] = _Profile(ops, fixed, totals)

    def _at(self, batch_size: int) -> tuple[int, Trust]:
        if batch_size not in self.known:
            if self.fallback is None:
                return self._keep(batch_size, self._predict(batch_size, probe_kernels=True))
            self.known[batch_size] = self.fallback.at(self.level, batch_size)
        return self.known[batch_size]

    def _predict(self, batch_size: int, *, probe_kernels: bool) -> MemoryReport:
        if not probe_kernels and batch_size in self.unprobed:
            return self.unprobed[batch_size]
        report = self.predicted.get(batch_size)
        # Without the probe, a prediction is the probed one where the probe measured nothing.
        if report is not None and (
            probe_kernels or report.allocator is None or not report.allocator.measured
        ):
            return report
        # The exact peak where a bound was read: the probe on that bound's recording, not a
        # second trace of the same step (the trace is most of a prediction's cost).
        traced = self.traced.pop(batch_size, None)
        if traced is None:
            traced = trace_step(self.model, self.spec, batch_size=batch_size)
            if isinstance(traced, MemoryReport):
                return traced
            if not probe_kernels:
                self.traced[batch_size] = traced
        report = traced.report(probe_kernels=probe_kernels)
        self._profile(report)
        return report

    def _keep(self, batch_size: int, report: MemoryReport) -> tuple[int, Trust]:
        self.traced.pop(batch_size, None)  # exact: its recording will not be read again
        if report.fallback is None:
            self.known[batch_size] = self._peak(report), self._trust(report)
            return self.known[batch_size]
        # Measured at this batch alone: measure the ladder once for all the others.
        self.fallback = measured_fallback(
            self.model, self.spec, FALLBACK_LADDER, report.fallback.reason, report.fallback
        )
        self.known[batch_size] = self.fallback.at(self.level, batch_size)
        return self.known[batch_size]

    def _peak(self, report: MemoryReport) -> int:
        return report.live_peak_bytes if self.level == "live" else report.held_peak_bytes

    def _trust(self, report: MemoryReport) -> Trust:
        return report.live_trust if self.level == "live" else report.allocator_trust


@dataclass(frozen=True)
class _Profile:
    """A report's bytes op by op at one level (`_Peaks.guess`): the ops it ran, the bytes at each
    that do not grow with the batch (`_fixed_bytes`), and the level's bytes at each."""

    ops: tuple[str, ...]
    fixed: tuple[int, ...]
    totals: tuple[int, ...]


def _fixed_bytes(alive: Breakdown) -> int:
    """What a step holds whatever its batch: the parameters, buffers, gradients, the optimizer's
    state and its update's temporaries, DDP's buckets."""
    return (
        alive.parameters_bytes
        + alive.buffers_bytes
        + alive.gradients_bytes
        + alive.optimizer_state_bytes
        + alive.optimizer_temporaries_bytes
        + alive.ddp_buckets_bytes
    )


class BudgetTooSmall(NinlabError):
    """Not even the smallest batch fits the budget."""


class BudgetTooLarge(NinlabError):
    """Even the largest batch searched fits the budget: the model is too small for it to bound
    the batch."""


def _smallest_batch(peak: _Peaks) -> int:
    """1, or 2 for a step that cannot run on one sample (batch norm over a vector in training:
    "Expected more than 1 value per channel"); batch 1's error where neither runs."""
    try:
        peak.bound(1)
    except NinlabError as error:
        try:
            peak.bound(2)
        except NinlabError:
            raise error from None
        return 2
    return 1


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
    max_batch_size: int = _LARGEST_SEARCHED,
    predicted: Iterable[MemoryReport] = (),
    **fields: Any,
) -> BatchFit:
    """The largest batch whose predicted peak fits `budget` (bytes, or text such as "8GiB",
    "500MB", "1.5 GiB"). The answer is found by exact predictions, extrapolation only proposing
    where to look: the result holds the exact peaks at the answer (fits) and the next size (does
    not); for a step fake tensors cannot run, estimates from real runs (`trust` says which).
    `level` "allocator" (the default) fits what the allocator holds, which is what runs out (on
    CUDA the reserved segments, `max_memory_reserved`); "live" fits tensor storage alone.
    `predicted`: reports of this step already made (`predict_memory`, probing kernels), which
    the search reads where it would predict their batch sizes, instead of predicting again."""
    level = _level(level)
    budget = budget_bytes(budget)
    max_batch_size = valid_batch_size(max_batch_size)
    spec = step_spec(spec, model=valid_model(model), **fields).at_any_batch()
    peak = _Peaks(model, spec, level, predicted=predicted)
    low = _search(peak, budget, max_batch_size)
    trust = peak.trust(low)
    return BatchFit(
        level,
        budget,
        low,
        peak(low),
        peak(low + 1),
        peak.predictions,
        trust.kind == "at least",
        trust,
        peak.fallback,
        dict(peak.known),
    )


def largest_batch(
    model: nn.Module,
    spec: StepSpec | None = None,
    *,
    budget: int | str,
    predicted: Iterable[MemoryReport] = (),
    unprobed: Iterable[MemoryReport] = (),
    **fields: Any,
) -> tuple[int, Trust]:
    """`fit_batch`'s answer at the allocator level alone, and what the peak there is (`Trust`):
    without the exact peak at the next size, which the search already knows is over the budget
    (at least its lower bound is) and which, where kernels are probed, costs a probe of each at
    that size. For the budget planner, which shows each alternative's answer, not its peaks.
    `unprobed`: reports of `predicted`'s traces read without the kernel probe, the search's
    lower bounds at their sizes, from which it guesses where to look (`_guided`)."""
    budget = budget_bytes(budget)
    spec = step_spec(spec, model=valid_model(model), **fields).at_any_batch()
    peak = _Peaks(model, spec, "allocator", predicted=predicted, unprobed=unprobed)
    low = _search(peak, budget, _LARGEST_SEARCHED)
    return low, peak.trust(low)


def _search(peak: _Peaks, budget: int, max_batch_size: int) -> int:
    """The largest batch up to `max_batch_size` whose exact peak fits `budget`, the next one's
    known not to (its exact peak, or its lower bound, is over the budget)."""
    guided = _guided(peak, budget, max_batch_size)
    if guided is not None and peak(guided) <= budget:
        return guided
    smallest = _smallest_batch(peak)
    if smallest > max_batch_size:
        raise NinlabError(
            f"the step cannot run at batch 1, so the largest batch searched, max_batch_size="
            f"{max_batch_size}, must be at least {smallest}"
        )
    if peak.bound(smallest) > budget:
        _too_small(peak, budget, smallest)
    # The search runs on lower bounds, predictions that probe no kernel: the largest batch whose
    # bound fits is at least the answer, and the next one's exact peak, at least its bound, is
    # over the budget. Exact predictions then check that candidate, and go below it only where a
    # probed kernel's blocks make the peak (`_exact_below`).
    candidate = guided or _largest_within(
        peak.bound,
        peak.bounds,
        budget,
        smallest,
        max_batch_size,
        peak.given(smallest),
        lambda sizes: peak.guess(budget, sizes),
    )
    low = _exact_below(peak, candidate, budget, smallest)
    if low == max_batch_size:
        raise BudgetTooLarge(
            f"budget {format_bytes(budget)} fits even batch {max_batch_size:,}, the largest "
            "searched; give a smaller budget"
        )
    return low


def _guided(peak: _Peaks, budget: int, max_batch_size: int) -> int | None:
    """The search's candidate found from the largest report the caller gave (the planner's, at
    the batch it asks about) without predicting at batch 1 or 2: where the ops' bytes read from
    that report say the budget is reached (`_Peaks.guess`), the bound there fitting and the next
    size's not; a second guess from the lines through those two, else None (the full search).
    Batch 1 is not asked: where the peak grows with the batch, no batch below a fitting one is
    the answer."""
    if not peak.predicted:
        return None
    sizes: tuple[int, ...] = (max(peak.predicted),)
    for _ in range(2):
        guess = peak.guess(budget, sizes)
        if guess is None or not 2 <= guess < max_batch_size:
            return None
        # The guess and the size beside it on the budget's side: where one fits and the other
        # does not, that is the candidate; else the line through the two says where to look.
        fits = peak.bound(guess) <= budget
        beside = guess + 1 if fits else guess - 1
        if beside < 2:
            return None
        if (peak.bound(beside) <= budget) != fits:
            return min(guess, beside)
        sizes = (min(guess, beside), max(guess, beside))
    return None


def _too_small(peak: _Peaks, budget: int, smallest: int) -> NoReturn:
    needed = peak(smallest)
    raise BudgetTooSmall(
        f"budget {budget:,} bytes ({format_bytes(budget)}) is too small for batch {smallest}, "
        f"which needs {needed:,} bytes ({format_bytes(needed)} at the {peak.level} level): "
        f"{needed - budget:,} bytes more"
    )


def _largest_within(
    peak: Callable[[int], int],
    tried: Collection[int],
    budget: int,
    smallest: int,
    max_batch_size: int,
    start: tuple[int, int] | None = None,
    guess: Callable[[tuple[int, int]], int | None] | None = None,
) -> int:
    """The largest batch up to `max_batch_size` whose `peak` fits the budget, batch `smallest`
    fitting; `tried`: the batch sizes `peak` has been asked at (a live view, growing as the
    search asks). `start`: a batch above `smallest` and its peak, already known (it need not be
    `peak`'s own figure: it only proposes where to look), for the first step's slope. `guess`:
    where to look next from the last two batches asked, op by op (`_Peaks.guess`), or None
    (then the secant through their peaks)."""

    def fits(batch_size: int) -> bool:
        return peak(batch_size) <= budget

    # Secant steps on the peak: the slope between the last two batches asked is the per-sample
    # cost where the peak is once both lie in one linear stretch, and then the next guess is
    # exact; each step asks one new batch (and its next, to confirm a guess that fits). The
    # first slope is from `smallest` to `start`, or to the next batch.
    previous = start or (smallest + 1, peak(smallest + 1))
    batch_size, at = smallest, peak(smallest)
    for _ in range(4):
        pair = min(batch_size, previous[0]), max(batch_size, previous[0])
        proposed = guess(pair) if guess is not None else None
        if proposed is None:
            rise, run = previous[1] - at, previous[0] - batch_size
            if rise * run <= 0:
                break
            if run < 0:
                rise, run = -rise, -run
            proposed = batch_size + (budget - at) * run // rise
        previous = batch_size, at
        batch_size = min(max(proposed, smallest), max_batch_size)
        at = peak(batch_size)
        if batch_size == previous[0]:
            break
        if at <= budget and (batch_size == max_batch_size or not fits(batch_size + 1)):
            break
    # Where the steps did not settle (the peak moved to another op), bisect between the largest
    # size known to fit and the smallest known not to (up to the largest searched: the first
    # slope may have asked one beyond it).
    searched = [b for b in tried if b <= max_batch_size]
    low = max(b for b in searched if fits(b))
    high = min((b for b in searched if not fits(b)), default=max_batch_size + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _exact_below(peak: _Peaks, candidate: int, budget: int, smallest: int) -> int:
    """The largest batch from `smallest` up to `candidate` whose exact peak fits, `candidate + 1`
    known not to (its lower bound does not): the candidate itself, unless a probed kernel's
    blocks make the peak there; then one step down by the excess over the bounds' per-sample
    slope, and a bisection where that does not settle."""
    low, high = smallest - 1, candidate + 1
    batch_size = candidate
    for _ in range(2):
        if peak(batch_size) <= budget:
            low = batch_size
            break
        high = batch_size
        per_sample = max(peak.bound(candidate + 1) - peak.bound(candidate), 1)
        excess = peak(batch_size) - budget
        batch_size = max(batch_size - -(-excess // per_sample), smallest)
    while high - low > 1:
        middle = (low + high) // 2
        if peak(middle) <= budget:
            low = middle
        else:
            high = middle
    if low < smallest:
        _too_small(peak, budget, smallest)
    return low
