"""CPU attention. Flash attention (`F.scaled_dot_product_attention`, and `nn.MultiheadAttention`
without attention weights), float32: per-thread float32 blocks of scores beside the outputs, and in
backward a copy of the output's gradient unless it is (B, L, H, D)
(`flash_attention_allocations`). An `attn_mask` (a keyword of the op;
a bool one is first made float by `where`, which the trace sees) is added to each score block in
place and changes none of these blocks (measured, so the rule reads only query and key). A mask
that needs a gradient (a learned position bias) sends the CPU to the math path, ops the trace
sees, whose `_safe_softmax` holds bool masks beside its output (`safe_softmax_allocations`).
Causal or not, the blocks are the same (measured); any other flash attention call (bfloat16,
dropout) is measured by the kernel probe, its keyword arguments with it."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import KernelAllocation, frees
from ninlab.analysis.allocator.registry import KernelBlocks, allocation_rule

__all__ = ["flash_attention_allocations", "safe_softmax_allocations"]


@allocation_rule("aten._scaled_dot_product_flash_attention_for_cpu.default")
def flash_attention(args: Sequence[Any]) -> KernelBlocks:
    return _flash_attention_blocks(args[0], args[1], args[2], _dropout(args, 3), backward=False)


@allocation_rule("aten._scaled_dot_product_flash_attention_for_cpu_backward.default")
def flash_attention_backward(args: Sequence[Any]) -> KernelBlocks:
    return _flash_attention_blocks(
        args[1], args[2], args[3], _dropout(args, 6), backward=True, grad_output=args[0]
    )


def _dropout(args: Sequence[Any], position: int) -> float:
    return args[position] if len(args) > position else 0.0


def _flash_attention_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    *,
    backward: bool,
    grad_output: torch.Tensor | None = None,
) -> KernelBlocks:
    """The rule's blocks where it covers the call: float32, 4-d, key and value of one shape
    (the kernel refuses value head sizes other than the query's), no dropout. Otherwise the
    call is measured (`kernel_probe`): a bfloat16 kernel keeps float32 copies and per-thread
    buffers of other sizes, and dropout draws a mask."""
    covered = (
        query.dtype == key.dtype == value.dtype == torch.float32
        and query.dim() == 4
        and key.shape == value.shape
        and query.shape[:2] == key.shape[:2]
        and query.shape[-1] == key.shape[-1]
        and dropout == 0.0
    )
    if not covered:
        return KernelBlocks(
            None,
            "flash attention other than float32 without dropout (buffers of no rule here)",
        )
    return KernelBlocks(
        flash_attention_allocations(
            query_shape=tuple(query.shape),
            key_shape=tuple(key.shape),
            backward=backward,
            threads=torch.get_num_threads(),
            # The kernel reads the gradient as (B, L, H, D), copying one laid out otherwise.
            grad_output_copied=grad_output is not None
            and not grad_output.transpose(1, 2).is_contiguous(),
        )
    )


def flash_attention_allocations(
    *,
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    backward: bool,
    threads: int,
    grad_output_copied: bool = True,
) -> tuple[KernelAllocation, ...]:
    """CPU flash attention (`F.scaled_dot_product_attention`'s CPU kernel), float32, for query
    (B, H, L, D) and key (B, H, S, D). Queries are split in blocks of 32, 64 or 256 rows (L under
    192, under 768, or more) and keys in blocks of up to 512 (ATen's FlashAttentionKernel.cpp);
    each thread gets float32 buffers for one block pair.

    Forward: the output and the log-sum-exp, then per thread the block's scores, row maxima and
    sums, and a D-wide accumulator. Backward: the three gradients, a copy of the output's gradient
    where it is not laid out as (B, L, H, D) (`grad_output_copied`; `nn.MultiheadAttention` and
    most transformers give it so, a (B, H, L, D)-contiguous one is copied), per thread the
    block's scores and their gradient, and one block of row sums. Measured with 1 and
    2 threads for (4, 4, 256, 24), (2, 4, 256, 24), (4, 4, 64, 16), (4, 8, 197, 64); e.g. the
    first with 2 threads: forward [393,216, 16,384, 144,384, -144,384], backward [393,216 x 4,
    262,144, 256, -256, -262,144, -393,216].
    """
    batch, heads, queries, head_size = query_shape
    keys = key_shape[2]
    query_block = 256 if queries >= 768 else 64 if queries >= 192 else 32
    query_block = min(query_block, queries)
    key_block = min(512, keys)
    query_bytes = prod(query_shape) * 4
    if not backward:
        per_thread = query_block * key_block + 2 * query_block + query_block * head_size
        buffer = KernelAllocation(threads * per_thread * 4, "per-thread blocks")
        return (
            KernelAllocation(query_bytes, "output", output=0),
            KernelAllocation(batch * heads * queries * 4, "log-sum-exp", output=1),
            buffer,
            *frees([buffer]),
        )
    gradients = [
        KernelAllocation(prod(shape) * 4, f"grad_{name}", output=index)
        for index, (name, shape) in enumerate(
            (("query", query_shape), ("key", key_shape), ("value", key_shape))
        )
    ]
    copies = [KernelAllocation(query_bytes, "copy of grad_output")] if grad_output_copied else []
    blocks = KernelAllocation(threads * 2 * query_block * key_block * 4, "per-thread score blocks")
    row_sums = KernelAllocation(query_block * 4, "row sums")
    return (*gradients, *copies, blocks, row_sums, *frees([row_sums, blocks, *copies]))


@allocation_rule("aten._safe_softmax.default")
def safe_softmax(args: Sequence[Any]) -> KernelBlocks:
    x, dim = args[0], args[1]
    dtype = args[2] if len(args) > 2 and args[2] is not None else x.dtype
    return KernelBlocks(
        safe_softmax_allocations(shape=tuple(x.shape), dim=dim, itemsize=dtype.itemsize)
    )


def safe_softmax_allocations(
    *, shape: Sequence[int], dim: int, itemsize: int = 4
) -> tuple[KernelAllocation, ...]:
    """`aten._safe_softmax` (the softmax of `F.scaled_dot_product_attention`'s math path, which
    the CPU takes when the mask needs a gradient: a learned position bias): the output, then a
    bool mask of the -inf scores, a bool per row (all -inf?) and a zero scalar of the output's
    dtype for the `where` that zeroes fully masked rows, all freed. Measured for float32 and
    bfloat16, 3-d and 4-d, softmax over the last or another dim: (3, 5, 7, 9) over dim 1:
    [3,780, 945, 189, 4, -4, -189, -945]."""
    elements = prod(shape)
    temporaries = [
        KernelAllocation(elements, "bool mask of -inf scores"),
        KernelAllocation(elements // shape[dim], "bool mask of fully masked rows"),
        KernelAllocation(itemsize, "zero scalar"),
    ]
    return (
        KernelAllocation(elements * itemsize, "output", output=0),
        *temporaries,
        *frees(reversed(temporaries)),
    )


@allocation_rule(
    "aten._native_multi_head_attention.default", "aten._transformer_encoder_layer_fwd.default"
)
def fast_path_attention(args: Sequence[Any]) -> KernelBlocks:
    """The fast inference path of `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` (eval,
    no grad): one kernel that makes the projections, scores and feed-forward as temporaries of its
    own, which the trace does not see; the probe measures each call (`kernel_probe.py`)."""
    return KernelBlocks(None, "the fast attention path's temporaries follow no rule here")
