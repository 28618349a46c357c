"""Why a model cannot be traced, in one line naming the real cause.

A model a user brings can fail for reasons of its own: it is scripted, it needs its targets in
training mode, its forward branches on tensor values, or it simply rejects the batch. The tracer
raises whatever the model raised; `cannot_run` turns that into one `NinlabError` that says which
of these it was and what to do, never the model's raw exception and never an unrelated hint.
A user's step function that fails is refused by `step_refused`: the same causes where they lie
beyond its code (the optimizer, a sparse gradient, a kernel this torch lacks), else its own error.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback

import torch
from torch import nn

from ninlab.analysis.step import StepSpec, deep_copied_a_fake, input_dtype_words, step_failed
from ninlab.analysis.torch_internals import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
    raised_by_torch_compile,
)
from ninlab.analysis.trace import record_step
from ninlab.errors import NinlabError, one_line

__all__ = ["NOT_TRACEABLE", "cannot_run", "check_traceable", "out_of_memory", "step_refused"]

# What a model raises on fake tensors when its forward needs tensor values: `if x.sum() > 0`,
# `.item()`, `nonzero()` (a shape that depends on data), or an op fake tensors do not implement.
NOT_TRACEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
    UnsupportedFakeTensorException,
)

_TARGET_WORDS = ("target", "label")


def check_traceable(model: nn.Module) -> None:
    """Refuse, before any work, a model ninlab cannot run its own way."""
    if isinstance(model, torch.jit.ScriptModule):
        raise NinlabError(
            f"the model is a scripted module ({type(model).__name__}): TorchScript runs its own "
            "interpreter, which fake tensors and module hooks cannot follow; give the Python "
            "nn.Module it was scripted from"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise NinlabError(
            f"the model is wrapped in {type(model).__name__}, which runs a copy of the model per "
            "device or process: give the model it wraps (model.module), whose step is each "
            "copy's (ddp=True adds DistributedDataParallel's gradient buckets)"
        )
    sparse = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.layout != torch.strided
    ]
    if sparse:
        # Its bytes are its indices' and values', which neither the fake copy (counted as one
        # element) nor the measurement's storage count (it has none) reads.
        raise NinlabError(
            f"the model holds a sparse tensor ({', '.join(sparse)}), whose memory ninlab cannot "
            f"account for yet; {_DENSE_INSTEAD}"
        )


def cannot_run(error: Exception, model: nn.Module, spec: StepSpec) -> NinlabError:
    """The one line that says why `model` could not run the step `spec` describes."""
    if isinstance(error, NinlabError):
        return error
    cause = _cause_beyond_the_step(error, model, spec, sparse_named=False)
    if cause is not None:
        return cause
    return _cause_in_the_call(error, model, spec)


def step_refused(error: Exception, model: nn.Module, spec: StepSpec, where: str) -> NinlabError:
    """The one line for a user's step function that raised on `where`: the cause where it lies
    beyond the step's own code (the optimizer, a sparse gradient, a kernel this torch lacks, the
    machine's memory), as for the built-in step; else the step's own error (`step_failed`)."""
    if deep_copied_a_fake(error):  # in whatever code the copy's tensors reached first
        return step_failed(spec, error, where)
    cause = _cause_beyond_the_step(error, model, spec, sparse_named=True)
    return cause if cause is not None else step_failed(spec, error, where)


def _cause_beyond_the_step(
    error: Exception, model: nn.Module, spec: StepSpec, *, sparse_named: bool
) -> NinlabError | None:
    """The cause of `error` in what any step of `model` runs, whoever wrote the step; None where
    it is not one of them. `sparse_named`: blame a sparse embedding only for an error that says
    sparse (a user's step may fail for reasons of its own)."""
    reason = one_line(error)
    if out_of_memory(error):
        return NinlabError(
            f"the step ran out of memory on this machine ({reason}); use a smaller batch"
        )
    sparse = _sparse_modules(model)
    if sparse and spec.mode == "train" and (not sparse_named or "sparse" in reason.lower()):
        return NinlabError(
            f"the model's {', '.join(sparse)} {'has' if len(sparse) == 1 else 'have'} sparse=True: "
            "its gradients are sparse tensors, which a trace on fake tensors cannot account for "
            f"({reason}); predict it with sparse=False (dense gradients), or with mode 'infer'"
        )
    if spec.mode == "train" and _raised_by_the_optimizer(error):
        return NinlabError(
            f"the optimizer {spec.optimizer_name} fails on this model's parameters ({reason}); "
            "the real step fails the same way: change its settings, or choose another optimizer"
        )
    missing_kernel = _MISSING_KERNEL.search(reason)
    if missing_kernel:
        op, dtype = missing_kernel.groups()
        # Only the dtypes other than the one the kernel lacks (ATen's names: 'BFloat16', 'Half').
        others = [name for name in ("float32", "bfloat16") if _ATEN_DTYPE.get(name) != dtype]
        return NinlabError(
            f"this PyTorch has no {spec.device_type} kernel {op} for {dtype} tensors ({reason}); "
            f"run the model in another dtype (dtype={' or '.join(map(repr, others))}, --dtype)"
        )
    if _MIXED_NORMALISATION in reason:
        return NinlabError(
            f"a normalisation of the model has parameters of another dtype than its input "
            f"({reason}), which the CPU kernel refuses: the real step fails the same way; cast "
            "the norm's weight and bias to its input's dtype (or the input to theirs)"
        )
    if _ONE_VALUE_PER_CHANNEL in reason:
        return NinlabError(
            f"a batch norm of the model has one value per channel to normalise in training "
            f"({reason}): a batch of one sample with nothing else to average over; use a batch of "
            "2 or more, or mode 'infer'"
        )
    return None


def _cause_in_the_call(error: Exception, model: nn.Module, spec: StepSpec) -> NinlabError:
    """The cause of `error` in how the built-in step called the model: its inputs, its autocast,
    its targets; the sizes and dtypes given, where nothing else explains it."""
    reason = one_line(error)
    if spec.amp is not None and _DTYPE_MISMATCH.search(reason):
        return NinlabError(
            f"the model fails under {spec.amp} autocast with a dtype error of its own ({reason}): "
            "an op autocast casts meets one it leaves in float32, and the real step fails the "
            "same way; cast inside the model so the two agree, or predict it without amp"
        )
    if spec.input_dtype is not None and _INDEX_OUT_OF_RANGE.search(reason):
        ranges = ", ".join(f"{low}:{high}" for low, high in spec.input_ranges)
        return NinlabError(
            f"the model indexes a table with an input's values outside its rows ({reason}): the "
            f"index inputs are drawn from input_range {ranges}; give ranges within the tables' "
            "sizes (num_embeddings: --input [NAME=]SIZE:int64:LOW:HIGH)"
        )
    if isinstance(error, NOT_TRACEABLE):
        return NinlabError(
            f"the model's forward depends on tensor values (data-dependent control flow or "
            f"shapes: {reason}), which a trace on fake tensors, shapes without data, cannot follow"
        )
    if raised_by_torch_compile(error):
        return NinlabError(
            f"the model runs code compiled by torch.compile, which fails to compile on the fake "
            f"tensors ninlab traces ({reason}); predict the model without torch.compile: the "
            "uncompiled program (torch.compile's generated kernels allocate otherwise)"
        )
    if _SPARSE_STORAGE in str(error):
        return NinlabError(
            f"the model makes a sparse tensor ({reason}), whose memory ninlab cannot account for "
            f"yet; {_DENSE_INSTEAD}"
        )
    higher_order = _HIGHER_ORDER_OP.search(str(error))  # the reason may be cut short
    if higher_order:
        # The error names ninlab's own dispatch mode, which is no help to the user.
        return NinlabError(
            f"the model calls torch's higher-order operator {higher_order.group(1)}, which a "
            "trace under ninlab's dispatch mode cannot run (PyTorch has no rule for it there); "
            "predict a model that computes the same with ordinary ops (for flex_attention: "
            "F.scaled_dot_product_attention with an attn_mask)"
        )
    if spec.mode == "train" and _MODIFIED_IN_PLACE in str(error):
        return NinlabError(
            f"the model changes in place a tensor autograd saved for backward ({reason}): the "
            "real step fails the same way; clone the tensor before changing it, or change it "
            "after the backward"
        )
    missing = _parameters(model)[len(spec.input_sizes) :]
    targets = [p.name for p in missing if any(word in p.name.lower() for word in _TARGET_WORDS)]
    # Needed where the forward cannot do without them, or its error asks for them: a Hugging
    # Face model takes `labels=None` and trains without them, failing for reasons of its own.
    needed = any(
        p.name in targets and p.default is inspect.Parameter.empty for p in missing
    ) or any(word in reason.lower() for word in _TARGET_WORDS)
    if targets and needed and spec.mode == "train":
        return NinlabError(
            f"the model needs its targets to run in training mode (its forward takes "
            f"{', '.join(targets)}; {reason}), and the built-in step gives it inputs only; "
            "summarize or predict it with mode 'infer' (--mode infer)"
        )
    unknown = _unknown_names(model, spec)
    if unknown:
        taken = [p.name for p in _keyword_parameters(model)]
        return NinlabError(
            f"the model's forward takes no argument named {', '.join(unknown)} ({reason}); its "
            f"arguments are {', '.join(taken) or 'none by name'}: name the inputs as they are, or "
            "give them by position (input_size without names, --input SIZE)"
        )
    keywords = _required_keywords(model, spec)
    if keywords:
        names = [p.name for p in _parameters(model)][: len(spec.input_sizes)] + keywords
        return NinlabError(
            f"the model's forward requires the keyword argument{'s' * (len(keywords) > 1)} "
            f"{', '.join(keywords)}; give every input by name, as input_size="
            f"{{{', '.join(f'{name!r}: (...)' for name in names)}}} "
            f"({' '.join(f'--input {name}=SIZE' for name in names)})"
        )
    if _batch_inside(model, spec):
        batch, *sample = spec.input_sizes[0]
        return NinlabError(
            f"input size {'x'.join(map(str, spec.input_sizes[0]))} starts with the batch "
            "(torchinfo's convention), but ninlab's input size is one sample: give "
            f"input_size={tuple(sample)} and batch_size={batch} "
            f"(--input {'x'.join(map(str, sample))} --batch {batch})"
        )
    required = _required_arguments(model)
    if required is not None and required > len(spec.input_sizes):
        return NinlabError(
            f"the model's forward takes {required} inputs and {len(spec.input_sizes)} were given; "
            "give one input size per argument (--input once per input)"
        )
    read = _container_read(error, model)
    if read:
        return NinlabError(
            f"the model's forward reads its one argument as a dict or list of tensors ({read}: "
            f"{reason}), and ninlab passes each input as a tensor of its own; {_WRAP_CONTAINER}"
        )
    taken = _taken_arguments(model)
    if taken is not None and not spec.input_names and taken < len(spec.input_sizes):
        return NinlabError(
            f"the model's forward takes {taken} input{'s' * (taken != 1)} and "
            f"{len(spec.input_sizes)} were given, each as an argument of its own; give one input "
            "size per argument"
            + (f"; for one dict or list of tensors, {_WRAP_CONTAINER}" if taken == 1 else "")
        )
    step = "train step" if spec.mode == "train" else "forward"
    sizes = ["x".join(map(str, size)) for size in spec.input_sizes]
    dtype = "" if spec.input_dtype is None else input_dtype_words(spec.input_dtypes)
    if spec.input_names:  # keywords: each size by its name
        named = ", ".join(f"{name}={size}" for name, size in zip(spec.input_names, sizes))
        inputs = f"inputs {named}" + (f" ({dtype})" if dtype else "")
    else:
        inputs = " and ".join(sizes) + (f" {dtype}" if dtype else "") + " inputs"
    return NinlabError(
        f"the model cannot run a {step} on a batch of {inputs} ({reason}); "
        "give the input sizes and dtype its forward expects"
    )


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: the machine's memory, not the model."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


# A CPU or CUDA kernel PyTorch lacks for a dtype: '"addmm_impl_cpu_" not implemented for 'Half''.
_MISSING_KERNEL = re.compile(r"\"(\w+)\" not implemented for '(\w+)'")
# How ATen names the dtypes a missing kernel is suggested instead of.
_ATEN_DTYPE = {"float32": "Float", "bfloat16": "BFloat16"}
# An index a kernel refuses, as ATen words it (embedding, index_select; embedding_bag; gather).
_INDEX_OUT_OF_RANGE = re.compile(
    r"index out of range|not in the valid range|out of bounds for dimension|i < index_size"
)
# A layer, group, batch or instance norm's CPU kernel given a float32 input and reduced-precision
# parameters (ATen's check_mixed_data_type).
_MIXED_NORMALISATION = "mixed dtype (CPU): expect parameter to have scalar type of"
# Batch norm in training given one value per channel (a batch of one, nothing else to average).
_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"
# Two tensors of an op in different dtypes, as ATen words it.
# An op like flex_attention that PyTorch runs through a rule per dispatch mode, and has none
# for ninlab's (its error names the mode's object; torch 2.8 calls it a HOP).
_HIGHER_ORDER_OP = re.compile(r"no rule registered for (?:HigherOrderOperator|HOP) (\w+)")
# What a sparse tensor's refusal advises, and how its storage's absence shows.
_DENSE_INSTEAD = "use it dense (tensor.to_dense() and an ordinary matmul), which ninlab predicts"
_SPARSE_STORAGE = "Cannot access storage of SparseTensorImpl"
# How to predict a model whose forward takes its tensors in one dict or list.
_WRAP_CONTAINER = (
    "predict a module whose forward takes them one by one and calls the model with them "
    "(def forward(self, x, y): return model({'x': x, 'y': y})), with one size per input "
    "(input_size={'x': (...), 'y': (...)}, --input x=SIZE --input y=SIZE)"
)
# Autograd's version check: a tensor saved for backward was changed in place after.
_MODIFIED_IN_PLACE = "has been modified by an inplace operation"
_DTYPE_MISMATCH = re.compile(r"must have the same (scalar )?type|expected scalar type|same dtype")


_TORCH_FOLDER = os.path.dirname(torch.__file__) + os.sep
_OPTIMIZERS_FOLDER = os.path.dirname(torch.optim.__file__) + os.sep
_NINLAB_FOLDER = os.path.dirname(os.path.dirname(__file__)) + os.sep


def _raised_by_the_optimizer(error: BaseException) -> bool:
    """Whether `error` was raised in torch's optimizers' own code (a setting the device or the
    gradients do not allow: capturable on CPU, SparseAdam given dense gradients), not the
    model's: the innermost frame that is neither ninlab's recorder nor torch's private machinery
    under it (fake tensors, dispatch) is an optimizer's."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith(_OPTIMIZERS_FOLDER):
            return True
        if not _machinery(frame.filename):
            return False
    return False


def _container_read(error: BaseException, model: nn.Module) -> str:
    """How a forward that takes one argument failed reading it as a dict (`batch["image"]`,
    `batch.items()`), read in the line the error was raised in (its innermost frame outside
    torch's and ninlab's machinery); "" for any other failure. The error itself does not say:
    a tensor indexed by "x" and by "image" fails in two ways."""
    parameters = _parameters(model)
    if len(parameters) != 1 or _taken_arguments(model) != 1:
        return ""
    name = re.escape(parameters[0].name)
    reads = re.compile(
        rf"\b{name}\s*\[\s*[rbf]?(['\"])[^'\"]*\1\s*\]|\b{name}\.(items|keys|values|get)\(\)?"
    )
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not _machinery(frame.filename):
            read = reads.search(frame.line or "")
            return read.group(0) if read else ""
    return ""


def _machinery(filename: str) -> bool:
    if filename.startswith(_NINLAB_FOLDER):
        return True
    if not filename.startswith(_TORCH_FOLDER):
        return False
    parts = filename[len(_TORCH_FOLDER) :].split(os.sep)
    return any(part.startswith("_") and not part.startswith("__") for part in parts)


def _sparse_modules(model: nn.Module) -> list[str]:
    """The embeddings whose gradients are sparse (`sparse=True`), by name."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
    ]


