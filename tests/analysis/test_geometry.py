"""Window geometry checked against PyTorch itself, and d2l's NiN pinned at 224x224."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ninlab.analysis.geometry import (
    INPUT_FIELD,
    AxisParams,
    EmptyOutputError,
    GeometryError,
    ReceptiveField,
    adaptive_pool_axis,
    axes_from_torch,
    axis_params,
    compose,
    explain_axes,
    influencing_positions,
    merge_fields,
    same_padding,
    smallest_input_for_chain,
    window_axis,
    windows_for_chain,
)
from ninlab.errors import NinlabError
from ninlab.models import build_nin

FAST = settings(max_examples=80, deadline=None)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class Layer:
    """A torch layer call with PyTorch's own arguments: op is 'conv', 'max_pool' or 'avg_pool'."""

    op: str
    sizes: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    ceil_mode: bool

    def run(self, x: torch.Tensor) -> torch.Tensor:
        ndim = len(self.sizes)
        if self.op == "conv":
            weight = torch.ones((1, 1, *self.kernel), dtype=x.dtype)
            return _CONV[ndim](
                x, weight, stride=self.stride, padding=self.padding, dilation=self.dilation
            )
        if self.op == "max_pool":
            return _MAX[ndim](
                x, self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode
            )
        return _AVG[ndim](x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode)

    def axes(self) -> tuple[AxisParams, ...]:
        return axes_from_torch(
            ndim=len(self.sizes),
            kind="conv" if self.op == "conv" else "pool",
            kernel_size=self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
        )


@st.composite
def layers(
    draw: st.DrawFn,
    *,
    ndims: tuple[int, ...] = (1, 2, 3),
    max_size: int = 12,
    valid_only: bool = False,
) -> Layer:
    """Random conv/pool geometries, different per axis; unless `valid_only`, some that torch
    rejects (pool padding over half the kernel, inputs too small)."""
    ndim = draw(st.sampled_from(ndims))
    op = draw(st.sampled_from(["conv", "max_pool", "avg_pool"]))
    axis = st.integers(1, 5)
    kernel = tuple(draw(axis) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    dilation = (
        tuple(draw(st.integers(1, 3)) for _ in range(ndim)) if op != "avg_pool" else (1,) * ndim
    )
    ceil_mode = op != "conv" and draw(st.booleans())
    padding: tuple[int, ...] | str
    if op == "conv" and draw(st.booleans()):
        padding = (
            "valid" if any(s > 1 for s in stride) else draw(st.sampled_from(["same", "valid"]))
        )
    elif op == "conv" or not valid_only:
        padding = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
    else:
        padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    if valid_only:
        # Big enough that every window fits at least once ('same' needs less, 'valid' exactly this).
        pads = (0,) * ndim if isinstance(padding, str) else padding
        low = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, pads)]
        sizes = tuple(draw(st.integers(lo, max(lo, max_size))) for lo in low)
    else:
        sizes = tuple(draw(st.integers(1, max_size)) for _ in range(ndim))
    return Layer(op, sizes, kernel, stride, padding, dilation, ceil_mode)


