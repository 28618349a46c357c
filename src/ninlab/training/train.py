"""The training loop: d2l's `train_ch6`, fast, resumable, and safe to interrupt.

`_train` is the algorithm: prepare the run (its configuration checked, fresh or from the
checkpoint), then for each epoch, for each batch, one `optimize_batch` (forward, loss, backward, SGD
step) on the images a seeded permutation picks for this rank, resized and scaled on the device
(`ninlab.training.pipeline`); a Ctrl-C (or SIGTERM) finishes the current step, saves, and returns
(`ninlab.training.interrupt`); every epoch ends with a test-set evaluation, a metrics row
(`ninlab.training.metrics`) and an atomic checkpoint (`ninlab.training.checkpoint`). Under torchrun
the same code runs on every rank (`ninlab.training.distributed`); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ninlab.analysis.measure import available_memory
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import InputTooSmall, summarize
from ninlab.errors import NinlabError
from ninlab.models import build_nin, parse_variant
from ninlab.optimizers import OptimizerSpec, make_optimizer
from ninlab.outputs import json_text, write_text_atomically
from ninlab.training import distributed
from ninlab.training.checkpoint import (
    CHECKPOINT_NAME,
    RunProgress,
    load_checkpoint,
    restore_run,
    save_run,
)
from ninlab.training.data import FILES, FashionMNIST, Split
from ninlab.training.diagnostics import (
    StepClock,
    chance_warning,
    report_throughput,
    sat_at_chance,
)
from ninlab.training.evaluate import Evaluation, autocast, evaluate_model
from ninlab.training.interrupt import StopRequest
from ninlab.training.metrics import write_metrics
from ninlab.training.pipeline import (
    Augmentation,
    InputTransform,
    batch_indices,
    epoch_permutation,
)
from ninlab.training.plots import plot_curves
from ninlab.training.preflight import (
    check_compiler,
    check_fits_data,
    check_memory,
)
from ninlab.training.presets import TrainConfig, config_from_dict
from ninlab.training.progress import Reporter, SilentReporter, format_duration
from ninlab.training.rundir import owning
from ninlab.training.schedule import Schedule
from ninlab.units import format_bytes, format_flops

__all__ = [
    "RunCost",
    "TrainResult",
    "optimize_batch",
    "resumed_config",
    "run_cost",
    "step_spec_of",
    "train",
]


# -- the cost of a run, from the accountant ------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    training_step_flops: int  # forward + backward of one global batch (2 FLOPs per multiply-add)
    peak_live_bytes: int  # predicted peak of tensor storage in one rank's training step
    # The same peak as the allocator holds it, which is what runs out: on CUDA the caching
    # allocator's reserved segments (max_memory_reserved).
    peak_allocator_bytes: int


def step_spec_of(config: TrainConfig, *, device_type: str, world_size: int) -> StepSpec:
    """The step a rank of this run takes, as the accountant describes it: this module's own
    `optimize_batch` with the run's loss settings and autocast, its optimizer, memory format
    and DDP."""
    step = functools.partial(
        optimize_batch,
        amp=config.amp,
        label_smoothing=config.label_smoothing,
        loss_scale=world_size / config.batch_size,
    )
    return StepSpec(
        input_size=(1, config.image_size, config.image_size),
        optimizer=_optimizer_spec(config),
        device_type=device_type,
        memory_format="channels_last" if config.channels_last else "contiguous",
        ddp=world_size > 1,
        step=step,
    )


def run_cost(
    model: nn.Module, config: TrainConfig, *, device_type: str, world_size: int
) -> RunCost:
    """INTEGRATION POINT with the accountant (`ninlab.analysis.summary` for FLOPs,
    `ninlab.analysis.predict` for the peak): the numbers printed before the first step. The rest of
    the trainer does not depend on how they are computed."""
    spec = step_spec_of(config, device_type=device_type, world_size=world_size)
    try:
        summary = summarize(model, spec, batch_size=config.batch_size)
    except InputTooSmall as error:
        fix = f"; use --image-size {max(error.smallest[1:])} or more" if error.smallest else ""
        raise NinlabError(
            f"--image-size {config.image_size} is too small for {config.variant}: {error}{fix}"
        ) from None
    memory = predict_memory(model, spec, batch_size=-(-config.batch_size // world_size))
    return RunCost(
        training_step_flops=summary.totals.training_step_flops,
        peak_live_bytes=memory.live_peak_bytes,
        peak_allocator_bytes=memory.held_peak_bytes,
    )


# -- the loop --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    config: TrainConfig
    output_dir: Path
    history: tuple[dict[str, Any], ...]  # one row of METRICS_FIELDS per completed epoch
    interrupted: bool
    model: nn.Module

    @property
    def checkpoint(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME


def train(
    config: TrainConfig,
    *,
    output_dir: str | os.PathLike[str],
    data: FashionMNIST | Callable[[], FashionMNIST],
    resume: bool = False,
    device: str | None = None,
    reporter: Reporter | None = None,
    stop: StopRequest | None = None,
    force_memory: bool = False,
) -> TrainResult:
    """Train `config` on `data`, writing checkpoint.pt, metrics.jsonl/.csv, curves.png and
    config.json to `output_dir`, which the run owns until it ends (`ninlab.training.rundir`).
    `data` may be a function that loads it: it is called once the directory is owned and the
    configuration and network are checked, so a refused run costs no loading. With `resume`,
    continue the checkpoint in `output_dir` exactly. A new run whose predicted peak does not fit
    in the memory available is refused unless `force_memory`."""
    context = distributed.start(device)
    try:
        # Rank 0 owns the directory for all ranks: it alone writes there.
        with owning(Path(output_dir)) if context.is_writer else contextlib.nullcontext():
            return _train(
                config,
                Path(output_dir),
                data,
                resume,
                context,
                reporter,
                stop or StopRequest(),
                force_memory,
            )
    finally:
        distributed.stop(context)


def _train(
    config: TrainConfig,
    output_dir: Path,
    data: FashionMNIST | Callable[[], FashionMNIST],
    resume: bool,
    context: distributed.Context,
    reporter: Reporter | None,
    stop: StopRequest,
    force_memory: bool,
) -> TrainResult:
    say: Reporter = (reporter or SilentReporter()) if context.is_writer else SilentReporter()
    run, progress, cost = _prepare(config, output_dir, data, resume, context, force_memory)
    config = run.config  # a resumed run's own
    _announce(say, run, progress, cost)
    clock = StepClock()
    while progress.epoch < config.epochs:
        epoch = progress.epoch + 1
        say.epoch_started(epoch, config.epochs, run.schedule.steps_per_epoch, progress.batch)
        run.net.train()
        sums = _EpochSums(progress, context.device)
        clock.start_epoch()
        for indices, global_count in _epoch_batches(run, epoch, start_batch=progress.batch):
            clock.start_step()
            lr = run.schedule.lr(progress.step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            inputs, labels = _training_batch(run, indices, step=progress.step)
            # DDP averages gradients over ranks; scaling by ranks / global batch makes that average
            # the gradient of the global batch's mean loss, whatever the size of this rank's share.
            loss_sum, logits = optimize_batch(
                run.net,
                run.optimizer,
                inputs,
                labels,
                amp=config.amp,
                label_smoothing=config.label_smoothing,
                loss_scale=context.world_size / global_count,
            )
            sums.add(loss_sum, logits, labels)
            progress.batch += 1
            progress.step += 1
            stopping = _should_stop(loss_sum, stop, context, epoch=epoch, step=progress.step, lr=lr)
            progress.seconds += clock.end_step(global_count)
            _report_step(say, run, progress, sums, clock)
            if stopping:
                _save_interrupted(run, progress, sums, epoch, say)
                return TrainResult(config, output_dir, tuple(progress.history), True, run.model)
        _end_epoch(run, progress, sums, epoch, say)
    return TrainResult(config, output_dir, tuple(progress.history), False, run.model)


def optimize_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    amp: str,
    label_smoothing: float,
    loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward (under bf16 autocast when `amp` is "bf16"), cross-entropy summed
    over the batch in float32, backward of that sum times `loss_scale`, then `optimizer.step()`.

    Returns the summed loss and the logits, detached. The learning rate is the optimizer's own.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(inputs.device, amp):
        logits = model(inputs)
    loss_sum = F.cross_entropy(
        logits.float(), targets, reduction="sum", label_smoothing=label_smoothing
    )
    (loss_sum * loss_scale).backward()
    optimizer.step()
    return loss_sum.detach(), logits.detach()


# -- preparing a run: the configuration checked, the network built or restored ---------------------


@dataclass(frozen=True)
class _Run:
    """What a prepared run trains with; none of it changes during the run (see `RunProgress`)."""

    config: TrainConfig
    output_dir: Path
    context: distributed.Context
    model: nn.Module  # the bare network: evaluated and saved
    net: nn.Module  # what the steps call: `model` under DDP and torch.compile when asked for
    optimizer: torch.optim.Optimizer
    train_split: Split  # on the device, like test_split
    test_split: Split
    transform: InputTransform
    augmentation: Augmentation  # of training batches only, before `transform`
    schedule: Schedule


def _prepare(
    config: TrainConfig,
    output_dir: Path,
    data: FashionMNIST | Callable[[], FashionMNIST],
    resume: bool,
    context: distributed.Context,
    force_memory: bool,
) -> tuple[_Run, RunProgress, RunCost | None]:
    """The run, where it stands, and (for a new run) its cost to print."""
    config, state = _checked_config(config, output_dir, resume, context)
    # Every check of the network (it fits the data, the compiler, the memory) comes before the
    # data is loaded: a refused run downloads and prints nothing.
    model, cost = _checked_network(
        config, state, context, data_bytes=None if force_memory else _data_bytes(config, data)
    )
    if callable(data):  # loaded only now: the directory is this run's and may be trained into
        data = data()
    model, optimizer, progress = _build(model, config, output_dir, state, context)
    net = distributed.wrap(model, context)
    if config.compile:
        net = torch.compile(net)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_split = _on_device(data.train, config.train_examples, context.device)
    run = _Run(
        config=config,
        output_dir=output_dir,
        context=context,
        model=model,
        net=net,
        optimizer=optimizer,
        train_split=train_split,
        test_split=_on_device(data.test, config.test_examples, context.device),
        transform=InputTransform(config.image_size, config.normalize),
        augmentation=Augmentation(flip=config.flip, translate=config.translate),
        schedule=Schedule.of(config, len(train_split), context.world_size),
    )
    return run, progress, cost


def _checked_config(
    config: TrainConfig, output_dir: Path, resume: bool, context: distributed.Context
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The configuration to train (a resumed run's saved one) and the checkpoint to resume from."""
    # Every rank checks the same files, so that all of them stop on the same error.
    if output_dir.exists() and not output_dir.is_dir():
        raise NinlabError(
            f"output directory {output_dir} is a file; choose a directory with --output-dir"
        )
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = None
    if resume:
        state = load_checkpoint(checkpoint_path)
        config = resumed_config(config_from_dict(state["config"]), dataclasses.asdict(config))
    elif checkpoint_path.exists():
        raise NinlabError(
            f"{output_dir} already holds a checkpoint; continue it with 'ninlab train --resume "
            f"{output_dir}' or choose another --output-dir"
        )
    if config.batch_size < context.world_size:
        raise NinlabError(
            f"batch size {config.batch_size} is smaller than the {context.world_size} processes"
        )
    return config, state


