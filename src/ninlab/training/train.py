"""The training loop: d2l's `train_ch6`, fast, resumable, and safe to interrupt.

Per step: a seeded permutation gives this rank's indices, the uint8 images are gathered, resized
and scaled on the device (`ninlab.training.pipeline`), then forward, loss, backward and an SGD step. Every
epoch ends with a test-set evaluation, a metrics row and an atomic checkpoint; Ctrl-C (or SIGTERM)
finishes the current step, saves, and returns. Under torchrun the same code runs on every rank
(`ninlab.training.distributed`); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ninlab.analysis.memory import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.models import build_nin, parse_variant
from ninlab.optimizers import OptimizerSpec, make_optimizer
from ninlab.outputs import output_directory, write_text_atomically
from ninlab.training import distributed
from ninlab.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ninlab.training.data import CLASS_NAMES, FashionMNIST, Split
from ninlab.training.evaluate import Evaluation, autocast, evaluate_model
from ninlab.training.pipeline import InputTransform, batch_indices, epoch_permutation
from ninlab.training.plots import plot_curves
from ninlab.training.presets import PRESETS, TrainConfig, config_from_dict
from ninlab.training.progress import Reporter, SilentReporter, format_duration
from ninlab.training.schedule import learning_rate
from ninlab.units import format_bytes, format_flops

__all__ = [
    "RunCost",
    "StopRequest",
    "TrainResult",
    "run_cost",
    "resumed_config",
    "train",
    "METRICS_FIELDS",
]

METRICS_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "train_seconds",
    "examples_per_s",
    "eval_seconds",
    "elapsed_seconds",
)

# Throughput is timed over a few steps once the first ones (oneDNN/cuDNN set-up) are out of the way.
_SETTLE_STEPS = 5
_TIMED_STEPS = 5
# Mean |logit| below which a network at chance is said to have lost its signal (d2l's NiN after an
# epoch at 96x96, lr 0.05: 0.012).
_FADED_LOGIT = 0.05
# Beyond this, a CPU run is told about the CPU preset.
_LONG_CPU_RUN_S = 30 * 60


# -- the cost of a run, from the accountant ------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    training_step_flops: int  # forward + backward of one global batch (2 FLOPs per multiply-add)
    peak_live_bytes: int  # predicted peak of tensor storage in one rank's training step
    peak_allocator_bytes: int  # the same peak as the allocator holds it (what the OS or CUDA sees)


def step_spec_of(config: TrainConfig, *, device_type: str, world_size: int) -> StepSpec:
    """The step a rank of this run takes, as the accountant describes it: the run's optimizer,
    precision, memory format and DDP."""
    return StepSpec(
        input_size=(1, config.image_size, config.image_size),
        optimizer=_optimizer_spec(config),
        amp="bf16" if config.amp == "bf16" else None,
        device_type=device_type,
        memory_format="channels_last" if config.channels_last else "contiguous",
        ddp=world_size > 1,
    )


def run_cost(model: nn.Module, config: TrainConfig, *, device_type: str, world_size: int) -> RunCost:
    """INTEGRATION POINT with the accountant (`ninlab.analysis.summary` for FLOPs,
    `ninlab.analysis.memory` for the peak): the numbers printed before the first step. The rest of
    the trainer does not depend on how they are computed."""
    spec = step_spec_of(config, device_type=device_type, world_size=world_size)
    summary = summarize(model, input_size=spec.input_size, batch_size=config.batch_size)
    memory = predict_memory(model, spec, batch_size=-(-config.batch_size // world_size))
    return RunCost(
        training_step_flops=summary.totals.training_step_flops,
        peak_live_bytes=memory.live_peak_bytes,
        peak_allocator_bytes=memory.allocator_peak_bytes,
    )


# -- interruption --------------------------------------------------------------------------------


class StopRequest:
    """Set by Ctrl-C or SIGTERM; the loop saves a checkpoint after the current step and returns.

    A second Ctrl-C interrupts at once (the last epoch's checkpoint is still intact)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[StopRequest]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# -- results ---------------------------------------------------------------------------------------


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
            f"the checkpoint was trained with other settings: {', '.join(differences)}; "
            "--resume continues the saved run, so drop those options or start a new run in another --output-dir"
        )
    return saved


