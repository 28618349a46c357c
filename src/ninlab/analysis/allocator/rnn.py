"""oneDNN's LSTM on CPU (`aten.mkldnn_rnn_layer` and its backward, one call per layer and
direction, which PyTorch's `nn.LSTM` runs in float32 and bfloat16 on CPU; GRU and plain RNNs run
as ATen ops the trace sees).

Under grad mode the forward returns, beside its outputs, the workspace oneDNN keeps for the
backward (uint8, `lstm_workspace_bytes`), which autograd saves: the fake kernel returns it empty,
so the recorder gives it its real size. Its formula is oneDNN's own (`set_workspace_sizes` and
`set_offsets` in src/cpu/rnn/rnn_utils.hpp): seven arrays, each starting on a 4 KiB page, whose
leading dimensions are padded to 64 bytes and never a multiple of 256 elements
(`get_good_ld`); no ISA enters it. Checked against the kernel on 60 random float32 shapes and 31
bfloat16 ones (sequence 1 to 100, batch 1 to 100, 1 to 1,000 features and hidden units).

The blocks the kernels allocate for themselves (the summed bias, reordered weights, oneDNN's
scratchpad, the backward's float32 copies) depend on oneDNN's gemm or brgemm choice, so the rules
give a reason and the predictor measures each call (`ninlab.analysis.kernel_probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ninlab.analysis.allocator.registry import KernelBlocks, allocation_rule

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


def lstm_workspace_bytes(
    *,
    sequence: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    itemsize: int,
    cell_itemsize: int,
) -> int:
    """The bytes of the workspace `aten.mkldnn_rnn_layer` returns for one LSTM layer and
    direction under grad mode: gates and hidden states per step (in the input's dtype, of
    `itemsize`), the layer's states over sequence + 1 steps (cell states in the dtype of `cx`,
    `cell_itemsize`) and their float32 gradients, each array starting on a 4 KiB page. E.g.
    335,872 bytes for a sequence of 20, batch 4, 32 features, 64 hidden units."""
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
