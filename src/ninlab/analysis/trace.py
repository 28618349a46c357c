"""The one tracer: run a step's real PyTorch code on fake tensors and record every aten op.

Everything ninlab knows about a model (shapes, rounding, FLOPs, what memory lives when) comes from
one recording of the real ops, made under `FakeTensorMode`: tensors carry shapes, dtypes, strides
and a device but no data, so a training step of NiN at batch 128 allocates nothing and takes
milliseconds. `record_step` makes fake copies of the model's parameters (`fake_parameters`), swaps
them in for the step, runs it under a `Recorder` (`ninlab.analysis.recorder`) with the cyclic
collector off (`collector_off`), and returns the `Recording` (`ninlab.analysis.recording`) with
which storages are the parameters, gradients, optimizer state, inputs and targets: a
`StepRecording`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import random
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ninlab.analysis.fake_fast_path import OffRecord, fake_empty
from ninlab.analysis.known_values import SIZE_LIMIT, KnownValues
from ninlab.analysis.model_state import (
    Captured,
    attribute_aliases,
    attribute_tensors,
    captured_containers,
    captured_modules,
    captured_tensors,
    model_kept,
    swapped_in,
)
from ninlab.analysis.recorder import Recorder
from ninlab.analysis.recording import Recording
from ninlab.analysis.step import (
    StepInputs,
    StepSpec,
    builtin_loss,
    builtin_loss_words,
    builtin_targets_shape,
    call_model,
    check_trains,
    class_labels,
    determined_input,
    example_inputs,
    inference_step,
    model_arguments,
    optimizer_state,
    optimizers_in,
    step_arguments,
    valid_model,
)
from ninlab.analysis.torch_internals import (
    FAKE_TENSOR_LOGGER,
    FakeTensorMode,
    reparametrize_module,
    require_supported_torch,
)
from ninlab.errors import NinlabError

__all__ = [
    "StepRecording",
    "collector_off",
    "fake_parameters",
    "python_random_states",
    "record_step",
    "sharing_recordings",
]


def fake_parameters(
    model: nn.Module,
    fake_mode: FakeTensorMode,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """Fake copies of a model's parameters and buffers (no data is copied or allocated).

    Parameters stay `nn.Parameter`s so optimizers and autograd treat them as leaves. Floating
    tensors are cast to `dtype` when given, as `model.to(dtype)` would, and 4-d ones laid out
    channels-last when asked, as `model.to(memory_format=torch.channels_last)` would.
    """
    fakes: dict[str, torch.Tensor] = {}
    bases: dict[int, torch.Tensor] = {}  # a real storage's address -> the fake one over its size
    # The measured copy's parameters are clones (`Parameter.__deepcopy__`), each on a storage of
    # its own elements in the strides `clone` keeps (a parameter viewing a periodic window's
    # longer storage was predicted 4 bytes over); its buffers keep their storages, shared or
    # longer. (Real tensors: taken before the fake mode is entered.)
    cloned = {name: _cloned_strides(p) for name, p in model.named_parameters()}
    with fake_mode, OffRecord(fake_mode):
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            target_dtype = (
                dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            )
            parameter = isinstance(tensor, nn.Parameter)
            base = (
                None if parameter else _storage_base(tensor, target_dtype, device, fake_mode, bases)
            )
            if memory_format == torch.contiguous_format and base is not None:
                fake = base.as_strided(
                    tuple(tensor.shape), tensor.stride(), tensor.storage_offset()
                )
            elif memory_format == torch.contiguous_format:
                stride = cloned[name] if parameter else tensor.stride()
                fake = fake_empty(fake_mode, tuple(tensor.shape), stride, target_dtype, device)
            else:
                fake = _empty(tuple(tensor.shape), target_dtype, device, memory_format)
            if parameter:
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            fakes[name] = fake
    return fakes


def _cloned_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides `tensor.clone()` gives (its own where dense, else contiguous)."""
    return torch.empty_like(tensor, device="meta", memory_format=torch.preserve_format).stride()


