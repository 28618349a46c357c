"""Checkpoints: written atomically, read back with one-line errors instead of tracebacks.

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
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ninlab.errors import NinlabError
from ninlab.outputs import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "load_checkpoint",
    "resolve_checkpoint_path",
    "save_checkpoint",
]

FORMAT = "ninlab-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` durably and atomically (`atomic_write`): a failed or interrupted write leaves
    the previous checkpoint untouched."""
    try:
        with atomic_write(path, durable=True) as out:
            torch.save({"format": FORMAT, **state}, out)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0][:120]
        raise NinlabError(
            f"could not write checkpoint {path} ({reason}); the previous one is unchanged; "
            "free disk space or choose another --output-dir"
        ) from None


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise NinlabError(
            f"no checkpoint at {path}; give a checkpoint file or a run directory from 'ninlab train'"
        )
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NinlabError(
            f"{path} is truncated or not a checkpoint ({first_line[:120]}); use an intact checkpoint.pt "
            "written by 'ninlab train'"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NinlabError(
            f"{path} is not a ninlab checkpoint (format {FORMAT}); use one written by 'ninlab train'"
        )
    return state