def resumed_config(saved: TrainConfig, requested: dict[str, Any]) -> TrainConfig:
    """The saved run's configuration; settings given again must agree with it (an exact resume
    cannot change the model, the data or the schedule)."""
    differences = [
        f"{key}={value!r} (saved: {getattr(saved, key)!r})"
        for key, value in requested.items()
        if getattr(saved, key) != value
    ]
    if differences:
        raise NinlabError(
            f"the checkpoint was trained with other settings: {', '.join(differences)}; --resume "
            "continues the saved run with its own settings: give --resume without a preset or "
            "training options, or start a new run in another --output-dir"
        )
    return saved


def _data_bytes(config: TrainConfig, data: FashionMNIST | Callable[[], FashionMNIST]) -> int:
    """The bytes of the images a run keeps on its device, beside the step's own peak: of `data`,
    or before it is loaded, of Fashion-MNIST's splits (which loading verifies)."""
    if callable(data):
        shapes = (FILES["train_images"].shape, FILES["test_images"].shape)
    else:
        shapes = (tuple(data.train.images.shape), tuple(data.test.images.shape))
    counts = (config.train_examples, config.test_examples)
    return sum(
        min(count or total, total) * math.prod(image)
        for (total, *image), count in zip(shapes, counts)
    )


def _checked_network(
    config: TrainConfig,
    state: dict[str, Any] | None,
    context: distributed.Context,
    *,
    data_bytes: int | None,
) -> tuple[nn.Module, RunCost | None]:
    """The network, freshly initialised on the CPU, once it has proved that it builds and fits
    (`ninlab.training.preflight`; the memory only of a new run, and not when `data_bytes`, the
    data's bytes on the device, is None: forced); and the cost of a new run, to print."""
    torch.manual_seed(config.seed)
    model = build_nin(parse_variant(config.variant))
    check_fits_data(model, config, world_size=context.world_size)
    if config.compile:
        check_compiler(context.device)
    cost = (
        run_cost(model, config, device_type=context.device.type, world_size=context.world_size)
        if state is None and context.is_writer
        else None
    )
    if cost is not None and data_bytes is not None:
        check_memory(
            cost.peak_allocator_bytes,
            data_bytes,
            context.device,
            available=available_memory(context.device),
        )
    return model, cost