def _storage_base(
    tensor: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    fake_mode: FakeTensorMode,
    bases: dict[int, torch.Tensor],
) -> torch.Tensor | None:
    """For a parameter or buffer that is a view holding a larger storage than its elements (a
    periodic window registered as a buffer: 132 bytes for 32 floats), a fake 1-d tensor over a
    storage of the real one's size, one for all the tensors viewing that storage (`bases`), as
    the measured copy of the model keeps it; None for any other, and where a cast to another
    dtype makes a tensor of its own."""
    if dtype != tensor.dtype or tensor.layout != torch.strided or tensor.is_meta:
        return None
    storage = tensor.untyped_storage()
    extent = 1 + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride()))
    used = (tensor.storage_offset() + extent) * tensor.element_size() if tensor.numel() else 0
    if storage.nbytes() <= used:
        return None
    key = storage.data_ptr()
    if key not in bases:
        elements = storage.nbytes() // tensor.element_size()
        bases[key] = fake_empty(fake_mode, (elements,), (1,), dtype, device)
    return bases[key]


def _empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """An empty tensor in `memory_format` where it applies (4-d), else contiguous, as
    `.to()` does."""
    if memory_format == torch.channels_last and len(shape) == 4:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector off: storages die by reference counts alone, as in a real
    step (`ninlab.analysis.measure` measures with it off), and a recording pays no full
    collection of everything the process holds (torch's own objects: a third of a second)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _saves_skipped(calls: list[object]) -> Iterator[None]:
    """`torch.save` does nothing while the step is recorded, and each call is noted in `calls`: a
    fake tensor has no bytes to write (pickling one fails), and a save writes a tensor's storage
    as it is (a CUDA one through a CPU copy), making no tensor of the step's device."""
    save = torch.save

    def skipped_save(obj: object, *args: Any, **kwargs: Any) -> None:
        calls.append(obj)

    torch.save = skipped_save
    try:
        yield
    finally:
        torch.save = save


@dataclass
class StepRecording:
    recording: Recording
    spec: StepSpec
    batch_size: int
    step_start: int  # index of the recorded step's first op (after any warm-up step)
    parameter_keys: dict[str, int]  # parameter name -> storage key
    gradient_keys: dict[str, int]  # parameter name -> storage key of its .grad after the step
    optimizer_state_keys: tuple[int, ...]
    input_keys: tuple[int, ...]  # one per input of the model
    target_key: int  # -1: no targets (an inference, or a loss that needs none)
    gradient_order: tuple[str, ...] = ()  # parameter names, as backward accumulated their gradients
    loss: str = ""  # what the training step's loss was (`builtin_loss_words`); "" for an inference
    saves_skipped: int = 0  # the step's `torch.save` calls, not run (`_saves_skipped`)
    # Whether the step drew from Python's or NumPy's random numbers (see `predict._varies`).
    drew_python_random: bool = False
    # A training step whose forward and backward ran the same ops on the same shapes in the
    # warm-up (a first step) as in the recorded one: its forward and backward are those of any
    # first step of the same program (what `summarize` counts), not only of a steady one.
    steady: bool = False
    # The recorder lives as long as its recording: what it holds (the autograd nodes it mapped to
    # modules, with their saved tensors) dies after the recording is read, not as the step
    # returns, when its ledger would record those storages freed after the step's last op.
    recorder: Recorder | None = field(default=None, repr=False, compare=False)


@collector_off()
def record_step(
    model: nn.Module,
    spec: StepSpec,
    batch_size: int,
    *,
    optimizer_step: bool = True,
    warm_up: bool = True,
) -> StepRecording:
    """Run one step of `model` on fake tensors and record it (see `_record_step`); the model
    is left exactly as it was (`model_kept`), whatever the step did to it or raised. Without
    `warm_up`, an inference is recorded on its first call, not in its steady state: enough to
    know whether the model runs at a size, at half the cost."""
    valid_model(model)
    check_trains(model, spec)
    shared = _shared_recording(model, spec, batch_size, optimizer_step, warm_up)
    if shared is not None:
        return shared
    captured = captured_modules(spec.step, model) if spec.step is not None else []
    tensors = captured_tensors(spec.step, model) if spec.step is not None else []
    draws = python_random_states()
    try:
        step = _kept_record_step(
            model, spec, batch_size, captured, tensors, optimizer_step, warm_up, reuse=True
        )
    except _LossFitChanged:
        # The output no longer fits the loss as before (the model changed): again, as a first
        # trace, from the random states the first try started from.
        _restore_random_states(draws)
        step = _kept_record_step(
            model, spec, batch_size, captured, tensors, optimizer_step, warm_up, reuse=False
        )
    step.drew_python_random = draws != python_random_states()
    if _SHARED and warm_up:  # a first call alone only asks whether a size runs: none share it
        _SHARED[-1].append((model, batch_size, optimizer_step, step))
    return step


def _kept_record_step(
    model: nn.Module,
    spec: StepSpec,
    batch_size: int,
    captured: list[nn.Module],
    tensors: list[Captured],
    optimizer_step: bool,
    warm_up: bool,
    *,
    reuse: bool,
) -> StepRecording:
    """`_record_step`, the model and the modules the step reaches put back as they were after."""
    with contextlib.ExitStack() as kept:
        for module in [model, *captured]:
            kept.enter_context(model_kept(module))
        return _record_step(
            model,
            spec,
            batch_size,
            captured,
            tensors,
            optimizer_step=optimizer_step,
            warm_up=warm_up,
            reuse_loss_fit=reuse,
        )


# The recordings `sharing_recordings` keeps, one list per open scope, the innermost last:
# (model, batch size, optimizer step, step), each recorded with a warm-up.
_SHARED: list[list[tuple[nn.Module, int, bool, StepRecording]]] = []


@contextlib.contextmanager
def sharing_recordings() -> Iterator[None]:
    """Within, `record_step` hands back a recording it made before, of the same model object at
    the same batch, rather than record the same step again: several questions about one model
    (its summary, the memory of its training step and of an inference) then trace each step once.
    Only around calls between which nothing changes the model (each call leaves it as it was).

    Besides the same step, a summary's forward and backward (`optimizer_step=False`) are read
    from a full training step of the built-in step on the same input, whatever its optimizer,
    where that step was `steady`: the same ops as its first step ran."""
    _SHARED.append(_SHARED[-1] if _SHARED else [])
    try:
        yield
    finally:
        _SHARED.pop()


def _shared_recording(
    model: nn.Module, spec: StepSpec, batch_size: int, optimizer_step: bool, warm_up: bool
) -> StepRecording | None:
    if not _SHARED or not warm_up:
        return None
    wanted = spec.for_model(model)
    for held_model, held_batch, held_optimizer_step, step in _SHARED[-1]:
        if held_model is not model or held_batch != batch_size:
            continue
        # An inference and a summary's forward and backward build no optimizer: any will do.
        same_but_optimizer = step.spec.replace(optimizer=wanted.optimizer) == wanted
        if held_optimizer_step == optimizer_step and (
            step.spec == wanted or (wanted.mode == "infer" and same_but_optimizer)
        ):
            return step
        if (
            wanted.mode == "train"
            and not optimizer_step
            and held_optimizer_step
            and step.steady
            and same_but_optimizer
        ):
            return step
    return None


def python_random_states() -> tuple[object, ...]:
    """Python's and NumPy's global random states (NumPy's only where the process imported it):
    a step that draws from them may branch on the draw, which fake tensors cannot see."""
    states: list[object] = [random.getstate()]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, *rest = numpy.random.get_state()
        states.append((name, keys.tobytes(), *rest))  # bytes: comparable, as the array is not
    return tuple(states)


def _restore_random_states(states: tuple[object, ...]) -> None:
    """Put back the random states `python_random_states` read (fake tensors' random ops leave
    torch's generator alone)."""
    random.setstate(states[0])
    numpy = sys.modules.get("numpy")
    if numpy is not None and len(states) > 1:
        name, keys, *rest = states[1]  # type: ignore[misc]
        numpy.random.set_state((name, numpy.frombuffer(keys, dtype=numpy.uint32), *rest))


class _CopiesIn(TorchFunctionMode):
    """`copy.deepcopy` of a fake tensor of `fake_mode` (an optimizer factory's EMA copy of the
    model, `AveragedModel`) makes a fake tensor of that mode, as a real copy is a real tensor:
    PyTorch's own deep copy of a fake tensor makes it in a mode of its own, which the step's
    first op mixing the two refuses. A torch-function mode, so only around the factory: while the
    step runs, one would turn off attention's fused inference paths."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.Tensor.__deepcopy__:
            return func(*args, **kwargs)
        tensor, memo = args
        if getattr(tensor, "fake_mode", None) is not self.fake_mode:
            return func(*args, **kwargs)
        if id(tensor) not in memo:
            with torch.no_grad():
                copied = tensor.clone(memory_format=torch.preserve_format)
            if isinstance(tensor, nn.Parameter):
                copied = nn.Parameter(copied, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = copied.requires_grad_(tensor.requires_grad)
        return memo[id(tensor)]


def _note_buffer_values(
    known: KnownValues, model: nn.Module, fakes: dict[str, torch.Tensor]
) -> None:
    """The values of the model's small buffers, for the step's reads of them: a batch norm with
    momentum=None takes `1 / float(num_batches_tracked)` as its factor, a value fake tensors do
    not have, which the real run reads from the model's own state (as a step count or an
    "initialised" flag). What the step writes to them is followed (`KnownValues.follow`), or
    forgets them."""
    for name, buffer in model.named_buffers():
        fake = fakes[name]
        if buffer.layout == torch.strided and not buffer.is_meta and buffer.numel() <= SIZE_LIMIT:
            known.note(fake, buffer.detach().to("cpu", fake.dtype, copy=True))


def _record_step(
    model: nn.Module,
    spec: StepSpec,
    batch_size: int,
    captured: list[nn.Module],
    captured_places: list[Captured],
    *,
    optimizer_step: bool,
    warm_up: bool,
    reuse_loss_fit: bool = False,
) -> StepRecording:
    """Run one step of `model` on fake tensors and record it.

    A training step (the built-in one or `spec.step`) runs twice: the first as a warm-up (not
    recorded; whatever it leaves alive, gradients and optimizer state, is tracked) and the second,
    analysed: the steady state, when optimizer state exists. So does an inference. Without
    `optimizer_step`, one forward, cross-entropy and backward are recorded and nothing else (what
    FLOP counts cover).

    The model's own parameters are not touched: fake copies stand in for them, swapped into the
    model for the duration of the step (as `torch.func.functional_call` does), so the step calls
    `model(inputs)` as it would for real, and the optimizer is built over the fakes. Tensors its
    modules hold as plain attributes are swapped for fake copies too, and count as buffers.
    So are the tensors of the modules the step reaches from outside the model (`captured`: a
    frozen teacher in its closure), in their own dtype; they count as what the step keeps, as
    they do when the optimizer factory builds such a module; and so are the plain tensors it
    reaches (`captured_places`: class weights in its closure).

    A training step's loss is fitted to the model's output (`_LossFit`), found by a forward
    before the step; with `reuse_loss_fit`, the fit found for the same model on inputs of the
    same layout before, checked against the output of the step's first call of the model.
    """
    require_supported_torch()
    spec = spec.for_model(model)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    # The recorder remembers op outputs itself (`FakeOutputs`); FakeTensorMode's own cache only
    # repeats it, hashing every argument of each call that still reaches it (a new shape).
    fake_mode.cache_enabled = False
    # Autograd cannot hold fake CUDA tensors in a build without CUDA: such a step runs on fake CPU
    # tensors with CUDA's choices made explicitly (foreach optimizers, fused dropout, autocast).
    emulate_cuda = spec.device_type == "cuda" and not torch.cuda.is_available()
    device = torch.device("cpu" if emulate_cuda else spec.device_type)
    memory_format = spec.torch_memory_format
    fakes = fake_parameters(
        model, fake_mode, dtype=spec.dtype, device=device, memory_format=memory_format
    )
    attribute_fakes = _fake_attributes(model, fake_mode, fakes)
    captured_fakes = [
        fake_parameters(module, fake_mode, dtype=None, device=device) for module in captured
    ]
    captured_tensors: list[torch.Tensor] = [t for fake in captured_fakes for t in fake.values()]
    captured_tensors += [
        t
        for module, fake in zip(captured, captured_fakes)
        for t in _fake_attributes(module, fake_mode, fake)
    ]
    with fake_mode, OffRecord(fake_mode):
        captured_values = [_fake_view(place.value) for place in captured_places]
    captured_tensors += captured_values
    trains = spec.mode == "train"
    recorder = Recorder(model, fake_mode, emulate_cuda=emulate_cuda)
    was_training = model.training
    model.train(trains)
    # A kernel that rejects its fake inputs raises, and the caller turns that into one clear line;
    # FakeTensorMode would also log the whole traceback first.
    fake_log = logging.getLogger(FAKE_TENSOR_LOGGER)
    log_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:

        def forward(*x: torch.Tensor) -> Any:
            args, kwargs = model_arguments(step_arguments(spec, x))
            return torch.func.functional_call(
                model, fakes, args, kwargs, tie_weights=True, strict=False
            )

        with fake_mode, OffRecord(fake_mode):
            inputs = example_inputs(spec, batch_size, device)
        # The loss fits the output, so its targets (if any) follow a forward's output: a forward
        # of its own (a tenth of a step's trace), unless this model's output on inputs of this
        # layout was fitted before and the step's own forward agrees (`_FirstOutput`).
        fits = _LOSS_FITS.setdefault(model, {}) if trains else {}
        # By step function too: a step that calls the model on parts of the batch (the planner's
        # accumulation) fits no loss to its first output, and would stop at it every time. By
        # its id, not the function, which may hold the model (a weak key's value must not): an
        # id reused by another function is checked all the same.
        layouts = ((t.shape, t.stride(), t.dtype, t.device) for t in inputs)
        fit_key = (None if spec.step is None else id(spec.step), spec.dtype, *layouts)
        fit = fits.get(fit_key) if reuse_loss_fit else None
        reused = fit is not None
        fits_anew = False
        if trains and fit is None:
            draws = python_random_states()
            # What that forward caches in the model (an attribute, a dict or an `lru_cache` of
            # its code) is undone (`model_kept`) and made again on the record, in the warm-up,
            # as a real loop's first step makes it: kept, a cache made off the record was never
            # counted. Its reads of the model's buffers are answered from their own known
            # values, apart from the step's: what this forward writes to them is not the real
            # step's.
            probe_known = KnownValues()
            _note_buffer_values(probe_known, model, fakes)
            with fake_mode, OffRecord(fake_mode, probe_known), model_kept(model):
                fit = _LossFit.of(_output_without_grad(forward, inputs))
            # Kept only where that forward drew no random number (skipped, it would not draw).
            fits_anew = draws == python_random_states()
        with fake_mode, OffRecord(fake_mode):
            targets = fit.targets(device) if fit is not None else None
        loss_words = fit.words if fit is not None else ""
        first_output = _FirstOutput(model, fit, strict=reused, watch=trains)
        for tensor in fakes.values():
            recorder.track(tensor, "parameter" if isinstance(tensor, nn.Parameter) else "buffer")
        for tensor in attribute_fakes:
            recorder.track(tensor, "buffer")
        _note_buffer_values(recorder.known, model, fakes)
        for tensor in captured_tensors:
            recorder.track(tensor, "captured")
        del captured_tensors
        for tensor, dtype, value_range in zip(inputs, spec.input_dtypes, spec.input_ranges):
            recorder.track(tensor, "input")
            value = determined_input(tuple(tensor.shape), dtype, value_range, torch.device("cpu"))
            if value is not None:
                recorder.known.note(tensor, value)
            elif not (dtype.is_floating_point or dtype.is_complex):
                recorder.known.note_bounds(tensor, value_range[0], value_range[1] - 1)
        if targets is not None:
            recorder.track(targets, "targets")
        trainable = [t for t in fakes.values() if isinstance(t, nn.Parameter) and t.requires_grad]
        # What a warm-up may replace on the model for good: attributes' tensors and buffers (a
        # replaced parameter lives on in the optimizer, as it does for real).
        replaceable = [
            *attribute_fakes,
            *(t for t in fakes.values() if not isinstance(t, nn.Parameter)),
        ]
        names = {id(t): name for name, t in fakes.items()}
        gradient_order: list[str] = []
        optimizers: list[torch.optim.Optimizer] = []
        step_start = 0
        step_inputs = step_arguments(spec, inputs)
        saves: list[object] = []
        with (
            fake_mode,
            reparametrize_module(model, fakes, tie_weights=True, strict=False),
            contextlib.ExitStack() as swapped,
            recorder,
            recorder.noting_rng_states(),
            _saves_skipped(saves),
            first_output,
        ):
            for module, module_fakes in zip(captured, captured_fakes):
                swapped.enter_context(
                    reparametrize_module(module, module_fakes, tie_weights=True, strict=False)
                )
            containers = captured_containers(spec.step) if spec.step is not None else []
            swapped.enter_context(swapped_in(captured_places, captured_values, containers))
            # The user's containers hold the only references: a fake the step drops from its
            # list (a history it trims) dies then, as the real tensor would.
            captured_values.clear()
            if not trains:
                infer = functools.partial(
                    inference_step,
                    model,
                    step_inputs,
                    autocast_dtype=spec.autocast_dtype,
                    grad_mode=spec.grad_mode,
                )
                # The steady state, as for training: what a first call leaves in the model (a
                # cache a forward keeps in an attribute, LeViT's attention biases) is there.
                if warm_up:
                    with recorder.warming_up():
                        infer()
                    _let_go_of_replaced(recorder, model, replaceable)
                infer()
            elif not optimizer_step:
                _forward_backward(model, step_inputs, targets, spec.autocast_dtype, device)
            else:
                with _CopiesIn(fake_mode):
                    optimizer = spec.make_optimizers(model, device_type=spec.device_type)
                optimizers = optimizers_in(optimizer)
                step = spec.step_function()
                with recorder.warming_up():
                    # Held while the recorded step runs, as a loop's `loss = step(...)` holds it.
                    previous = step(model, optimizer, step_inputs, targets)
                _let_go_of_replaced(recorder, model, replaceable)
                _name_survivors(recorder, trainable, optimizers)
                step_start = len(recorder.recording.ops)
                # The order in which backward finishes each parameter's gradient (DDP's buckets
                # follow it), of those still trainable (the warm-up may have frozen some).
                hooks = [
                    p.register_post_accumulate_grad_hook(
                        lambda p: gradient_order.append(names[id(p)])
                    )
                    for p in trainable
                    if p.requires_grad
                ]
                step(model, optimizer, step_inputs, targets)
                for hook in hooks:
                    hook.remove()
                del previous
    finally:
        model.train(was_training)
        fake_log.setLevel(log_level)
    if reused and first_output.seen != fit:
        # Unchecked (the step never called the model), or another fit whose stop the step
        # caught: not a recording to keep.
        raise _LossFitChanged
    if fits_anew and first_output.seen == fit:
        fits[fit_key] = fit
    if trains and optimizer_step and not recorder.phases.backward_calls:
        raise NinlabError(
            f"the step {spec.step_name} never calls backward(), so it trains nothing; call "
            "loss.backward() in it, or predict mode='infer'"
        )
    state_keys = [recorder.storage_key(t) for t in optimizer_state(optimizers)]
    return StepRecording(
        recorder=recorder,
        recording=recorder.recording,
        spec=spec,
        batch_size=batch_size,
        step_start=step_start,
        parameter_keys={
            name: recorder.storage_key(t)
            for name, t in fakes.items()
            if isinstance(t, nn.Parameter)
        },
        gradient_keys={
            names[id(p)]: recorder.storage_key(p.grad) for p in trainable if p.grad is not None
        },
        optimizer_state_keys=tuple(k for k in state_keys if k >= 0),
        input_keys=tuple(recorder.storage_key(tensor) for tensor in inputs),
        target_key=recorder.storage_key(targets) if targets is not None else -1,
        gradient_order=tuple(gradient_order),
        saves_skipped=len(saves),
        steady=trains and optimizer_step and _same_first_step(recorder, step_start),
        loss=(loss_words if spec.step is None else f"the step {spec.step_name}'s own")
        if trains
        else "",
    )


# The phases a summary counts of a training step (`summary._BACKWARD_PHASES` and the forward).
_COUNTED_PHASES = ("forward", "backward", "recompute")


def _same_first_step(recorder: Recorder, step_start: int) -> bool:
    """Whether the recorded step's forward and backward ran the ops its warm-up ran, in order,
    on the same shapes (see `StepRecording.steady`)."""
    first = [op for op in recorder.warm_up_ops if op[0] in _COUNTED_PHASES]
    recorded = [
        (op.phase, op.op, tuple(t.shape for t in op.outputs))
        for op in recorder.recording.ops[step_start:]
        if op.phase in _COUNTED_PHASES
    ]
    return first == recorded


def _let_go_of_replaced(
    recorder: Recorder, model: nn.Module, replaceable: list[torch.Tensor]
) -> None:
    """After the warm-up: an attribute's tensor or a buffer the model no longer holds (a cache
    the step replaced, RAFT's placeholder pyramid, ConViT's placeholder `rel_indices` buffer) is
    dead when the recorded step starts, as it is for real, though `model_kept` (or the
    reparametrisation) still holds it, to put the real one back."""
    held = {id(found.tensor.untyped_storage()) for found in attribute_tensors(model)}
    held |= {id(buffer.untyped_storage()) for buffer in model.buffers()}
    for fake in replaceable:
        if id(fake.untyped_storage()) not in held:
            recorder.ledger.let_go(fake)


def _fake_attributes(
    module: nn.Module, fake_mode: FakeTensorMode, parameter_fakes: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Swap fake copies in for the tensors `module` holds as plain attributes; returns them. An
    attribute that holds one of the module's own parameters or buffers again gets that tensor's
    fake (`parameter_fakes`, by name), which is counted once, as the parameter. The caller puts
    the real ones back (`model_kept`)."""
    by_identity = {
        id(tensor): parameter_fakes[name]
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if name in parameter_fakes
    }
    found = attribute_tensors(module)  # before the aliases hold fakes, which it would count
    for alias in attribute_aliases(module):
        alias.replace(by_identity[id(alias.tensor)])
    with fake_mode, OffRecord(fake_mode):
        fakes = [_fake_view(attribute.tensor) for attribute in found]
    for attribute, fake in zip(found, fakes):
        attribute.replace(fake)
    return fakes


