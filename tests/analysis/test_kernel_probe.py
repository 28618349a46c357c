"""Kernels no rule knows, measured one call at a time (`ninlab.analysis.kernel_probe`): the
blocks of the call alone are the blocks it makes inside a real step, so a step of such kernels is
predicted exactly at the allocator level, and a call too large to run stays a visible
lower bound."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_cpu_grouped_mm
from layer_zoo import LAYER_ZOO
from test_allocator import op_allocations
from torch import nn

from ninlab.analysis import kernel_probe
from ninlab.analysis.allocator import cpu_kernel_allocations
from ninlab.analysis.kernel_probe import KernelCall, TensorLayout, measured_allocations
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.models import build_nin, get_config

aten = torch.ops.aten


def _bf16_conv_backward() -> tuple[tuple, tuple[torch.Tensor, ...]]:
    x = torch.randn(4, 32, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 32, 3, 3).bfloat16().contiguous(memory_format=torch.channels_last)
    window = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    grad = torch.randn(4, 48, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    args = (grad, x, w, [48], *window, [True, True, True])
    return args, aten.convolution_backward.default(*args)


def test_a_call_is_measured_as_the_profiler_sees_it_with_its_outputs_marked() -> None:
    args, outputs = _bf16_conv_backward()
    _, reason = cpu_kernel_allocations("aten.convolution_backward.default", args)
    assert "scratchpad" in reason or "without AMX" in reason  # no rule knows all its blocks
    measured = measured_allocations(
        KernelCall.of("aten.convolution_backward.default", args, outputs)
    )
    assert not isinstance(measured, str)
    assert [a.delta_bytes for a in measured] == op_allocations(
        lambda: aten.convolution_backward.default(*args)
    )
    marked = {a.output: a.delta_bytes for a in measured if a.output is not None}
    assert marked == {index: t.untyped_storage().nbytes() for index, t in enumerate(outputs)}
    assert sum(a.delta_bytes for a in measured) == sum(marked.values())


def test_a_call_is_measured_once_per_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    args, outputs = _bf16_conv_backward()
    call = KernelCall.of("aten.convolution_backward.default", args, outputs)
    first = measured_allocations(call)
    monkeypatch.setattr(kernel_probe, "_measure", lambda call: pytest.fail("measured again"))
    assert (
        measured_allocations(KernelCall.of("aten.convolution_backward.default", args, outputs))
        is first
    )


def test_a_layout_keys_strides_and_makes_zeros_of_them() -> None:
    x = torch.randn(2, 8, 5, 5)
    layouts = {TensorLayout.of(x), TensorLayout.of(x.contiguous(memory_format=torch.channels_last))}
    assert len(layouts) == 2
    expanded = TensorLayout.of(torch.randn(1, 8, 1, 1).expand(2, 8, 5, 5))
    assert expanded.nbytes == 8 * 4
    real = expanded.zeros()
    assert real.stride() == (0, 1, 0, 0) and not real.any()
    # A lazily conjugated tensor is another call: its kernel copies it resolved first.
    z = torch.zeros(4, 3, dtype=torch.complex64)
    conjugated = TensorLayout.of(z.conj())
    assert conjugated != TensorLayout.of(z) and conjugated.zeros().is_conj()
    assert repr(TensorLayout.of(z)).endswith("dtype=torch.complex64)")


def test_a_step_with_a_call_too_large_to_run_stays_a_lower_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All or none: with one call over the limit the figure is a lower bound whatever the others
    give, so none is run (what keeps the batch planner fast at large batch sizes)."""
    model = build_nin()
    small = predict_memory(model, input_size=(1, 96, 96), batch_size=2, amp="bf16")
    assert not small.allocator.lower_bound
    monkeypatch.setattr(
        kernel_probe, "PROBE_LIMIT_BYTES", 100_000
    )  # NiN's last convs fit, the first not
    monkeypatch.setattr(kernel_probe, "_measure", lambda call: pytest.fail("a call was run"))
    report = predict_memory(model, input_size=(1, 96, 96), batch_size=2, amp="bf16")
    assert report.allocator.lower_bound and report.allocator.measured == ()
    assert all(
        "not measured: a call of the step takes over 97.66 KiB of tensors" in note
        for note in report.allocator.unmodelled
    )
    assert report.allocator_peak_bytes < small.allocator_peak_bytes


