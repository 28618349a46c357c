"""Measured peaks of real steps: exact live-storage figures (the issue's NiN figures at batch 128
among them), the allocator level above them, and a cross-check of the live level against the
profiler's own tensor identity, a mechanism that shares nothing with a dispatch mode."""

from __future__ import annotations

import copy as copy_module
import functools

import pytest
import torch
from cnn_zoo import ZOO
from layer_zoo import VmapEnsemble
from steps import reentrant_step
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from ninlab.analysis.measure import Measurement, measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, train_step
from ninlab.cli import main
from ninlab.errors import NinlabError
from ninlab.models import resolve_model
from ninlab.optimizers import make_optimizer

NIN_PARAMETERS_BYTES = 1_992_166 * 4


# Allocator figures depend on the thread count (oneDNN's choices): two, as in CI.
pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def nin() -> torch.nn.Module:
    return resolve_model("nin-d2l")


def nin_train(optimizer: str) -> StepSpec:
    return StepSpec(input_size=(1, 224, 224), optimizer=optimizer)


def nin_infer(grad_mode: str = "no_grad") -> StepSpec:
    return StepSpec(input_size=(1, 224, 224), mode="infer", grad_mode=grad_mode)  # type: ignore[arg-type]


@functools.cache
def measured(name: str, spec: StepSpec, batch_size: int) -> Measurement:
    """One measurement of a step, shared by a test of the live level and its `machine` twin of the
    allocator level (both run with the two threads the autouse fixture pins)."""
    model = resolve_model(name) if name == "nin-d2l" else ZOO[name].factory()
    return measure(model, spec, batch_size=batch_size)


def test_nin_training_step_at_batch_2() -> None:
    sgd = measured("nin-d2l", nin_train("sgd"), 2)
    assert sgd.baseline.parameters_bytes == sgd.baseline.gradients_bytes == NIN_PARAMETERS_BYTES
    assert (sgd.baseline.input_bytes, sgd.baseline.targets_bytes) == (2 * 224 * 224 * 4, 2 * 8)
    assert sgd.live_peak_bytes == 28_430_744
    assert (sgd.live_peak_op, sgd.live_peak_phase) == ("aten::threshold_backward", "backward")
    adam = measured("nin-d2l", nin_train("adam"), 2)
    # Adam adds two moments per parameter and a float32 step counter per parameter tensor (24).
    assert adam.baseline.optimizer_state_bytes == 2 * NIN_PARAMETERS_BYTES + 24 * 4
    assert adam.live_peak_bytes - sgd.live_peak_bytes == adam.baseline.optimizer_state_bytes


@pytest.mark.machine
@pytest.mark.torch_build
def test_nin_training_step_at_batch_2_allocator_level() -> None:
    sgd = measured("nin-d2l", nin_train("sgd"), 2)
    assert sgd.allocator_peak_bytes == 30_824_344
    assert sgd.allocator_peak_phase == "backward"
    adam = measured("nin-d2l", nin_train("adam"), 2)
    assert (
        adam.allocator_peak_bytes - sgd.allocator_peak_bytes == adam.baseline.optimizer_state_bytes
    )


def test_nin_inference_at_batch_2_is_the_same_under_both_guards() -> None:
    for grad_mode in ("no_grad", "inference_mode"):
        result = measured("nin-d2l", nin_infer(grad_mode), 2)
        # parameters + input + conv1's output + ReLU's output
        assert (
            result.live_peak_bytes
            == NIN_PARAMETERS_BYTES + 401_408 + 2 * 2 * 96 * 54 * 54 * 4
            == 12_849_048
        )
        assert result.live_peak_op == "aten::relu"


@pytest.mark.machine
@pytest.mark.torch_build
def test_nin_inference_at_batch_2_allocator_level_under_both_guards() -> None:
    for grad_mode in ("no_grad", "inference_mode"):
        result = measured("nin-d2l", nin_infer(grad_mode), 2)
        # the next 1x1 conv holds a blocked copy of its input and a blocked result as well
        assert result.allocator_peak_bytes == 15_125_400
        assert result.allocator_peak_op == "aten::mkldnn_convolution"


ZOO_AT_BATCH_4 = pytest.mark.parametrize(
    ("name", "train_live", "train_allocator", "infer_live", "infer_allocator"),
    [
        # Counted under a dispatch mode the ResNet's training peak was 3_532_552: a residual
        # gradient summed out of place (see `ninlab.analysis.measure`).
        ("resnet_bn", 3_467_016, 3_925_768, 1_412_656, 1_421_872),
        ("mobilenet_relu6", 2_951_312, 3_115_152, 704_888, 772_728),
        ("vgg_big_head", 26_920_512, 27_027_008, 9_187_752, 9_253_288),
        ("ceil_pool_net", 912_896, 931_456, 560_232, 560_232),
        ("grouped_net", 2_089_792, 2_393_280, 1_179_176, 1_459_752),
    ],
)