def _build(
    model: nn.Module,
    config: TrainConfig,
    output_dir: Path,
    state: dict[str, Any] | None,
    context: distributed.Context,
) -> tuple[nn.Module, torch.optim.Optimizer, RunProgress]:
    """The checked network and its optimizer on the device, fresh or restored from `state`;
    writes config.json. A configuration refused before leaves the directory as it was (`owning`
    removes one it created and nothing was written in)."""
    model = model.to(context.device, memory_format=_config_memory_format(config))
    optimizer = make_optimizer(_optimizer_spec(config), model.parameters())
    # Each rank draws its own dropout masks; rank 0 of a single process keeps the seed's stream.
    torch.manual_seed(config.seed + context.rank)
    progress = restore_run(state, model, optimizer, context) if state is not None else RunProgress()
    if context.is_writer:
        config_text = json_text(dataclasses.asdict(config), indent=2) + "\n"
        write_text_atomically(output_dir / "config.json", config_text, durable=True)
    return model, optimizer, progress


def _on_device(split: Split, count: int | None, device: torch.device) -> Split:
    part = split.head(count) if count else split
    return Split(part.images.to(device), part.labels.to(device))


def _optimizer_spec(config: TrainConfig) -> OptimizerSpec:
    name = "sgd" if config.momentum == 0 else ("nesterov" if config.nesterov else "sgd-momentum")
    return OptimizerSpec(
        name=name,
        lr=config.lr,
        settings={"momentum": config.momentum, "weight_decay": config.weight_decay},
    )