def _required_keywords(model: nn.Module, spec: StepSpec) -> list[str]:
    """The forward's keyword-only arguments without a default that the inputs do not name."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is inspect.Parameter.empty
        and p.name not in spec.input_names
    ]


def _keyword_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The forward's arguments that may be given by name."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in signature.parameters.values() if p.kind in kinds]


def _unknown_names(model: nn.Module, spec: StepSpec) -> list[str]:
    """The inputs' names the forward has no argument for (and no `**kwargs` to take them)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return []
    taken = {p.name for p in _keyword_parameters(model)}
    return [name for name in spec.input_names if name not in taken]


def _batch_inside(model: nn.Module, spec: StepSpec) -> bool:
    """Whether the one input's size holds the batch first (torchinfo's `input_size=(128, 1, 224,
    224)`): the model rejected it, and runs a forward at that size without its first axis."""
    if len(spec.input_sizes) != 1 or len(spec.input_sizes[0]) < 2:
        return False
    sample = spec.input_sizes[0][1:]
    probe = spec.replace(input_size=sample, mode="infer", step=None, ddp=None)
    try:
        outputs = record_step(model, probe, 2).recording.module_outputs.get("", ())
    except Exception:  # noqa: BLE001 - whatever the model raises, the guess is wrong
        return False
    # The batch of 2 must come out as a batch: not read as an unbatched input's channels.
    return bool(outputs) and outputs[0][0][:1] == (2,)


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in signature.parameters.values() if p.kind in kinds]


def _taken_arguments(model: nn.Module) -> int | None:
    """How many inputs the forward can take by position; None for any number (`*args`) or a
    forward without a signature."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    return len(_parameters(model))


def _required_arguments(model: nn.Module) -> int | None:
    parameters = _parameters(model)
    if not parameters:
        return None
    return sum(1 for p in parameters if p.default is inspect.Parameter.empty)