@ZOO_AT_BATCH_4
def test_zoo_at_batch_4(
    name: str, train_live: int, train_allocator: int, infer_live: int, infer_allocator: int
) -> None:
    entry = ZOO[name]
    train = measured(name, StepSpec(input_size=entry.input_size, optimizer="sgd-momentum"), 4)
    assert train.live_peak_bytes == train_live
    for grad_mode in ("no_grad", "inference_mode"):
        spec = StepSpec(input_size=entry.input_size, mode="infer", grad_mode=grad_mode)
        infer = measured(name, spec, 4)
        assert infer.live_peak_bytes == infer_live


@pytest.mark.machine
@pytest.mark.torch_build
@ZOO_AT_BATCH_4
def test_zoo_at_batch_4_allocator_level(
    name: str, train_live: int, train_allocator: int, infer_live: int, infer_allocator: int
) -> None:
    entry = ZOO[name]
    train = measured(name, StepSpec(input_size=entry.input_size, optimizer="sgd-momentum"), 4)
    assert train.allocator_peak_bytes == train_allocator
    for grad_mode in ("no_grad", "inference_mode"):
        spec = StepSpec(input_size=entry.input_size, mode="infer", grad_mode=grad_mode)
        infer = measured(name, spec, 4)
        assert infer.allocator_peak_bytes == infer_allocator


def test_vgg_inference_peak_counts_max_pool_indices_under_inference_mode() -> None:
    """inference_mode runs max_pool2d whole, as its parts: the indices its part makes count."""
    entry = ZOO["vgg_big_head"]
    result = measure(
        entry.factory(),
        StepSpec(input_size=entry.input_size, mode="infer", grad_mode="inference_mode"),
        batch_size=4,
    )
    assert result.live_peak_op == "aten::max_pool2d_with_indices"


class _Product(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.weight)


class _Unpool(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return F.max_unpool2d(values, indices, 2).flatten(1)


@pytest.mark.parametrize(
    ("build", "input_size", "live_bytes"),
    [(_Product, (64,), 14_080), (_Unpool, (3, 16, 16), 75_072)],
    ids=["mm", "max_unpool2d"],
)
def test_autocasts_casts_are_storages(
    build: type[torch.nn.Module], input_size: tuple[int, ...], live_bytes: int
) -> None:
    """Under autocast an op's arguments are cast inside its profiled call, and where nothing keeps
    the casts (an inference; `max_unpool2d`'s backward keeps only the indices) they die before it
    returns: they were taken for its workspace (13,568 live bytes for the `mm` inference, 66,880
    for the unpooling), though a dispatch mode, and the prediction, sees them as storages."""
    torch.manual_seed(0)
    model = build()
    spec = StepSpec(input_size=input_size, mode="infer", amp="bf16")
    assert measure(model, spec, batch_size=4).live_peak_bytes == live_bytes
    assert predict_memory(model, spec, batch_size=4).live_peak_bytes == live_bytes


def _profiler_tensor_peak(model: torch.nn.Module, spec: StepSpec, batch_size: int) -> int:
    """Live-storage peak from the profiler alone: allocations the profiler itself ties to a
    tensor some op read (its TensorID), summed in time order over the second step."""
    from torch._C._profiler import _EventType
    from torch.profiler import _utils

    torch.manual_seed(0)
    inputs = torch.randn(batch_size, *spec.input_size)
    targets = torch.randint(0, 10, (batch_size,))
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    level = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), inputs, targets])
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True
    ) as prof:
        train_step(model, optimizer, inputs, targets)
        with record_function("second"):
            train_step(model, optimizer, inputs, targets)
    events = list(_utils.traverse_dfs(prof.profiler.kineto_results.experimental_event_tree()))
    mark = next(e for e in events if e.name == "second")
    peak = 0
    for event in sorted(
        (e for e in events if e.typed[0] == _EventType.Allocation), key=lambda e: e.start_time_ns
    ):
        if event.typed[1].id is not None:
            level += event.typed[1].alloc_size
            if mark.start_time_ns <= event.start_time_ns <= mark.end_time_ns:
                peak = max(peak, level)
    return peak