def _config_memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def _announce(say: Reporter, run: _Run, progress: RunProgress, cost: RunCost | None) -> None:
    config, context, schedule = run.config, run.context, run.schedule
    say.info(
        f"training {config.variant} at {config.image_size}x{config.image_size}, batch "
        f"{config.batch_size}, {config.epochs} epochs of {len(run.train_split):,} images "
        f"({schedule.steps_per_epoch} steps), on {context.device}"
        + (f" x {context.world_size} processes" if context.distributed else "")
        + f"; output in {run.output_dir}"
    )
    if cost is not None:
        step_flops = cost.training_step_flops
        say.info(
            f"cost: {format_flops(step_flops)} per training step (forward + backward, 2 FLOPs per "
            f"multiply-add), {format_flops(step_flops * schedule.total_steps)} in all; predicted "
            f"peak memory of a step per process: {format_bytes(cost.peak_live_bytes)} of tensors, "
            f"{format_bytes(cost.peak_allocator_bytes)} held by the allocator"
        )
    if progress.epoch or progress.batch:
        say.info(
            f"resuming after epoch {progress.epoch}, batch {progress.batch} (step {progress.step})"
        )


# -- a step's surroundings: its batch, its sums, stopping, reporting ------------------------------


def _epoch_batches(
    run: _Run, epoch: int, *, start_batch: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """This rank's indices of each batch of `epoch` from `start_batch` on, with the global batch's
    size."""
    permutation = epoch_permutation(
        len(run.train_split), seed=run.config.seed, epoch=epoch, device=run.context.device
    )
    return batch_indices(
        permutation,
        batch_size=run.config.batch_size,
        rank=run.context.rank,
        world_size=run.context.world_size,
        start_batch=start_batch,
    )


def _training_batch(
    run: _Run, indices: torch.Tensor, *, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images gathered, augmented (the draws of optimizer step `step`), resized and scaled on the
    device, in the network's memory format; labels."""
    images = run.augmentation(run.train_split.images[indices], seed=run.config.seed, step=step)
    inputs = run.transform(images).contiguous(memory_format=_config_memory_format(run.config))
    return inputs, run.train_split.labels[indices]


class _EpochSums:
    """Loss, correct predictions and examples of the epoch so far on this rank, on the device."""

    def __init__(self, progress: RunProgress, device: torch.device) -> None:
        self._sums = torch.tensor(
            [progress.loss_sum, progress.correct, progress.examples],
            dtype=torch.float64,
            device=device,
        )

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._sums[0] += loss_sum
        self._sums[1] += (logits.argmax(dim=1) == labels).sum()
        self._sums[2] += labels.shape[0]

    def means(self) -> tuple[float, float]:
        """Mean loss and accuracy on this rank (rank 0's are what the progress bar shows)."""
        seen = float(self._sums[2]) or 1.0
        return float(self._sums[0]) / seen, float(self._sums[1]) / seen

    def fold_into(self, progress: RunProgress, context: distributed.Context) -> None:
        """Summed over all ranks into `progress`, which the checkpoint saves."""
        totals = distributed.all_reduce_sum(self._sums.clone(), context)
        progress.loss_sum, progress.correct, progress.examples = (float(v) for v in totals)


def _should_stop(
    loss_sum: torch.Tensor,
    stop: StopRequest,
    context: distributed.Context,
    *,
    epoch: int,
    step: int,
    lr: float,
) -> bool:
    """Whether any rank was asked to stop (Ctrl-C, SIGTERM); raises when any rank's loss is no
    longer finite. One collective per step: every rank must agree on stopping at the same step."""
    flags = torch.tensor(
        [0.0 if torch.isfinite(loss_sum) else 1.0, float(stop.requested)], device=context.device
    )
    distributed.all_reduce_sum(flags, context)
    if flags[0] > 0:
        raise NinlabError(
            f"training diverged: the loss is no longer finite (nan or inf) at epoch {epoch}, step "
            f"{step} (lr {lr:.4g}); the checkpoint of the last complete epoch is kept; lower --lr, "
            "add --warmup-epochs 1, or use --preset default (normalised input, Kaiming init)"
        )
    return bool(flags[1] > 0)


def _report_step(
    say: Reporter, run: _Run, progress: RunProgress, sums: _EpochSums, clock: StepClock
) -> None:
    seconds_per_step = clock.just_settled()
    if seconds_per_step is not None:
        report_throughput(
            say,
            run.config,
            seconds_per_step,
            steps_left=run.schedule.total_steps - progress.step,
            epochs_left=run.config.epochs - progress.epoch,
            test_examples=len(run.test_split),
            device_type=run.context.device.type,
        )
    say.batch_done(progress.batch, *sums.means(), clock.epoch_examples_per_s())


# -- the end of an epoch, or of an interrupted one -------------------------------------------------


def _end_epoch(
    run: _Run, progress: RunProgress, sums: _EpochSums, epoch: int, say: Reporter
) -> None:
    """Evaluate, add the epoch's row to the history, save the checkpoint, metrics and curves, and
    report, with a warning when the epoch sat at chance level."""
    config = run.config
    sums.fold_into(progress, run.context)
    row, evaluation = _evaluate_epoch(run, progress, epoch)
    progress.close_epoch(row)
    save_run(run.output_dir, run.config, run.model, run.optimizer, progress, run.context)
    if run.context.is_writer:
        write_metrics(run.output_dir, progress.history)
        plot_curves(
            progress.history,
            run.output_dir / "curves.png",
            epochs=config.epochs,
            title=f"{config.variant} at {config.image_size}x{config.image_size}, batch "
            f"{config.batch_size}, lr {config.lr:g}",  # no directory: a notebook's is temporary
        )
    _report_epoch(say, config, row, evaluation)


def _evaluate_epoch(
    run: _Run, progress: RunProgress, epoch: int
) -> tuple[dict[str, Any], Evaluation]:
    """The test-set evaluation after `epoch` and the epoch's row of METRICS_FIELDS."""
    eval_start = time.perf_counter()
    # The bare model, not the DDP wrapper: evaluation needs no collectives inside forward.
    evaluation = evaluate_model(
        run.model,
        run.test_split,
        transform=run.transform,
        batch_size=run.config.batch_size,
        amp=run.config.amp,
        channels_last=run.config.channels_last,
        flip_tta=run.config.flip_tta,
        context=run.context,
    )
    eval_seconds = time.perf_counter() - eval_start
    row = {
        "epoch": epoch,
        "step": progress.step,
        "lr": run.schedule.lr(progress.step - 1),  # the last step's
        "train_loss": progress.loss_sum / progress.examples,
        "train_accuracy": progress.correct / progress.examples,
        "test_loss": evaluation.loss,
        "test_accuracy": evaluation.accuracy,
        "train_seconds": progress.seconds,
        "examples_per_s": progress.examples / progress.seconds,
        "eval_seconds": eval_seconds,
        "elapsed_seconds": progress.elapsed + (progress.seconds + eval_seconds),
    }
    return row, evaluation


def _report_epoch(
    say: Reporter, config: TrainConfig, row: dict[str, Any], evaluation: Evaluation
) -> None:
    epoch, train_loss, train_accuracy = row["epoch"], row["train_loss"], row["train_accuracy"]
    say.epoch_finished(
        f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}, train acc "
        f"{train_accuracy:.4f}, test acc {evaluation.accuracy:.4f}, "
        f"{row['examples_per_s']:,.0f} ex/s, "
        f"{format_duration(row['train_seconds'] + row['eval_seconds'])}"
    )
    if not math.isfinite(evaluation.loss):
        say.warn(
            f"epoch {epoch}: the test loss is not a finite number ({evaluation.loss}): the "
            "network's outputs overflow on some test images; metrics.jsonl holds null for it"
        )
    if sat_at_chance(train_accuracy, evaluation.accuracy):
        say.warn(chance_warning(epoch, train_accuracy, evaluation, train_loss, config))


def _save_interrupted(
    run: _Run, progress: RunProgress, sums: _EpochSums, epoch: int, say: Reporter
) -> None:
    """The checkpoint after Ctrl-C or SIGTERM, with the epoch's partial sums: a resume continues
    from the next batch."""
    sums.fold_into(progress, run.context)
    save_run(run.output_dir, run.config, run.model, run.optimizer, progress, run.context)
    say.epoch_finished(
        f"interrupted in epoch {epoch} after batch {progress.batch}: checkpoint saved in "
        f"{run.output_dir}; continue with: ninlab train --resume --output-dir {run.output_dir}"
    )
