"""The fast path on fake tensors: remembered outputs, constants, and `clear_caches`."""

import pytest
import torch
from conftest import needs_cpu_grouped_mm
from torch import nn

from ninlab.analysis.fake_fast_path import FakeOutputs, clear_caches, op_traits
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.torch_internals import FakeTensor, FakeTensorMode
from ninlab.analysis.trace import record_step


def test_remembered_outputs_change_no_recording():
    """Op outputs are made from what earlier calls returned, remembered across recordings: a
    recording at batch 3 after one at batch 2 (the optimizer's ops see the same parameters, the
    activations new shapes) is the one made with nothing remembered, op by op and storage
    by storage."""
    from cnn_zoo import resnet_bn

    model, spec = resnet_bn(), StepSpec((3, 32, 32), optimizer="adam")
    clear_caches()
    cold = record_step(model, spec, 3)
    record_step(model, spec, 2)
    warm = record_step(model, spec, 3)
    assert warm.recording.ops == cold.recording.ops
    assert lives(warm) == lives(cold)
    assert warm.recording.saved_for_backward == cold.recording.saved_for_backward
    assert warm.optimizer_state_keys == cold.optimizer_state_keys


def lives(step):
    """Each storage's bytes, shape, role, birth and death, a death after the last op read as none:
    what outlives the step dies when the recording's own objects do, whenever the collector runs."""
    last = len(step.recording.ops) - 1
    return {
        key: (
            r.nbytes,
            r.shape,
            r.role,
            r.created_at,
            None if r.freed_after == last else r.freed_after,
        )
        for key, r in step.recording.storages.items()
    }


def test_adam_step_counts_are_counted_on_their_constants():
    """Adam keeps each step count in a real scalar, which FakeTensorMode holds as a constant; the
    recorder makes it (`torch.tensor(0.0)`) and counts it (`step += 1`, `item()`) itself, as
    FakeTensorMode would: after the warm-up and the recorded step every count is 2, a 4-byte
    storage of the optimizer state."""
    from cnn_zoo import resnet_bn

    made: list[torch.optim.Optimizer] = []

    def adam(model: nn.Module) -> torch.optim.Optimizer:
        made.append(torch.optim.Adam(model.parameters()))
        return made[-1]

    step = record_step(resnet_bn(), StepSpec((3, 32, 32), optimizer=adam), 2)
    counts = [state["step"] for state in made[0].state.values()]
    assert len(counts) == len(step.parameter_keys)
    assert all(type(count) is FakeTensor and count.constant.item() == 2.0 for count in counts)
    scalars = [step.recording.storages[key] for key in step.optimizer_state_keys]
    assert [record.nbytes for record in scalars if record.shape == ()] == [4] * len(counts)


def test_clear_caches_forgets_every_output_and_what_each_op_is(monkeypatch):
    """After `clear_caches` a recording makes its outputs through FakeTensorMode as the first one
    did, and each op's traits are found again; without it, a repeat makes most outputs itself."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    spec = StepSpec((3, 8, 8), optimizer="sgd")
    dispatched = []
    fake_dispatch = FakeTensorMode.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        dispatched.append(func)
        return fake_dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(FakeTensorMode, "__torch_dispatch__", counting)

    def fake_kernels_run():
        dispatched.clear()
        record_step(model, spec, 2)
        return len(dispatched)

    # A first recording: what other modules remember (the convolution's backend, found by
    # asking PyTorch, which dispatches) is then remembered for every count below.
    fake_kernels_run()
    clear_caches()
    cold = fake_kernels_run()
    warm = fake_kernels_run()
    relu = op_traits(torch.ops.aten.relu.default)
    clear_caches()
    assert op_traits(torch.ops.aten.relu.default) is not relu
    assert fake_kernels_run() == cold > warm


class _ConstantWeight(nn.Module):
    """A PReLU whose weight the forward makes with `torch.tensor` (a constant) and views."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 256)

    def forward(self, x):
        return nn.functional.prelu(self.linear(x), torch.tensor([0.25])).sum(1)