def _make_output_dir(path: Path) -> None:
    output_directory(path)


def _write_text_atomically(path: Path, text: str) -> None:
    """Every text file of a run (config, metrics) is needed to follow or reproduce it: durable."""
    write_text_atomically(path, text, durable=True)


def _write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv, rewritten whole from the checkpoint's history each epoch, so a
    resumed run never duplicates or loses a row."""
    _write_text_atomically(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=METRICS_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    _write_text_atomically(output_dir / "metrics.csv", table.getvalue())


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # completed batches of the current epoch
    step: int = 0  # completed optimizer steps
    loss_sum: float = 0.0  # current epoch so far, all ranks
    correct: float = 0.0
    examples: float = 0.0
    seconds: float = 0.0
    elapsed: float = 0.0  # training and evaluation time of all epochs before this one
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _on_device(split: Split, count: int | None, device: torch.device) -> Split:
    part = split.head(count) if count else split
    return Split(part.images.to(device), part.labels.to(device))


def _optimizer_spec(config: TrainConfig) -> OptimizerSpec:
    name = "sgd" if config.momentum == 0 else ("nesterov" if config.nesterov else "sgd-momentum")
    return OptimizerSpec(name=name, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _checkpoint_state(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: _Progress,
    rng: list[Any],
) -> dict[str, Any]:
    return {
        "config": dataclasses.asdict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "step": progress.step,
        "rng": rng,
        "running": {
            "loss_sum": progress.loss_sum,
            "correct": progress.correct,
            "examples": progress.examples,
            "seconds": progress.seconds,
            "elapsed": progress.elapsed,
        },
        "history": progress.history,
    }


def _restore(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, context: distributed.Context
) -> _Progress:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise NinlabError(
            f"the checkpoint's weights do not fit its own configuration ({str(error)[:100]})"
        ) from None
    if len(state["rng"]) != context.world_size:
        raise NinlabError(
            f"the checkpoint was written by {len(state['rng'])} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node={len(state['rng'])}) to continue exactly"
        )
    _set_rng_state(state["rng"][context.rank], context.device)
    running = state["running"]
    # Partial sums were reduced over all ranks before saving; rank 0 carries them on.
    mine = 1.0 if context.rank == 0 else 0.0
    return _Progress(
        epoch=int(state["epoch"]),
        batch=int(state["batch"]),
        step=int(state["step"]),
        loss_sum=running["loss_sum"] * mine,
        correct=running["correct"] * mine,
        examples=running["examples"] * mine,
        seconds=running["seconds"],
        elapsed=running["elapsed"],
        history=list(state["history"]),
    )


def _steps_per_epoch(num_examples: int, config: TrainConfig, world_size: int) -> int:
    full, rest = divmod(num_examples, config.batch_size)
    return full + (1 if rest >= world_size else 0)


def _chance_warning(epoch: int, train_accuracy: float, evaluation: Evaluation, loss: float) -> str:
    """Why an epoch sat at chance, from what the test set shows: dead final ReLUs or a faded signal."""
    text = (
        f"epoch {epoch} sat at chance level: train accuracy {train_accuracy:.3f}, test accuracy "
        f"{evaluation.accuracy:.3f} (chance is {1 / len(CLASS_NAMES):.3f}), train loss {loss:.3f} "
        f"(ln 10 = {math.log(10):.3f})."
    )
    if evaluation.zero_logit_examples:
        text += (
            f" {evaluation.zero_logit_examples} of {evaluation.examples} test images give all-zero logits: the "
            "ReLU that ends NiN's last block is dead for them, so their loss is ln 10 and their gradient zero; "
            "once it is dead for every image the run cannot recover."
        )
    elif evaluation.mean_abs_logit < _FADED_LOGIT:
        text += (
            f" The logits are tiny (mean |logit| {evaluation.mean_abs_logit:.4f}): the signal reaching the last "
            "layer has faded, so the gradients are tiny too and the run may take epochs to leave this plateau, "
            "or never does. That is d2l's recipe on some seeds: its Xavier-uniform init alone shrinks the "
            "signal 8x in the first 11x11 conv (fan-out 96 x 121)."
        )
    return text + " Restart with another --seed, or use --preset default, which learns on every seed tried."


def train(
    config: TrainConfig,
    *,
    output_dir: str | os.PathLike[str],
    data: FashionMNIST,
    resume: bool = False,
    device: str | None = None,
    reporter: Reporter | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train `config` on `data`, writing checkpoint.pt, metrics.jsonl/.csv, curves.png and
    config.json to `output_dir`. With `resume`, continue the checkpoint in `output_dir` exactly."""
    context = distributed.start(device)
    try:
        return _train(config, Path(output_dir), data, resume, context, reporter, stop or StopRequest())
    finally:
        distributed.stop(context)


