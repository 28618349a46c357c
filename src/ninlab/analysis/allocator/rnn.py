"""oneDNN's LSTM on CPU (`aten.mkldnn_rnn_layer` and its backward, one call per layer and
direction, which PyTorch's `nn.LSTM` runs in float32 and bfloat16 on CPU; GRU and plain RNNs run
as ATen ops the trace sees).

Under grad mode the forward returns, beside its outputs, the workspace oneDNN keeps for the
backward (uint8, `lstm_workspace_bytes`), which autograd saves: the fake kernel returns it empty,
so the recorder gives it its real size. Its formula is oneDNN's own (`set_workspace_sizes` and
`set_offsets` in src/cpu/rnn/rnn_utils.hpp): seven arrays, each starting on a 4 KiB page, whose
leading dimensions are padded to 64 bytes and never a multiple of 256 elements
(`get_good_ld`); no ISA enters it. Checked against the kernel on 60 random float32 shapes and 31
bfloat16 ones (sequence 1 to 100, batch 1 to 100, 1 to 1,000 features and hidden units) under
torch 2.13 and 2.14.1. Older oneDNNs lay it out otherwise (torch 2.8's 3.7.1 gives 425,984 bytes
where the formula gives 335,872), and a backward given too small a workspace kills the process:
so the formula is checked against one real call per dtype and process, and where it fails each
shape's workspace is measured, by one real forward on zeros (kept per shape).

The blocks the kernels allocate for themselves (the summed bias, reordered weights, oneDNN's
scratchpad, the backward's float32 copies) depend on oneDNN's gemm or brgemm choice, so the rules
give a reason and the predictor measures each call (`ninlab.analysis.kernel_probe`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.allocator.registry import KernelBlocks, allocation_rule
from ninlab.analysis.torch_internals import DisableTorchDispatch

__all__ = ["LSTM_MODE", "lstm_workspace_bytes"]

LSTM_MODE = 2
"""`mode` of an LSTM in `aten.mkldnn_rnn_layer` (oneDNN's rnn_kind: RNN_RELU 0, RNN_TANH 1,
LSTM 2, GRU 3); PyTorch sends only LSTMs to oneDNN."""

_PAGE = 4096


def _good_leading_dimension(elements: int, itemsize: int) -> int:
    """oneDNN's get_good_ld: a row padded to 64 bytes, one more 64 bytes where the padded row is
    a multiple of 256 elements (4K aliasing)."""
    per_line = 64 // itemsize
    padded = -(-elements // per_line) * per_line
    return padded + per_line if padded % 256 == 0 else padded


@functools.cache
def lstm_workspace_bytes(
    *,
    sequence: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    cell_dtype: torch.dtype,
) -> int:
    """The bytes of the workspace `aten.mkldnn_rnn_layer` returns on this torch for one LSTM
    layer and direction under grad mode, with input and weights in `dtype` and cell states in
    `cell_dtype` (`cx`'s): oneDNN's formula where one real call confirmed it, else measured.
    E.g. 335,872 bytes for a sequence of 20, batch 4, 32 features, 64 hidden units in float32
    under torch 2.13."""
    shape = (sequence, batch, input_size, hidden_size)
    if _formula_holds(dtype, cell_dtype):
        return _formula_bytes(*shape, dtype.itemsize, cell_dtype.itemsize)
    return _measured_bytes(*shape, dtype, cell_dtype)


@functools.cache
def _formula_holds(dtype: torch.dtype, cell_dtype: torch.dtype) -> bool:
    """Whether oneDNN's formula gives this torch's workspace, on one shape that exercises every
    padding (300 features, 5 hidden units: rows padded, states wider than the hidden size)."""
    shape = (7, 3, 300, 5)
    return _formula_bytes(*shape, dtype.itemsize, cell_dtype.itemsize) == _measured_bytes(
        *shape, dtype, cell_dtype
    )


def _measured_bytes(
    sequence: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    cell_dtype: torch.dtype,
) -> int:
    """The workspace of one real forward on zeros of these shapes (real even where the recorder
    asks, inside the fake mode)."""
    with DisableTorchDispatch():
        return _real_forward_workspace(sequence, batch, input_size, hidden_size, dtype, cell_dtype)


def _real_forward_workspace(
    sequence: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    cell_dtype: torch.dtype,
) -> int:
    x = torch.zeros(sequence, batch, input_size, dtype=dtype)
    w_ih = torch.zeros(4 * hidden_size, input_size, dtype=dtype)
    w_hh = torch.zeros(4 * hidden_size, hidden_size, dtype=dtype)
    bias = torch.zeros(4 * hidden_size, dtype=dtype)
    hx = torch.zeros(batch, hidden_size, dtype=dtype)
    cx = torch.zeros(batch, hidden_size, dtype=cell_dtype)
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        outputs = torch.ops.aten.mkldnn_rnn_layer(
            x, w_ih, w_hh, bias, bias, hx, cx, False, [], LSTM_MODE, hidden_size, 1, True,
            False, False, True,
        )  # fmt: skip
    return outputs[3].numel()


def _formula_bytes(
    sequence: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    itemsize: int,
    cell_itemsize: int,
) -> int:
    """oneDNN's formula (torch 2.13, 2.14.1): gates and hidden states per step (in the input's
    dtype, of `itemsize`), the layer's states over sequence + 1 steps (cell states of
    `cell_itemsize`) and their float32 gradients, each array starting on a 4 KiB page."""
    states = max(input_size, hidden_size)
    steps = sequence * batch  # (step, sample) rows of the gates and hidden states
    rows = 2 * (sequence + 1) * batch  # the states of layer and layer + 1, over steps 0..T
    arrays = (
        steps * _good_leading_dimension(4 * hidden_size, itemsize) * itemsize,  # gates
        steps * _good_leading_dimension(hidden_size, itemsize) * itemsize,  # hidden states
        rows * _good_leading_dimension(states, itemsize) * itemsize,  # layer states
        rows * hidden_size * cell_itemsize,  # cell states
        rows * _good_leading_dimension(states, 4) * 4,  # gradients of the layer states
        rows * _good_leading_dimension(states, 4) * 4,  # ... of the iteration states
        rows * hidden_size * 4,  # ... of the cell states
    )
    return sum(-(-size // _PAGE) * _PAGE for size in arrays)


@allocation_rule("aten.mkldnn_rnn_layer.default", "aten.mkldnn_rnn_layer_backward.default")
def mkldnn_rnn_layer(args: Sequence[Any]) -> KernelBlocks:
    return KernelBlocks(
        None, "oneDNN LSTM layer (reordered weights and scratchpad follow its gemm choice)"
    )
