import gc

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ninlab.analysis import trace
from ninlab.analysis.step import StepSpec
from ninlab.analysis.trace import LayerInputTooSmall, record_step
from ninlab.models import build_nin


@pytest.fixture(scope="module")
def nin():
    return build_nin()


def step_ops(step):
    return step.recording.ops[step.step_start :]


def test_training_step_phases_and_backward_attribution(nin):
    step = record_step(nin, StepSpec((1, 224, 224), optimizer="sgd-momentum"), 2)
    ops = step_ops(step)
    assert [p for i, p in enumerate(o.phase for o in ops) if i == 0 or p != ops[i - 1].phase] == [
        "zero_grad", "forward", "loss", "backward", "optimizer",
    ]
    conv_backward = [(o.module, o.autograd_node) for o in ops if o.op == "aten.convolution_backward.default"]
    assert conv_backward[0] == ("7.4", "ConvolutionBackward0")  # backward runs last layer first
    assert conv_backward[-1] == ("0.0", "ConvolutionBackward0")
    assert len(conv_backward) == 12
    assert step.parameter_keys.keys() == step.gradient_keys.keys()
    assert len(step.optimizer_state_keys) == 24  # one momentum buffer per parameter tensor


def test_saved_for_backward_names_the_reasons(nin):
    step = record_step(nin, StepSpec((1, 224, 224), optimizer="sgd"), 2)
    saved = {(s.module, s.node, s.field) for s in step.recording.saved_for_backward}
    storages = step.recording.storages
    assert ("0.0", "ConvolutionBackward0", "input") in saved
    assert ("0.1", "ReluBackward0", "result") in saved
    assert ("1", "MaxPool2DWithIndicesBackward0", "result1") in saved  # the int64 indices
    assert ("", "NllLossBackward0", "target") in saved
    assert ("", "LogSoftmaxBackward0", "result") in saved
    indices = next(s for s in step.recording.saved_for_backward if s.module == "1" and s.field == "result1")
    assert storages[indices.storage_key].dtype == torch.int64
    assert storages[indices.storage_key].nbytes == 8 * 2 * 96 * 26 * 26
    # conv 0.2 keeps the ReLU output 0.1 keeps: one storage, counted once.
    relu = next(s for s in step.recording.saved_for_backward if s.module == "0.1")
    conv = next(s for s in step.recording.saved_for_backward if s.module == "0.2" and s.field == "input")
    assert relu.storage_key == conv.storage_key


def test_inference_mode_still_sees_max_pool_indices(nin):
    for grad_mode in ("no_grad", "inference_mode"):
        step = record_step(nin, StepSpec((1, 224, 224), mode="infer", grad_mode=grad_mode), 4)
        pools = [o for o in step.recording.ops if o.op == "aten.max_pool2d_with_indices.default"]
        assert [o.outputs[1].dtype for o in pools] == [torch.int64] * 3
        assert step.target_key == -1


@pytest.mark.canary
def test_cuda_step_uses_fused_dropout_and_foreach_optimizers(nin):
    """PyTorch fuses dropout (bool mask) and runs foreach optimizers on CUDA, not on CPU."""
    cpu = step_ops(record_step(nin, StepSpec((1, 224, 224), optimizer="adam"), 2))
    cuda = step_ops(record_step(nin, StepSpec((1, 224, 224), optimizer="adam", device_type="cuda"), 2))
    def dropout(ops):
        return [(o.op, tuple(t.dtype for t in o.outputs)) for o in ops if o.module == "6" and o.phase == "forward"]
    assert dropout(cuda) == [("aten.native_dropout.default", (torch.float32, torch.bool))]
    assert ("aten.bernoulli_.float", (torch.float32,)) in dropout(cpu)  # CPU keeps a float mask
    assert any(o.op.startswith("aten._foreach_") for o in cuda if o.phase == "optimizer")
    assert not any(o.op.startswith("aten._foreach_") for o in cpu if o.phase == "optimizer")


@pytest.mark.canary
def test_bf16_autocast_runs_convolutions_in_bf16(nin):
    """PyTorch's CPU autocast runs convolutions in bf16 and log-softmax in float32."""
    ops = step_ops(record_step(nin, StepSpec((1, 224, 224), amp="bf16", optimizer="sgd"), 2))
    convs = [o for o in ops if o.op == "aten.convolution.default"]
    assert {o.outputs[0].dtype for o in convs} == {torch.bfloat16}
    log_softmax = next(o for o in ops if o.op == "aten._log_softmax.default")
    assert log_softmax.outputs[0].dtype == torch.float32


