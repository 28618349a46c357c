"""The quick way to run ops on fake tensors: outputs made from what earlier calls returned.

FakeTensorMode's own dispatch is most of the cost of a recording, so the recorder
(`ninlab.analysis.recorder`) and `OffRecord` spare it where they can, through `FakeOutputs`: an
in-place op returns its first argument without the fake kernel; an op called again with arguments
of the same metadata gets its outputs made directly from what an earlier call returned, remembered
across recordings; an op FakeTensorMode would run as a Python decomposition (batch norm and its
backward) is decomposed here, each part remembered the same way; ops on real constants (Adam's
step count) are computed on the constants. What is remembered, and what is found once per op
(`op_traits`), lives in module-level caches; `clear_caches` empties them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ninlab.analysis.torch_internals import (
    ANNOTATIONS_WITHOUT_TENSORS,
    CONSTANT_NUMEL_LIMIT,
    DataDependentOutputException,
    DisableTorchDispatch,
    FakeTensor,
    FakeTensorMode,
    TorchDispatchMode,
    composite_kernel,
    decomposition_table,
    default_device_name,
    meta_table,
    op_schema,
    runs_as_composite_parts,
    torch_decomp_decompositions,
)

if TYPE_CHECKING:
    from ninlab.analysis.known_values import KnownValues

__all__ = [
    "PRIM_DEVICE",
    "FakeOutputs",
    "OffRecord",
    "OpTraits",
    "clear_caches",
    "fake_device",
    "fake_empty",
    "op_traits",
    "tensors_in",
]

aten = torch.ops.aten

# Asked by the autograd engine of every fake tensor; answered by `fake_device`, one mode sooner.
PRIM_DEVICE = torch.ops.prim.device.default
# Queries of metadata that FakeTensorMode answers without running a kernel; they are not ops.
_METADATA_OPS = {
    aten.is_contiguous.default,
    aten.is_contiguous.memory_format,
    aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default,
    aten.size.default,
    aten.sym_size.default,
    aten.stride.default,
    aten.sym_stride.default,
    aten.storage_offset.default,
    aten.sym_storage_offset.default,
    aten.numel.default,
    aten.sym_numel.default,
    aten.dim.default,
    torch.ops.prim.layout.default,
    torch.ops.prim.device.default,
}


def fake_device(tensor: FakeTensor) -> torch.device:
    """`prim.device` of a fake tensor: asked by C++ (the autograd engine) of every fake tensor,
    thousands of times a step, and answered here as FakeTensor itself answers it, one
    mode sooner."""
    return torch.device("meta") if tensor.fake_mode.in_kernel_invocation else tensor.fake_device


class OffRecord(TorchDispatchMode):
    """Runs ops on fake tensors the quick way the recorder runs them (in-place ops skip the fake
    kernel, outputs made from `FakeOutputs`), recording nothing: for what a step needs made
    before it is recorded (the fake parameters, the input batch, the probe forward that fits the
    loss), and for the parts of an op that FakeTensorMode decomposes. Entered over `fake_mode`.
    With `known`, a read of values is answered where they are known, as the recorder answers it
    (`KnownValues`), and what each op makes or writes is followed."""

    def __init__(self, fake_mode: FakeTensorMode, known: KnownValues | None = None) -> None:
        super().__init__()
        self._fake_outputs = FakeOutputs(fake_mode)
        self._known = known

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is PRIM_DEVICE and type(args[0]) is FakeTensor:
            return fake_device(args[0])
        kwargs = kwargs or {}
        traits = op_traits(func)
        if traits.metadata:
            return func(*args, **kwargs)
        if traits.returns_self and getattr(args[0], "constant", None) is None:
            output = args[0]
        else:
            try:
                output = self._fake_outputs.run(func, args, kwargs)
            except DataDependentOutputException:
                answer = None if self._known is None else self._known.answer(func, args, kwargs)
                if answer is None:
                    raise
                return answer
        if self._known is not None:
            self._known.follow(func, args, kwargs, output)
        return output


@dataclass(frozen=True)
class OpTraits:
    """What the recorder needs to know of an aten op before running it, found once per op."""

    name: str  # as OpRecord.op names it
    metadata: bool  # a query FakeTensorMode answers without a kernel: not an op
    # CompositeImplicitAutograd: runs as its parts, through this kernel; None: runs itself
    composite_kernel: Callable[..., Any] | None
    returns_self: bool  # in place on its first argument, which it returns, metadata unchanged
    pointwise: bool  # a TensorIterator op, elementwise
    # Positions of its Tensor arguments: a Python number given for one is wrapped, for real, in a
    # CPU tensor made by no op (see `Recorder`)
    tensor_arguments: tuple[int, ...]


_TRAITS: dict[Any, OpTraits] = {}
_TENSOR_TYPE = torch.TensorType.get()


def op_traits(func: Any) -> OpTraits:
    traits = _TRAITS.get(func)
    if traits is None:
        schema = op_schema(func)
        first = schema.arguments[0].alias_info if schema.arguments else None
        returned = schema.returns[0].alias_info if len(schema.returns) == 1 else None
        in_place = (
            first is not None
            and first.is_write
            and returned is not None
            and returned.is_write
            and set(returned.before_set) == set(first.before_set)
            and torch.Tag.inplace_view not in func.tags
        )
        metadata = func in _METADATA_OPS  # prim ops among them have no dispatch table to ask
        composite = not metadata and runs_as_composite_parts(func.name())
        traits = OpTraits(
            name=str(func),
            metadata=metadata,
            composite_kernel=composite_kernel(func) if composite else None,
            returns_self=in_place,
            pointwise=torch.Tag.pointwise in func.tags,
            tensor_arguments=tuple(
                position
                for position, argument in enumerate(schema.arguments)
                if not argument.kwarg_only and argument.type == _TENSOR_TYPE
            ),
        )
        _TRAITS[func] = traits
    return traits


class FakeOutputs:
    """Runs an op on fake tensors, remembering what its outputs look like for the arguments'
    metadata, so that the next call with the same shapes, strides, dtypes and other arguments
    makes its outputs directly instead of going through `FakeTensorMode` again.

    FakeTensorMode has a cache of its own, but it hashes every argument in depth on every call,
    which costs more than the meta kernel it saves; a step repeats the same few calls many times
    (each block of a network, each parameter in the optimizer), and this key is cheap. Remembered:
    fresh outputs, and one output viewing the first argument (a view op's), made again on its
    storage; not other outputs aliasing an input, not mutating ops, not outputs or inputs holding
    real constant values (FakeTensorMode computes those for real), not ops that raise
    (data-dependent ones).

    What is remembered outlives one recording (`_KNOWN_OUTPUTS`): outputs' metadata follows from
    the arguments' alone, so a second prediction of a model, or one at another batch size (whose
    optimizer ops see the same parameter shapes), makes most outputs directly.

    An op FakeTensorMode runs as a Python decomposition (batch norm, its backward) is decomposed
    here the same way, each part through this memory: at a new batch size, the parts on
    per-channel statistics are known already, and only those on the batch are new.

    Ops on real constants alone (Adam's step count: `step += 1`, `step.item()`) are computed
    here on the constants, as FakeTensorMode would compute them, without its slow path; so is the
    count itself made (`torch.tensor(0.0)`).
    """

    def __init__(self, mode: FakeTensorMode) -> None:
        self._mode = mode
        # What a factory op without a dtype or device makes depends on the defaults.
        defaults = (torch.get_default_dtype(), default_device_name())
        if sum(len(known) for known in _KNOWN_OUTPUTS.values()) > _KNOWN_OUTPUTS_LIMIT:
            _KNOWN_OUTPUTS.clear()
        self._known = _KNOWN_OUTPUTS.setdefault(defaults, {})
        # Runs the parts of an op FakeTensorMode decomposes in Python, so that they are
        # remembered too (made when first needed).
        self._parts: OffRecord | None = None

    def run(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func in ANNOTATIONS_WITHOUT_TENSORS:
            # No tensor in or out, so nothing fake to make: FakeTensorMode would run the same
            # kernel after checks that cost ten times the kernel (an optimizer's step and
            # zero_grad open and close one each).
            with DisableTorchDispatch():
                return func(*args, **kwargs)
        if func is _GROUPED_MM and (made := _cpu_grouped_mm(args, kwargs)) is not None:
            return made
        key = _key(func, args, kwargs)
        if key is None:
            if (
                func.is_view
                and args
                and type(args[0]) is FakeTensor
                and args[0].constant is not None
            ):
                return _view_of_constant(self._mode, func, args, kwargs)
            if _on_constants(func, args, kwargs):
                return _run_on_constants(func, args)
            if func is aten.lift_fresh.default and _small_real_tensor(args[0]):
                return _fake_constant(self._mode, args[0])
            return func(*args, **kwargs)
        entry = self._known.get(key)
        if entry is not None:
            views, made = entry
            return _make_view(args[0], *made) if views else _make_fakes(self._mode, *made)
        decomposition = _python_decomposition(self._mode, func)
        if decomposition is None:
            output = func(*args, **kwargs)
        else:
            if self._parts is None:
                self._parts = OffRecord(self._mode)
            with self._parts:
                output = decomposition(*args, **kwargs)
        fresh = None if func.is_view else _fresh_outputs(output, args, kwargs)
        if fresh is not None:
            self._known[key] = (False, fresh)
        elif args:
            # A view op, or one whose output views its input all the same (`_unsafe_view`).
            view = _view_output(output, args[0])
            if view is not None:
                self._known[key] = (True, view)
        return output


# `torch._grouped_mm` (a mixture of experts' batched expert matmul: Hugging Face's MoE layers
# call it on CPU from torch 2.9); absent from older torch.
_GROUPED_MM = getattr(getattr(aten, "_grouped_mm", None), "default", None)
_GROUPED_MM_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _cpu_grouped_mm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`_grouped_mm`'s output as the CPU kernel makes it, or None on another device. Its fake
    kernel is CUDA's: it refuses float32, which the CPU kernel multiplies (a Mixtral in float32 was
    refused as if its input were wrong). The CPU kernel (measured on torch 2.13 and 2.14.1)
    takes float32, bfloat16 or float16 operands of one dtype, int32 offsets, no bias and no other
    output dtype, strides of whole 16-byte steps, and allocates its contiguous output alone: one
    matrix product per group, `offs` cutting the side that is not a batch of matrices."""
    if not _CPU_GROUPED_MM or getattr(args[0], "fake_device", args[0].device).type != "cpu":
        return None
    named = dict(zip(("mat_a", "mat_b", "offs", "bias", "out_dtype"), args)) | kwargs
    a, b, offs = named["mat_a"], named["mat_b"], named.get("offs")
    if a.dtype not in _GROUPED_MM_DTYPES:
        raise RuntimeError(
            f"Expected mat_a to be Float32, BFloat16 or Float16 matrix, got {a.dtype}"
        )
    if b.dtype != a.dtype:
        raise RuntimeError(
            f"_grouped_mm: expected both matrices of one dtype, got {a.dtype} and {b.dtype}"
        )
    if named.get("bias") is not None:
        raise RuntimeError("_grouped_mm: bias not supported on CPU")
    if named.get("out_dtype") not in (None, a.dtype):
        raise RuntimeError("Grouped gemm output dtype must match `mat_a` dtype")
    if offs is not None and offs.dtype != torch.int32:
        raise RuntimeError("_grouped_mm: offsets have to be int32")
    for matrix in (a, b):
        if any(stride != 1 and stride * matrix.element_size() % 16 for stride in matrix.stride()):
            raise RuntimeError("_grouped_mm: strides should be multiple of 16 bytes")
    contraction = b.shape[-2 if b.dim() == 3 else 0]
    if a.shape[-1] != contraction:
        raise RuntimeError(
            f"_grouped_mm: contraction sizes differ ({a.shape[-1]} and {contraction})"
        )
    groups = offs.shape[0] if offs is not None else a.shape[0]
    if a.dim() == 2 and b.dim() == 2:  # offs cut the contraction: one product per group
        shape = (groups, a.shape[0], b.shape[1])
    elif a.dim() == 2:  # offs cut a's rows, each group's rows times its matrix of b
        shape = (a.shape[0], b.shape[2])
    elif b.dim() == 2:  # offs cut b's columns
        shape = (a.shape[1], b.shape[1])
    else:  # a batch of matrix products
        shape = (a.shape[0], a.shape[1], b.shape[2])
    return a.new_empty(shape)


def _cpu_has_grouped_mm() -> bool:
    """Whether this torch has a CPU kernel of `_grouped_mm` (2.13 has; 2.8 has CUDA's only, so
    there the fake kernel's refusal stands, as the real step's would)."""
    if _GROUPED_MM is None:
        return False
    try:
        _GROUPED_MM(torch.zeros(4, 4), torch.zeros(1, 4, 4), torch.tensor([4], dtype=torch.int32))
    except NotImplementedError:
        return False
    return True


# Asked once, on real tensors: inside a trace, a fake tensor mode is active.
_CPU_GROUPED_MM = _cpu_has_grouped_mm()


def _python_decomposition(mode: FakeTensorMode, func: Any) -> Callable[..., Any] | None:
    """The Python decomposition FakeTensorMode runs for `func` instead of a meta kernel (batch
    norm and its backward, `slice`, `threshold_backward`, `_softmax`: its `_dispatch_impl` for
    an op with neither a Python meta nor a symbolic C++ one), or None. Found once per op."""
    if func not in _DECOMPOSITIONS:
        decomposed = (
            func not in meta_table
            and not mode.cpp_meta_supports_symint(func)
            and func in decomposition_table
            and torch_decomp_decompositions(func)
        )
        _DECOMPOSITIONS[func] = decomposition_table[func] if decomposed else None
    return _DECOMPOSITIONS[func]


_DECOMPOSITIONS: dict[Any, Callable[..., Any] | None] = {}


def _small_real_tensor(value: Any) -> bool:
    """A plain CPU tensor FakeTensorMode keeps as a constant when `torch.tensor` makes one."""
    return (
        type(value) is torch.Tensor
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.requires_grad
        and value.numel() <= CONSTANT_NUMEL_LIMIT
    )


def _fake_constant(mode: FakeTensorMode, real: torch.Tensor) -> FakeTensor:
    """`torch.tensor(0.0)` under `mode` (Adam's step count, one per parameter): a fake tensor
    holding a copy of the value as its constant, registered with the mode's converter, as
    FakeTensorMode's `lift_fresh` makes it, without converting through its general machinery."""
    with DisableTorchDispatch():
        constant = real.clone()
        empty = torch.empty_strided(
            tuple(real.shape), real.stride(), dtype=real.dtype, device="meta"
        )
    fake = FakeTensor(mode, empty, real.device, constant=constant)
    mode.fake_tensor_converter.set_tensor_memo(constant, fake)
    mode.fake_tensor_converter.add_constant_storage_mapping(fake)
    return fake


# (default dtype, default device) -> key -> (whether the output views the first argument, what
# `_make_view` or `_make_fakes` needs; no fake mode: the outputs belong to the recording that
# makes them). Cleared when it holds more than
# _KNOWN_OUTPUTS_LIMIT keys in all, so that a long session's memory stays bounded.
_KNOWN_OUTPUTS: dict[tuple[Any, ...], dict[tuple[Any, ...], Any]] = {}
_KNOWN_OUTPUTS_LIMIT = 200_000
_CACHEABLE: dict[Any, bool] = {}


def clear_caches() -> None:
    """Forget all this module remembers: the outputs made (`FakeOutputs`) and what is found once
    per op (its traits, whether its outputs can be remembered, its Python decomposition), so that
    the next recording makes every output through FakeTensorMode again."""
    for cache in (_KNOWN_OUTPUTS, _TRAITS, _CACHEABLE, _DECOMPOSITIONS):
        cache.clear()


def _key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    cacheable = _CACHEABLE.get(func)
    if cacheable is None:
        schema = op_schema(func)
        # A view op is remembered only when it returns one tensor viewing its first argument.
        one_view = (
            len(schema.returns) == 1
            and str(schema.returns[0].type) == "Tensor"
            and bool(schema.arguments and schema.arguments[0].alias_info is not None)
        )
        cacheable = not ((func.is_view and not one_view) or schema.is_mutable)
        cacheable = cacheable and torch.Tag.dynamic_output_shape not in func.tags
        _CACHEABLE[func] = cacheable
    if not cacheable:
        return None
    parts: list[Any] = [func]
    for value in (*args, *kwargs.items()) if kwargs else args:
        part = _key_part(value)
        if part is None:
            return None
        parts.append(part)
    return tuple(parts)


def _on_constants(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether FakeTensorMode would compute this op on real constants and return either a Python
    number (`item()`) or its first argument (an in-place op): every tensor argument, at the top
    level, a fake tensor holding a constant, the op neither random nor changing shapes in place."""
    if (
        kwargs
        or not args
        or not (func is aten._local_scalar_dense.default or op_traits(func).returns_self)
    ):
        return False
    if torch.Tag.nondeterministic_seeded in func.tags:
        return False
    tensors = [value for value in args if isinstance(value, torch.Tensor)]
    if any(isinstance(value, (tuple, list)) for value in args) or not tensors:
        return False
    return all(type(t) is FakeTensor and t.constant is not None for t in tensors)


def _view_of_constant(
    mode: FakeTensorMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A view op on a fake tensor holding a constant (`torch.tensor([0.25]).view(1, 1)`): the
    fake kernel's view of its storage, holding the view of the constant. FakeTensorMode would
    compute it on the constant and make a fake of another storage, so a view would count its
    bytes again (`F.prelu` of a weight made by `torch.tensor`: 4 bytes over)."""
    base = args[0]
    constant, base.constant = base.constant, None
    try:
        output = func(*args, **kwargs)
    finally:
        base.constant = constant
    if type(output) is FakeTensor:
        with DisableTorchDispatch():
            output.constant = func(constant, *args[1:], **kwargs)
        mode.fake_tensor_converter.add_constant_storage_mapping(output)
    return output


def _run_on_constants(func: Any, args: tuple[Any, ...]) -> Any:
    """The op computed on the constants, as FakeTensorMode computes it (without dispatch to any
    mode); an in-place op's output is its first (fake) argument, whose constant it updated."""
    constants = [value.constant if isinstance(value, FakeTensor) else value for value in args]
    with DisableTorchDispatch():
        output = func(*constants)
    return args[0] if isinstance(output, torch.Tensor) else output


_PLAIN = (
    int,
    float,
    bool,
    str,
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
    type(None),
)


def _lazy_bits(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is lazily conjugated or negated (`conj()`): the bits are no part of a key
    or of what is remembered, and the next kernel reads them (a CPU kernel given one copies it
    resolved first, a dispatch mode sees the `clone`), so such a tensor keeps to FakeTensorMode."""
    return tensor.is_conj() or tensor.is_neg()


def _key_part(value: Any) -> Any:
    """A hashable stand-in for an op argument, or None when the argument cannot be keyed."""
    if isinstance(value, FakeTensor):
        if value.constant is not None or _lazy_bits(value):
            return None
        return (value.shape, value.stride(), value.dtype, value.storage_offset(), value.fake_device)
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        parts = tuple(_key_part(item) for item in value)
        return None if None in parts else ("seq", parts)
    return None


def _fresh_outputs(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `_make_fakes` needs to make outputs like these again, or None when they are not all
    fresh fake tensors (or None) without constants."""
    container = list if isinstance(output, list) else tuple if isinstance(output, tuple) else None
    outputs = tuple(output) if container is not None else (output,)
    described: list[tuple[Any, ...] | None] = []
    for tensor in outputs:
        if tensor is None:
            described.append(None)
            continue
        if (
            type(tensor) is not FakeTensor
            or tensor.constant is not None
            or tensor.requires_grad
            or _lazy_bits(tensor)
        ):
            return None
        described.append((tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.fake_device))
    if all(entry is None for entry in described):
        return None
    inputs = {id(t.untyped_storage()) for t in tensors_in((*args, *kwargs.values()))}
    if any(t is not None and id(t.untyped_storage()) in inputs for t in outputs):
        return None
    return tuple(described), container


def _make_fakes(mode: FakeTensorMode, described: tuple[Any, ...], container: type | None) -> Any:
    made = []
    for entry in described:
        if entry is None:
            made.append(None)
            continue
        made.append(fake_empty(mode, *entry))
    return container(made) if container is not None else made[0]


def fake_empty(
    mode: FakeTensorMode,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> FakeTensor:
    """A fresh fake tensor of this layout on `device`, made as FakeTensorMode makes one, without
    dispatching the factory op through it."""
    with DisableTorchDispatch():
        empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return FakeTensor(mode, empty, device)


def _view_output(output: Any, base: Any) -> tuple[Any, ...] | None:
    """What `_make_view` needs to make this view of `base` again, or None."""
    if (
        type(output) is not FakeTensor
        or type(base) is not FakeTensor
        or output.constant is not None
    ):
        return None
    if output.untyped_storage() is not base.untyped_storage() or output.requires_grad:
        return None
    if _lazy_bits(output):
        return None
    return (
        tuple(output.shape),
        output.stride(),
        output.storage_offset(),
        output.dtype,
        output.fake_device,
    )


def _make_view(
    base: FakeTensor,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
    dtype: torch.dtype,
    device: torch.device,
) -> FakeTensor:
    """A fake tensor viewing `base`'s storage, as FakeTensorMode's cache makes one."""
    with DisableTorchDispatch():
        view = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        view.set_(base.untyped_storage(), offset, shape, stride)
    return FakeTensor(base.fake_mode, view, device)


def tensors_in(values: tuple[Any, ...] | list[Any]) -> list[torch.Tensor]:
    """The tensors among `values`, in order, looking into lists and tuples (an aten op's
    arguments and outputs; a torch function's output, such as an LSTM's (out, (h, c)))."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += tensors_in(value)
    return found