def _input(layer: Layer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    # Integer values in float64: sums and averages are exact, so "changed" means really changed.
    return torch.randint(0, 100, (1, 1, *layer.sizes), generator=generator).to(torch.float64)


@FAST
@given(layers(max_size=14))
def test_output_size_and_rejections_match_torch(layer: Layer) -> None:
    if (
        layer.op == "avg_pool"
        and len(layer.sizes) == 3
        and any(n < k for n, k in zip(layer.sizes, layer.kernel))
    ):
        # avg_pool3d alone also refuses an input smaller than the kernel, even when padding makes
        # room: an op's own check, not window geometry (avg_pool1d/2d and max_pool3d accept it).
        with pytest.raises(RuntimeError):
            layer.run(_input(layer))
        return
    try:
        expected = tuple(layer.run(_input(layer)).shape[2:])
    except (RuntimeError, ValueError):
        expected = None
    try:
        got = tuple(params.window(n).output_size for params, n in zip(layer.axes(), layer.sizes))
    except GeometryError:
        got = None
    assert got == expected


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 15),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
)
def test_asymmetric_padding_matches_an_explicit_pad(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int
) -> None:
    """Unequal padding before/after (as 'same' and pad layers make) is F.pad, then no padding."""
    params = AxisParams(
        kernel_size=kernel,
        stride=stride,
        padding_before=before,
        padding_after=after,
        dilation=dilation,
    )
    x = torch.ones(1, 1, size)
    try:
        expected = F.conv1d(
            F.pad(x, (before, after)), torch.ones(1, 1, kernel), stride=stride, dilation=dilation
        ).shape[-1]
    except RuntimeError:
        with pytest.raises(EmptyOutputError):
            params.window(size)
        return
    assert params.window(size).output_size == expected


def test_same_padding_puts_the_odd_extra_after() -> None:
    assert same_padding(4) == (1, 2)
    assert same_padding(3, dilation=2) == (2, 2)
    assert same_padding(2, dilation=3) == (1, 2)
    assert window_axis(10, kernel_size=4, padding="same").output_size == 10
    with pytest.raises(GeometryError, match="stride 1"):
        axis_params(kernel_size=3, stride=2, padding="same")


@FAST
@given(layers(ndims=(1, 2), max_size=9, valid_only=True))
def test_exactly_the_read_positions_can_change_the_output(layer: Layer) -> None:
    """Perturb one input position per batch entry: the output changes iff some window reads it.

    A max pool sees the perturbation because 1000 exceeds every random value (no ties); an all-ones
    conv and an average pool add it with a positive weight.
    """
    windows = [params.window(n) for params, n in zip(layer.axes(), layer.sizes)]
    positions = list(itertools.product(*(range(n) for n in layer.sizes)))
    x = _input(layer).repeat(len(positions), *([1] * (len(layer.sizes) + 1)))
    for b, position in enumerate(positions):
        x[(b, 0, *position)] = 1000.0
    baseline = layer.run(_input(layer))
    changed = (layer.run(x) != baseline).flatten(1).any(dim=1).tolist()
    read = [w.read_positions() for w in windows]
    expected = [all(p in r for p, r in zip(position, read)) for position in positions]
    assert changed == expected
    for window, reads in zip(windows, read):
        n = window.input_size
        unread = set(range(n)) - reads
        assert set(window.unread_positions()) == unread
        assert window.unread_real == len(unread)
        # The remainder after the last window is the bottom/right block, never the top/left.
        assert set(range(n - window.trailing_unread_real, n)) <= unread
        if window.trailing_unread_real:
            assert max(reads, default=-1) == n - 1 - window.trailing_unread_real


def test_trailing_rows_are_never_read_and_the_last_read_row_is() -> None:
    """The forum post's case in small: 3 rows dropped by a stride-4 conv, and only those."""
    window = window_axis(23, kernel_size=11, stride=4)  # (23 - 11)/4 + 1 = 4: rows 0..22 all read
    assert (window.output_size, window.trailing_unread_real) == (4, 0)
    window = window_axis(26, kernel_size=11, stride=4)  # 4.75 -> 4: rows 23, 24, 25 never read
    assert (window.textbook_output, window.output_size, window.trailing_unread_real) == (4.75, 4, 3)
    weight = torch.ones(1, 1, 11, 11)
    x = torch.rand(1, 1, 26, 26)
    baseline = F.conv2d(x, weight, stride=4)
    dropped = x.clone()
    dropped[..., 23:, :] += 1
    dropped[..., :, 23:] += 1
    assert torch.equal(F.conv2d(dropped, weight, stride=4), baseline)
    last_read = x.clone()
    last_read[..., 22, :] += 1
    assert not torch.equal(F.conv2d(last_read, weight, stride=4), baseline)


