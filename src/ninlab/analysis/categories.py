"""What each tensor storage of a step is for, and why autograd keeps a tensor, in words.

Every storage the memory accountant counts belongs to exactly one category (`CATEGORY_TABLE`: its
name, what it holds and its colour in charts); `categorize` decides which from a recorded step. A
tensor autograd saves for backward also gets a reason (`saved_reason`), read from the autograd
node and field that keep it. Both live here, apart from prediction, so the result types
(`ninlab.analysis.memory_report`) and the renderers can name categories without running a step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # an annotation only: the result types name categories without the tracer
    from ninlab.analysis.trace import StepRecording

__all__ = [
    "CATEGORIES",
    "CATEGORY_COLORS",
    "CATEGORY_MEANINGS",
    "CATEGORY_TABLE",
    "Category",
    "categorize",
    "saved_reason",
]


@dataclass(frozen=True)
class Category:
    """One kind of memory: its name (`Breakdown`'s field is `{name}_bytes`), what it holds in
    words, and its colour in every chart."""

    name: str
    meaning: str
    color: str


# The order is the precedence: a storage that is both a parameter and saved for backward (a conv
# keeps its weight) is a parameter; the input batch a first conv keeps is the input batch.
CATEGORY_TABLE: tuple[Category, ...] = (
    Category(
        "parameters",
        "the model's parameters (weights and biases), at the model's dtype",
        "#8C8C8C",
    ),
    Category(
        "buffers",
        "the model's buffers (batch norm's running mean and variance, its batch counter)",
        "#B5B5B5",
    ),
    Category(
        "input",
        "the input batch",
        "#937860",
    ),
    Category(
        "targets",
        "the class labels of the batch (int64), training only",
        "#C8B08F",
    ),
    Category(
        "gradients",
        "parameter gradients: the previous step's until zero_grad(set_to_none=True) frees them,"
        " then this step's as backward makes them",
        "#DD8452",
    ),
    Category(
        "optimizer_state",
        "what the optimizer keeps between steps: momentum buffers, Adam's two moments and step "
        "counters, ...",
        "#DA8BC3",
    ),
    Category(
        "ddp_buckets",
        "DistributedDataParallel's flat gradient buckets (one copy of every trainable "
        "parameter's gradient), held for the whole run",
        "#8172B3",
    ),
    Category(
        "saved_for_backward",
        "activations autograd keeps for backward (a conv's input, a ReLU's output, max-pool "
        "indices, dropout masks, the log-softmax), alive from the op that makes them until "
        "backward has used them",
        "#4C72B0",
    ),
    Category(
        "recomputed",
        "what activation checkpointing recomputes in backward (the checkpointed block's forward"
        " run again) and the recomputed graph keeps until backward has used it",
        "#1F3A68",
    ),
    Category(
        "forward_temporaries",
        "outputs of forward and loss ops that autograd does not keep (a conv output a ReLU "
        "replaces, the logits, the loss); in inference, every activation",
        "#64B5CD",
    ),
    Category(
        "backward_temporaries",
        "backward's own tensors other than parameter gradients: gradients with respect to "
        "activations, and intermediate results",
        "#C44E52",
    ),
    Category(
        "optimizer_temporaries",
        "tensors optimizer.step() makes and frees (Adam's denominator, foreach lists)",
        "#CCB974",
    ),
    Category(
        "other",
        "anything else: what the step's own code makes outside the model, backward and the "
        "optimizer (a GradScaler's scale and unscaling), and what a first step leaves alive "
        "besides gradients and optimizer state",
        "#55A868",
    ),
)
CATEGORIES: tuple[str, ...] = tuple(category.name for category in CATEGORY_TABLE)
CATEGORY_MEANINGS: dict[str, str] = {category.name: category.meaning for category in CATEGORY_TABLE}
CATEGORY_COLORS: dict[str, str] = {category.name: category.color for category in CATEGORY_TABLE}


_ROLES = {
    "parameter": "parameters",
    "buffer": "buffers",
    "input": "input",
    "targets": "targets",
    "gradient": "gradients",  # the warm-up step's, alive when the recorded step starts
    "optimizer_state": "optimizer_state",
}
# A storage with no role that is no gradient, optimizer state or saved tensor is a temporary of
# the phase that made it.
_PHASES = {
    "forward": "forward_temporaries",
    "loss": "forward_temporaries",
    "backward": "backward_temporaries",
    "recompute": "recomputed",
    "optimizer": "optimizer_temporaries",
}


def categorize(step: StepRecording) -> dict[int, int]:
    """Storage key -> index into `CATEGORIES`, for every storage alive at or after the step's
    start."""
    storages = step.recording.storages
    start = step.step_start
    saved = {s.storage_key for s in step.recording.saved_for_backward}
    state = set(step.optimizer_state_keys)
    gradients = set(step.gradient_keys.values())
    index = {name: i for i, name in enumerate(CATEGORIES)}
    categories: dict[int, int] = {}
    for key, record in storages.items():
        if record.freed_after is not None and record.freed_after < start:
            continue
        if record.role in _ROLES:
            name = _ROLES[record.role]
        elif key in gradients:
            name = "gradients"
        elif key in state:
            name = "optimizer_state"
        elif key in saved:
            name = "saved_for_backward"
        else:
            name = _PHASES.get(record.phase, "other")
        categories[key] = index[name]
    return categories


# -- why autograd keeps a tensor --------------------------------------------------------------

# Every max pool keeps the same thing besides its input.
_MAX_POOL_INDICES = "max pool keeps the int64 index of each window's maximum"
# (autograd node without its version digit, saved field) -> reason. The node and field names are
# PyTorch's (`grad_fn._saved_<field>`), so the table reads against derivatives.yaml.
_REASONS: dict[tuple[str, str], str] = {
    ("ConvolutionBackward", "input"): "conv keeps its input, to compute the weight gradient",
    ("ConvolutionBackward", "weight"): "conv keeps its weight, to compute the input gradient",
    ("ReluBackward", "result"): "ReLU keeps its output: the gradient passes where it is positive",
    ("HardtanhBackward", "self"): (
        "ReLU6/hardtanh keeps its input: the gradient passes inside the clamp"
    ),
    ("LeakyReluBackward", "self"): "LeakyReLU keeps its input: its sign picks the slope",
    ("EluBackward", "self"): "ELU keeps its input",
    ("GeluBackward", "self"): "GELU keeps its input",
    ("SiluBackward", "self"): "SiLU keeps its input",
    ("SigmoidBackward", "result"): "sigmoid keeps its output (its derivative is y(1-y))",
    ("TanhBackward", "result"): "tanh keeps its output (its derivative is 1-y^2)",
    ("MaxPool1DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool2DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool3DWithIndicesBackward", "self"): "max pool keeps its input",
    ("MaxPool1DWithIndicesBackward", "result1"): _MAX_POOL_INDICES,
    ("MaxPool2DWithIndicesBackward", "result1"): _MAX_POOL_INDICES,
    ("MaxPool3DWithIndicesBackward", "result1"): _MAX_POOL_INDICES,
    ("AdaptiveMaxPool2DBackward", "self"): "adaptive max pool keeps its input",
    ("AdaptiveMaxPool2DBackward", "result1"): (
        "adaptive max pool keeps the int64 index of each maximum"
    ),
    ("AvgPool2DBackward", "self"): "average pool keeps its input (its backward reads the shape)",
    ("AdaptiveAvgPool2DBackward", "self"): "adaptive average pool keeps its input",
    ("NativeDropoutBackward", "result1"): (
        "dropout keeps its mask (bool, the fused kernel CUDA uses)"
    ),
    ("LogSoftmaxBackward", "result"): "cross-entropy keeps its log-softmax",
    ("NllLossBackward", "self"): "cross-entropy keeps its log-softmax",
    ("NllLossBackward", "target"): "cross-entropy keeps the targets",
    ("NllLossBackward", "total_weight"): "cross-entropy keeps a scalar total weight",
    ("AddmmBackward", "mat1"): "linear keeps its input, to compute the weight gradient",
    ("AddmmBackward", "mat2"): "linear keeps its weight (transposed view), for the input gradient",
    ("MmBackward", "self"): "matmul keeps its left operand",
    ("MmBackward", "mat2"): "matmul keeps its right operand",
    ("NativeBatchNormBackward", "input"): "batch norm keeps its input",
    ("NativeBatchNormBackward", "weight"): "batch norm keeps its scale",
    ("NativeBatchNormBackward", "running_mean"): "batch norm keeps its running mean",
    ("NativeBatchNormBackward", "running_var"): "batch norm keeps its running variance",
    ("NativeBatchNormBackward", "result1"): "batch norm keeps each channel's batch mean",
    ("NativeBatchNormBackward", "result2"): "batch norm keeps each channel's inverse std",
    ("NativeBatchNormBackward", "save_mean"): "batch norm keeps each channel's batch mean",
    ("NativeBatchNormBackward", "save_invstd"): "batch norm keeps each channel's inverse std",
}


def saved_reason(node: str, field: str, *, module_type: str = "") -> str:
    """Why autograd node `node` (e.g. "ReluBackward0") keeps its saved `field`, in words.

    Dropout on CPU is a composite (a float mask made by bernoulli_, then input * mask), so its
    mask is a multiplication's saved `other`: `module_type` tells it apart from other products.
    """
    base = re.sub(r"\d+$", "", node)
    if base == "MulBackward" and module_type.startswith("Dropout"):
        return "dropout keeps its mask, scaled by 1/(1-p) (float on CPU; a bool on CUDA)"
    return _REASONS.get((base, field), f"{base} keeps its {field}")
