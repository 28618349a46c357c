"""What a recording of a step is made of: its ops, the storages they make, what autograd saved.

The tracer (`ninlab.analysis.trace`) fills a `Recording` while a step runs on fake tensors: an
`OpRecord` per aten op (its module, phase, inputs and outputs as `TensorMeta`, FLOPs, window and
CPU allocations), a `StorageRecord` per tensor storage (from the op that made it to the op after
which it died) and a `SavedTensor` per tensor autograd kept for backward. Everything ninlab
predicts is read from these. A layer whose input is too small for its window raises
`LayerInputTooSmall` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ninlab.analysis.allocator import KernelAllocation
from ninlab.analysis.geometry import AxisParams, AxisWindow, EmptyOutputError
from ninlab.analysis.kernel_probe import KernelCall
from ninlab.errors import NinlabError

__all__ = [
    "LayerInputTooSmall",
    "OpRecord",
    "Recording",
    "SavedTensor",
    "StorageRecord",
    "TensorMeta",
    "WindowOp",
]


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage_key: int  # which storage it views (see StorageRecord)


@dataclass(frozen=True)
class WindowOp:
    """A convolution or pooling op's windows: one `AxisParams` per spatial axis, and the sizes."""

    kind: str  # "conv", "max_pool" or "avg_pool"
    axes: tuple[AxisParams, ...]
    input_spatial: tuple[int, ...]
    output_spatial: tuple[int, ...]

    def axis_windows(self) -> tuple[AxisWindow, ...]:
        """Where the windows fall along each spatial axis: one `AxisWindow` per axis."""
        return tuple(params.window(size) for params, size in zip(self.axes, self.input_spatial))


class LayerInputTooSmall(NinlabError):
    """A layer's input is too small for its window; carries the layer and the geometry error."""

    def __init__(self, module: str, module_type: str, error: EmptyOutputError) -> None:
        self.module, self.module_type, self.error = module, module_type, error
        super().__init__(f"layer {module or '(top level)'} ({module_type}): {error}")


@dataclass(frozen=True)
class OpRecord:
    index: int
    op: str  # e.g. "aten.convolution.default"
    phase: str
    module: str  # qualified name of the innermost module running it; "" for the top level
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    flops: int
    window: WindowOp | None
    autograd_node: str  # in backward: the autograd node being executed, e.g. "ReluBackward0"
    # On CPU, every block the kernel allocates and frees, outputs included
    # (`ninlab.analysis.allocator`); None: it allocates only its outputs, or its workspace is not
    # modelled (`cpu_unmodelled` says why).
    cpu_allocations: tuple[KernelAllocation, ...] | None = None
    cpu_unmodelled: str = ""
    # Where `cpu_unmodelled` gives a reason: the call as its kernel sees it, for
    # `ninlab.analysis.kernel_probe` to measure.
    cpu_call: KernelCall | None = None
    # On CPU, the Python numbers the op took as tensors and their casts, held beside its outputs
    # at its high point (`allocator.scalars`).
    cpu_scalar_bytes: int = 0


@dataclass
class StorageRecord:
    """One storage's life: created by op `created_at` (-1: before recording), died after op
    `freed_after` (None: still alive when the recording ended). Views share their storage, so each
    storage is counted once whatever views of it exist."""

    key: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    created_at: int
    phase: str
    module: str
    freed_after: int | None = None
    role: str = ""  # set by whoever knows more: "parameter", "input", "gradient", ...


@dataclass(frozen=True)
class SavedTensor:
    """A tensor autograd keeps for backward: which node keeps it, under which name, for
    which layer."""

    storage_key: int
    node: str  # e.g. "ConvolutionBackward0"
    field: str  # e.g. "input", "result", "indices", "mask"
    module: str  # "" for the model's own forward and for code outside the model alike
    # The node was made while no module of the model ran: the loss (the model's own forward, a
    # `torch.flatten` in its root `forward`, is module "" too, but inside the model).
    outside_model: bool = False


@dataclass
class Recording:
    ops: list[OpRecord] = field(default_factory=list)
    # What autograd held as each backward call of the step began, read from the graph's saved
    # variables (gradient accumulation calls backward once per micro-batch).
    saved_for_backward: list[SavedTensor] = field(default_factory=list)
    storages: dict[int, StorageRecord] = field(default_factory=dict)
    # Each module's outputs (shape, dtype) at its first forward call, by qualified name.
    module_outputs: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]] = field(
        default_factory=dict
    )
    # Allocations and frees in the order they happened: ("alloc" | "free", storage key, op index).
    events: list[tuple[str, int, int]] = field(default_factory=list)
    # Why the program recorded may not be the real one at some op (the recorder's words), once
    # each: where a composite op chooses its path by whether its input is a tensor subclass.
    unsure: list[str] = field(default_factory=list)
