"""One process or many: the training loop asks this module who it is and how to combine numbers.

Under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) the process
group is initialised with NCCL on GPUs and gloo on CPUs; alone, everything is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ninlab.errors import NinlabError

__all__ = ["Context", "all_gather_objects", "all_reduce_sum", "start", "stop", "wrap"]


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def start(device: str | None = None) -> Context:
    """Join the process group when launched by torchrun; pick the device (this rank's GPU,
    else CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(device) if device else _default_device(local_rank)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise NinlabError(
                f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu"
            )
        torch.cuda.set_device(chosen)
    if world_size == 1:
        return Context(device=chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=chosen)


def stop(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum across ranks, in place (the identity for one process)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any, context: Context) -> list[Any]:
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DistributedDataParallel across ranks (gradients averaged in backward); the model
    itself alone."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