@FAST
@given(layers(ndims=(1,), max_size=30, valid_only=True), st.integers(1, 4))
def test_min_input_size_is_the_smallest_that_works(layer: Layer, required: int) -> None:
    (params,) = layer.axes()
    smallest = params.min_input_size(required)
    assert params.window(smallest).output_size >= required
    assert layer_output_size(layer, smallest) == params.window(smallest).output_size
    if smallest > 1:
        too_small = layer_output_size(layer, smallest - 1)
        assert too_small is None or too_small < required


def layer_output_size(layer: Layer, size: int) -> int | None:
    try:
        return layer.run(torch.zeros(1, 1, size)).shape[-1]
    except RuntimeError:
        return None


@st.composite
def chains(draw: st.DrawFn) -> tuple[int, list[Layer]]:
    """A 1-d chain of ones-convs and average pools (same windows as max pools, but every read
    position gets a positive gradient, so autograd shows exactly which inputs matter)."""
    chain = draw(
        st.lists(
            layers(ndims=(1,), valid_only=True).filter(lambda layer: layer.op != "max_pool"),
            min_size=1,
            max_size=4,
        )
    )
    return draw(st.integers(1, 40)), chain


@settings(max_examples=60, deadline=None)
@given(chains())
def test_receptive_field_and_influence_match_autograd(drawn: tuple[int, list[Layer]]) -> None:
    size, chain = drawn
    params = [layer.axes()[0] for layer in chain]
    try:
        windows = windows_for_chain(size, params)
    except EmptyOutputError as error:
        assert size < smallest_input_for_chain(params) == error.min_network_input_size
        return
    assert size >= smallest_input_for_chain(params)
    x = torch.rand(1, 1, size, dtype=torch.float64, requires_grad=True)
    out = x
    for layer in chain:
        out = layer.run(out)
    assert out.shape[-1] == windows[-1].output_size
    field = INPUT_FIELD
    for p in params:
        field = compose(field, p)
    # Padding and ceil-mode overhang put part of a field outside the input; otherwise it is exact.
    padded = any(w.params.total_padding or w.overhang for w in windows)
    for index in range(out.shape[-1]):
        (grad,) = torch.autograd.grad(out[0, 0, index], x, retain_graph=True)
        seen = {int(i) for i in torch.nonzero(grad[0, 0]).flatten()}
        assert seen == influencing_positions(windows, [index])
        if not seen:  # an output whose windows all fall outside the input
            assert padded
            continue
        first, last = field.bounds(index)
        assert first <= min(seen) and max(seen) <= last
        if not padded:
            assert (min(seen), max(seen)) == (first, last)


def test_residual_merge_is_the_union_of_both_branches() -> None:
    """out = conv5x5(x) + conv1x1(conv3x3(x)) with dilation: the field is the wider branch's."""
    wide = compose(INPUT_FIELD, AxisParams(kernel_size=5, padding_before=2, padding_after=2))
    narrow = compose(
        compose(
            INPUT_FIELD, AxisParams(kernel_size=3, padding_before=3, padding_after=3, dilation=3)
        ),
        AxisParams(kernel_size=1),
    )
    merged = merge_fields(wide, narrow)
    assert merged == ReceptiveField(size=7, jump=1, start=-3)
    x = torch.rand(1, 1, 20, dtype=torch.float64, requires_grad=True)
    out = F.conv1d(x, torch.ones(1, 1, 5, dtype=torch.float64), padding=2) + F.conv1d(
        F.conv1d(x, torch.ones(1, 1, 3, dtype=torch.float64), padding=3, dilation=3),
        torch.ones(1, 1, 1, dtype=torch.float64),
    )
    (grad,) = torch.autograd.grad(out[0, 0, 10], x)
    seen = torch.nonzero(grad[0, 0]).flatten().tolist()
    assert (seen[0], seen[-1]) == merged.bounds(10)
    assert seen == [7, 8, 9, 10, 11, 12, 13]
    with pytest.raises(GeometryError, match="jumps"):
        merge_fields(wide, compose(INPUT_FIELD, AxisParams(kernel_size=2, stride=2)))


