"""Checkpoints: what one holds, written atomically, read back with one-line errors instead of
tracebacks, and restored into a run (`save_run`, `restore_run`).

A checkpoint is a plain dict of tensors, numbers, strings and lists (loadable with
`torch.load(weights_only=True)`, so opening one never runs code):

    format      FORMAT
    config      the run's TrainConfig as a dict
    model       the unwrapped model's state_dict
    optimizer   the optimizer's state_dict
    epoch       epochs completed
    batch       batches completed in the current epoch (0 at an epoch boundary)
    step        optimizer steps completed
    rng         each rank's torch CPU generator state (and CUDA's on GPU)
    running     the current epoch's partial sums (loss, correct, examples, seconds)
    history     one dict of metrics per completed epoch
    checksum    SHA-256 of everything above (`_checksum`), verified on every load: torch's zip
                format has no checksum of its own, so a flipped byte in a tensor would load
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ninlab.errors import NinlabError, NinlabWarning, one_line
from ninlab.inputs import regular_file
from ninlab.outputs import atomic_write, disk_error
from ninlab.training import distributed
from ninlab.training.presets import TrainConfig

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "RunProgress",
    "load_checkpoint",
    "resolve_checkpoint_path",
    "restore_run",
    "save_checkpoint",
    "save_run",
    "warn_if_not_finite",
]

FORMAT = "ninlab-checkpoint-2"  # 2: with a checksum
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` with its checksum durably and atomically (`atomic_write`): a failed or
    interrupted write leaves the previous checkpoint, if any, untouched."""
    contents = {"format": FORMAT, **state}
    contents["checksum"] = _checksum(contents)
    previous = "the previous one is unchanged" if path.exists() else "no checkpoint was written"
    try:
        with atomic_write(path, durable=True) as out:
            torch.save(contents, out)
    except RuntimeError as error:
        # torch.save reports whatever stopped the write (a full disk, a second Ctrl-C) as a C++
        # enforce failure; the Python exception behind it says what happened.
        cause = error.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if isinstance(cause, OSError):
            raise NinlabError(f"{disk_error(path, cause)}; {previous}") from None
        raise NinlabError(
            f"could not write checkpoint {path} ({one_line(error)}); {previous}"
        ) from None
    except NinlabError as error:  # atomic_write's own: opening, flushing or renaming
        raise NinlabError(f"{error}; {previous}") from None


def _checksum(contents: dict[str, Any]) -> str:
    """SHA-256 over every value but the checksum itself: tensors by dtype, shape and bytes, the
    rest by repr, dicts in key order."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}".encode())
            for key in sorted(value, key=repr):
                add(key)
                add(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"list {len(value)}".encode())
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add({key: value for key, value in contents.items() if key != "checksum"})
    return digest.hexdigest()


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    fix = "give a checkpoint file or a run directory from 'ninlab train'"
    if not regular_file(path, what="checkpoint", fix=fix).is_file():
        raise NinlabError(
            f"no checkpoint at {path}; give a checkpoint file or a run directory from 'ninlab "
            "train'"
        )
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - on bytes that are no checkpoint, torch's unpickler
        # raises whatever its parser meets (KeyError on a stray memo index, IndexError, ...)
        raise NinlabError(
            f"{path} is truncated or not a checkpoint ({one_line(error)}); use an intact "
            "checkpoint.pt written by 'ninlab train'"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NinlabError(
            f"{path} is not a ninlab checkpoint (format {FORMAT}, with a checksum); use one "
            "written by this version of 'ninlab train'"
        )
    if state.get("checksum") != _checksum(state):
        raise NinlabError(
            f"{path} is corrupt: its contents do not match the checksum saved with them; use an "
            "intact copy or train again"
        )
    return state


# -- a run's checkpoint: its position, weights, optimizer and generators ---------------------------


@dataclass
class RunProgress:
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

    def close_epoch(self, row: dict[str, Any]) -> None:
        """Record a finished epoch's row; the next epoch's sums start from zero."""
        self.history.append(row)
        self.epoch, self.batch, self.elapsed = row["epoch"], 0, row["elapsed_seconds"]
        self.loss_sum = self.correct = self.examples = self.seconds = 0.0


def save_run(
    output_dir: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: RunProgress,
    context: distributed.Context,
) -> None:
    """The run's checkpoint in `output_dir`. Every rank calls this: each one's generator state is
    gathered (a collective), and rank 0 writes."""
    rng = distributed.all_gather_objects(_rng_state(context.device), context)
    if context.is_writer:
        save_checkpoint(
            output_dir / CHECKPOINT_NAME, _run_state(config, model, optimizer, progress, rng)
        )


def _run_state(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: RunProgress,
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


def warn_if_not_finite(weights: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A `NinlabWarning` when floating-point tensors of `weights` (a state_dict) hold nan or inf:
    whatever such a network predicts is meaningless (a run that diverged, a file edited)."""
    bad = {
        name: int((~torch.isfinite(tensor)).sum())
        for name, tensor in weights.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
    }
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        named = ", ".join(f"{name} ({count:,})" for name, count in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        warnings.warn(
            NinlabWarning(
                f"{path}: weights that are not finite numbers (nan or inf) in {named}{more}; "
                "what this network predicts is meaningless"
            ),
            stacklevel=2,
        )


def restore_run(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    context: distributed.Context,
) -> RunProgress:
    """Load a checkpoint's weights, optimizer and this rank's generators; where the run stands."""
    warn_if_not_finite(state["model"], "the checkpoint")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise NinlabError(
            f"the checkpoint's weights do not fit its own configuration ({one_line(error)})"
        ) from None
    if len(state["rng"]) != context.world_size:
        raise NinlabError(
            f"the checkpoint was written by {len(state['rng'])} process(es); resume it with the "
            f"same number (torchrun --nproc_per_node={len(state['rng'])}) to continue exactly"
        )
    _set_rng_state(state["rng"][context.rank], context.device)
    running = state["running"]
    # Partial sums were reduced over all ranks before saving; rank 0 carries them on.
    mine = 1.0 if context.rank == 0 else 0.0
    return RunProgress(
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


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