# batch norm's per-thread sums and max pooling's copies: rules read off this CPU
@pytest.mark.avx512
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_nin_as_the_cpu_preset_trains_it_is_exact(mode: str) -> None:
    """NiN with batch norm at 72x72, bf16 autocast, channels-last (the `cpu` preset): every
    convolution is one oneDNN brgemm kernel no rule knows. Measured one call at a time, the
    step's allocator peak is the real one to the byte (it was 15% under in training and 29% in
    inference when only flagged "at least")."""
    model = build_nin(get_config("nin-d2l-bn"))
    report = predict_memory(
        model,
        input_size=(1, 72, 72),
        batch_size=8,
        mode=mode,
        optimizer="sgd-momentum",
        amp="bf16",
        memory_format="channels_last",
    )
    measured = measure(model, report.spec, batch_size=8)
    assert not report.allocator.lower_bound, report.allocator.unmodelled
    assert report.allocator.measured
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


@pytest.mark.avx512  # the float32 rules around the measured calls: AVX-512
@pytest.mark.parametrize(
    ("name", "options"),
    [
        (
            "convnext_ln",
            {"memory_format": "channels_last"},
        ),  # kernel == stride downsampling backward
        ("attention_net", {"amp": "bf16"}),  # bf16 matrix multiplies on oneDNN
    ],
)
def test_layer_kinds_no_rule_knows_are_exact(name: str, options: dict[str, str]) -> None:
    entry = LAYER_ZOO[name]
    model = entry.factory()
    report = predict_memory(
        model, input_size=entry.input_size, batch_size=2, optimizer="adam", **options
    )  # type: ignore[arg-type]
    measured = measure(model, report.spec, batch_size=2)
    assert not report.allocator.lower_bound, report.allocator.unmodelled
    assert report.allocator.measured
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


def test_a_call_that_cannot_run_on_zeros_says_so() -> None:
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 5, 3, 3)  # 5 input channels for 3: refused
    call = KernelCall.of(
        "aten.convolution.default", (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), []
    )
    assert measured_allocations(call) == "could not be run on its own (RuntimeError)"


def test_calls_measured_in_one_profile_are_measured_as_each_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step's unknown calls run in one profile (its start costs more than a small call), each
    read from its own span: the blocks of each, and the reason of one that cannot run on zeros,
    are those it gives in a profile of its own."""
    args, outputs = _bf16_conv_backward()
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 5, 3, 3)  # 5 input channels for 3: refused
    forward = (args[1], args[2], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    calls = [
        KernelCall.of("aten.convolution_backward.default", args, outputs),
        KernelCall.of(
            "aten.convolution.default", (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), []
        ),
        KernelCall.of("aten.convolution.default", forward, (aten.convolution.default(*forward),)),
    ]
    alone = [kernel_probe._measure([call])[0] for call in calls]
    assert alone[1] == "could not be run on its own (RuntimeError)"
    assert [sum(a.delta_bytes for a in blocks) for blocks in (alone[0], alone[2])] == [
        sum(t.untyped_storage().nbytes() for t in outputs),
        4 * 48 * 12 * 12 * 2,  # the forward's bf16 output
    ]
    profiles = []
    started = kernel_probe.quiet_profile

    def counted(**options: object) -> object:
        profiles.append(options)
        return started(**options)

    monkeypatch.setattr(kernel_probe, "_MEASURED", {})
    monkeypatch.setattr(kernel_probe, "quiet_profile", counted)
    monkeypatch.setenv("NINLAB_NO_CACHE", "1")
    kernel_probe.measure_together(calls)
    assert len(profiles) == 1
    assert [measured_allocations(call) for call in calls] == alone
    assert len(profiles) == 1


def test_a_call_whose_blocks_depend_on_its_values_is_not_run_on_zeros() -> None:
    """An EmbeddingBag's backward in max mode keeps the indices that won, all of them on zeros:
    the step stays a lower bound, saying why, where the probe would give another figure."""
    bag = torch.nn.EmbeddingBag(50, 16, mode="max")
    ids = torch.randint(0, 50, (2, 12))
    report = predict_memory(
        bag, input_size=(12,), input_dtype=torch.long, input_range=(0, 50), batch_size=2
    )
    assert report.allocator.lower_bound
    assert any("depend on the values" in note for note in report.allocator.unmodelled)
    measured = measure(bag, report.spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes <= measured.allocator_peak_bytes
    assert bag(ids).shape == (2, 16)  # the model is the user's still


class _MaskedScatter(torch.nn.Module):
    """Values scattered into a map where it is positive, then summed: `masked_scatter`'s backward
    selects the summed (broadcast) gradient by the mask, a kernel whose buffers depend on how many
    of the mask's values are true."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        return hidden.masked_scatter(hidden > 0, hidden * 2).sum(1)


