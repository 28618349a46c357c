"""Kernels whose CPU code allocates temporaries that follow no rule here: each call measured.

Found by running the kernel probe over every call of the corpus and the layer zoo
(torch 2.14.1, 2 threads): these kernels hold blocks beyond their outputs that no rule gives,
and a step whose peak falls inside one was printed as exact while up to 35% under.

* always: the upsampling kernels (nearest, bilinear, bicubic, trilinear; forward and backward)
  copy their input and output into the layout they work in (an upsampled 2x8x14x14 map: 62,720
  bytes beside its 50,176-byte output; inference was 0.81); the FFT kernels plan into
  workspaces (a `torch.fft.irfft2` of a 2x8x16x9 spectrum: 55,296 bytes; 0.74); `nn.Bilinear`'s
  `_trilinear` multiplies through temporaries; `F.unfold`'s `im2col` makes its output like its
  input and then grows it (an input-sized block freed inside the op); an embedding bag's backward
  sorts and selects its indices into temporaries (per-sample weights: 0.90); the group norm
  backward sums per sample and channel into two (N, C) temporaries and the layer norm backward
  its weight's gradients per thread (an `nn.GroupNorm(2, 4)` step at batch 2: 968 predicted
  against 1,032; an `nn.LayerNorm(6)` at batch 1: 192 against 288, torch 2.13); `kthvalue`
  selects in a copy of its input (856 against 1,480);
* where a tensor argument is in another layout than the contiguous one the kernel reads (a
  channels-last map, a transposed or broadcast gradient): layer and group norm forward, and
  the pooling backwards of `nn.AdaptiveMaxPool2d`, `nn.AvgPool2d/3d` and
  `nn.AdaptiveAvgPool2d` make a contiguous copy first (a channels-last group norm: its input
  copied). Given contiguous tensors they allocate only their outputs; gather, scatter and
  index_add not in bfloat16 or float16, where they work in a float32 copy;
* `all` of a tensor that is not bool (its bool copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ninlab.analysis.allocator.registry import OUTPUTS_ONLY, KernelBlocks, allocation_rule

__all__ = ["ALWAYS_PROBED", "PROBED_IN_ANOTHER_LAYOUT", "PROBED_IN_REDUCED_PRECISION"]

_UPSAMPLING = tuple(
    f"aten.{name}.default"
    for kind in (
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d",
        "_upsample_nearest_exact3d",
        "upsample_linear1d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_trilinear3d",
        "_upsample_bilinear2d_aa",
        "_upsample_bicubic2d_aa",
    )
    for name in (kind, f"{kind}_backward")
)

# The ops whose every call is measured, by the reason.
ALWAYS_PROBED: dict[str, tuple[str, ...]] = {
    "upsampling (the kernel's copies in its own layout)": _UPSAMPLING,
    "FFT (the plan's workspaces)": tuple(
        f"aten.{name}.default" for name in ("_fft_r2c", "_fft_c2r", "_fft_c2c")
    ),
    "bilinear product (the kernel's temporaries)": ("aten._trilinear.default",),
    "unfold (an input-sized block the kernel grows into its output)": ("aten.im2col.default",),
    "group norm backward (the kernel's per-sample and per-thread sums)": (
        "aten.native_group_norm_backward.default",
    ),
    "selection along a dim (the kernel's working copy of its input)": ("aten.kthvalue.default",),
    "embedding bag backward (the kernel's index temporaries)": (
        "aten._embedding_bag_backward.default",
        "aten._embedding_bag_dense_backward.default",
        "aten._embedding_bag_per_sample_weights_backward.default",
    ),
}

# The ops measured where a tensor argument is not contiguous, by what they are: given
# contiguous tensors they allocate only their outputs (the norms and pooling backwards by the
# kernels' code; the rest found so at every contiguous call of the survey behind
# `outputs_only.SURVEYED`), given others some copy one first (a softmax along a strided dim, an
# embedding of expanded indices: the input again, in full).
PROBED_IN_ANOTHER_LAYOUT: dict[str, tuple[str, ...]] = {
    "layer norm": ("aten.native_layer_norm.default",),
    "group norm": ("aten.native_group_norm.default",),
    "pooling backward": (
        "aten.adaptive_max_pool2d_backward.default",
        "aten._adaptive_avg_pool2d_backward.default",
        "aten.avg_pool2d_backward.default",
        "aten.avg_pool3d_backward.default",
    ),
    "pooling": (
        "aten.avg_pool2d.default",
        "aten.max_pool2d_with_indices.default",
        "aten.max_unpool2d.default",
    ),
    "softmax": (
        "aten._softmax.default",
        "aten._softmax_backward_data.default",
        "aten._log_softmax.default",
        "aten._log_softmax_backward_data.default",
    ),
    "indexing": (
        "aten.embedding.default",
        "aten.index_select.default",
        "aten.gather.default",
        "aten.scatter_.src",
        "aten.scatter_add_.default",
        "aten.index_add_.default",
    ),
    "reduction along a dim": ("aten.max.dim", "aten.linalg_vector_norm.default"),
    "resampling": (
        "aten.grid_sampler_2d.default",
        "aten.col2im.default",
        "aten.pixel_unshuffle.default",
        "aten.reflection_pad2d.default",
    ),
}


def _measured(reason: str) -> Any:
    def rule(args: Sequence[Any]) -> KernelBlocks:
        return KernelBlocks(None, reason)

    return rule


# Ops of `PROBED_IN_ANOTHER_LAYOUT` whose CPU kernels, given bfloat16 or float16 values, work
# in a float32 copy (gather: of its output; scatter, scatter_add, index_add: of `self`), so
# they are measured then too (on 2.8, 2.13 and 2.14.1: a (4, 32) bf16 scatter_add_ holds 512
# bytes beside it; a bf16 gather's backward, a scatter_add into zeros, was 0.87 to 0.91 of the
# real allocator peak, printed as exact). The survey behind the layouts saw float32 calls.
PROBED_IN_REDUCED_PRECISION = frozenset(
    {
        "aten.gather.default",
        "aten.scatter_.src",
        "aten.scatter_add_.default",
        "aten.index_add_.default",
    }
)
_REDUCED = frozenset({torch.bfloat16, torch.float16})


def _measured_in_another_layout(what: str, *, reduced_too: bool) -> Any:
    def rule(args: Sequence[Any]) -> KernelBlocks:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if reduced_too and any(t.dtype in _REDUCED for t in tensors):
            return KernelBlocks(None, f"{what} of bfloat16 or float16 values (a float32 copy)")
        if all(t.is_contiguous() for t in tensors):
            return OUTPUTS_ONLY
        return KernelBlocks(None, f"{what} of a tensor not contiguous (the kernel's copy)")

    return rule


@allocation_rule("aten.all.default")
def _all(args: Sequence[Any]) -> KernelBlocks:
    # The kernel reduces a bool tensor as it is; any other it first compares with zero into a
    # bool copy (a (4, 32) float32 tensor: 128 bytes beside the output, on 2.8 to 2.14.1; the
    # survey saw bool masks alone).
    if args[0].dtype == torch.bool:
        return OUTPUTS_ONLY
    return KernelBlocks(None, "all of a tensor that is not bool (the kernel's bool copy)")


for _reason, _ops in ALWAYS_PROBED.items():
    allocation_rule(*_ops)(_measured(_reason))
for _what, _ops in PROBED_IN_ANOTHER_LAYOUT.items():
    for _op in _ops:
        _reduced_too = _op in PROBED_IN_REDUCED_PRECISION
        allocation_rule(_op)(_measured_in_another_layout(_what, reduced_too=_reduced_too))
