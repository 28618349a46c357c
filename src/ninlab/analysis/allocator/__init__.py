"""What the CPU allocator holds beyond live tensor storage: per-op workspace rules (CUDA's caching
allocator is simulated in `ninlab.analysis.cuda_allocator`).

CPU. A tensor-level trace (a dispatch mode) sees each op's outputs, but inside some kernels the
c10 CPU allocator hands out blocks that belong to no tensor the trace sees. A rule here gives, for
one op call, every allocation and free the kernel makes, in order, with the op's own outputs in
their place; the in-op peak is then `live before the op + peak_above_start_bytes(allocations)`.
All rules were read off the PyTorch profiler's allocation records (`profile_memory=True`) for one
op at a time on this machine (torch 2.13.0 CPU, oneDNN 3.12, AVX-512 with AMX, 2 threads), with
`ONEDNN_VERBOSE=1` naming the memory formats behind each block; tests/analysis/test_allocator.py
replays them against the profiler.

Each rule registers itself for its ops (`registry.allocation_rule`), and
`cpu_kernel_allocations(op, args)` is the one way to ask: a `KernelBlocks` of the allocations
(None: the op allocates only its outputs) and, where they are not known or only a lower bound,
why. A kernel whose blocks follow no rule found is given a reason, and the predictor measures
each such call on its own (`ninlab.analysis.kernel_probe`). The rules, by kernel family:

* `convolution`: which kernel runs a convolution call (`conv_call.ConvCall`, parsed once), for
  * `onednn_float32`: oneDNN's float32 convolutions, NCHW and channels-last, forward and
    backward, depthwise among them;
  * `onednn_bf16`: oneDNN's bfloat16 convolutions (bf16 autocast): exact for depthwise forward
    passes; elsewhere the channels-last copies, dense copies and contiguous clones are counted
    but oneDNN's AMX brgemm scratchpads and weight padding are not, so those rules give a lower
    bound with the reason;
* `matmul`: matrix multiplies (bfloat16 ones by `onednn_bf16`: exact when too small for oneDNN);
* `batch_norm`: batch norm forward and backward;
* `embedding`: embedding backward;
* `attention`: CPU flash attention, and the `_safe_softmax` of attention's math path;
* `layer_norm`: layer norm's backward (its per-thread sums);
* `pooling`: max pooling's backward;
* `rnn`: oneDNN's LSTM layers (their workspace's size; their own blocks are measured);
* `probed`: kernels with temporaries no rule follows (upsampling, FFT, `_trilinear`, `im2col`;
  norms and pooling backwards given a tensor not contiguous), each call measured.
`blocks` holds what they share (`KernelAllocation`, channel blocks and their padding).

Beside the rules, for every op: `scalars`, the casts TensorIterator makes of inputs whose dtype is
not the op's common dtype (a bool mask times a float gradient, `sum` of a mask into int64), and
the Python numbers an op takes as tensors (8 bytes,
then 4 when cast to float: Adam's bias corrections, a step count's increment), held at its high
point.

An op no rule names counts as its outputs alone only where that is known (`outputs_only`: a
view, a pointwise op, one that makes no tensor, or one the kernel survey measured so at every
call); every other call is measured by the kernel probe, so a kernel nobody wrote a rule for is
never silently counted as its outputs. Linear layers have a rule that finds nothing to add
(`matmul`: float32 `addmm`/`mm` copy no matrix BLAS reads as it is) and sends the rest to the
probe.
"""

# The rule modules register their rules when imported; nothing else imports them.
from ninlab.analysis.allocator import (  # noqa: F401
    attention,
    batch_norm,
    convolution,
    embedding,
    layer_norm,
    matmul,
    pooling,
    probed,
    rnn,
)
from ninlab.analysis.allocator.blocks import KernelAllocation, peak_above_start_bytes
from ninlab.analysis.allocator.registry import KernelBlocks, cpu_kernel_allocations
from ninlab.analysis.allocator.scalars import input_cast_bytes

__all__ = [
    "KernelAllocation",
    "KernelBlocks",
    "cpu_kernel_allocations",
    "input_cast_bytes",
    "peak_above_start_bytes",
]