def test_a_masked_scatter_backward_is_not_run_on_zeros() -> None:
    """On zeros its mask selects nothing, and the kernel skips its index buffers: measured so, the
    step was printed as exact at 0.64 of its allocator peak."""
    torch.manual_seed(0)
    model = _MaskedScatter()
    report = predict_memory(model, input_size=(16,), batch_size=16)
    assert any(
        "masked_scatter_backward" in note and "depend on the values" in note
        for note in report.allocator.unmodelled
    )
    measured = measure(model, report.spec, batch_size=16)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes <= measured.allocator_peak_bytes


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_kernel_this_torch_lacks_for_the_dtype_is_refused_as_measure_refuses(mode: str) -> None:
    """`nn.LocalResponseNorm` of a 2-d map runs `avg_pool3d`, which has no CPU kernel for
    bfloat16: the step fails for real, and the prediction says so in the same line (it printed
    the live figure as exact)."""
    from torch import nn

    from ninlab.errors import NinlabError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(3)).to(torch.bfloat16)
    fields = {"input_size": (3, 12, 12), "mode": mode, "dtype": "bfloat16"}
    with pytest.raises(NinlabError) as measured:
        measure(model, batch_size=2, **fields)
    with pytest.raises(NinlabError) as predicted:
        predict_memory(model, batch_size=2, **fields)
    assert str(predicted.value) == str(measured.value)
    assert str(predicted.value).startswith("this PyTorch has no cpu kernel avg_pool3d")


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_matrix_exponential_is_not_run_on_zeros(mode: str) -> None:
    """`torch.matrix_exp` keeps as many products as its norm asks for, the fewest on zeros: an
    orthogonal parametrization's step (a 16x16 weight's exponential) was printed as exact at
    0.59 of its allocator peak."""
    torch.manual_seed(0)
    model = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(16, 16))
    report = predict_memory(model, input_size=(16,), batch_size=2, mode=mode)
    assert report.allocator_trust.kind == "at least"
    assert any(
        "linalg_matrix_exp" in note and "depend on the values" in note
        for note in report.allocator.unmodelled
    )
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes <= measured.allocator_peak_bytes


class _Experts(nn.Module):
    """A mixture of experts' batched matmul: 16 rows to each of 4 experts."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 32, 48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor([16, 32, 48, 64], dtype=torch.int32)
        return torch._grouped_mm(x.reshape(-1, 32), self.weight, offs=offsets)


@needs_cpu_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_products_whose_blocks_follow_the_routing_are_a_lower_bound(dtype):
    """`_grouped_mm` multiplies each expert's rows on its own: in bfloat16 each product takes a
    scratch block sized by how many rows the routing gave it, which zeros (no rows anywhere)
    never take; so that figure is "at least" (it was printed exact, 0.70 of the measured), and
    in float32, where the products take no blocks, exact."""
    model = _Experts().to(dtype)
    report = predict_memory(model, input_size=(32, 32), batch_size=2)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    if dtype == torch.float32:
        assert report.allocator_trust.kind == "exact"
        assert report.allocator_peak_bytes == measured.allocator_peak_bytes
    else:
        assert report.allocator_trust.kind == "at least"
        assert report.allocator_peak_bytes < measured.allocator_peak_bytes


class _QuantizedLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(16, 24, batch_first=True)
        self.head = torch.nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_a_call_holding_a_torchscript_object_keys_the_cache_by_its_identity() -> None:
    """A dynamically quantized LSTM hands `quantized_lstm` its packed weights as TorchScript
    objects, whose `==` raises: the second prediction, finding the call measured, raised
    NotImplementedError. The call is measured once, and both predictions are exact."""
    torch.manual_seed(0)
    model = torch.ao.quantization.quantize_dynamic(
        _QuantizedLSTM(), {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
    )
    reports = [
        predict_memory(model, input_size=(6, 16), mode="infer", batch_size=2) for _ in range(2)
    ]
    measured = measure(model, reports[0].spec, batch_size=2)
    for report in reports:
        assert report.allocator_trust.exact
        assert report.live_peak_bytes == measured.live_peak_bytes == 2_496
        assert report.allocator_peak_bytes == measured.allocator_peak_bytes
