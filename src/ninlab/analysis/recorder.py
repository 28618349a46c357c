"""The recorder: a dispatch mode that records every aten op a step dispatches on fake tensors.

Per op, a `Recorder` keeps the module running it (in backward too: the autograd node being executed
is mapped back to the module whose forward created it), the phase of the step
(`ninlab.analysis.phases`), its inputs and outputs, FLOPs, conv/pool window and the blocks its
CPU kernel allocates; the storages ops make go to its `StorageLedger`, and as each backward
begins, what autograd saved is harvested. Where being a dispatch mode would change the program,
it follows the unwatched one, and where a fake kernel's outputs differ from the CPU kernel's
(dtypes of statistics, layouts), it corrects them after the kernel. Ops run the quick way
(`ninlab.analysis.fake_fast_path`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from typing_extensions import Self

from ninlab.analysis.allocator import cpu_kernel_allocations, input_cast_bytes
from ninlab.analysis.allocator.rnn import lstm_workspace_bytes
from ninlab.analysis.fake_fast_path import (
    PRIM_DEVICE,
    FakeOutputs,
    OpTraits,
    fake_device,
    op_traits,
    tensors_in,
)
from ninlab.analysis.flops import op_flops
from ninlab.analysis.geometry import AxisParams, EmptyOutputError, axes_from_torch
from ninlab.analysis.hugging_face import tracing_answered
from ninlab.analysis.kernel_dtypes import OutputDtypes, check_cpu_kernel_dtypes
from ninlab.analysis.kernel_probe import KernelCall, TensorLayout
from ninlab.analysis.known_values import KnownValues
from ninlab.analysis.ledger import StorageLedger, harvest_saved_tensors
from ninlab.analysis.phases import ANNOTATION_OPS, StepPhases
from ninlab.analysis.recording import LayerInputTooSmall, OpRecord, Recording, TensorMeta, WindowOp
from ninlab.analysis.step import output_tensors
from ninlab.analysis.torch_internals import (
    DataDependentOutputException,
    DisableTorchDispatch,
    DisableTorchFunction,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    TorchDispatchMode,
    autograd_sequence_nr,
    compute_elementwise_output_strides,
    current_autograd_node,
    make_contiguous_strides_for,
    node_sequence_nr,
    op_schema,
    suggest_memory_format,
    top_saved_tensors_hooks,
    view_base,
)
from ninlab.errors import NinlabError
from ninlab.units import dtype_name

__all__ = ["Recorder", "temporaries_kept_out_of_place", "unfollowed_formulas"]

aten = torch.ops.aten
_NUMBERS = (float, int, bool, complex)

# Ops whose CPU kernels refuse a source of another dtype than `self`'s where their fake kernels
# accept it (checked on torch 2.8 and 2.14): the argument that must match. Under bf16 autocast a
# lower-precision result index_add'ed into a float32 tensor would otherwise be predicted for a
# step that fails. (scatter, scatter_add, scatter_reduce and masked_scatter's fake kernels refuse
# it themselves.)
_SOURCE_OF_SELFS_DTYPE = {
    **dict.fromkeys((aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_), "source"),
    **dict.fromkeys((aten.index_reduce, aten.index_reduce_, aten.put, aten.put_), "source"),
    **dict.fromkeys((aten.index_put, aten.index_put_), "values"),
}

_POOLS = {
    aten.max_pool1d_with_indices: ("max_pool", 1),
    aten.max_pool2d_with_indices: ("max_pool", 2),
    aten.max_pool3d_with_indices: ("max_pool", 3),
    aten.avg_pool2d: ("avg_pool", 2),
    aten.avg_pool3d: ("avg_pool", 3),
}


def _window_params(func: Any, args: tuple[Any, ...]) -> tuple[str, tuple[AxisParams, ...]] | None:
    """The window of a conv/pool op, read from its aten arguments before it runs."""
    packet = func.overloadpacket
    if packet is aten.convolution and not args[6]:  # a transposed convolution is not a window
        x, weight = args[0], args[1]
        spatial = x.dim() - 2
        axes = axes_from_torch(
            ndim=spatial,
            kind="conv",
            kernel_size=tuple(weight.shape[2:]),
            stride=args[3],
            padding=args[4],
            dilation=args[5],
        )
        return "conv", axes
    if packet in _POOLS:
        kind, spatial = _POOLS[packet]
        # max_pool: (self, kernel, stride, padding, dilation, ceil_mode);
        # avg_pool: (self, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override).
        stride = args[2] if len(args) > 2 else None
        padding = args[3] if len(args) > 3 else 0
        if kind == "max_pool":
            dilation = args[4] if len(args) > 4 else 1
            ceil_mode = bool(args[5]) if len(args) > 5 else False
        else:
            dilation, ceil_mode = 1, bool(args[4]) if len(args) > 4 else False
        axes = axes_from_torch(
            ndim=spatial,
            kind="pool",
            kernel_size=args[1],
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
        )
        return kind, axes
    return None


class _ModuleStack:
    """The innermost module running, in forward (hooks) and in backward (the module whose forward
    made the autograd node being executed).

    Which module made a node is read without watching Python calls (a torch-function mode would
    turn off PyTorch's fast paths, see `ninlab.analysis.phases`): autograd numbers its nodes as
    it makes them, before their op reaches the recorder, so the context in which the first op
    after node n was dispatched (`note_context`) is the one node n was made in."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {module: name for name, module in model.named_modules()}
        self.types = {name: type(module).__name__ for module, name in self.names.items()}
        self.stack: list[str] = []
        self.outputs: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]] = {}
        # At each new node number seen by the recorder: (module, made under saved-tensor hooks
        # (checkpointing), made while no module ran (the loss)); "" is the root module's own
        # forward, or code outside any module.
        self._numbers: list[int] = []
        self._contexts: list[tuple[str, bool, bool]] = []
        self.param_owner: dict[int, str] = {
            id(param): name.rpartition(".")[0] for name, param in model.named_parameters()
        }
        self._handles: list[Any] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def note_context(self) -> None:
        """Called as each op is dispatched: the context the nodes made since the last call were
        made in."""
        number = autograd_sequence_nr()
        if not self._numbers or number != self._numbers[-1]:
            self._numbers.append(number)
            hooked = top_saved_tensors_hooks(True) is not None
            self._contexts.append((self.current(), hooked, not self.stack))

    def context_of(self, node: Any) -> tuple[str, bool, bool] | None:
        """(module, hooked, outside the model) of the node, None if the recorder never saw it
        made."""
        at = bisect.bisect_left(self._numbers, node_sequence_nr(node) + 1)
        return self._contexts[at] if at < len(self._contexts) else None

    def __enter__(self) -> Self:
        def pre_hook(module: nn.Module, _inputs: Any) -> None:
            if module in self.names:
                self.stack.append(self.names[module])

        def post_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if module in self.names and self.stack:
                name = self.stack.pop()
                if name not in self.outputs:
                    tensors = output_tensors(output)
                    self.outputs[name] = tuple((tuple(t.shape), t.dtype) for t in tensors)

        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(pre_hook),
            nn.modules.module.register_module_forward_hook(post_hook),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def graph(self, roots: Sequence[torch.Tensor]) -> tuple[dict[Any, str], set[Any], set[Any]]:
        """The autograd graph behind `roots` (parameters' AccumulateGrad nodes aside), in the
        order its nodes were made: each node's module, the nodes made under saved-tensor hooks,
        those made outside the model."""
        owners: dict[Any, str] = {}
        hooked: set[Any] = set()
        outside: set[Any] = set()
        pending = [t.grad_fn for t in roots if isinstance(t, torch.Tensor)]
        while pending:
            node = pending.pop()
            # An AccumulateGrad node has a `variable`: it saves nothing.
            if node is None or node in owners or hasattr(node, "variable"):
                continue
            module, under_hooks, outside_model = self.context_of(node) or ("", False, False)
            owners[node] = module
            if under_hooks:
                hooked.add(node)
            if outside_model:
                outside.add(node)
            pending += [child for child, _ in node.next_functions]
        # In the order the nodes were made, as the step made them.
        made = sorted(owners, key=node_sequence_nr)
        return {node: owners[node] for node in made}, hooked, outside

    def owner_of_node(self, node: Any) -> str:
        variable = getattr(node, "variable", None)  # AccumulateGrad: the parameter it accumulates
        if variable is not None:
            return self.param_owner.get(id(variable), "")
        context = self.context_of(node)
        return "" if context is None else context[0]


# Normalisations whose CPU kernels keep their statistics in float32 when reduced-precision input
# meets float32 weights (autocast), by the position of the weight among their arguments.
_MIXED_PRECISION_STATISTICS = {
    aten.native_batch_norm.default: 1,
    aten.native_layer_norm.default: 2,
    aten.native_group_norm.default: 1,
}


@functools.cache
def _output_mask_position(func: Any) -> int | None:
    """Where `func` takes an `output_mask` among its arguments; None: it takes none."""
    names = [argument.name for argument in op_schema(func).arguments]
    return names.index("output_mask") if "output_mask" in names else None


# Backward ops whose kernels make an output their `output_mask` leaves out, by its position: the
# grid samplers' mask says only whether grad_input is wanted, grad_grid is always made (ATen's
# GridSampler; measured on 2.8 and 2.14.1: a 2x8x8x2 grid no gradient is wanted for, from
# `torch.rand`, still gets its 1,024-byte gradient, a bf16 step's live peak 0.98 of the real one).
_MADE_WHATEVER_THE_MASK = {
    aten.grid_sampler_2d_backward.default: 1,
    aten.grid_sampler_3d_backward.default: 1,
}


