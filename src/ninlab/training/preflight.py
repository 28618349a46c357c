"""What a run checks before its first step, so that it fails in its first second with one line
rather than minutes later with a traceback: the network fits the data (classes, channels), batch
norm gets at least two images a step, the step fits in the memory available, and --compile has a
compiler to run."""

from __future__ import annotations

import torch
from torch import nn

from ninlab.analysis.torch_internals import BatchNormBase
from ninlab.errors import NinlabError, one_line
from ninlab.models import parse_variant
from ninlab.training.data import CLASS_NAMES
from ninlab.training.pipeline import batches_per_epoch
from ninlab.training.presets import TrainConfig
from ninlab.units import format_bytes

__all__ = ["check_compiler", "check_fits_data", "check_memory"]

_CHANNELS = 1  # Fashion-MNIST is grayscale


def check_fits_data(model: nn.Module, config: TrainConfig, *, world_size: int) -> None:
    """The variant's classes and channels are Fashion-MNIST's; every step has images to take,
    two or more on each process when the network has batch norm."""
    variant = parse_variant(config.variant)
    if variant.num_classes != len(CLASS_NAMES):
        raise NinlabError(
            f"--variant {config.variant} has num_classes={variant.num_classes}, but Fashion-MNIST "
            f"has {len(CLASS_NAMES)} classes; drop num_classes or set it to {len(CLASS_NAMES)}"
        )
    if variant.in_channels != _CHANNELS:
        raise NinlabError(
            f"--variant {config.variant} has in_channels={variant.in_channels}, but Fashion-MNIST "
            f"images have {_CHANNELS} channel; drop in_channels or set it to {_CHANNELS}"
        )
    examples = config.train_examples or 60_000
    if batches_per_epoch(examples, batch_size=config.batch_size, world_size=world_size) == 0:
        raise NinlabError(
            f"--train-examples {examples} is too few for one training step on {world_size} "
            f"process(es); give at least {2 * world_size}"
        )
    has_batch_norm = any(isinstance(m, BatchNormBase) for m in model.modules())
    if has_batch_norm and config.batch_size < 2 * world_size:
        raise NinlabError(
            f"--batch {config.batch_size} gives each of {world_size} process(es) a single image "
            f"per step, and batch norm ({config.variant}) needs two or more; use --batch "
            f"{2 * world_size} or more"
        )


def check_memory(
    peak_bytes: int, data_bytes: int, device: torch.device, *, available: int | None
) -> None:
    """Refuse a run whose predicted step peak and data on the device exceed `available`."""
    needed = peak_bytes + data_bytes
    if available is None or needed <= available:
        return
    raise NinlabError(
        f"this run needs about {format_bytes(needed)} on {device} (predicted peak of a training "
        f"step {format_bytes(peak_bytes)}, data {format_bytes(data_bytes)}) but "
        f"{format_bytes(available)} is available; lower --batch or --image-size, or pass "
        "--force-memory to start anyway"
    )


def check_compiler(device: torch.device) -> None:
    """torch.compile compiles at the first step: a C++ compiler on the CPU, Triton on CUDA."""
    if device.type == "cuda":
        from ninlab.analysis.torch_internals import has_triton

        if not has_triton():
            raise NinlabError(
                "--compile needs Triton on CUDA, which this PyTorch cannot import; install it "
                "or drop --compile"
            )
        return
    from ninlab.analysis.torch_internals import InvalidCxxCompiler, cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except (InvalidCxxCompiler, OSError, RuntimeError) as error:
        raise NinlabError(
            f"--compile needs a working C++ compiler ({one_line(error)}); install g++ (or set "
            "$CXX) or drop --compile"
        ) from None
