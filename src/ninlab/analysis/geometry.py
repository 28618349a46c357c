"""Window geometry of convolution and pooling, one spatial axis at a time.

Conv and pooling windows are a product of independent per-axis windows, so every question the
forum post asks (why 54.25 becomes 54, which rows are lost, how big a field an output sees, how
small an input may be) is answered per axis and combined by the caller.

Coordinates along one axis: the layer's real input is at positions 0..n-1, the padding before it at
-padding_before..-1 and the padding after it at n..n+padding_after-1. Window i starts at
``-padding_before + i*stride`` and reads the taps ``start + j*dilation`` for j in 0..kernel_size-1.

Why PyTorch drops the bottom/right and never the top/left: window 0 starts at the first padded
position and every further window is one stride later, so nothing is left over before the first
window. An output exists only while its whole window fits (floor), so whatever remainder does not
fill another stride is left over at the end. Nothing is cropped at random. (Positions can also be
skipped *between* taps, when the stride exceeds the window's span or dilation spreads the taps.)
With ``ceil_mode`` a pooling layer adds one more window that may run past the padded edge (its
missing taps are skipped), but PyTorch refuses a window that would start in the right padding, as
it would see nothing but padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ninlab.errors import NinlabError

__all__ = [
    "INPUT_FIELD",
    "AxisParams",
    "AxisWindow",
    "EmptyOutputError",
    "GeometryError",
    "Kind",
    "ReceptiveField",
    "adaptive_pool_axis",
    "axes_from_torch",
    "axis_params",
    "compose",
    "explain_axes",
    "influencing_positions",
    "merge_fields",
    "same_padding",
    "smallest_input_for_chain",
    "window_axis",
    "windows_for_chain",
]

Kind = Literal["conv", "pool"]


class GeometryError(NinlabError):
    """Window parameters that PyTorch itself rejects (a zero stride, too much pool padding...)."""


class EmptyOutputError(GeometryError):
    """An input too small for a layer: the textbook formula gives fewer than one output position.

    Carries what a caller needs to name the layer, show its arithmetic (e.g. ``(5 - 11 + 2*0)/4
    + 1 = -0.5 < 1``) and say how large the input must be; `layer_index` and
    `min_network_input_size` are set when the layer sits in a chain.
    """

    def __init__(
        self,
        *,
        arithmetic: str,
        min_input_size: int,
        layer_index: int | None = None,
        min_network_input_size: int | None = None,
    ) -> None:
        self.arithmetic = arithmetic
        self.min_input_size = min_input_size
        self.layer_index = layer_index
        self.min_network_input_size = min_network_input_size
        where = "" if layer_index is None else f"layer {layer_index}: "
        message = (
            f"{where}{arithmetic}, so the output would be empty; "
            f"this layer needs an input of at least {min_input_size}"
        )
        if min_network_input_size is not None:
            message += f", so the network input must be at least {min_network_input_size}"
        super().__init__(message)


@dataclass(frozen=True)
class AxisParams:
    """One layer's window along one spatial axis; independent of the input size.

    Pooling padding is symmetric in PyTorch, but `padding_before`/`padding_after` are kept apart
    because convolutions with ``padding='same'`` and explicit pad layers are not.
    """

    kernel_size: int
    stride: int = 1
    padding_before: int = 0
    padding_after: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    kind: Kind = "conv"

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride", "dilation"):
            if getattr(self, name) < 1:
                raise GeometryError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.padding_before, self.padding_after) < 0:
            raise GeometryError(
                f"padding must not be negative, got ({self.padding_before}, {self.padding_after}); "
                "crop the input explicitly instead"
            )
        if self.kind not in ("conv", "pool"):
            raise GeometryError(f"kind must be 'conv' or 'pool', not {self.kind!r}")
        if self.kind == "conv" and self.ceil_mode:
            raise GeometryError(
                "ceil_mode exists only for pooling; a convolution always rounds down"
            )
        # PyTorch's pool shape check, padding <= kernel_size // 2 whatever the dilation, so that
        # the first window is never mostly padding.
        if (
            self.kind == "pool"
            and max(self.padding_before, self.padding_after) > self.kernel_size // 2
        ):
            raise GeometryError(
                f"pool padding ({self.padding_before}, {self.padding_after}) exceeds half the "
                f"kernel size {self.kernel_size}; use padding <= {self.kernel_size // 2}"
            )

    @property
    def span(self) -> int:
        """Extent of one window: dilation spreads k taps over dilation*(k-1)+1 positions."""
        return self.dilation * (self.kernel_size - 1) + 1

    @property
    def total_padding(self) -> int:
        return self.padding_before + self.padding_after

    def formula(self, input_size: int) -> str:
        """The textbook output-size formula with this layer's numbers filled in.

        With dilation the kernel term is the span, as a dilated window covers that many positions.
        """
        if self.padding_before == self.padding_after:
            padding = f"2*{self.padding_before}"
        else:
            padding = f"{self.padding_before} + {self.padding_after}"
        return f"({input_size} - {self.span} + {padding})/{self.stride} + 1"

    def textbook_output(self, input_size: int) -> float:
        return (input_size + self.total_padding - self.span) / self.stride + 1

    def window(self, input_size: int) -> AxisWindow:
        """Everything about this layer's windows over an input of `input_size` positions.

        Raises `EmptyOutputError` when the output would have no positions, as PyTorch does.
        """
        if input_size < 1:
            raise GeometryError(f"input size must be at least 1, got {input_size}")
        # How far window 0 could slide and still fit in the padded input; floor division rounds
        # towards minus infinity, as PyTorch's div_rtn does.
        room = input_size + self.total_padding - self.span
        output_size = room // self.stride + 1
        # Ceil mode may add a window that runs past the padded edge, even when no window fits.
        rounded_up = self.ceil_mode and room % self.stride != 0
        if rounded_up:
            output_size += 1
        # PyTorch's rule: the last window must start inside the input or the left padding.
        dropped_window = (
            rounded_up and (output_size - 1) * self.stride >= input_size + self.padding_before
        )
        if dropped_window:
            output_size -= 1
        if output_size < 1:
            value = _number(self.textbook_output(input_size))
            bound = (
                f"{value} <= 0, even rounded up (ceil_mode)" if self.ceil_mode else f"{value} < 1"
            )
            raise EmptyOutputError(
                arithmetic=f"{self.formula(input_size)} = {bound}",
                min_input_size=self.min_input_size(),
            )
        last_tap = -self.padding_before + (output_size - 1) * self.stride + self.span - 1
        padded_end = input_size + self.padding_after - 1
        read = _read_count(self, input_size, output_size)
        return AxisWindow(
            params=self,
            input_size=input_size,
            output_size=output_size,
            textbook_output=self.textbook_output(input_size),
            rounded_up=rounded_up,
            dropped_window=dropped_window,
            last_tap=last_tap,
            trailing_unread_real=min(input_size, max(0, input_size - 1 - last_tap)),
            trailing_unread_padding=min(self.padding_after, max(0, padded_end - last_tap)),
            overhang=max(0, last_tap - padded_end),
            unread_real=input_size - read,
        )

    def min_input_size(self, output_size: int = 1) -> int:
        """Smallest input size whose output has at least `output_size` positions.

        Floor mode needs ``n + padding - span >= (m-1)*stride``. Ceil mode keeps window i while
        ``i*stride <= n + padding - span + stride - 1`` (rounding up) and
        ``i*stride < n + padding_before`` (PyTorch's start-inside rule). Output size never shrinks
        as the input grows, which is what makes chains invertible.
        """
        if output_size < 1:
            raise GeometryError(f"required output size must be at least 1, got {output_size}")
        if not self.ceil_mode:
            return max(1, (output_size - 1) * self.stride + self.span - self.total_padding)
        return max(
            1,
            (output_size - 2) * self.stride + self.span - self.total_padding + 1,
            (output_size - 1) * self.stride - self.padding_before + 1,
        )


@dataclass(frozen=True)
class AxisWindow:
    """One layer's windows over a given input size, along one axis.

    `trailing_unread_real` counts the real positions after the last tap (bottom rows or right
    columns lost to rounding down); `trailing_unread_padding` the padding after it. `overhang` is
    how far a ceil-mode window runs past the padded edge. `unread_real` counts every real position
    no window reads, including holes between windows when the stride exceeds the span or dilation
    skips taps.
    """

    params: AxisParams
    input_size: int
    output_size: int
    textbook_output: float
    rounded_up: bool
    dropped_window: bool
    last_tap: int
    trailing_unread_real: int
    trailing_unread_padding: int
    overhang: int
    unread_real: int

    @property
    def interior_unread_real(self) -> int:
        return self.unread_real - self.trailing_unread_real

    def read_positions(self, outputs: Iterable[int] | None = None) -> frozenset[int]:
        """Real input positions read by the given output positions (all outputs by default)."""
        chosen = range(self.output_size) if outputs is None else outputs
        return _read_positions(self.params, self.input_size, chosen)

    def unread_positions(self) -> tuple[int, ...]:
        """Real input positions that no window reads, in order."""
        read = self.read_positions()
        return tuple(p for p in range(self.input_size) if p not in read)

    def explain(self, noun: str = "row/column", side: str = "bottom/right") -> str:
        """The arithmetic and what it loses, e.g. ``(224 - 11 + 2*0)/4 + 1 = 54.25 -> 54; the
        last 1 row/column (bottom/right) of real pixels is never read``.

        `noun` names one position ("row", "row and column"); plurals add an s to each word.
        """
        params = self.params
        value = _number(self.textbook_output)
        if self.dropped_window:
            rounding = (
                f"{value} -> {self.output_size} (ceil_mode rounds up to {self.output_size + 1}, "
                "but PyTorch drops the window that would start in the right padding)"
            )
        elif self.rounded_up:
            rounding = f"{value} -> {self.output_size} (ceil_mode rounds up)"
        elif self.textbook_output != self.output_size:
            rounding = f"{value} -> {self.output_size}"
        else:
            rounding = value
        clauses = [f"{params.formula(self.input_size)} = {rounding}"]
        if params.dilation > 1:
            clauses.append(
                f"span {params.span} = dilation {params.dilation} * ({params.kernel_size} - 1) + 1"
            )
        if self.trailing_unread_real:
            count = self.trailing_unread_real
            clause = f"the last {count} {_plural(noun, count)} ({side}) of real pixels"
            padding = self.trailing_unread_padding
            if padding:
                clause += f" and the {padding} padding {_plural(noun, padding)} after"
                count += padding
            clauses.append(f"{clause} {_verb(noun, count)} never read")
        elif self.trailing_unread_padding:
            count = self.trailing_unread_padding
            clauses.append(
                f"the last {count} {_plural(noun, count)} ({side}) of padding {_verb(noun, count)} "
                "never read, so no real pixel is lost"
            )
        if self.interior_unread_real:
            count = self.interior_unread_real
            clauses.append(
                f"{count} real {_plural(noun, count)} between taps {_verb(noun, count)} never read "
                "(stride or dilation skips them)"
            )
        if self.overhang:
            clauses.append(
                f"the last window runs {self.overhang} past the padded edge "
                "(ceil_mode; those taps are skipped)"
            )
        return "; ".join(clauses)


def _read_count(params: AxisParams, input_size: int, output_size: int) -> int:
    """How many real positions (0 <= p < input_size) some tap of some window reads.

    Tap j of window i reads `j*dilation - padding_before + i*stride`: for each j, an arithmetic
    progression of step `stride`. Progressions whose offsets agree modulo the stride run along
    the same positions, so per residue the positions read are a union of intervals (in units of
    the stride), counted without visiting positions: as fast for a billion pixels as for ten.
    """
    stride = params.stride
    by_residue: dict[int, list[tuple[int, int]]] = {}
    for tap in range(params.kernel_size):
        offset = tap * params.dilation - params.padding_before
        first = max(0, -(offset // stride))  # the first window whose tap is at or past 0
        last = min(output_size - 1, (input_size - 1 - offset) // stride)
        if first > last:
            continue
        residue, base = offset % stride, offset // stride
        by_residue.setdefault(residue, []).append((base + first, base + last))
    read = 0
    for intervals in by_residue.values():
        end = None
        for low, high in sorted(intervals):
            start = low if end is None else max(low, end + 1)
            if start <= high:
                read += high - start + 1
                end = high
    return read


def _read_positions(params: AxisParams, input_size: int, outputs: Iterable[int]) -> frozenset[int]:
    read: set[int] = set()
    for index in outputs:
        start = index * params.stride - params.padding_before
        read.update(
            tap
            for tap in range(start, start + params.span, params.dilation)
            if 0 <= tap < input_size
        )
    return frozenset(read)


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _plural(noun: str, count: int) -> str:
    if count == 1:
        return noun
    return " ".join(
        word if word == "and" else "/".join(part + "s" for part in word.split("/"))
        for word in noun.split(" ")
    )


def _verb(noun: str, count: int) -> str:
    return "are" if count != 1 or " and " in noun else "is"


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[int, int]:
    """PyTorch's ``padding='same'``: total span-1, the odd extra position after (bottom/right).

    For an even span PyTorch cannot pad symmetrically, so it pads the input once more on the
    right (an explicit ``constant_pad_nd``) and then convolves with the smaller symmetric padding.
    """
    total = dilation * (kernel_size - 1)
    return total // 2, total - total // 2


def axis_params(
    *,
    kernel_size: int,
    stride: int = 1,
    padding: int | Literal["same", "valid"] = 0,
    padding_after: int | None = None,
    dilation: int = 1,
    ceil_mode: bool = False,
    kind: Kind = "conv",
) -> AxisParams:
    """`AxisParams` from PyTorch-style arguments; `padding_after` defaults to `padding`."""
    if padding == "valid":
        before, after = 0, 0
    elif padding == "same":
        if kind != "conv" or stride != 1:
            raise GeometryError(
                "padding='same' needs a convolution with stride 1, as in PyTorch; "
                "give padding as a number"
            )
        before, after = same_padding(kernel_size, dilation)
    elif isinstance(padding, int):
        before, after = padding, padding if padding_after is None else padding_after
    else:
        raise GeometryError(f"padding must be a number, 'same' or 'valid', not {padding!r}")
    return AxisParams(
        kernel_size=kernel_size,
        stride=stride,
        padding_before=before,
        padding_after=after,
        dilation=dilation,
        ceil_mode=ceil_mode,
        kind=kind,
    )


def window_axis(
    input_size: int,
    *,
    kernel_size: int,
    stride: int = 1,
    padding: int | Literal["same", "valid"] = 0,
    padding_after: int | None = None,
    dilation: int = 1,
    ceil_mode: bool = False,
    kind: Kind = "conv",
) -> AxisWindow:
    """One layer's windows along one axis, from PyTorch-style arguments."""
    params = axis_params(
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        padding_after=padding_after,
        dilation=dilation,
        ceil_mode=ceil_mode,
        kind=kind,
    )
    return params.window(input_size)


def axes_from_torch(
    *,
    ndim: int,
    kind: Kind,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] | Literal["same", "valid"] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> tuple[AxisParams, ...]:
    """Per-axis `AxisParams` from a layer's or aten op's arguments (an int or one value per axis).

    A missing or empty stride means the kernel size for pooling (PyTorch's default, and what
    ``max_pool2d_with_indices`` receives as ``stride=[]``) and 1 for convolution.
    """
    kernels = _per_axis(kernel_size, ndim, "kernel_size")
    if stride is None or (isinstance(stride, Sequence) and len(stride) == 0):
        strides = kernels if kind == "pool" else (1,) * ndim
    else:
        strides = _per_axis(stride, ndim, "stride")
    dilations = _per_axis(dilation, ndim, "dilation")
    paddings: tuple[int | Literal["same", "valid"], ...]
    paddings = (
        (padding,) * ndim if isinstance(padding, str) else _per_axis(padding, ndim, "padding")
    )
    return tuple(
        axis_params(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=ceil_mode, kind=kind)
        for k, s, p, d in zip(kernels, strides, paddings, dilations, strict=True)
    )


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    values = tuple(value)
    if len(values) == 1:
        return values * ndim
    if len(values) != ndim:
        raise GeometryError(
            f"{name} has {len(values)} values for {ndim} spatial axes; give 1 or {ndim}"
        )
    return values


def adaptive_pool_axis(input_size: int, output_size: int) -> AxisParams:
    """The fixed window an adaptive pool uses at this input size, when its windows are uniform.

    Adaptive pooling's window i covers [floor(i*n/m), ceil((i+1)*n/m)); only when m divides n
    (always for global pooling, m = 1) are those windows one kernel n/m with stride n/m. The
    result describes this input size only: an adaptive pool accepts any input size >= 1, so it
    does not belong in `smallest_input_for_chain`.
    """
    if input_size < 1 or output_size < 1:
        raise GeometryError(
            f"adaptive pool sizes must be at least 1, got {input_size} -> {output_size}"
        )
    if input_size % output_size:
        raise GeometryError(
            f"adaptive pool {input_size} -> {output_size} has windows of unequal size, so it "
            "has no single kernel and stride; its receptive field is not one size and jump"
        )
    size = input_size // output_size
    return AxisParams(kernel_size=size, stride=size, kind="pool")


def windows_for_chain(input_size: int, chain: Sequence[AxisParams]) -> tuple[AxisWindow, ...]:
    """Each layer's windows when a chain of layers is fed `input_size` along one axis.

    An input too small for some layer raises `EmptyOutputError` naming that layer's index and the
    smallest input the whole chain accepts.
    """
    windows: list[AxisWindow] = []
    size = input_size
    for index, params in enumerate(chain):
        try:
            window = params.window(size)
        except EmptyOutputError as error:
            raise EmptyOutputError(
                arithmetic=error.arithmetic,
                min_input_size=error.min_input_size,
                layer_index=index,
                min_network_input_size=smallest_input_for_chain(chain),
            ) from None
        windows.append(window)
        size = window.output_size
    return tuple(windows)


def smallest_input_for_chain(chain: Sequence[AxisParams], output_size: int = 1) -> int:
    """Smallest chain input whose final output has at least `output_size` positions.

    Inverts the chain from the end: since no layer's output shrinks when its input grows, the
    smallest input of layer j is the smallest that gives layer j+1 its own smallest input.
    """
    required = output_size
    for params in reversed(chain):
        required = params.min_input_size(required)
    return required


def influencing_positions(
    chain: Sequence[AxisWindow], outputs: Iterable[int] | None = None
) -> frozenset[int]:
    """Positions of the chain's input that can change the given final outputs (all by default).

    Exact, unlike a receptive field's span: a field that reaches past the input edge through an
    intermediate layer's padding counts padding, while this follows only real positions back.
    """
    needed: Iterable[int] = range(chain[-1].output_size) if outputs is None else outputs
    for window in reversed(chain):
        needed = window.read_positions(needed)
    return frozenset(needed)


@dataclass(frozen=True)
class ReceptiveField:
    """What one output position sees of the network input, along one axis.

    Output i sees network-input positions ``start + i*jump`` to ``start + i*jump + size - 1``.
    `jump` is the effective stride (network-input distance between neighbouring outputs), `start`
    is negative where the field of output 0 reaches into padding. `size` is an extent: dilation or
    a stride larger than the kernel leaves holes inside it.
    """

    size: int
    jump: int
    start: int

    def bounds(self, index: int = 0) -> tuple[int, int]:
        """First and last network-input position of output `index`'s field."""
        first = self.start + index * self.jump
        return first, first + self.size - 1

    @property
    def center(self) -> float:
        """Centre of output 0's field in network-input positions."""
        return self.start + (self.size - 1) / 2


INPUT_FIELD = ReceptiveField(size=1, jump=1, start=0)
"""The network input sees itself: each position one pixel wide, one pixel apart."""


def compose(field: ReceptiveField, params: AxisParams) -> ReceptiveField:
    """The field of a layer's output, given the field of its input.

    One step in the layer's input is `field.jump` network-input positions, so the window's span
    widens the field by (span - 1) input steps, its stride multiplies the jump, and its leading
    padding moves the first window padding_before steps back.
    """
    return ReceptiveField(
        size=field.size + (params.span - 1) * field.jump,
        jump=field.jump * params.stride,
        start=field.start - params.padding_before * field.jump,
    )


def merge_fields(first: ReceptiveField, second: ReceptiveField) -> ReceptiveField:
    """Field of an elementwise combination (residual add, concat along channels): the union.

    Both branches must step through the input alike; otherwise output i of one branch and output i
    of the other see differently spaced regions and no single size and jump describes the sum.
    """
    if first.jump != second.jump:
        raise GeometryError(
            f"cannot merge receptive fields with jumps {first.jump} and {second.jump}; "
            "the branches step through the input at different rates"
        )
    start = min(first.start, second.start)
    end = max(first.bounds()[1], second.bounds()[1])
    return ReceptiveField(size=end - start + 1, jump=first.jump, start=start)


def explain_axes(windows: Sequence[AxisWindow]) -> str:
    """One line for a layer's spatial axes: shared arithmetic once when all axes agree.

    For d2l's first conv at 224x224: ``(224 - 11 + 2*0)/4 + 1 = 54.25 -> 54; the last 1 row and
    column (bottom/right) of real pixels are never read``.
    """
    nouns, sides = _AXIS_WORDS[len(windows)]
    if len({(w.input_size, w.params) for w in windows}) == 1:
        return windows[0].explain(" and ".join(nouns), "/".join(sides))
    return " | ".join(
        f"{noun}s: {window.explain(noun, side)}"
        for noun, side, window in zip(nouns, sides, windows, strict=True)
    )


_AXIS_WORDS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    1: (("position",), ("end",)),
    2: (("row", "column"), ("bottom", "right")),
    3: (("slice", "row", "column"), ("back", "bottom", "right")),
}