def _train(
    config: TrainConfig,
    output_dir: Path,
    data: FashionMNIST,
    resume: bool,
    context: distributed.Context,
    reporter: Reporter | None,
    stop: StopRequest,
) -> TrainResult:
    say: Reporter = (reporter or SilentReporter()) if context.is_writer else SilentReporter()
    # Every rank checks the same files, so that all of them stop on the same error.
    if output_dir.exists() and not output_dir.is_dir():
        raise NinlabError(f"output directory {output_dir} is a file; choose a directory with --output-dir")
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = None
    if resume:
        state = load_checkpoint(checkpoint_path)
        config = resumed_config(config_from_dict(state["config"]), dataclasses.asdict(config))
    elif checkpoint_path.exists():
        raise NinlabError(
            f"{output_dir} already holds a checkpoint; continue it with --resume or choose another --output-dir"
        )
    if config.batch_size < context.world_size:
        raise NinlabError(
            f"batch size {config.batch_size} is smaller than the {context.world_size} processes"
        )
    device = context.device
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    torch.manual_seed(config.seed)
    model = build_nin(parse_variant(config.variant))
    cost = (
        run_cost(model, config, device_type=device.type, world_size=context.world_size)
        if state is None and context.is_writer
        else None
    )
    if context.is_writer:  # only now: a bad variant or input size leaves no directory behind
        _make_output_dir(output_dir)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(_optimizer_spec(config), model.parameters())
    # Each rank draws its own dropout masks; rank 0 of a single process keeps the seed's stream.
    torch.manual_seed(config.seed + context.rank)
    progress = _restore(state, model, optimizer, context) if state is not None else _Progress()
    if context.is_writer:
        _write_text_atomically(
            output_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n"
        )

    net = distributed.wrap(model, context)
    if config.compile:
        net = torch.compile(net)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_split = _on_device(data.train, config.train_examples, device)
    test_split = _on_device(data.test, config.test_examples, device)
    transform = InputTransform(config.image_size, config.normalize)
    steps_per_epoch = _steps_per_epoch(len(train_split), config, context.world_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)

    say.info(
        f"training {config.variant} at {config.image_size}x{config.image_size}, batch {config.batch_size}, "
        f"{config.epochs} epochs of {len(train_split):,} images ({steps_per_epoch} steps), on {device}"
        + (f" x {context.world_size} processes" if context.distributed else "")
        + f"; output in {output_dir}"
    )
    if cost is not None:
        say.info(
            f"cost: {format_flops(cost.training_step_flops)} per training step (forward + backward, 2 FLOPs "
            f"per multiply-add), {format_flops(cost.training_step_flops * total_steps)} in all; "
            f"predicted peak memory of a step per process: {format_bytes(cost.peak_live_bytes)} of tensors, "
            f"{format_bytes(cost.peak_allocator_bytes)} held by the allocator"
        )
    if progress.epoch or progress.batch:
        say.info(f"resuming after epoch {progress.epoch}, batch {progress.batch} (step {progress.step})")

    lr = learning_rate(
        max(0, progress.step - 1),
        peak_lr=config.lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        kind=config.schedule,
    )
    timed: list[float] = []
    steps_this_process = 0
    interrupted = False
    while progress.epoch < config.epochs and not interrupted:
        epoch = progress.epoch + 1
        permutation = epoch_permutation(len(train_split), seed=config.seed, epoch=epoch, device=device)
        say.epoch_started(epoch, config.epochs, steps_per_epoch, progress.batch)
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, examples (this rank)
        sums[0], sums[1], sums[2] = progress.loss_sum, progress.correct, progress.examples
        window_start, window_examples = time.perf_counter(), 0
        for indices, global_count in batch_indices(
            permutation,
            batch_size=config.batch_size,
            rank=context.rank,
            world_size=context.world_size,
            start_batch=progress.batch,
        ):
            step_start = time.perf_counter()
            lr = learning_rate(
                progress.step,
                peak_lr=config.lr,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                kind=config.schedule,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = transform(train_split.images[indices]).contiguous(memory_format=memory_format)
            labels = train_split.labels[indices]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, config.amp):
                logits = net(inputs)
            loss_sum = F.cross_entropy(
                logits.float(), labels, reduction="sum", label_smoothing=config.label_smoothing
            )
            # DDP averages gradients over ranks; scaling by ranks / global batch makes that average
            # the gradient of the global batch's mean loss, whatever the size of this rank's share.
            (loss_sum * (context.world_size / global_count)).backward()
            optimizer.step()
            with torch.no_grad():
                sums[0] += loss_sum.detach()
                sums[1] += (logits.argmax(dim=1) == labels).sum()
                sums[2] += labels.shape[0]
            progress.batch += 1
            progress.step += 1
            steps_this_process += 1
            window_examples += global_count

            # One collective per step: every rank must agree on stopping at the same step.
            flags = torch.tensor(
                [0.0 if torch.isfinite(loss_sum) else 1.0, float(stop.requested)], device=device
            )
            distributed.all_reduce_sum(flags, context)
            if flags[0] > 0:
                raise NinlabError(
                    f"training diverged: the loss is no longer finite (nan or inf) at epoch {epoch}, step {progress.step} "
                    f"(lr {lr:.4g}); the checkpoint of the last complete epoch is kept; lower --lr, add "
                    "--warmup-epochs 1, or use --preset default (normalised input, Kaiming init)"
                )
            now = time.perf_counter()
            progress.seconds += now - step_start
            if _SETTLE_STEPS <= steps_this_process - 1 < _SETTLE_STEPS + _TIMED_STEPS:
                timed.append(now - step_start)
                if len(timed) == _TIMED_STEPS:
                    _report_throughput(
                        say, timed, config, context, progress, total_steps, len(test_split), device
                    )
            seen = float(sums[2]) or 1.0
            say.batch_done(
                progress.batch,
                float(sums[0]) / seen,
                float(sums[1]) / seen,
                window_examples / (now - window_start),
            )
            if flags[1] > 0:
                interrupted = True
                break

        epoch_sums = distributed.all_reduce_sum(sums.clone(), context)
        progress.loss_sum, progress.correct, progress.examples = (float(v) for v in epoch_sums)
        if interrupted:
            _save(output_dir, config, model, optimizer, progress, context)
            say.epoch_finished(
                f"interrupted in epoch {epoch} after batch {progress.batch}: checkpoint saved in {output_dir}; "
                f"continue with: ninlab train --resume --output-dir {output_dir}"
            )
            break

        eval_start = time.perf_counter()
        # The bare model, not the DDP wrapper: evaluation needs no collectives inside forward.
        evaluation = evaluate_model(
            model,
            test_split,
            transform=transform,
            batch_size=config.batch_size,
            amp=config.amp,
            channels_last=config.channels_last,
            context=context,
        )
        eval_seconds = time.perf_counter() - eval_start
        train_loss = progress.loss_sum / progress.examples
        train_accuracy = progress.correct / progress.examples
        progress.elapsed += progress.seconds + eval_seconds
        row = {
            "epoch": epoch,
            "step": progress.step,
            "lr": lr,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_loss": evaluation.loss,
            "test_accuracy": evaluation.accuracy,
            "train_seconds": progress.seconds,
            "examples_per_s": progress.examples / progress.seconds,
            "eval_seconds": eval_seconds,
            "elapsed_seconds": progress.elapsed,
        }
        progress.history.append(row)
        progress.epoch, progress.batch = epoch, 0
        progress.loss_sum = progress.correct = progress.examples = progress.seconds = 0.0
        _save(output_dir, config, model, optimizer, progress, context)
        if context.is_writer:
            _write_metrics(output_dir, progress.history)
            plot_curves(
                progress.history,
                output_dir / "curves.png",
                epochs=config.epochs,
                title=f"{config.variant} at {config.image_size}x{config.image_size}, batch {config.batch_size}, "
                f"lr {config.lr:g} ({output_dir.name})",
            )
        say.epoch_finished(
            f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}, train acc {train_accuracy:.4f}, "
            f"test acc {evaluation.accuracy:.4f}, {row['examples_per_s']:,.0f} ex/s, "
            f"{format_duration(row['train_seconds'] + eval_seconds)}"
        )
        if train_accuracy < 1.5 / len(CLASS_NAMES) and evaluation.accuracy < 1.5 / len(CLASS_NAMES):
            say.warn(_chance_warning(epoch, train_accuracy, evaluation, train_loss))
    return TrainResult(config, output_dir, tuple(progress.history), interrupted, model)