def _fake_view(tensor: torch.Tensor) -> torch.Tensor:
    """A fake copy of `tensor` over a storage of the real one's size (a view, such as
    `hann_window`'s, keeps a larger storage alive than its elements: 36 bytes for 8 floats)."""
    storage = torch.empty(
        tensor.untyped_storage().nbytes() // tensor.element_size(),
        dtype=tensor.dtype,
        device=tensor.device,
    )
    view = storage.as_strided(tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
    return view.requires_grad_(tensor.requires_grad)


@dataclass(frozen=True)
class _LossFit:
    """What the built-in loss makes of a model's output: its targets' shape (None: it takes
    none) and what it is (`builtin_loss_words`)."""

    targets_shape: tuple[int, ...] | None
    words: str

    @staticmethod
    def of(output: Any) -> _LossFit:
        return _LossFit(builtin_targets_shape(output), builtin_loss_words(output))

    def targets(self, device: torch.device) -> torch.Tensor | None:
        """`builtin_targets` of such an output."""
        return class_labels(self.targets_shape, device)


# By model: the loss's fit to its output, by the step function, the parameters' dtype and the
# layout of the inputs it was found on. Only fits the step's own first forward agreed with are
# kept.
_LOSS_FITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _LossFit]] = (
    weakref.WeakKeyDictionary()
)