def test_bad_parameters_are_ninlab_errors() -> None:
    for kwargs in (
        {"kernel_size": 0},
        {"kernel_size": 3, "stride": 0},
        {"kernel_size": 3, "padding_before": -1},
    ):
        with pytest.raises(NinlabError):
            AxisParams(**kwargs)
    with pytest.raises(GeometryError, match="ceil_mode"):
        AxisParams(kernel_size=3, ceil_mode=True)
    with pytest.raises(GeometryError, match="half the kernel"):
        AxisParams(kernel_size=3, padding_before=2, padding_after=2, kind="pool")
    with pytest.raises(GeometryError, match="1 or 2"):
        axes_from_torch(ndim=2, kind="conv", kernel_size=(3, 3, 3))


def test_pool_stride_defaults_to_the_kernel() -> None:
    assert (
        axes_from_torch(ndim=2, kind="pool", kernel_size=3, stride=[])
        == (AxisParams(kernel_size=3, stride=3, kind="pool"),) * 2
    )
    assert axes_from_torch(ndim=1, kind="conv", kernel_size=[3]) == (AxisParams(kernel_size=3),)


def test_ceil_mode_overhang_and_dropped_window() -> None:
    # (8 - 3)/2 + 1 = 3.5 -> 4: the 4th window starts at 6, inside, and runs 1 past the edge.
    window = window_axis(8, kernel_size=3, stride=2, ceil_mode=True, kind="pool")
    assert (window.output_size, window.overhang, window.trailing_unread_real) == (4, 1, 0)
    assert F.max_pool1d(torch.zeros(1, 1, 8), 3, 2, ceil_mode=True).shape[-1] == 4
    # (5 - 2 + 2)/2 + 1 = 3.5 -> 4 would start a window at position 5, in the right padding.
    window = window_axis(5, kernel_size=2, stride=2, padding=1, ceil_mode=True, kind="pool")
    assert (window.output_size, window.dropped_window, window.trailing_unread_padding) == (
        3,
        True,
        1,
    )
    assert window.explain() == (
        "(5 - 2 + 2*1)/2 + 1 = 3.5 -> 3 (ceil_mode rounds up to 4, but PyTorch drops the window "
        "that would start in the right padding); the last 1 row/column (bottom/right) of padding "
        "is never read, so no real pixel is lost"
    )


def test_interior_holes_and_dilation_are_explained() -> None:
    window = window_axis(10, kernel_size=3, stride=4, dilation=3)
    # span 7: one window at 0 reads 0, 3, 6; positions 1, 2, 4, 5 are holes, 7..9 trail.
    assert window.unread_positions() == (1, 2, 4, 5, 7, 8, 9)
    assert (window.trailing_unread_real, window.interior_unread_real) == (3, 4)
    assert window.explain() == (
        "(10 - 7 + 2*0)/4 + 1 = 1.75 -> 1; span 7 = dilation 3 * (3 - 1) + 1; the last 3 "
        "rows/columns (bottom/right) of real pixels are never read; 4 real rows/columns between "
        "taps are never read (stride or dilation skips them)"
    )


def test_axes_that_differ_are_explained_one_by_one() -> None:
    rows = window_axis(7, kernel_size=3, stride=2)
    columns = window_axis(10, kernel_size=5, stride=2)
    assert explain_axes([rows, columns]) == (
        "rows: (7 - 3 + 2*0)/2 + 1 = 3 | columns: (10 - 5 + 2*0)/2 + 1 = 3.5 -> 3; the last 1 "
        "column (right) of real pixels is never read"
    )