def _save(
    output_dir: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: _Progress,
    context: distributed.Context,
) -> None:
    rng = distributed.all_gather_objects(_rng_state(context.device), context)
    if context.is_writer:
        save_checkpoint(
            output_dir / CHECKPOINT_NAME, _checkpoint_state(config, model, optimizer, progress, rng)
        )


def _report_throughput(
    say: Reporter,
    timed: list[float],
    config: TrainConfig,
    context: distributed.Context,
    progress: _Progress,
    total_steps: int,
    test_examples: int,
    device: torch.device,
) -> None:
    seconds_per_step = sorted(timed)[len(timed) // 2]
    examples_per_s = config.batch_size / seconds_per_step
    remaining_steps = total_steps - progress.step
    # Evaluation is a forward pass alone: about a third of a training step's arithmetic per image.
    remaining_s = remaining_steps * seconds_per_step + (config.epochs - progress.epoch) * test_examples / (
        3 * examples_per_s
    )
    say.info(
        f"measured: {examples_per_s:,.0f} examples/s ({seconds_per_step * 1000:,.0f} ms per step of "
        f"{config.batch_size}); about {format_duration(remaining_s)} to go"
    )
    cpu = PRESETS["cpu"]
    if device.type == "cpu" and remaining_s > _LONG_CPU_RUN_S and config.image_size > cpu.image_size:
        say.warn(
            f"on this CPU the whole run takes about {format_duration(remaining_s)}. The CPU preset "
            f"(--preset cpu: {cpu.variant} at {cpu.image_size}x{cpu.image_size}, bf16, {cpu.epochs} epochs) reaches "
            ">= 88% test accuracy in under 10 minutes on 2 cores."
        )