def test_a_view_of_a_constant_is_a_view_of_its_storage():
    """FakeTensorMode computes an op on constants for real and makes a fake of another storage;
    a view made so would count its bytes again (4 live bytes over, printed as exact)."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    model = _ConstantWeight()
    step = record_step(model, StepSpec((16,), mode="infer"), 16)
    ops = step.recording.ops[step.step_start :]
    (made,) = [op for op in ops if op.op == "aten.lift_fresh.default"]
    (viewed,) = [op for op in ops if op.op == "aten.view.default"]
    assert viewed.outputs[0].storage_key == made.outputs[0].storage_key
    report = predict_memory(model, input_size=(16,), batch_size=16, mode="infer")
    assert report.live_peak_bytes == measure(model, report.spec, batch_size=16).live_peak_bytes


_GROUPED_MM_CALLS = {
    # a mixture of experts' forward: each group of rows times its expert's matrix
    "rows x experts": lambda dtype: (
        torch.ones(12, 8, dtype=dtype),
        torch.ones(3, 8, 16, dtype=dtype),
    ),
    # its weight gradient: the rows' contraction cut into groups
    "transposed rows x rows": lambda dtype: (
        torch.ones(12, 8, dtype=dtype).t(),
        torch.ones(12, 16, dtype=dtype),
    ),
    # its input gradient: each group times its expert's matrix transposed
    "rows x experts transposed": lambda dtype: (
        torch.ones(12, 16, dtype=dtype),
        torch.ones(3, 8, 16, dtype=dtype).transpose(-2, -1),
    ),
}


@needs_cpu_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", sorted(_GROUPED_MM_CALLS))
def test_grouped_mm_outputs_are_the_cpu_kernels(call, dtype):
    """`_grouped_mm`'s fake kernel is CUDA's and refuses float32, which the CPU kernel multiplies:
    on CPU the output is made as the CPU kernel makes it, shape, strides and dtype, float32
    included (a Mixtral in float32 was refused, its input blamed)."""
    a, b = _GROUPED_MM_CALLS[call](dtype)
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    real = torch._grouped_mm(a, b, offs)
    with FakeTensorMode() as mode:
        fake_a, fake_b, fake_offs = (mode.from_tensor(t) for t in (a, b, offs))
        fake = FakeOutputs(mode).run(
            torch.ops.aten._grouped_mm.default, (fake_a, fake_b, fake_offs), {}
        )
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


@needs_cpu_grouped_mm
@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.ones(12, 8, dtype=torch.float64), torch.ones(3, 8, 16, dtype=torch.float64)),
        (torch.ones(12, 8), torch.ones(3, 8, 6)),  # rows of 24 bytes
        (torch.ones(12, 8, dtype=torch.bfloat16), torch.ones(3, 8, 16)),
    ],
    ids=["float64", "unaligned", "mixed dtypes"],
)
def test_grouped_mm_refuses_what_the_cpu_kernel_refuses(a, b):
    """What the CPU kernel refuses (float64, rows not whole 16-byte steps, two dtypes), the fake
    one refuses too, so no step that fails for real is predicted."""
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError):
        torch._grouped_mm(a, b, offs)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError):
        FakeOutputs(mode).run(
            torch.ops.aten._grouped_mm.default, tuple(map(mode.from_tensor, (a, b, offs))), {}
        )


class _Experts(nn.Module):
    """A mixture of experts' products as Hugging Face's MoE layers make them: the tokens sorted
    by expert, multiplied by `F.grouped_mm` with each expert's weights (offsets given)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(4, 16, 32) * 0.1)
        self.down = nn.Parameter(torch.randn(4, 32, 16) * 0.1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        tokens = x.reshape(-1, 16)
        ends = torch.arange(1, 5, dtype=torch.int32, device=x.device) * (tokens.shape[0] // 4)
        hidden = torch.nn.functional.grouped_mm(tokens, self.up, offs=ends)
        out = torch.nn.functional.grouped_mm(torch.relu(hidden), self.down, offs=ends)
        return self.head(out.view(x.shape).mean(1))


@needs_cpu_grouped_mm
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_experts_grouped_products_in_float32_are_the_cpu_kernels(mode):
    """The fake kernel of `_grouped_mm` is CUDA's checks, which refuse float32: every Hugging
    Face MoE model (Mixtral, DeepSeek-V3, gpt-oss) was refused where the real step runs. Its
    output is made as the CPU kernel makes it, and the step is exact."""
    model = _Experts()
    report = predict_memory(model, input_size=(8, 16), mode=mode, batch_size=2)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_trust.exact and report.allocator_trust.exact
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