@pytest.mark.canary
def test_live_level_agrees_with_the_profilers_tensor_identity(nin: torch.nn.Module) -> None:
    """PyTorch's profiler ties each tensor allocation to a TensorID; they sum to the live level."""
    spec = nin_train("sgd")
    peak = _profiler_tensor_peak(resolve_model("nin-d2l"), spec, 2)
    assert peak == measure(nin, spec, batch_size=2).live_peak_bytes


def test_cuda_without_a_gpu_is_a_clear_error(nin: torch.nn.Module) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the error ninlab gives without a GPU; this machine has one")
    spec = StepSpec(input_size=(1, 224, 224), device_type="cuda", optimizer="sgd")
    with pytest.raises(NinlabError, match="needs a GPU"):
        measure(nin, spec, batch_size=1)


@pytest.mark.cuda
def test_cuda_allocator_level_is_max_memory_allocated(nin: torch.nn.Module) -> None:
    result = measure(
        nin, StepSpec(input_size=(1, 224, 224), device_type="cuda", optimizer="sgd"), batch_size=8
    )
    assert result.allocator_method == "torch.cuda.max_memory_allocated"
    assert result.live_peak_bytes <= result.allocator_peak_bytes < 2 * result.live_peak_bytes
    assert result.reserved_peak_bytes is not None
    assert result.allocator_peak_bytes <= result.reserved_peak_bytes  # max_memory_reserved


def test_cli_prints_both_levels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "nin-d2l", "--batch", "2", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    assert "12,849,048" in out and "allocator" in out and "inference (no_grad)" in out


@pytest.mark.machine
@pytest.mark.torch_build
def test_cli_prints_the_allocator_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "nin-d2l", "--batch", "2", "--mode", "infer"]) == 0
    assert "15,125,400" in capsys.readouterr().out


@pytest.mark.slow
def test_issue_figures_at_batch_128(nin: torch.nn.Module) -> None:
    """The figures issue 3 gives for NiN, float32, batch 128, second step, on this CPU."""
    assert measure(nin, nin_train("sgd"), batch_size=128).live_peak_bytes == 1_027_460_920
    assert measure(nin, nin_infer(), batch_size=128).live_peak_bytes == 320_313_240


class _Deformable(torch.nn.Module):
    """torchvision's deformable convolution, a C++ op of another namespace whose kernel makes
    its columns buffer by an aten op inside it and frees it before it returns."""

    def __init__(self) -> None:
        super().__init__()
        ops = pytest.importorskip("torchvision.ops")
        self.offsets = torch.nn.Conv2d(4, 18, 3, padding=1)
        self.deformable = ops.DeformConv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deformable(x, self.offsets(x)).sum((1, 2, 3))


def test_another_librarys_op_is_an_op_its_temporaries_its_workspace() -> None:
    """The live level takes an op of another namespace (`torchvision::deform_conv2d`) as the op
    a dispatch mode is handed, as the predictor does: its columns buffer is not a storage."""
    from ninlab.analysis.predict import predict_memory

    model = _Deformable()
    spec = StepSpec(input_size=(4, 8, 8), mode="infer")
    result = measure(model, spec, batch_size=2)
    parameters = sum(p.numel() for p in model.parameters()) * 4
    batch = 2 * 4 * 8 * 8 * 4
    # At the op: the parameters, the input, the offsets (4.5 inputs), the (2, 1) float mask
    # torchvision makes where none is given, and its output.
    assert result.live_peak_bytes == parameters + batch + batch * 18 // 4 + 8 + batch
    assert result.live_peak_op == "torchvision::deform_conv2d"
    assert predict_memory(model, spec, batch_size=2).live_peak_bytes == result.live_peak_bytes