def test_input_too_small_names_the_layer(nin):
    with pytest.raises(LayerInputTooSmall) as error:
        record_step(nin, StepSpec((1, 66, 66), mode="infer"), 1)
    assert (error.value.module, error.value.module_type, error.value.error.min_input_size) == ("5", "MaxPool2d", 3)


def test_the_model_is_left_untouched(nin):
    before = {name: p.clone() for name, p in nin.named_parameters()}
    nin.eval()
    record_step(nin, StepSpec((1, 224, 224), optimizer="adam"), 2)
    assert not nin.training
    assert all(torch.equal(before[name], p) and p.grad is None for name, p in nin.named_parameters())


@pytest.mark.canary
def test_batch_norm_statistics_stay_float32_under_autocast():
    """PyTorch's autocast lets batch norm take bf16 input but keeps its statistics float32."""
    from cnn_zoo import resnet_bn

    step = record_step(resnet_bn(), StepSpec((3, 32, 32), amp="bf16", optimizer="sgd"), 2)
    norms = [o for o in step_ops(step) if o.op == "aten.native_batch_norm.default"]
    assert norms and all(o.inputs[0].dtype == torch.bfloat16 for o in norms)
    assert {(o.outputs[0].dtype, o.outputs[1].dtype, o.outputs[2].dtype) for o in norms} == {
        (torch.bfloat16, torch.float32, torch.float32)
    }


def test_batch_norm_backward_keeps_a_channels_last_input_layout() -> None:
    """The CPU kernel writes batch norm's grad_input in its channels-last input's layout even when
    grad_output arrives NCHW (from average pooling); the fake kernel would give it NCHW, and the
    convolution backward before it would be predicted to copy it (MobileNet: 32 KB over)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    step = record_step(model, StepSpec(input_size=(16, 8, 8), memory_format="channels_last"), 4)
    (conv_backward,) = [op for op in step.recording.ops if op.op == "aten.convolution_backward.default"]
    assert conv_backward.cpu_allocations is not None, conv_backward.cpu_unmodelled
    assert not [a for a in conv_backward.cpu_allocations if "copy of the grad_output" in a.what]


def test_remembered_outputs_change_no_recording():
    """Op outputs are made from what earlier calls returned, remembered across recordings: a
    recording at batch 3 after one at batch 2 (the optimizer's ops see the same parameters, the
    activations new shapes) is the one made with nothing remembered, op by op and storage by storage."""
    from cnn_zoo import resnet_bn

    model, spec = resnet_bn(), StepSpec((3, 32, 32), optimizer="adam")
    trace._KNOWN_OUTPUTS.clear()
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
        key: (r.nbytes, r.shape, r.role, r.created_at, None if r.freed_after == last else r.freed_after)
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


@pytest.mark.parametrize("enabled", [True, False])
def test_recording_leaves_the_collector_as_it_was(enabled):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    (gc.enable if enabled else gc.disable)()
    try:
        record_step(model, StepSpec((4,), optimizer="sgd"), 2)
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


@pytest.mark.parametrize("op", [torch.mul, torch.add, torch.maximum])
def test_elementwise_outputs_take_the_strides_the_cpu_gives(op) -> None:
    """On a (N, C, 1, 1) map (after global pooling) channels-last strides are contiguous too, and
    TensorIterator then writes a contiguous output where the fake kernel keeps the input's strides;
    a max-pool backward reading the result copies it when the layouts disagree (NiN's dropout)."""
    real = torch.randn(4, 8, 1, 1).as_strided((4, 8, 1, 1), (8, 1, 8, 8))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        output = op(fake, fake)
        assert output.stride() == (8, 1, 8, 8)  # the fake kernel's strides
        corrected = trace._elementwise_layout((fake, fake), output)
    assert corrected.stride() == op(real, real).stride() == (8, 1, 1, 1)
    wider = torch.randn(4, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(wider)
        output = op(fake, fake)
        assert trace._elementwise_layout((fake, fake), output) is output
    assert output.stride() == op(wider, wider).stride()
