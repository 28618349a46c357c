"""Measured memory of one real training step or one real inference on this machine's device.

The step is `ninlab.analysis.step`'s, the one the predictor traces, run for real: a training step is run
twice and the second is measured (steady state: gradients from step 1 live until `zero_grad`
frees them, optimizer state exists); inference is run twice too and the second measured.

Two levels are measured, each with a method that shares no code with the predictor:

* live tensor storage: a dispatch mode on the REAL tensors counts each storage an op returns once
  (views share it) and uncounts it when the storage itself dies (a weak reference on the
  `untyped_storage()`, whose Python object PyTorch keeps alive as long as the C++ storage), so
  lifetimes are autograd's and Python's real ones, not a simulation. Composite ops the mode is
  handed whole (`conv2d`, `max_pool2d` under `torch.inference_mode()`) are run as their parts, so
  their internal outputs (max pooling's int64 indices) are seen as they are under `no_grad`.
  Cross-check: the profiler's own tensor identity (allocations whose storage some op takes as
  input) gives the same training peak; it cannot be the method because it misses storages no op
  reads, such as max-pool indices without grad.
* allocator: on CPU, the PyTorch profiler's allocation records (`profile_memory=True`), which the
  c10 CPU allocator emits for every block it hands out, tensor or not (oneDNN reorder buffers and
  scratchpads, wrapped scalars); the records are summed in time order over the measured step. On
  CUDA, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, which includes the
  caching allocator's 512-byte rounding and cuDNN workspaces, and `max_memory_reserved()`, the
  segments the allocator holds from the device (`reserved_peak_bytes`).

Both peaks include everything alive during the measured step: parameters, buffers, gradients
(until `zero_grad(set_to_none=True)` frees them, then the new ones), optimizer state, the input
batch and targets, and all the step allocates; `baseline` itemises what was alive at its start.
The logits and the loss stay referenced until the step returns, as in d2l's training loop.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ninlab.analysis.lazy import copy_model
from ninlab.analysis.phases import StepPhases
from ninlab.analysis.refusals import cannot_run
from ninlab.analysis.step import (
    StepSpec,
    builtin_targets,
    example_inputs,
    inference_step,
    optimizer_state,
    optimizers_in,
    step_failed,
    step_spec,
    valid_batch_size,
)
from ninlab.analysis.trace import collector_off
from ninlab.errors import NinlabError

__all__ = ["Baseline", "Measurement", "measure"]

_STEP_MARK = "ninlab.measured_step"
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
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
    live_peak_op: str  # the aten op whose output set the peak
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
        self._mark: record_function | None = None
        self._alive: dict[int, tuple[int, weakref.ref]] = {}  # StorageImpl address -> (bytes, ref)

    def survivors(self) -> list[torch.UntypedStorage]:
        """The storages counted so far that are still alive."""
        return [storage for _, ref in self._alive.values() if (storage := ref()) is not None]

    def count(self, tensor: torch.Tensor, op: str) -> None:
        self.count_storage(tensor.untyped_storage(), op)

    def count_storage(self, storage: torch.UntypedStorage, op: str) -> None:
        key = storage._cdata  # the C++ StorageImpl: one per storage, however many views
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

    def _follow_phase(self) -> None:
        """Take the step's phase now; the profiler gets a mark per phase, so its peak can be
        placed too."""
        phase = self._phases.current if self._phases is not None else "setup"
        if phase == self.current_phase:
            return
        self.current_phase = phase
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
        self._mark = record_function(_PHASE_MARK + phase)
        self._mark.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark, self.current_phase = None, "setup"
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Run a composite op as its C++ kernel would, under this mode so its parts are counted.
        # Not `func.decompose()`: that prefers Python decompositions (native_batch_norm becomes
        # _native_batch_norm_legit), which would change the program being measured.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        if func.namespace == "profiler":  # an annotation (optimizers mark their step): not work
            return func(*args, **kwargs)
        self._follow_phase()
        output = func(*args, **kwargs)
        # Inputs first: a tensor made before the step and not in the baseline is still memory.
        for tensor in tree_flatten((args, kwargs, output))[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.count(tensor, str(func))
        return output


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
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
    parameters = list(model.parameters())
    counted = Baseline(
        parameters_bytes=_storage_bytes(parameters, seen),
        buffers_bytes=_storage_bytes(list(model.buffers()), seen),
        gradients_bytes=_storage_bytes([p.grad for p in parameters if p.grad is not None], seen),
        optimizer_state_bytes=_storage_bytes(optimizer_state(optimizers), seen),
        input_bytes=_storage_bytes(list(inputs), seen),
        targets_bytes=_storage_bytes([] if targets is None else [targets], seen),
    )
    other = sum(storage.nbytes() for storage in survivors if storage._cdata not in seen)
    return dataclasses.replace(counted, other_bytes=other)


def _profiled_peak(prof: profile, start_level_bytes: int) -> tuple[int, str, str]:
    """Peak of the CPU allocator's level over the marked step, from the profiler's records.

    `start_level_bytes` is what was allocated before profiling began; nothing allocated then is
    freed while profiling (the model, input and targets outlive it), so level = start + sum of
    records so far. Returns (peak bytes, innermost op at the peak, phase at the peak).
    """
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == _STEP_MARK]
    if len(marks) != 1:
        raise NinlabError("the profiler did not record the measured step; is another profiler running?")
    step_start, step_end = marks[0].start_ns(), marks[0].end_ns()
    records = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    level = peak = start_level_bytes
    peak_time = step_start
    for record in records:
        level += record.nbytes()
        if step_start <= record.start_ns() <= step_end and level > peak:
            peak, peak_time = level, record.start_ns()
    spans = [e for e in events if e.name() != "[memory]" and e.start_ns() <= peak_time <= e.end_ns()]
    ops = [e for e in spans if e.name().startswith("aten::")]
    phases = [e for e in spans if e.name().startswith(_PHASE_MARK)]
    innermost = max(ops, key=lambda e: e.start_ns()).name() if ops else ""
    phase = max(phases, key=lambda e: e.start_ns()).name()[len(_PHASE_MARK) :] if phases else ""
    return peak, innermost, phase


def measure(
    model: nn.Module, spec: StepSpec | None = None, *, batch_size: int, seed: int = 0, **fields: Any
) -> Measurement:
    """Run the step `spec` describes (or its fields, as keywords; `step=fn` runs the user's own
    step function) for real on its device type at `batch_size`, and measure its memory peaks.

    The model is copied (and cast to the spec's dtype and memory format), so the caller's
    parameters are untouched.
    """
    spec = step_spec(spec, **fields)
    batch_size = valid_batch_size(batch_size)
    if spec.ddp is not None:
        raise NinlabError("a measurement runs one process without DDP; measure without ddp")
    device = torch.device(spec.device_type)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NinlabError("measuring on cuda needs a GPU, and this machine has none; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise NinlabError(f"cannot measure on {device.type!r}; use cpu or cuda")
    torch.manual_seed(seed)
    model = copy_model(model, spec).to(device=device, dtype=spec.dtype, memory_format=spec.torch_memory_format)
    inputs = example_inputs(spec, batch_size, device)
    targets: torch.Tensor | None = None
    optimizers: list[torch.optim.Optimizer] = []
    if spec.mode == "train":
        model.train()
        # The loss fits the output (lazy modules get their shapes here).
        targets = builtin_targets(_probe(model, inputs, spec), device)
        _release_probe_blocks(device)
        optimizer = spec.make_optimizers(model)
        optimizers = optimizers_in(optimizer)
        train = spec.step_function()
        # A model of one input gets one tensor, as the user's loop passes it.
        step_inputs = inputs[0] if len(inputs) == 1 else inputs

        def step() -> object:
            try:
                return train(model, optimizer, step_inputs, targets)
            except NinlabError:
                raise
            except Exception as error:  # noqa: BLE001 - the step may raise anything: one line naming it
                if spec.step is None:
                    raise cannot_run(error, model, spec) from None
                raise step_failed(spec, error, f"real tensors, batch {batch_size}") from None

    else:
        model.eval()
        _probe(model, inputs, spec)  # lazy modules get their shapes before the baseline counts them
        _release_probe_blocks(device)

        def step() -> object:
            # The logits are dropped at once, as the predictor's one inference drops them.
            inference_step(model, inputs, autocast_dtype=spec.autocast_dtype, grad_mode=spec.grad_mode)
            return None

    phases = StepPhases(model)
    # The first step runs under a counter of its own: what it leaves alive besides gradients and
    # optimizer state (a GradScaler's scale; what it returns, held while the next step runs as a
    # loop's `loss = step(...)` holds it) is alive when the measured step starts.
    first = _LiveStorage()
    live = _LiveStorage(phases)
    if device.type == "cpu":
        start_level = _baseline(model, optimizers, inputs, targets, []).total_bytes
        # The level is the start plus the records, so nothing made before may be freed while
        # profiling: garbage from earlier work is collected now, and the collector stays off
        # (a collection in the step freed a caller's cyclic garbage: 8% less, measured).
        gc.collect()
        with collector_off(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with first:
                previous = step()
            survivors = first.survivors()
            baseline = _baseline(model, optimizers, inputs, targets, survivors)
            _count_baseline(live, model, optimizers, inputs, targets, survivors)
            del survivors  # strong references: the step's zero_grad must be able to free gradients
            with record_function(_STEP_MARK), phases, live:
                step()
        allocator_bytes, allocator_op, allocator_phase = _profiled_peak(prof, start_level)
        method, device_name = "cpu profiler allocation records", "cpu"
        reserved_bytes = None
    else:
        with first:
            previous = step()
        survivors = first.survivors()
        torch.cuda.synchronize(device)
        baseline = _baseline(model, optimizers, inputs, targets, survivors)
        _count_baseline(live, model, optimizers, inputs, targets, survivors)
        del survivors  # strong references: the step's zero_grad must be able to free gradients
        torch.cuda.reset_peak_memory_stats(device)
        with phases, live:
            step()
        torch.cuda.synchronize(device)
        allocator_bytes, allocator_op, allocator_phase = torch.cuda.max_memory_allocated(device), "", ""
        reserved_bytes = torch.cuda.max_memory_reserved(device)
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
        live_peak_bytes=live.peak_bytes,
        live_peak_op=live.peak_op,
        live_peak_phase=live.peak_phase,
        allocator_peak_bytes=allocator_bytes,
        allocator_peak_op=allocator_op,
        allocator_peak_phase=allocator_phase,
        allocator_method=method,
        reserved_peak_bytes=reserved_bytes,
    )


def _probe(model: nn.Module, inputs: tuple[torch.Tensor, ...], spec: StepSpec) -> Any:
    """One forward without autograd; a model that rejects the batch says why in one line."""
    try:
        with torch.no_grad():
            return model(*inputs)
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
    tensors = [*model.parameters(), *model.buffers(), *inputs]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += optimizer_state(optimizers)
    if targets is not None:
        tensors.append(targets)
    for tensor in tensors:
        live.count(tensor, "baseline")
    for storage in survivors:
        live.count_storage(storage, "baseline")