class _WhereANumber(nn.Module):
    """`torch.where` with a Python number for one side: an overload (where.ScalarOther) that
    runs as its parts, `scalar_tensor` and where.self, under a name that also has a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.where(y > 0, y, 0.5)


def test_a_composite_overloads_parts_are_ops_their_outputs_storages() -> None:
    """The number's 0-d tensor is `scalar_tensor`'s output, read by where.self, a storage as the
    predictor counts it, not a workspace of the `aten::where` the profiler shows around both."""
    model = _WhereANumber()
    spec = StepSpec(input_size=(16,), mode="infer")
    result = measure(model, spec, batch_size=2)
    parameters = (16 * 16 + 16) * 4
    # At where.self: the parameters, the input, the linear's output, the mask, the number (a
    # float32 0-d tensor) and where's output.
    assert result.live_peak_bytes == parameters + 2 * 16 * 4 * 3 + 2 * 16 + 4
    assert predict_memory(model, spec, batch_size=2).live_peak_bytes == result.live_peak_bytes


def _with_a_copy(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    """SGD, and a frozen copy of the model that the step moves towards it (an EMA by hand)."""
    copy = copy_module.deepcopy(model).requires_grad_(False)
    return torch.optim.SGD(model.parameters(), lr=0.1), copy


def _copy_step(model: torch.nn.Module, made, inputs, targets):
    optimizer, copy = made
    loss = train_step(model, optimizer, inputs, targets)
    with torch.no_grad():
        for kept, parameter in zip(copy.parameters(), model.parameters(), strict=True):
            kept.lerp_(parameter, 0.01)
    return loss


def test_a_factorys_module_is_held_whether_or_not_the_step_reads_it() -> None:
    # The copy's batch norm statistics (8 + 8 floats and a count) are read by no op of the step;
    # they were left out of the baseline, 72 bytes under the prediction.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 5),
    )
    spec = StepSpec(input_size=(3, 6, 6), optimizer=_with_a_copy, step=_copy_step)
    predicted = predict_memory(model, spec, batch_size=2)
    measured = measure(model, spec, batch_size=2)
    assert predicted.live_trust.exact
    assert measured.live_peak_bytes == predicted.live_peak_bytes
    assert measured.baseline.other_bytes >= 2 * 8 * 4 + 8


def test_a_generator_state_the_returned_loss_holds_is_alive() -> None:
    # A reentrant checkpoint keeps a copy of the CPU generator's state (5056 bytes, made by no
    # op) in its autograd context, which the first step's returned loss holds through the
    # measured step: the live level left it out (15,200 bytes against the allocator's 20,256).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    spec = StepSpec(input_size=(16,), step=reentrant_step)
    measured = measure(model, spec, batch_size=4)
    assert measured.live_peak_bytes == measured.allocator_peak_bytes == 20_256
    assert measured.live_peak_bytes == predict_memory(model, spec, batch_size=4).live_peak_bytes


@torch.library.custom_op("ninlab_tests::scaled_exp", mutates_args=())
def _scaled_exp(x: torch.Tensor) -> torch.Tensor:
    return x.exp() * 2 + 1  # two temporaries of x's size, freed inside the op


@_scaled_exp.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled_exp(self.linear(x)).sum(1)


def test_a_python_custom_ops_temporaries_are_its_workspace(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A dispatch mode is handed a `torch.library.custom_op` whole, so the blocks its Python
    kernel makes and frees are its workspace; once the kernel probe had run the op under a
    profile of its own (an empty kernel cache), the step's profile did not record it (torch
    2.14.1), and the measured live peak counted them (67,584 bytes against 51,200)."""
    monkeypatch.setenv("NINLAB_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = _CustomOp()
    report = predict_memory(model, input_size=(16,), batch_size=16, mode="infer")
    measured = measure(model, report.spec, batch_size=16)
    assert measured.live_peak_bytes == report.live_peak_bytes == 51_200
    assert measured.allocator_peak_bytes == report.allocator_peak_bytes


def test_a_vmap_ensembles_batching_rules_make_storages_not_workspace() -> None:
    """Under `torch.func.vmap` the profiler nests each op in a same-named call at vmap's level,
    which a dispatch mode is never handed: it is handed the batching rule's ops, and `addmm` of
    a batched weight is `bmm`, a `mul` of the bias and an `add`, three tensors alive at once.
    Taken for the vmap-level call's workspace, they measured 22,688 live bytes, 512 below the
    truth: the arithmetic, which the allocator's own records confirm at the same op."""
    members, hidden, batch = 4, 32, 8
    parameters = members * (hidden * 16 + hidden + 10 * hidden + 10) * 4
    inputs = batch * 16 * 4
    products = 2 * members * batch * hidden * 4  # bmm's and add's outputs
    bias = members * hidden * 4  # the bias times beta
    truth = parameters + inputs + products + bias
    model = VmapEnsemble(members, hidden)
    measured = measure(model, input_size=(16,), batch_size=batch, mode="infer")
    assert measured.live_peak_bytes == measured.allocator_peak_bytes == truth == 23_200
    predicted = predict_memory(model, measured.spec, batch_size=batch)
    assert predicted.live_trust.exact and predicted.live_peak_bytes == truth
    trained = measure(model, input_size=(16,), batch_size=batch, optimizer="adam")
    predicted = predict_memory(model, trained.spec, batch_size=batch)
    assert predicted.live_peak_bytes == trained.live_peak_bytes