def test_empty_output_names_the_formula_and_the_minimum() -> None:
    with pytest.raises(EmptyOutputError) as caught:
        window_axis(5, kernel_size=11, stride=4)
    assert str(caught.value) == (
        "(5 - 11 + 2*0)/4 + 1 = -0.5 < 1, so the output would be empty; "
        "this layer needs an input of at least 11"
    )


def test_adaptive_pool_is_a_window_only_when_uniform() -> None:
    assert adaptive_pool_axis(5, 1) == AxisParams(kernel_size=5, stride=5, kind="pool")
    assert adaptive_pool_axis(6, 3) == AxisParams(kernel_size=2, stride=2, kind="pool")
    assert F.adaptive_avg_pool1d(torch.arange(6.0).view(1, 1, 6), 3).flatten().tolist() == [
        0.5,
        2.5,
        4.5,
    ]
    with pytest.raises(GeometryError, match="unequal"):
        adaptive_pool_axis(7, 3)


# d2l's NiN at 224x224, one spatial axis (the network is square).


def nin_axis_layers(model: nn.Module) -> list[tuple[str, AxisParams]]:
    """Conv and max-pool layers of a model in forward order, as one axis's parameters."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            axes = axes_from_torch(
                ndim=2,
                kind="conv",
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
            )
        elif isinstance(module, nn.MaxPool2d):
            axes = axes_from_torch(
                ndim=2,
                kind="pool",
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                ceil_mode=module.ceil_mode,
            )
        else:
            continue
        assert axes[0] == axes[1]
        found.append((name, axes[0]))
    return found


@pytest.fixture(scope="module")
def nin() -> nn.Module:
    torch.manual_seed(0)
    return build_nin().eval()


@pytest.fixture(scope="module")
def nin_chain(nin: nn.Module) -> list[tuple[str, AxisParams]]:
    return nin_axis_layers(nin)


def test_nin_rounding_at_224(nin: nn.Module, nin_chain: list[tuple[str, AxisParams]]) -> None:
    windows = windows_for_chain(224, [params for _, params in nin_chain])
    rows = [
        (name, w.textbook_output, w.output_size, w.trailing_unread_real)
        for (name, _), w in zip(nin_chain, windows)
    ]
    assert rows == [
        ("0.0", 54.25, 54, 1),
        ("0.2", 54, 54, 0),
        ("0.4", 54, 54, 0),
        ("1", 26.5, 26, 1),
        ("2.0", 26, 26, 0),
        ("2.2", 26, 26, 0),
        ("2.4", 26, 26, 0),
        ("3", 12.5, 12, 1),
        ("4.0", 12, 12, 0),
        ("4.2", 12, 12, 0),
        ("4.4", 12, 12, 0),
        ("5", 5.5, 5, 1),
        ("7.0", 5, 5, 0),
        ("7.2", 5, 5, 0),
        ("7.4", 5, 5, 0),
    ]
    assert all(w.unread_real == w.trailing_unread_real for w in windows)
    assert explain_axes([windows[0], windows[0]]) == (
        "(224 - 11 + 2*0)/4 + 1 = 54.25 -> 54; the last 1 row and column (bottom/right) of real "
        "pixels are never read"
    )
    # The same sizes as the real model's outputs.
    sizes = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-1])
        )
        for name, module in nin.named_modules()
        if name in dict(nin_chain)
    ]
    with torch.no_grad():
        nin(torch.zeros(1, 1, 224, 224))
    for hook in hooks:
        hook.remove()
    assert [sizes[name] for name, _ in nin_chain] == [w.output_size for w in windows]


def test_nin_receptive_field(nin_chain: list[tuple[str, AxisParams]]) -> None:
    field = INPUT_FIELD
    fields = {}
    for name, params in nin_chain:
        field = compose(field, params)
        fields[name] = field
    assert fields["0.0"] == ReceptiveField(size=11, jump=4, start=0)
    assert fields["1"] == ReceptiveField(size=19, jump=8, start=0)
    assert fields["3"] == ReceptiveField(size=67, jump=16, start=-16)
    assert fields["5"] == ReceptiveField(size=131, jump=32, start=-32)
    # The final block's 5x5 output: each position sees 195 pixels, 32 apart, from -64 (padding).
    assert field == ReceptiveField(size=195, jump=32, start=-64)
    assert field.bounds(4) == (64, 258)
    # Global average pooling (5 -> 1) makes the single output see the union of all five.
    assert compose(field, adaptive_pool_axis(5, 1)) == ReceptiveField(size=323, jump=160, start=-64)


def test_nin_last_five_rows_and_columns_cannot_change_the_output(
    nin: nn.Module, nin_chain: list[tuple[str, AxisParams]]
) -> None:
    """The fields' spans reach 258, past the image, yet pixels 219..223 never matter: every pool
    drops its last row, and the padding that the spans count is not image."""
    windows = windows_for_chain(224, [params for _, params in nin_chain])
    assert influencing_positions(windows) == frozenset(range(219))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 224, 224, generator=generator)
    with torch.no_grad():
        baseline = nin(x)
        dropped = x.clone()
        dropped[..., 219:, :] = torch.rand(5, 224, generator=generator)
        dropped[..., :, 219:] = torch.rand(224, 5, generator=generator)
        assert torch.equal(nin(dropped), baseline)
        last = x.clone()
        last[..., 218, :] += 10
        assert not torch.equal(nin(last), baseline)


def test_nin_smallest_input_is_67(nin: nn.Module, nin_chain: list[tuple[str, AxisParams]]) -> None:
    chain = [params for _, params in nin_chain]
    assert smallest_input_for_chain(chain) == 67
    with torch.no_grad():
        assert nin(torch.zeros(1, 1, 67, 67)).shape == (1, 10)
        with pytest.raises(RuntimeError):
            nin(torch.zeros(1, 1, 66, 66))
    with pytest.raises(EmptyOutputError) as caught:
        windows_for_chain(66, chain)
    # 66 -> 14 -> 6 -> 6 -> 2 -> 2, and the third max pool (module "5") has nothing left to pool.
    assert nin_chain[caught.value.layer_index][0] == "5"
    assert str(caught.value) == (
        "layer 11: (2 - 3 + 2*0)/2 + 1 = 0.5 < 1, so the output would be empty; this layer needs "
        "an input of at least 3, so the network input must be at least 67"
    )
    assert windows_for_chain(67, chain)[-1].output_size == 1


@settings(max_examples=300, deadline=None)
@given(
    kernel=st.integers(1, 9),
    stride=st.integers(1, 7),
    dilation=st.integers(1, 4),
    padding=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    ceil_mode=st.booleans(),
    input_size=st.integers(1, 80),
)
def test_unread_count_equals_the_positions_no_window_reads(
    kernel: int,
    stride: int,
    dilation: int,
    padding: tuple[int, int],
    ceil_mode: bool,
    input_size: int,
) -> None:
    before, after = (min(p, kernel // 2) for p in padding)
    params = AxisParams(
        kernel,
        stride=stride,
        padding_before=before,
        padding_after=after,
        dilation=dilation,
        ceil_mode=ceil_mode,
        kind="pool" if ceil_mode else "conv",
    )
    try:
        window = params.window(input_size)
    except EmptyOutputError:
        return
    assert window.unread_real == len(window.unread_positions())


def test_unread_count_of_a_billion_positions_is_arithmetic() -> None:
    # NiN's first layer (11, stride 4) over 4e9 + 13 positions: (4e9 + 2)/4 + 1 = 1e9 + 1.5,
    # rounded down, so the last 2 positions are never read; counted without visiting positions
    # (enumerating them took minutes).
    size = 4_000_000_000 + 13
    window = AxisParams(11, stride=4).window(size)
    assert window.output_size == 1_000_000_001
    assert window.unread_real == window.trailing_unread_real == 2