def _masked_outputs(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A backward op's outputs with those its `output_mask` leaves out as None, as the kernels
    return them (an undefined tensor; `_MADE_WHATEVER_THE_MASK` excepted); Python's
    decomposition of batch norm backward, which FakeTensorMode runs, makes grad_input whatever
    the mask says (measured on 2.13: a BatchNorm2d straight on the step's input, whose gradient
    autograd never asks for, was predicted a live peak 1.44 of the real one)."""
    position = _output_mask_position(func)
    if position is None or not isinstance(output, (tuple, list)):
        return output
    mask = args[position] if position < len(args) else kwargs.get("output_mask")
    if mask is None or len(mask) != len(output) or all(mask):
        return output
    made = _MADE_WHATEVER_THE_MASK.get(func)
    return tuple(
        tensor if wanted or index == made else None
        for index, (tensor, wanted) in enumerate(zip(output, mask))
    )


# `_native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias,
# proj_weight, proj_bias, mask=None, need_weights=True, ...)`: where its `need_weights` sits.
_NEED_WEIGHTS_POSITION = 10


def _attention_weights_not_wanted(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """The fused inference attention (`nn.MultiheadAttention`'s fast path) told not to return
    its weights returns None for them (an undefined tensor), as the kernel does; the fake kernel
    made an empty tensor, shown as an output of shape (0,) the model never returned."""
    if func is not aten._native_multi_head_attention.default:
        return output
    need_weights = (
        args[_NEED_WEIGHTS_POSITION]
        if len(args) > _NEED_WEIGHTS_POSITION
        else kwargs.get("need_weights", True)
    )
    return output if need_weights else (output[0], None)


def _cpu_output_dtypes(output: Any, dtypes: OutputDtypes, fake_outputs: FakeOutputs) -> Any:
    """Outputs of a call of mixed dtypes in the dtypes the CPU kernel gives them, run once on
    small real tensors (`kernel_dtypes`): `huber_loss` of a bf16 input and a float32 target is
    bfloat16 on CPU and float32 on fake tensors (measured on 2.13). Made by `fake_outputs`,
    which remembers them."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    if dtypes is None or len(dtypes) != len(outputs):
        return output
    cast = tuple(
        fake_outputs.run(aten._to_copy.default, (tensor,), {"dtype": dtype})
        if isinstance(tensor, torch.Tensor) and dtype is not None and tensor.dtype != dtype
        else tensor
        for tensor, dtype in zip(outputs, dtypes)
    )
    return cast if isinstance(output, (tuple, list)) else cast[0]


def _float32_statistics(
    func: Any, args: tuple[Any, ...], output: Any, fake_outputs: FakeOutputs
) -> Any:
    """A normalisation's saved mean and inverse std in float32 when reduced-precision input meets
    float32 weights (autocast), as the real kernels keep them (measured on CPU: batch norm, layer
    norm, group norm; batch norm on CUDA too); the fake kernel would give them the input's
    dtype, half their bytes. The copies are made by `fake_outputs`, which remembers them: through
    FakeTensorMode, each is a Python decomposition of `_to_copy`, a fifth of a bf16 step."""
    weight_at = _MIXED_PRECISION_STATISTICS.get(func)
    if weight_at is None:
        return output
    x, weight = args[0], args[weight_at]
    if (
        x.dtype not in (torch.bfloat16, torch.float16)
        or weight is None
        or weight.dtype != torch.float32
    ):
        return output
    result, mean, inverse_std = output

    def to_float32(tensor: torch.Tensor) -> torch.Tensor:
        # As `tensor.to(torch.float32)`, which returns a float32 tensor itself.
        if tensor.dtype == torch.float32:
            return tensor
        return fake_outputs.run(aten._to_copy.default, (tensor,), {"dtype": torch.float32})

    return result, to_float32(mean), to_float32(inverse_std)


def _group_norm_grad_input_dtype(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """Group norm backward's grad_input in its input's dtype, as the kernels make it
    (`empty_like(X)`); given reduced-precision input with float32 statistics (autocast), the fake
    kernel promotes it to float32, twice its bytes (measured on 2.13 and 2.14.1: a GroupNorm
    after a bf16 convolution, the training step's live peak 1.18 of the real one)."""
    if func is not aten.native_group_norm_backward.default or output[0] is None:
        return output
    x = args[1]
    if output[0].dtype == x.dtype:
        return output
    return (output[0].to(x.dtype), *output[1:])


def _cpu_batch_norm_layout(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """CPU batch norm's output, and its backward's grad_input, in the layout ATen suggests for
    the input (`empty_like(input, input.suggest_memory_format())`): channels-last for a
    channels-last map, else contiguous. The fake kernels give the output the input's strides
    and grad_input grad_output's: a `BatchNorm1d` over a transposed sequence (PatchTST's) was
    predicted to return it transposed, so the linear layer after it copied nothing (live 0.93
    of the real step); a channels-last input with an NCHW gradient, the convolution backward
    after it copied its grad_output (mbconv, MobileNet: 32 KB over at batch 4)."""
    if func is aten.native_batch_norm.default:
        x = args[0]
    elif func is aten.native_batch_norm_backward.default:
        x = args[1]
    else:
        return output
    made = output[0]
    if made is None or x.device.type != "cpu":
        return output
    layout = _suggested_memory_format(x)
    if made.is_contiguous(memory_format=layout):
        return output
    return (torch.empty_like(made, memory_format=layout), *output[1:])


def _suggested_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ATen suggests for `x` (`suggest_memory_format`): channels-last where it is
    laid out so (and is not also contiguous), else contiguous."""
    for rank, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == rank and x.is_contiguous(memory_format=layout) and not x.is_contiguous():
            return layout
    return torch.contiguous_format


# Backward kernels whose CPU grad_input layout the fake kernel does not give, by the layout the
# CPU kernel writes (measured on every pair of NCHW, channels-last and transposed-last-two
# gradient and input): "contiguous", "grad_output" (its strides, as TensorIterator gives them),
# or "input" (the layout ATen suggests for the input).
_CPU_GRAD_INPUT_LAYOUT = {
    aten.native_layer_norm_backward.default: "contiguous",
    aten._log_softmax_backward_data.default: "contiguous",
    aten.mse_loss_backward.default: "contiguous",
    aten.hardswish_backward.default: "grad_output",
    aten.native_dropout_backward.default: "grad_output",
    aten.native_group_norm_backward.default: "input",
}


def _cpu_grad_input_layout(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """A backward kernel's grad_input in the layout the CPU kernel writes
    (`_CPU_GRAD_INPUT_LAYOUT`), where the fake kernel gives another: layer norm given a
    transposed gradient (timm's pvt_v2) makes it contiguous where the fake one kept the
    gradient's strides, and a later reshape copied only in the prediction."""
    layout = _CPU_GRAD_INPUT_LAYOUT.get(func)
    grad_input = output[0] if isinstance(output, (tuple, list)) else output
    if layout is None or grad_input is None or _device_type(grad_input) != "cpu":
        return output
    # Most calls have the layout already: said without making a fake tensor through
    # FakeTensorMode's factory path (a fifth of a small model's prediction).
    contiguous = tuple(make_contiguous_strides_for(grad_input.shape))
    if grad_input.stride() == contiguous and (
        layout == "contiguous"
        or (layout == "grad_output" and args[0].stride() == contiguous)
        or (layout == "input" and suggest_memory_format(args[1]) == torch.contiguous_format)
    ):
        return output
    if layout == "contiguous":
        wanted = torch.empty_like(grad_input, memory_format=torch.contiguous_format)
    elif layout == "grad_output":
        wanted = torch.empty_like(args[0])
    else:
        wanted = torch.empty_like(grad_input, memory_format=suggest_memory_format(args[1]))
    if wanted.stride() == grad_input.stride():
        return output
    return (wanted, *output[1:]) if isinstance(output, (tuple, list)) else wanted


def _cpu_lstm_outputs(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """oneDNN's LSTM layer as the CPU kernel returns it: under grad mode, the workspace it keeps
    for backward at its real size (`lstm_workspace_bytes`; the fake kernel returns it empty, and
    a one-layer LSTM classifier's live peak was 0.46 of the real one); in backward, every
    gradient float32, whatever the inputs' dtype (torch 2.8's fake kernel gives a bf16 layer's
    its inputs' dtype: the live peak of the corpus's `lstm` under bf16 autocast was 0.90 of the
    real one, the engine's casts of them to bf16 unseen), and the second bias gradient a clone of
    the first, not the same tensor."""
    if func is aten.mkldnn_rnn_layer.default and torch.is_grad_enabled():
        x, cx = args[0], args[6]
        workspace = lstm_workspace_bytes(
            sequence=x.shape[0],
            batch=x.shape[1],
            input_size=x.shape[2],
            hidden_size=args[10],
            dtype=x.dtype,
            cell_dtype=cx.dtype,
        )
        return (*output[:3], output[3].new_empty((workspace,)))
    if func is aten.mkldnn_rnn_layer_backward.default:
        output = tuple(
            grad if grad.dtype == torch.float32 else torch.empty_like(grad, dtype=torch.float32)
            for grad in output
        )
        if output[4] is output[3]:
            return (*output[:4], torch.empty_like(output[3]), *output[5:])
    return output


_EMBEDDING_BAGS = frozenset({aten._embedding_bag.default, aten._embedding_bag_forward_only.default})


def _cpu_embedding_bag_storages(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """EmbeddingBag's index buffers on the storages the CPU kernel leaves them on, which it
    sizes and then shrinks (`resize_` keeps the storage): offset2bag, where it is made, on one
    element more than it holds, and bag_size, under include_last_offset, on one per offset
    (measured on 2.13 and 2.14.1, every mode, both index dtypes: a mean bag of (2, 12) indices
    had a 200-byte offset2bag where the fake kernel's has 192, and the inference live peak was
    8 bytes under)."""
    if func not in _EMBEDDING_BAGS or _device_type(output[0]) != "cpu":
        return output
    offsets, offset2bag, bag_size = args[2], output[1], output[2]
    include_last_offset = len(args) > 7 and bool(args[7])
    if offset2bag.numel() > 0 and _sums_bags_fast(args, output[0]):
        offset2bag = offset2bag.new_empty((0,))
    elif offset2bag.numel() > 0:
        elements = offset2bag.numel()
        offset2bag = offset2bag.new_empty((elements + 1,)).resize_((elements,))
    if include_last_offset and offsets.numel() > bag_size.numel():
        bag_size = bag_size.new_empty((offsets.numel(),)).resize_(bag_size.shape)
    return (output[0], offset2bag, bag_size, *output[3:])


def _sums_bags_fast(args: tuple[Any, ...], output: torch.Tensor) -> bool:
    """Whether the CPU kernel sums the bags by its fast path, which makes no offset2bag: ATen's
    `is_fast_path` (EmbeddingBag.cpp) takes bfloat16 tables beside float32 and float16 ones,
    where the fake kernel's copy of it does not (measured on 2.8, 2.13 and 2.14.1: a bf16 sum
    bag of 8 indices has an empty offset2bag, the fake kernel's 64 bytes; an inference's live
    peak was 72 bytes over)."""
    weight, mode = args[0], args[4] if len(args) > 4 else 0
    weights = args[6] if len(args) > 6 else None  # per_sample_weights
    padding_idx = args[8] if len(args) > 8 else -1
    return (
        mode == 0
        and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and weight.stride(1) == 1
        and output.stride(1) == 1
        and (padding_idx is None or padding_idx < 0)
        and (weights is None or weights.stride(0) == 1)
    )


# Losses whose CPU kernels compute the elementwise loss into their output and then resize it to
# the reduced 0-d value (`resize_({})` keeps the storage), by the position of their reduction.
_LOSSES_REDUCED_IN_THEIR_OUTPUT = {
    aten.mse_loss.default: 2,
    aten.smooth_l1_loss.default: 2,
    aten.soft_margin_loss.default: 2,
    aten.binary_cross_entropy.default: 3,
}


def _cpu_reduced_loss_storage(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """A reduced loss on the storage the CPU kernel leaves it on: the elementwise loss's, though
    the value is 0-d (measured on 2.13 and 2.14.1: `F.mse_loss` of a (2, 4, 8, 8) output has a
    2,048-byte storage; the fake kernel's has 4). The loss a training loop holds while the next
    step runs holds all of it (a Conv2d regressed on zeros: 5,448 bytes predicted, 6,596
    measured)."""
    reduction_at = _LOSSES_REDUCED_IN_THEIR_OUTPUT.get(func)
    if reduction_at is None or _device_type(output) != "cpu" or output.dim() != 0:
        return output
    reduction = args[reduction_at] if len(args) > reduction_at else 1  # mean
    if reduction == 0:  # none: not reduced
        return output
    operands = [a for a in args[:reduction_at] if isinstance(a, torch.Tensor)]
    elements = torch.broadcast_shapes(*(tuple(a.shape) for a in operands)).numel()
    return output.new_empty((elements,)).resize_(())


# Ops whose CPU kernels make their output like their first argument (`empty_like`) and then
# resize it to the output's shape: where the output is smaller, `resize_` keeps the storage.
_OUTPUTS_RESIZED_FROM_THEIR_INPUT = frozenset({aten.col2im.default})


def _cpu_output_resized_from_input(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """The output on the storage the CPU kernel leaves it on, its input's where that is larger
    (measured on 2.13 and 2.14.1: `F.fold` of (2, 72, 256) columns to a (2, 8, 16, 16) map,
    and the backward of `F.unfold`, keep a 147,456-byte storage for 16,384 bytes of values; the
    fake kernel's has 16,384, and a fold's live peak was 0.59 of the real one)."""
    if func not in _OUTPUTS_RESIZED_FROM_THEIR_INPUT or _device_type(output) != "cpu":
        return output
    elements = args[0].numel()
    if elements <= output.numel() or not output.is_contiguous():
        return output
    return output.new_empty((elements,)).resize_(output.shape)


# The window functions: periodic (their default), ATen computes a window one element longer and
# returns all but its last element, a view keeping the whole storage.
_WINDOWS = frozenset(
    {
        aten.hann_window,
        aten.hamming_window,
        aten.blackman_window,
        aten.bartlett_window,
        aten.kaiser_window,
    }
)


def _periodic_window_storage(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """A periodic window on the storage ATen leaves it on, one element longer than the window
    (TensorFactories.cpp; measured on 2.8, 2.13 and 2.14.1: `torch.hann_window(32)` keeps 132
    bytes, the fake kernel's 128; an STFT front end's live peak was 4 bytes under)."""
    if func.overloadpacket not in _WINDOWS or output.numel() < 2:
        return output
    periodic = args[1] if len(args) > 1 else True
    if not periodic:
        return output
    return output.new_empty((output.numel() + 1,))[: output.numel()]


def _check_source_dtype(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, as the CPU kernel does, a source of another dtype than `self`'s (see
    `_SOURCE_OF_SELFS_DTYPE`), in one line naming the op and the dtypes."""
    name = _SOURCE_OF_SELFS_DTYPE[func.overloadpacket]
    position = next(i for i, a in enumerate(op_schema(func).arguments) if a.name == name)
    source = args[position] if position < len(args) else kwargs.get(name)
    target = args[0]
    if isinstance(source, torch.Tensor) and source.dtype != target.dtype:
        into, given = dtype_name(target.dtype), dtype_name(source.dtype)
        raise NinlabError(
            f"{func.overloadpacket.__name__}: its {name} is {given} and the tensor it writes "
            f"into {into}, which the CPU kernel refuses (the real step fails); cast the {name} "
            f"to {into} (under autocast, the result of a lower-precision op is {given})"
        )


def _elementwise_layout(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """An elementwise op's output in contiguous strides where TensorIterator's fast setup gives
    them: every operand of the output's shape and contiguous. Sizes of 1 make a tensor
    contiguous in both layouts (a (N, C, 1, 1) map after global pooling, a one-channel image or
    weight), and there the fake kernel keeps a channels-last input's strides where the real one
    does not; the strides decide which layout a later kernel runs in (NiN's dropout feeds a
    max-pool backward that copies grad_input when they disagree, 884,736 bytes at batch 128 in
    bf16; a masked one-channel convolution weight, `weight * mask`, ran the convolution
    channels-last only in the prediction: 1.59 of the allocator peak). A number in a tensor's
    place (`x * 2`) is an operand of its own, of no shape, so there is no fast setup and the
    real output keeps the input's strides too."""
    if not isinstance(output, FakeTensor) or output.dim() < 2 or 1 not in output.shape:
        return output
    contiguous = make_contiguous_strides_for(output.shape)
    if output.stride() == tuple(contiguous) or not output.is_contiguous():
        return output
    operands = [args[i] if i < len(args) else None for i in _tensor_positions(func)]
    if not all(
        isinstance(a, torch.Tensor) and a.shape == output.shape and a.is_contiguous()
        for a in operands
        if a is not None
    ):
        return output
    if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
        return output
    dtypes = tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args)
    settings = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
    keywords = tuple(sorted(kwargs.items()))
    try:
        fast = _takes_fast_setup(func, dtypes, output.dim(), settings, keywords)
    except TypeError:  # a setting that cannot be a cache key (a list): the fake strides stay
        return output
    return torch.empty_like(output, memory_format=torch.contiguous_format) if fast else output


@functools.cache
def _takes_fast_setup(
    func: Any,
    dtypes: tuple[torch.dtype | None, ...],
    rank: int,
    settings: tuple[Any, ...],
    keywords: tuple[tuple[str, Any], ...],
) -> bool:
    """Whether the CPU kernel gives an output contiguous strides where every operand is
    contiguous and laid out otherwise (TensorIterator's fast setup), run once on real tensors of
    `rank` dimensions laid out so; a kernel that allocates its output like its input instead
    (`hardtanh`'s `empty_like`) keeps their strides. `dtypes`: the tensors' at their positions,
    None for the other arguments, `settings`; `keywords`: the keyword arguments (no tensors)."""
    sizes = (1,) + (2,) * (rank - 1)
    # The size-1 first dimension innermost: contiguous, and not in contiguous strides.
    strides = (1, *(2 ** (rank - 1 - d) for d in range(1, rank)))
    with DisableTorchDispatch():
        probe = [
            torch.ones(sizes, dtype=dtype).as_strided(sizes, strides) if dtype else setting
            for dtype, setting in zip(dtypes, settings)
        ]
        try:
            output = func(*probe, **dict(keywords))
        except Exception:  # noqa: BLE001 - a kernel that refuses the probe: the fake strides stay
            return False
    return isinstance(output, torch.Tensor) and output.stride() != strides


@functools.cache
def _tensor_positions(func: Any) -> tuple[int, ...]:
    """The positions of an op's operands: its tensor arguments (where a number passed is a
    wrapped one), and a number given as the other side of a binary op (`rsub.Scalar`'s
    `other`, `where.ScalarOther`'s), which ATen wraps in a tensor too (`wrapped_scalar_tensor`),
    not a setting such as a slope or a bound."""
    return tuple(
        i
        for i, argument in enumerate(op_schema(func).arguments)
        if not argument.kwarg_only
        and (
            isinstance(argument.type, torch.TensorType)
            or (argument.name in ("self", "other") and isinstance(argument.type, torch.NumberType))
        )
    )


# Elementwise kernels (backwards without the pointwise tag, `copysign`) whose fake kernels lay
# their output out like another operand than the CPU kernel's TensorIterator does, by the
# positions of the operands it reads in order (mostly grad_output first; none: contiguous):
# given an NCHW gradient of a channels-last activation the real output is NCHW and the fake one
# channels-last, and the convolution backward after it copies the gradient where they disagree
# (SELU after a channels-last convolution: 6,400 allocator bytes under at batch 2, torch 2.14.1;
# checked on 2.8 and 2.13 too).
_GRADIENT_FIRST_ELEMENTWISE = {
    aten.elu_backward.default: (0, 5),
    aten.hardswish_backward.default: (0, 1),
    aten.hardsigmoid_backward.default: (0, 1),
    aten.hardtanh_backward.default: (0, 1),
    aten.softplus_backward.default: (0, 1),
    aten.logit_backward.default: (0, 1),
    aten.copysign.Tensor: (0, 1),
    aten.binary_cross_entropy_backward.default: (1, 2, 0),  # the input first
    # grad_input made contiguous (`zeros_like(input, LEGACY_CONTIGUOUS_MEMORY_FORMAT)`) and filled
    aten.mse_loss_backward.default: (),
    aten.smooth_l1_loss_backward.default: (),
    aten.huber_loss_backward.default: (),
}


def _cpu_elementwise_layout(func: Any, args: tuple[Any, ...], output: Any) -> Any:
    """The output of one of `_GRADIENT_FIRST_ELEMENTWISE` in the strides TensorIterator gives it
    on CPU, from its operands of the output's shape in the kernel's order."""
    positions = _GRADIENT_FIRST_ELEMENTWISE.get(func)
    if positions is None or not isinstance(output, FakeTensor):
        return output
    if not positions:
        strides = tuple(make_contiguous_strides_for(output.shape))
    else:
        # A gradient reduced to a number (a loss's mean) takes no part in the layout.
        operands = [args[i] for i in positions if args[i].shape == output.shape]
        if not operands:
            return output
        strides = tuple(compute_elementwise_output_strides(*operands))
    if strides == output.stride():
        return output
    return torch.empty_strided(output.shape, strides, dtype=output.dtype, device=output.device)


def _sums_gradients(args: tuple[Any, ...], kwargs: dict[str, Any], summed: bool) -> bool:
    """Whether an `add` may be the autograd engine accumulating two gradients of one tensor:
    while a backward node runs without grad mode (not create_graph, not a checkpoint's
    recomputation), where the node may hand the engine a gradient to sum into the first
    (`summed`: see `_SummingNodes`), two tensors alike, nothing else; the engine adds in place
    only into a dense one whose storage it holds alone (`can_accumulate_inplace`): not a view,
    whose base holds the storage too (a weight's gradient `mm(...).t()`, a bias's
    `sum(...).view(...)`: a GRU's first sum of each weight's gradients over its time steps is
    out of place, 7 KB)."""
    if kwargs or len(args) != 2 or torch.is_grad_enabled() or not summed:
        return False
    first, second = args
    return (
        isinstance(first, FakeTensor)
        and isinstance(second, FakeTensor)
        and first.shape == second.shape
        and first.dtype == second.dtype
        and first.layout == torch.strided
        and aten.is_non_overlapping_and_dense.default(first)
        and view_base(first) is None
    )


class _SummingNodes:
    """Which backward nodes may hand the engine a gradient to sum, and into what. The engine
    sums the gradients of an input that several edges reach, after the node delivering the
    second has run, with that node current, into the gradient already there: made before that
    node ran, unless the node itself reaches the input twice (`x * x`). Any other `add` of a
    node is its formula's own, out of place for real too (`pinv`'s `... - ... + ...`,
    `lu_factor`'s: recorded in place, a step on 16x16 matrices of a 16x256 activation was 0.881
    of the measured live peak). Read from each backward's graph as it begins; a node of no graph
    read (the engine's root, a backward not watched) may sum anything."""

    def __init__(self) -> None:
        self._seen: set[int] = set()  # sequence numbers of the nodes of the graphs read
        self._summing: set[int] = set()  # those with an edge to an input others reach
        self._twice: set[int] = set()  # those reaching one input by two edges
        self._running = (-1, -1)  # the node running: its sequence number, its first op's index

    def read(self, roots: Sequence[torch.Tensor], nodes: Iterable[Any]) -> None:
        """Reads the graph of `nodes` (every node behind `roots` but AccumulateGrad)."""
        nodes = list(nodes)
        edges: dict[tuple[int, int], int] = {}
        for node in nodes:
            for child, position in node.next_functions:
                if child is not None:
                    slot = _input_slot(child, position)
                    edges[slot] = edges.get(slot, 0) + 1
        for root in roots:
            if isinstance(root, torch.Tensor) and root.grad_fn is not None:
                slot = _input_slot(root.grad_fn, root.output_nr)
                edges[slot] = edges.get(slot, 0) + 1
        for node in nodes:
            number = node_sequence_nr(node)
            self._seen.add(number)
            slots = [_input_slot(child, at) for child, at in node.next_functions if child]
            if any(edges[slot] > 1 for slot in slots):
                self._summing.add(number)
            if len(set(slots)) < len(slots):
                self._twice.add(number)

    def running(self, node: Any, index: int) -> None:
        """Op `index` runs in `node`: the first of the node's run, if it is a new one."""
        number = node_sequence_nr(node)
        if number != self._running[0]:
            self._running = (number, index)

    def may_sum_into(self, node: Any, made_at: int) -> bool:
        """Whether `node`, running, may hand the engine a gradient to sum into a tensor made by
        op `made_at` (-1: before the recording)."""
        number = node_sequence_nr(node)
        if number not in self._seen or number in self._twice:
            return True
        return number in self._summing and made_at < self._running[1]


def _input_slot(node: Any, position: int) -> tuple[int, int]:
    """An input of a backward node, as the engine's input buffer holds it: an AccumulateGrad
    node's by its leaf (its sequence number is the same for all), any other by its own."""
    variable = getattr(node, "variable", None)
    if variable is not None:
        return (-1, id(variable))
    return (node_sequence_nr(node), position)


# The ops a backward formula fills the zeros it has just made with, each by its in-place twin:
# unwatched it fills them in place, on a tensor subclass (a fake tensor) out of place
# (FunctionsManual.cpp, for composite compliance), a tensor of the differentiated one's size more:
# gather's backward (`scatter_add`: a graph net's message passing), index_select's (`index_add`:
# 1.26 of the real live peak, a parameter's rows picked by index), indexing's (`index_put`),
# the value-selecting reductions' along a dim (max, min, median, mode, kthvalue, topk, sort:
# `scatter`), cummax's and cummin's (`scatter_add`), trace's (`index_fill`); measured on 2.13;
# take's (`put`, accumulating), found on 2.14.1 (a 16x256 activation's: 15,396 live bytes over).
_FILLS_OF_FRESH_ZEROS = {
    aten.scatter_add.default: aten.scatter_add_.default,
    aten.scatter.src: aten.scatter_.src,
    aten.index_add.default: aten.index_add_.default,
    aten.index_put.default: aten._index_put_impl_.default,
    aten.index_fill.int_Tensor: aten.index_fill_.int_Tensor,
    aten.put.default: aten.put_.default,
}
# The ops those zeros are made by, as an `OpRecord` names them.
_ZEROS_MADE_BY = frozenset(
    str(op) for op in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)
)

# The backward of a reduction to one selected value (`max()`, `min()`, `median()`, `nanmedian()`
# with no dim) spreads the gradient evenly over the elements equal to it (FunctionsManual.cpp,
# `evenly_distribute_backward`; profiled on 2.8, 2.13 and 2.14.1). Unwatched on CPU it reads
# `value.isnan()`, builds the mask (`input == value`), makes the gradient's zeros, sums the mask
# (into int64, a copy of the mask 8 bytes an element) and fills the zeros in place
# (`masked_fill_`): the zeros and the mask's int64 copy are alive together. On a tensor subclass
# (a fake tensor) or a GPU it makes NaN masks of the input and the value and their `logical_and`,
# then the mask, its sum, and the gradient last, out of place (`mask * share`): `w.max()` of a
# (10, 8) parameter was predicted 997 live bytes against 836, then 1,444 allocator bytes against
# 1,760. On CPU the recorder runs the NaN masks unrecorded and records the unwatched program:
# the zeros right after the mask, the product as the fill of those zeros. The 1-byte
# `value.isnan()` it leaves out dies before the zeros are made: no high point is there.
_EVENLY_DISTRIBUTING_NODES = frozenset(
    {"MaxBackward1", "MinBackward1", "MedianBackward0", "NanmedianBackward0"}
)
_NAN_MASK_OPS = frozenset({aten.isnan.default, aten.logical_and.default})
_SPREADING_OPS = _NAN_MASK_OPS | {aten.eq.Tensor, aten.mul.Tensor}

# The backward of `torch.matrix_exp` (FunctionsManual.cpp, `differential_analytic_matrix_function`)
# takes the exponential of the block matrix [[A^H, grad], [0, A^H]]: unwatched it makes that
# matrix's zeros and copies the three blocks into them, on a tensor subclass (a fake tensor) it
# builds it by three `cat`s of the blocks and a `zeros_like` of one, two half-sized tensors
# and a block more (an orthogonal parametrization's 16x16 weight: 1,024 live bytes over, torch
# 2.14.1). The recorder runs the blocks' `cat`s and `zeros_like` unrecorded and records the
# last `cat` (along the rows) as the zeros the CPU program fills: the same storage, copies into
# it make none.
_EXP_DIFFERENTIAL_NODES = frozenset({"LinalgMatrixExpBackward0"})
_EXP_DIFFERENTIAL_OPS = frozenset({aten.cat.default, aten.zeros_like.default})

# The masks backward formulas put over a `where` they have just made, unwatched in place and on
# a tensor subclass out of place: maximum's and minimum's (`at::where(self == other, grad / 2,
# grad).masked_fill_(self < other, 0)`, derivatives.yaml) and clamp's between tensor bounds
# (FunctionsManual.cpp), a gradient-sized tensor more (a `torch.maximum` of two 16x256
# activations: 125,528 bytes predicted against 109,144, torch 2.14.1).
_MASKS_OF_A_FRESH_WHERE = {aten.masked_fill.Scalar: aten.masked_fill_.Scalar}
_WHERE_MADE_BY = frozenset({str(aten.where.self)})

# The masks backward formulas `and` into a mask they have just made, unwatched in place and on
# a tensor subclass out of place: clamp's between tensor bounds before torch 2.14
# (`(self >= min).logical_and_(self <= max)`, FunctionsManual.cpp `clamp_backward`; a mask of
# the input's size more: 129,628 live bytes predicted against 125,532 for a 16x256 activation,
# torch 2.8 and 2.13), and `evenly_distribute_backward`'s NaN masks on a GPU
# (`input_isnan.logical_and_(value_isnan)`; on CPU it takes another path, `_spread_evenly`).
# Both masks are the formula's locals, alive to its end.
_ANDS_INTO_A_FRESH_MASK = {aten.logical_and.default: aten.logical_and_.default}
_MASK_MADE_BY = frozenset(
    str(op)
    for op in (aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor, aten.isnan.default)
)

# Backward formulas that, without grad mode, compute in place on the temporaries they have just
# made and, on a tensor subclass, out of place: binary cross-entropy with logits
# (`t.add(1).sub_(target).mul_(input.sigmoid()).sub_(t)` with a `pos_weight`, else
# `input.sigmoid().sub_(target)`, then `.mul_(grad)` and `.mul_(weight)`, FunctionsManual.cpp;
# with a `pos_weight`, a 16x256 input's step was 151,128 live bytes predicted against 101,976).
# Each node, with the ops recorded as their in-place twins where their first argument is a
# temporary the node made, which dies right after (`StorageLedger.accumulating`); a link of a
# chain whose temporaries C++ keeps to the end of the expression is not (`t.add(1).sub(target)`):
# the figures are then estimates (`temporaries_kept_out_of_place`).
_IN_PLACE_ON_ITS_TEMPORARIES = {
    "BinaryCrossEntropyWithLogitsBackward0": {
        aten.sub.Tensor: aten.sub_.Tensor,
        aten.mul.Tensor: aten.mul_.Tensor,
    },
}

# Backward formulas that choose their program by the values of their input, which fake tensors
# do not have: unwatched, a product's (`prod`, `cumprod`) divides the output by an input with no
# zero and takes a zero-safe path otherwise; on a tensor subclass it always takes a third,
# composite-compliant one (FunctionsManual.cpp, ReduceOps.cpp). A step holding one is an estimate
# (`h.cumprod(1)` of a 16x256 activation: 195,480 live bytes predicted against 121,432 measured).
_FORMULAS_BY_VALUES = {
    "ProdBackward0": "prod",
    "ProdBackward1": "prod",
    "CumprodBackward0": "cumprod",
}


# Decompositions asking for vectors only where a gradient may be wanted (BatchLinearAlgebra.cpp,
# `_may_require_fw_or_bw_grad`), which is always true of a tensor subclass: unwatched and without
# gradients, `torch.linalg.svdvals` (and `matrix_norm(ord=2)`, `cond`, which run it),
# `eigvalsh` and `eigvals` compute no vectors, where on fake tensors they do (an inference's
# `svdvals` of a 16x8x32 activation: 55,848 live bytes predicted against 35,368). What the
# dispatch mode sees is also what `torch.linalg.svd(A, full_matrices=False)`, `eigh` and `eig`
# run, which do compute them: the recorder cannot tell which the step called, so it says so.
# Each op, with the position and default of the arguments that ask for vectors, the values
# that make the call one a decomposition could have made.
_VECTORS_FOR_A_SUBCLASS = {
    aten._linalg_svd.default: ((1, "full_matrices", False), (2, "compute_uv", True)),
    aten._linalg_eigh.default: ((2, "compute_v", True),),
    aten.linalg_eig.default: (),
}


def _vectors_unsure(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why the vectors of this call may not be computed unwatched ("" where they are): a call of
    `_VECTORS_FOR_A_SUBCLASS` made as a decomposition could have made it, on an input no
    gradient is wanted for."""
    asks = _VECTORS_FOR_A_SUBCLASS.get(func)
    if asks is None or (args[0].requires_grad and torch.is_grad_enabled()):
        return ""
    for position, name, value in asks:
        given = args[position] if len(args) > position else kwargs.get(name, value)
        if given != value:
            return ""
    return (
        f"{func.__name__.split('.')[0].lstrip('_')} computes vectors here on fake tensors; "
        "without gradients, torch.linalg.svdvals, eigvalsh and eigvals (and matrix_norm and "
        "cond, which run them) compute none unwatched, and a trace cannot tell them from svd, "
        "eigh and eig, which do: the figures count the vectors"
    )


# Composite ops that take another path on CPU tensors than on a tensor subclass, by a choice the
# trace cannot make: torch 2.14's `quantile` and `nanquantile` find a few k-th values by a
# selection over the input, without the `sort` (values and int64 indices of the input's size)
# they run on a fake tensor, and sort where they ask for many (a 2x256 activation's
# `torch.quantile(h, 0.3, dim=1)`: 24,764 live bytes predicted against 19,094 measured). Seen
# as a `sort` of the tensor whose NaNs the same call has just looked for (`isnan`), which only
# this program does (before 2.14 it sorts first and looks for NaNs in the sorted values).
_SORT = aten.sort.default
_NAN_CHECK = aten.isnan.default
_QUANTILE_UNSURE = (
    "quantile (or nanquantile) on CPU tensors picks its k-th values by a selection, without "
    "sorting, where it asks for few, and a trace on fake tensors always sorts: the figures "
    "count the sort's values and indices"
)


def temporaries_kept_out_of_place(recording: Recording) -> tuple[str, ...]:
    """Why a recorded backward may hold more than the real one: for each node of
    `_IN_PLACE_ON_ITS_TEMPORARIES` with an op still out of place on a temporary it made, the
    reason (empty where none is)."""
    names = set()
    for op in recording.ops:
        twins = _IN_PLACE_ON_ITS_TEMPORARIES.get(op.autograd_node)
        if twins is None or op.op not in {str(func) for func in twins} or not op.inputs:
            continue
        record = recording.storages.get(op.inputs[0].storage_key)
        made_here = (
            record is not None
            and record.created_at >= 0
            and recording.ops[record.created_at].autograd_node == op.autograd_node
        )
        if made_here:
            names.add(op.autograd_node)
    return tuple(
        f"{name} computes in place on its own temporaries unwatched and out of place on fake "
        "tensors, and not every step of it was followed: the figures count a temporary more"
        for name in sorted(names)
    )


def _in_node(names: frozenset[str]) -> bool:
    """Whether the op being dispatched runs inside an autograd node of one of these types."""
    node = current_autograd_node()
    return node is not None and type(node).__name__ in names


# Backward formulas of linear algebra whose program on fake tensors is not the one the CPU runs
# (ATen's formulas branch on tensor subclasses for composite compliance, and the recorder
# follows those branches only where it knows them): found by the model-family probe on 2.14.1,
# the backward of a 16x16 weight's `householder_product` 68 live bytes under the real step's.
# A step holding one is an estimate.
_FORMULAS_UNLIKE_THE_CPUS = {
    "LinalgHouseholderProductBackward0": "householder_product",
}


def unfollowed_formulas(ops: Sequence[OpRecord]) -> tuple[str, ...]:
    """Why a recorded backward may not be the real one: for each op of `_FORMULAS_BY_VALUES`
    or `_FORMULAS_UNLIKE_THE_CPUS` differentiated, the reason (empty where none is)."""
    nodes = {op.autograd_node for op in ops}
    by_values = sorted({name for node, name in _FORMULAS_BY_VALUES.items() if node in nodes})
    unlike = sorted({name for node, name in _FORMULAS_UNLIKE_THE_CPUS.items() if node in nodes})
    return tuple(
        f"{name}'s backward takes its path by the values of its input (a zero in it or not), "
        "which a trace on fake tensors does not have; the traced path is PyTorch's for tensor "
        "subclasses"
        for name in by_values
    ) + tuple(
        f"{name}'s backward on fake tensors takes another program than on CPU tensors (its "
        "temporaries differ)"
        for name in unlike
    )


# The in-place twin of each op the unwatched program may run in place where the recorder sees
# it out of place.
_IN_PLACE = {
    aten.add.Tensor: aten.add_.Tensor,
    **_FILLS_OF_FRESH_ZEROS,
    **_MASKS_OF_A_FRESH_WHERE,
}

# The matrix products `at::linear` makes its output with when it cannot fold the bias into one
# `addmm` (an input of 3 or more dimensions that is not contiguous: a GRU's transposed sequence).
_LINEAR_PRODUCTS = frozenset({aten.mm.default, aten.bmm.default})


def _adds_linear_bias(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    product: tuple[tuple[int, ...], int] | None,
    key: Callable[[torch.Tensor], int],
) -> bool:
    """Whether an `add` is `at::linear` adding its bias to the product it just made: the
    product's storage, made by the same Python call (`product`: its call site and storage key),
    plus a 1-d tensor along its last dimension. Unwatched, `at::linear` adds the bias in place
    (`output.add_(bias)`); on a tensor subclass (a fake tensor) it adds out of place (ATen's
    Linear.cpp, for composite compliance), a product-sized tensor more: a GRU's input
    projection, 6,912 bytes over a 26 KB inference. A user's own `x @ w.t() + b` is two Python
    calls, and adds out of place for real too."""
    if kwargs or len(args) != 2 or product is None:
        return False
    total, bias = args
    return (
        isinstance(total, FakeTensor)
        and isinstance(bias, torch.Tensor)
        and total.dim() >= 3
        and bias.dim() == 1
        and bias.shape[0] == total.shape[-1]
        and product == (_dispatching_call_site(), key(total))
    )


def _dispatching_call_site() -> tuple[int, ...]:
    """Where, in Python, the op being dispatched was called from: the frame above the recorder's
    `__torch_dispatch__` (and the wrappers PyTorch puts around it), and its instruction. Two ops
    one C++ function runs share it; two Python calls on one line do not."""
    entry = Recorder.__dict__["__torch_dispatch__"].__code__
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not entry:
        frame = frame.f_back
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return ()
    return (id(caller), id(caller.f_code), caller.f_lasti)


# The files of the wrappers PyTorch puts between a Python call and a dispatch mode.
_DISPATCH_WRAPPERS = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")


def _python_caller() -> Any:
    """The frame of the Python function whose call dispatched the op now in the recorder's
    `__torch_dispatch__` (past the wrappers PyTorch puts around it), or None."""
    entry = Recorder.__dict__["__torch_dispatch__"].__code__
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not entry:
        frame = frame.f_back
    frame = frame.f_back if frame is not None else None
    while frame is not None and any(w in frame.f_code.co_filename for w in _DISPATCH_WRAPPERS):
        frame = frame.f_back
    return frame


def _window_op(
    window: tuple[str, tuple[AxisParams, ...]], x: torch.Tensor, output: torch.Tensor
) -> WindowOp:
    kind, axes = window
    spatial = len(axes)
    return WindowOp(kind, axes, tuple(x.shape[-spatial:]), tuple(output.shape[-spatial:]))


_CPU_DROPOUT = F.dropout


_NESTED_FROM_MASK = aten._nested_tensor_from_mask.default

# Ops whose real kernels refuse two operands of different dtypes ("mat1 and mat2 must have the
# same dtype"), where the fake kernels promote them: a float64 batch into a float32 layer, or an
# int8 weight, would be predicted for a step that fails. The operands' positions (an optional
# one may be None). Found by running each op on small real and fake tensors of bfloat16 and
# float32 (torch 2.14.1): an embedding bag's float32 table weighted per sample by a bf16
# activation under autocast, a cross product, `cdist` and `conv_tbc` of the two.
# (`kernel_dtypes` finds any op's mix of floating dtypes by running it; this table also
# refuses a float beside an integer operand, an int8 weight, which that check leaves alone.)
_SAME_DTYPE_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.mv.default: (0, 1),
    aten.dot.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.baddbmm.default: (1, 2),
    aten.addmv.default: (1, 2),
    aten.convolution.default: (0, 1),
    aten._embedding_bag.default: (0, 6),
    aten._embedding_bag_forward_only.default: (0, 6),
    aten.linalg_cross.default: (0, 1),
    aten._cdist_forward.default: (0, 1),
    aten.conv_tbc.default: (0, 1),
}


def _check_same_dtype(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise as the real kernel would where `func`'s operands differ in dtype."""
    names = [argument.name for argument in op_schema(func).arguments]
    first, second = (
        args[i] if i < len(args) else kwargs.get(names[i]) for i in _SAME_DTYPE_OPERANDS[func]
    )
    if isinstance(second, torch.Tensor) and first.dtype != second.dtype:
        raise RuntimeError(
            f"{func.__name__}: expected both operands to have the same dtype, but got "
            f"{first.dtype} and {second.dtype} (the real kernel refuses them)"
        )


def _cuda_dropout(
    cpu_dropout: Callable[..., torch.Tensor],
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    # CUDA's dropout uses native_dropout when 0 < p < 1 and training
    # (ATen's is_fused_kernel_acceptable).
    if not training or inplace or not 0 < p < 1:
        return cpu_dropout(input, p, training, inplace)
    return torch.ops.aten.native_dropout(input, p, True)[0]


class Recorder(TorchDispatchMode):
    """Records every op a step dispatches, in order, as an `OpRecord`: its phase (read from the
    step as it runs, `ninlab.analysis.phases`), the module running it, its inputs and outputs,
    FLOPs, window and CPU allocations.

    The storages ops make go to its `StorageLedger`; as backward begins, what autograd saved is
    harvested (`harvest_saved_tensors`). `recording` holds all of it.
    """

    def __init__(
        self, model: nn.Module, fake_mode: FakeTensorMode, *, emulate_cuda: bool = False
    ) -> None:
        super().__init__()
        self.emulate_cuda = emulate_cuda
        self._paused = False
        self._warming_up = False
        # What each op of a warm-up ran, as (phase, op, output shapes): a recorded step that ran
        # the same forward and backward was the same there as a first step (`StepRecording.steady`).
        self.warm_up_ops: list[tuple[str, str, tuple[tuple[int, ...], ...]]] = []
        self._entered = 0  # how many `with` blocks of this recorder are open
        self._overflow_flags: set[int] = set()  # storage keys of GradScaler's found-inf flags
        # The last matrix product `at::linear` may add its bias to: (call site, storage key).
        self._product: tuple[tuple[int, ...], int] | None = None
        # The backward nodes that may hand the engine a gradient to sum (`_sums_gradients`).
        self._summing = _SummingNodes()
        # The last NaN check a quantile's `sort` may follow: (call site, storage key).
        self._nan_check: tuple[tuple[int, ...], int] | None = None
        # The last copy resolving a lazily conjugated tensor, which the op after it may have
        # made itself (see `_resolves_in_its_kernel`): (call site, op index, storage key, the
        # layout of the tensor it resolved).
        self._resolved: tuple[tuple[int, ...], int, int, TensorLayout] | None = None
        # The zeros `evenly_distribute_backward` fills, from its mask to its product (see
        # `_spread_evenly`).
        self._spread_zeros: torch.Tensor | None = None
        # Ops given a Python number for a Tensor argument: the autograd sequence number just past
        # the node each made -> the op's index (see `_saved_number`).
        self._wrapped_numbers: dict[int, int] = {}
        self.modules = _ModuleStack(model)
        # No reference back to the recorder from what it holds, so that it and its recording die
        # by reference counts (see `StepRecording.recorder`).
        harvest = weakref.WeakMethod(self._harvest_saved_tensors)

        def on_backward(roots: Sequence[torch.Tensor]) -> None:
            harvest()(roots)  # a recorder is alive while it records

        self.phases = StepPhases(model, on_backward=on_backward)
        # The values of the fake tensors whose values are known, so that a check on them takes
        # the real run's branch (`known_values.py`); transformers' `is_tracing` is answered from
        # them while the step runs (`hugging_face.py`).
        self.known = KnownValues()
        self._decisions = contextlib.ExitStack()
        self._fake_outputs = FakeOutputs(fake_mode)
        ops: list[OpRecord] = []
        self.ledger = StorageLedger(clock=lambda: len(ops) - 1)
        self.recording = Recording(
            ops=ops,
            storages=self.ledger.storages,
            events=self.ledger.events,
            module_outputs=self.modules.outputs,
        )

    @property
    def current_phase(self) -> str:
        """The phase an op dispatched now belongs to (see `ninlab.analysis.phases`): "setup"
        before the recorder is entered, "warm-up" during a warm-up step."""
        if self._warming_up:
            return "warm-up"
        return self.phases.current if self._entered else "setup"

    def track(self, tensor: torch.Tensor, role: str) -> None:
        """Register, in the current phase, a tensor made before or outside recording (see
        `StorageLedger.track`)."""
        self.ledger.track(tensor, role, phase=self.current_phase)

    def storage_key(self, tensor: torch.Tensor) -> int:
        """The serial key of a live tensor's storage (-1 if it was never seen)."""
        return self.ledger.key(tensor)

    # -- what autograd saved, pauses, the warm-up -----------------------------------------------
    def _harvest_saved_tensors(self, roots: Sequence[torch.Tensor]) -> None:
        """As each backward begins, while its whole graph (behind `roots`) is still there: what
        autograd saved, added to what earlier backward calls of the step saw (gradient
        accumulation runs several)."""
        if self._paused or self._warming_up:
            return
        owners, hooked, outside = self.modules.graph(roots)
        self._summing.read(roots, owners)
        with self.paused():  # unpacking a saved variable dispatches a detach: not part of the step
            harvested = harvest_saved_tensors(
                owners,
                self.ledger.key,
                skip=hooked,
                outside_model=outside,
                unseen=self._saved_number,
            )
        saved = self.recording.saved_for_backward
        seen = set(saved)
        saved += [entry for entry in harvested if entry not in seen]

    def _saved_number(self, node: Any, tensor: torch.Tensor) -> int:
        """The key of a Python number autograd saved for backward (`x * 0.5` keeps 0.5 for the
        gradient of x), -1 for any other saved tensor never seen. The Python binding wraps the
        number, for real, in a CPU tensor of its own (8 bytes for a float) before the op, made by
        no op; the number reaches a dispatch mode as itself, so only the saved tensor shows it.
        It is counted from the op that was given it to its death."""
        made_at = self._wrapped_numbers.get(node_sequence_nr(node) + 1)
        if made_at is None or type(tensor) is FakeTensor:
            return -1
        op = self.recording.ops[made_at]
        record = self.ledger.note(tensor, created_at=made_at, phase=op.phase, module=op.module)
        return -1 if record is None else record.key

    def _counts_wrapped_numbers(self, traits: OpTraits, args: tuple[Any, ...]) -> bool:
        """Whether the op was given a Python number for a Tensor argument, in a CPU step (the
        wrapped number is a CPU tensor: on a GPU it is not on the device)."""
        numbers = any(
            type(args[position]) in _NUMBERS
            for position in traits.tensor_arguments
            if position < len(args)
        )
        if not numbers or self.emulate_cuda:
            return False
        tensor = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
        return tensor is not None and _device_type(tensor) == "cpu"

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run as usual but are not recorded, and the storages they make are not tracked."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Ops run but are not recorded; the storages they make are tracked (phase "warm-up"), so
        whatever a first step leaves alive (gradients, optimizer state, a GradScaler's scale) is
        alive when the recorded step starts."""
        self._warming_up = True
        try:
            yield
        finally:
            self._warming_up = False

    @contextlib.contextmanager
    def noting_rng_states(self) -> Iterator[None]:
        """Note each copy of the CPU generator's state the step takes (activation checkpointing
        keeps one per checkpoint until backward, 5056 bytes): a real tensor, made by no op, so
        the recorder would not see it otherwise. Made when the next op runs."""
        take_state = torch.get_rng_state

        def noted_state() -> torch.Tensor:
            state = take_state()
            if not self._paused:
                created_at = -1 if self._warming_up else len(self.recording.ops)
                self.ledger.note(
                    state,
                    created_at=created_at,
                    phase=self.current_phase,
                    module=self.modules.current(),
                )
            return state

        torch.get_rng_state = noted_state
        try:
            yield
        finally:
            torch.get_rng_state = take_state

    # -- dispatch ---------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        # Entered again inside `__torch_dispatch__` (a composite op's parts run under it), only
        # the dispatch mode is pushed back: the step's hooks are already in place, and leaving
        # the inner `with` must not remove them. Torch 2.8 (and 2.10) runs the profiler's
        # annotations (every optimizer step's) as composite parts.
        if not self._entered:
            self.modules.__enter__()
            self.phases.__enter__()
            self._decisions.enter_context(tracing_answered(self.known))
            if self.emulate_cuda:
                # CUDA's dropout is the fused kernel, which keeps a bool mask where the CPU
                # composite keeps a float one (`nn.Dropout` calls `F.dropout` through the module).
                F.dropout = functools.partial(_cuda_dropout, _CPU_DROPOUT)
        self._entered += 1
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._entered -= 1
        if not self._entered:
            F.dropout = _CPU_DROPOUT
            self._decisions.close()
            self.phases.__exit__(*exc)
            self.modules.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is PRIM_DEVICE and type(args[0]) is FakeTensor:
            return fake_device(args[0])
        kwargs = kwargs or {}
        if not self._paused:
            self.modules.note_context()
        if func in ANNOTATION_OPS:
            return self.phases.annotation(func, args, lambda: self._dispatch(func, args, kwargs))
        if func in _INDEXED_ROWS:
            self._check_indices(func, args)
        try:
            output = self._dispatch(func, args, kwargs)
        except DataDependentOutputException:
            # A read of values (`item()`, `bool()`): answered where they are known.
            answer = self.known.answer(func, args, kwargs)
            if answer is None:
                raise
            return answer
        self.known.follow(func, args, kwargs, output)
        return output

    def _dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if func is _NESTED_FROM_MASK:
            # `nn.TransformerEncoder`'s fast path packs the tokens its padding mask keeps into a
            # nested tensor: a size that depends on the mask's values, which fake tensors do not
            # have (and cannot hold a nested tensor). PyTorch takes that path unwatched, so the
            # trace cannot follow the step: as for any shape that depends on data.
            raise DynamicOutputShapeException(func)
        traits = op_traits(func)
        if traits.metadata:
            return func(*args, **kwargs)
        if func in _SAME_DTYPE_OPERANDS:
            _check_same_dtype(func, args, kwargs)
        if func.overloadpacket in _SOURCE_OF_SELFS_DTYPE:
            _check_source_dtype(func, args, kwargs)
        # An in-place op's output is its first argument, shape and all: the fake kernel would
        # only check broadcasting, so it is skipped (a third of a training step's ops are these,
        # most of them the optimizer's). Not for a tensor holding a real constant (Adam's step
        # count): the fake kernel computes its new value.
        skip_kernel = traits.returns_self and getattr(args[0], "constant", None) is None
        if self._paused:
            return args[0] if skip_kernel else self._fake_outputs.run(func, args, kwargs)
        if func in _SPREADING_OPS and self._spreads_evenly_on_cpu(args):
            return self._spread_evenly(func, args, kwargs)
        if func in _EXP_DIFFERENTIAL_OPS and _in_node(_EXP_DIFFERENTIAL_NODES):
            return self._exp_differential(func, args, kwargs)
        if (
            func is aten._local_scalar_dense.default
            and self.ledger.key(args[0]) in self._overflow_flags
        ):
            # A GradScaler asks whether unscaling found an inf or NaN: the steady state has none,
            # so the optimizer steps. Any other value a step reads needs real data.
            return 0.0
        if func is aten._amp_foreach_non_finite_check_and_unscale_.default:
            self._overflow_flags.add(self.ledger.key(args[1]))
        return self._run(func, traits, args, kwargs, skip_kernel=skip_kernel)

    def _run(
        self, func: Any, traits: OpTraits, args: Any, kwargs: dict[str, Any], *, skip_kernel: bool
    ) -> Any:
        """Run the op (checked by `_dispatch`) and record it."""
        # Composite ops (conv2d, max_pool2d under inference_mode, ...) run as their parts, as
        # they do for real; recording the parts shows what they allocate (max-pool indices).
        # The C++ composite kernel, not a Python decomposition (`func.decompose` prefers those), so
        # the parts are the kernels PyTorch really runs. Torch-function modes sit above autograd
        # and must not see the parts again. Not the profiler's annotations, composite under torch
        # 2.8 with no parts: they are recorded as themselves, the ops of their phase (an
        # optimizer's zero_grad has no other).
        if (
            traits.composite_kernel is not None
            and func not in ANNOTATION_OPS
            and not self._pools_without_indices(func, args)
        ):
            with self, DisableTorchFunction():
                return traits.composite_kernel(*args, **kwargs)
        # The warm-up runs the same program, so an input too small names its layer there too.
        window = _window_params(func, args)
        if window is not None:
            self._check_window_fits(window, args[0])
        dtypes = (
            None
            if self.emulate_cuda
            else check_cpu_kernel_dtypes(func, args, kwargs, pointwise=traits.pointwise)
        )
        if self._warming_up:
            # Corrected as recorded ops are: what the warm-up leaves alive (the loss a loop
            # holds) is the CPU kernel's.
            output = (
                args[0] if skip_kernel else self._cpu_outputs(func, traits, args, kwargs, dtypes)
            )
            made = tensors_in((output,))
            for tensor in made:
                self.ledger.note(tensor, created_at=-1, phase="warm-up", module="")
            shapes = tuple(tuple(tensor.shape) for tensor in made)
            self.warm_up_ops.append((self.phases.current, traits.name, shapes))
            return output
        output = args[0] if skip_kernel else self._cpu_outputs(func, traits, args, kwargs, dtypes)
        self._record(func, traits.name, args, kwargs, output, window)
        if self._max_pool1d_parts_without_indices(func, args):
            # `max_pool1d`'s own kernel makes no indices (see `_pools_without_indices`): on fake
            # tensors it runs as its parts, whose indices (viewed, then dropped) take no bytes.
            self.recording.storages[self.ledger.key(output[1])].nbytes = 0
        if self._counts_wrapped_numbers(traits, args):
            self._wrapped_numbers[autograd_sequence_nr()] = len(self.recording.ops) - 1
        if func in _VECTORS_FOR_A_SUBCLASS:
            unsure = _vectors_unsure(func, args, kwargs)
            if unsure and unsure not in self.recording.unsure:
                self.recording.unsure.append(unsure)
        if func in (_NAN_CHECK, _SORT) and not self.emulate_cuda:
            self._note_quantile(func, args[0])
        if self._resolved is not None:
            self._resolves_in_its_kernel(args, kwargs, output)
        if func is aten.clone.default and (args[0].is_conj() or args[0].is_neg()):
            self._resolved = (
                _dispatching_call_site(),
                len(self.recording.ops) - 1,
                self.ledger.key(output),
                TensorLayout.of(args[0]),  # not the tensor: its storage dies when it would
            )
        if func in _LINEAR_PRODUCTS:
            self._product = (_dispatching_call_site(), self.ledger.key(output))
        elif (
            func is aten.add.Tensor
            and (
                _sums_gradients(args, kwargs, self._may_sum_into(args[0]))
                or _adds_linear_bias(args, kwargs, self._product, self.ledger.key)
            )
        ) or (
            (func in _FILLS_OF_FRESH_ZEROS and self._fills_fresh(args, _ZEROS_MADE_BY))
            or (func in _MASKS_OF_A_FRESH_WHERE and self._fills_fresh(args, _WHERE_MADE_BY))
        ):
            # What the unwatched program makes in place (see each): recorded so.
            self.ledger.accumulating(
                len(self.recording.ops) - 1,
                args[0],
                output,
                functools.partial(self._made_in_place, _IN_PLACE[func]),
            )
        elif (twin := self._in_place_on_a_temporary(func, args, output)) is not None:
            self.ledger.accumulating(
                len(self.recording.ops) - 1,
                args[0],
                output,
                functools.partial(self._made_in_place, twin),
            )
        elif func in _ANDS_INTO_A_FRESH_MASK and self._fills_fresh(args, _MASK_MADE_BY):
            # The formula holds both masks to its end, so the result is the first's storage
            # (not a storage that continues it, as a sum's: the first does not die here).
            self.recording.storages[self.ledger.key(output)].nbytes = 0
            self._made_in_place(_ANDS_INTO_A_FRESH_MASK[func], self.ledger.key(args[0]))
        return output

    def _cpu_outputs(
        self,
        func: Any,
        traits: OpTraits,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        dtypes: OutputDtypes,
    ) -> Any:
        """The op's outputs from the fake kernel, corrected where the CPU kernel's differ
        (`dtypes`: those the CPU kernel gives a call of mixed dtypes, where known)."""
        output = _masked_outputs(func, args, kwargs, self._fake_outputs.run(func, args, kwargs))
        output = _cpu_output_dtypes(output, dtypes, self._fake_outputs)
        output = _attention_weights_not_wanted(func, args, kwargs, output)
        output = _float32_statistics(func, args, output, self._fake_outputs)
        output = _group_norm_grad_input_dtype(func, args, output)
        output = _cpu_batch_norm_layout(func, args, output)
        output = _cpu_lstm_outputs(func, args, output)
        output = _cpu_grad_input_layout(func, args, output)
        output = _cpu_elementwise_layout(func, args, output)
        output = _periodic_window_storage(func, args, output)
        if not self.emulate_cuda:
            output = _cpu_reduced_loss_storage(func, args, output)
            output = _cpu_embedding_bag_storages(func, args, output)
            output = _cpu_output_resized_from_input(func, args, output)
        if traits.pointwise:
            output = _elementwise_layout(func, args, kwargs, output)
        return output

    def _may_sum_into(self, first: Any) -> bool:
        """Whether the autograd node running may hand the engine a gradient to sum into `first`
        (see `_SummingNodes`)."""
        node = current_autograd_node()
        if node is None or not isinstance(first, torch.Tensor):
            return False
        record = self.recording.storages.get(self.ledger.key(first))
        return self._summing.may_sum_into(node, -1 if record is None else record.created_at)

    def _note_quantile(self, func: Any, x: torch.Tensor) -> None:
        """Remembers a CPU `isnan` (where it may be a quantile's) and notes a `sort` of the same
        storage by the same call as one the real CPU program may not run (`_QUANTILE_UNSURE`)."""
        if _device_type(x) != "cpu":
            return
        here = (_dispatching_call_site(), self.ledger.key(x))
        if func is _NAN_CHECK:
            self._nan_check = here
        elif here == self._nan_check and _QUANTILE_UNSURE not in self.recording.unsure:
            self.recording.unsure.append(_QUANTILE_UNSURE)

    def _spreads_evenly_on_cpu(self, args: tuple[Any, ...]) -> bool:
        """Whether the op is one of `evenly_distribute_backward`'s (`_EVENLY_DISTRIBUTING_NODES`)
        in a CPU step, where, unwatched, the formula takes another path."""
        node = current_autograd_node()
        return (
            node is not None
            and type(node).__name__ in _EVENLY_DISTRIBUTING_NODES
            and not self.emulate_cuda
            and _device_type(args[0]) == "cpu"
        )

    def _pools_without_indices(self, func: Any, args: tuple[Any, ...]) -> bool:
        """Whether the op is a CPU `max_pool1d` of an input no gradient is wanted for: its own
        kernel then makes the output alone (ATen's MaxPooling.cpp), where on a tensor subclass it
        runs as `max_pool1d_with_indices`, int64 indices the real step never makes (an
        inference's live peak 1.055 of the measured). Recorded as the one op it is."""
        return func is aten.max_pool1d.default and self._on_cpu_without_gradient(args[0])

    def _max_pool1d_parts_without_indices(self, func: Any, args: tuple[Any, ...]) -> bool:
        """Whether the op is the 2-d pooling `F.max_pool1d` runs as its parts on a tensor subclass
        (`max_pool1d` dispatched with autograd, under `no_grad` or in a train step on an input
        that needs no gradient), where `_pools_without_indices` holds: unwatched, the CPU kernel
        of `max_pool1d` makes the output alone."""
        if func is not aten.max_pool2d_with_indices.default or not self._on_cpu_without_gradient(
            args[0]
        ):
            return False
        caller = _python_caller()
        return (
            caller is not None
            and caller.f_code.co_name == "_max_pool1d"
            and caller.f_code.co_filename == F.__file__
        )

    def _on_cpu_without_gradient(self, x: torch.Tensor) -> bool:
        """Whether `x` is a CPU step's tensor no gradient is wanted for (a pooling's input that
        `max_pool1d`'s own kernel pools without indices)."""
        return (
            not self.emulate_cuda
            and _device_type(x) == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def _spread_evenly(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An op of `evenly_distribute_backward` on a tensor subclass, run as the CPU program
        does its part (`_EVENLY_DISTRIBUTING_NODES`): a NaN mask unrecorded; the mask, then the
        zeros of the input's size and dtype (`grad.new_zeros(input.sizes(), input.options())`);
        the product of the mask and the gradient's share as the fill of those zeros."""
        if func in _NAN_MASK_OPS:
            return self._fake_outputs.run(func, args, kwargs)
        if func is aten.eq.Tensor:
            mask = self._run(func, op_traits(func), args, kwargs, skip_kernel=False)
            source = args[0]
            zeros = aten.new_zeros.default
            self._spread_zeros = self._run(
                zeros, op_traits(zeros), (source, list(source.shape)), {}, skip_kernel=False
            )
            return mask
        mask, share = args
        fill = aten.masked_fill_.Tensor
        filled = self._run(
            fill, op_traits(fill), (self._spread_zeros, mask, share), {}, skip_kernel=True
        )
        self._spread_zeros = None
        return filled

    def _resolves_in_its_kernel(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """The op just recorded, given the copy `self._resolved` made of a lazily conjugated
        (or negated) tensor by the same call, is recorded as its kernel runs unwatched: a kernel
        given such a tensor (`x * y.conj()`) resolves it into a copy of its own, a block it frees
        before it returns (a dispatch mode is handed the copy, made by `clone`, as an op of its
        own: a 16x128 complex64 operand's 16,384 bytes counted live). Measured on its own, the
        op is given the tensor the copy resolved."""
        site, index, key, lazy = self._resolved or ((), -1, -1, None)
        self._resolved = None
        op = self.recording.ops[-1]
        if (
            op.cpu_call is None
            or site != _dispatching_call_site()
            or all(self.ledger.key(t) != key for t in tensors_in(args))
        ):
            return
        self.recording.storages[key].nbytes = 0
        self.recording.ops[index] = dataclasses.replace(
            self.recording.ops[index], cpu_allocations=(), cpu_unmodelled="", cpu_call=None
        )
        given = tuple(
            lazy if isinstance(a, torch.Tensor) and self.ledger.key(a) == key else a for a in args
        )
        self.recording.ops[-1] = dataclasses.replace(
            op, cpu_call=KernelCall.of(op.op, given, tensors_in((output,)), kwargs)
        )

    def _in_place_on_a_temporary(self, func: Any, args: tuple[Any, ...], output: Any) -> Any | None:
        """The in-place twin the unwatched formula runs for this op (see
        `_IN_PLACE_ON_ITS_TEMPORARIES`), or None: its first argument a tensor the same node
        made, of the output's shape and dtype, grad mode off."""
        node = current_autograd_node()
        twins = _IN_PLACE_ON_ITS_TEMPORARIES.get(type(node).__name__) if node else None
        if twins is None or func not in twins or torch.is_grad_enabled():
            return None
        first = args[0]
        if (
            not isinstance(first, torch.Tensor)
            or first.shape != output.shape
            or first.dtype != output.dtype
        ):
            return None
        record = self.recording.storages.get(self.ledger.key(first))
        if record is None or record.created_at < 0:
            return None
        maker = self.recording.ops[record.created_at]
        return twins[func] if maker.autograd_node == type(node).__name__ else None

    def _exp_differential(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An op building `matrix_exp`'s backward block matrix on a tensor subclass, run as the
        unwatched program builds it (`_EXP_DIFFERENTIAL_NODES`): the blocks unrecorded, the last
        `cat`, along the rows, as the zeros of the whole matrix the blocks are copied into."""
        if func is aten.cat.default:
            tensors, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
            rank = tensors[0].dim()
            if dim % rank == rank - 2:
                rows = [*tensors[0].shape]
                rows[-2] = sum(t.shape[-2] for t in tensors)
                zeros = aten.new_zeros.default
                return self._run(zeros, op_traits(zeros), (tensors[0], rows), {}, skip_kernel=False)
        return self._fake_outputs.run(func, args, kwargs)

    def _fills_fresh(self, args: tuple[Any, ...], makers: frozenset[str]) -> bool:
        """Whether the op (one of `_FILLS_OF_FRESH_ZEROS` or `_MASKS_OF_A_FRESH_WHERE`) is a
        backward formula filling the tensor the same autograd node has just made by one of
        `makers` (zeros, a `where`): unwatched, it fills it in place (the ledger makes it so if
        the tensor dies right after, as a formula's temporary does)."""
        node = current_autograd_node()
        record = self.recording.storages.get(self.ledger.key(args[0]))
        if node is None or record is None or record.created_at < 0:
            return False
        maker = self.recording.ops[record.created_at]
        return maker.op in makers and maker.autograd_node == type(node).__name__

    def _made_in_place(self, in_place: Any, key: int) -> None:
        """The last op, one the unwatched program makes in place (a sum of gradients, a linear's
        bias, gather's gradient), is recorded so: as `in_place` into its first argument, storage
        `key` (`StorageLedger.accumulating`)."""
        op = self.recording.ops[-1]
        (total,) = op.outputs
        # A kernel measured on its own is measured as the in-place one, which makes no output.
        call = op.cpu_call and dataclasses.replace(op.cpu_call, op=str(in_place), output_bytes=0)
        self.recording.ops[-1] = dataclasses.replace(
            op,
            op=str(in_place),
            outputs=(dataclasses.replace(total, storage_key=key),),
            cpu_call=call,
        )

    def _check_window_fits(
        self, window: tuple[str, tuple[AxisParams, ...]], x: torch.Tensor
    ) -> None:
        """Check the geometry before the op runs, to name the layer and its arithmetic if the
        input is too small."""
        kind, axes = window
        try:
            for params, size in zip(axes, x.shape[x.dim() - len(axes) :]):
                params.window(size)
        except EmptyOutputError as error:
            module = self._module_now()[0]
            raise LayerInputTooSmall(module, self.modules.types.get(module, kind), error) from None

    def _check_indices(self, func: Any, args: tuple[Any, ...]) -> None:
        """Refuse an index op whose indices are known to fall outside the rows it indexes (an
        embedding given an `input_range` beyond its `num_embeddings`): the real kernel raises
        "index out of range", the fake one does not look. Indices of unknown values pass."""
        source, dim, index = _INDEXED_ROWS[func](args)
        bounds = self.known.bounds(index)
        if bounds is None:
            return
        size = source.shape[dim] if source.dim() else 1
        low, high = bounds
        if low >= 0 and high < size:
            return
        module = self.modules.current()
        where = f"layer {module} ({self.modules.types.get(module, '')})" if module else "the model"
        raise NinlabError(
            f"{where} indexes {size} rows ({func.name()}) with indices from {low} to {high}: the "
            "real step fails ('index out of range') on any index outside 0 to "
            f"{size - 1}; give index inputs an input_range within 0:{size} "
            f"(--input [NAME=]SIZE:int64:0:{size})"
        )

    def _module_now(self) -> tuple[str, str]:
        node = current_autograd_node()
        if node is None:
            return self.modules.current(), ""
        self._summing.running(node, len(self.recording.ops))
        return self.modules.owner_of_node(node), type(node).__name__

    def _record(
        self,
        func: Any,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        window: tuple[str, tuple[AxisParams, ...]] | None,
    ) -> None:
        index = len(self.recording.ops)
        module, node = self._module_now()
        in_tensors = tensors_in(args) + (tensors_in(tuple(kwargs.values())) if kwargs else [])
        outputs = tuple(tensors_in((output,)))
        phase = self.current_phase
        note = self.ledger.note
        output_records = [
            note(tensor, created_at=index, phase=phase, module=module) for tensor in outputs
        ]
        output_tuple = output if isinstance(output, (tuple, list)) else (output,)
        # A CUDA step emulated on CPU tensors runs CUDA's kernels, not these.
        on_cpu = not self.emulate_cuda and all(_device_type(t) == "cpu" for t in outputs)
        allocations, unmodelled = cpu_kernel_allocations(name, args) if on_cpu else (None, "")
        meta = self._meta
        self.recording.ops.append(
            OpRecord(
                index=index,
                op=name,
                phase=phase,
                module=module,
                inputs=tuple(meta(t) for t in in_tensors),
                outputs=tuple(
                    TensorMeta(tuple(t.shape), t.dtype, -1 if record is None else record.key)
                    for t, record in zip(outputs, output_records)
                ),
                flops=op_flops(func, args, tuple(output_tuple)),
                window=None if window is None else _window_op(window, args[0], outputs[0]),
                autograd_node=node,
                cpu_allocations=allocations,
                cpu_unmodelled=unmodelled,
                cpu_call=KernelCall.of(name, args, outputs, kwargs) if unmodelled else None,
                cpu_scalar_bytes=input_cast_bytes(func, args, kwargs, outputs) if on_cpu else 0,
            )
        )

    def _meta(self, tensor: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(tensor.shape), tensor.dtype, self.ledger.key(tensor))


# The ops that pick rows of a tensor by index, and where to find (the tensor indexed, the
# dimension, the indices) in their arguments.
_INDEXED_ROWS: dict[Any, Callable[[tuple[Any, ...]], tuple[torch.Tensor, int, torch.Tensor]]] = {
    aten.embedding.default: lambda args: (args[0], 0, args[1]),
    aten._embedding_bag.default: lambda args: (args[0], 0, args[1]),
    aten._embedding_bag_forward_only.default: lambda args: (args[0], 0, args[1]),
    aten.index_select.default: lambda args: (args[0], args[1], args[2]),
    aten.gather.default: lambda args: (args[0], args[1], args[2]),
}


def _device_type(tensor: torch.Tensor) -> str:
    """A tensor's device type; a fake tensor's is read without dispatching `prim.device`."""
    fake_device = getattr(tensor, "fake_device", None)
    return (fake_device or tensor.device).type