class _LossFitChanged(Exception):
    """A reused `_LossFit` does not fit the step's output: the step is traced again, anew."""


class _FirstOutput:
    """While entered (where `watch`: a training step, whose loss is fitted): the loss's fit to
    the output of the first call of `model` (`seen`). With `strict`, a fit other than `expected`
    stops the step there (`_LossFitChanged`), before the loss reads targets made for another
    output."""

    def __init__(
        self, model: nn.Module, expected: _LossFit | None, *, strict: bool, watch: bool
    ) -> None:
        self.model, self.expected, self.strict, self.watch = model, expected, strict, watch
        self.seen: _LossFit | None = None
        self._handle: Any = None

    def __enter__(self) -> None:
        if self.watch:
            self._handle = nn.modules.module.register_module_forward_hook(self._hook)

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is not self.model or self.seen is not None:
            return
        self.seen = _LossFit.of(output)
        if self.strict and self.seen != self.expected:
            raise _LossFitChanged


def _output_without_grad(forward: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Any:
    """The model's output on `inputs`, without autograd, to fit the loss to it."""
    with torch.no_grad():
        return forward(*inputs)


def _name_survivors(
    recorder: Recorder, parameters: list[nn.Parameter], optimizers: list[torch.optim.Optimizer]
) -> None:
    """Give what the warm-up left alive its role: gradients and optimizer state; the rest (a
    GradScaler's scale, anything the step keeps) stays the warm-up's. A function of its own, so
    no loop variable outlives it holding a gradient that zero_grad must free."""
    for tensors, role in (
        ([p.grad for p in parameters if p.grad is not None], "gradient"),
        (optimizer_state(optimizers), "optimizer_state"),
    ):
        for tensor in tensors:
            key = recorder.storage_key(tensor)
            if key >= 0:
                recorder.recording.storages[key].role = role


def _forward_backward(
    model: nn.Module,
    inputs: StepInputs,
    targets: torch.Tensor | None,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> None:
    """Forward, loss and backward without an optimizer: what FLOP counts of a step cover."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = call_model(model, inputs)
        loss = builtin_loss(logits, targets)
    del logits
    loss.backward()
