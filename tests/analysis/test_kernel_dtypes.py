"""Calls whose fake kernels accept a mix of dtypes that the CPU kernel refuses are refused as the
real step fails, in one line naming the op, the dtypes and the cast; the mixes the CPU kernel
runs are predicted with its outputs' dtypes (`ninlab.analysis.kernel_dtypes`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.errors import NinlabError


class _FloatNorm(nn.Module):
    """A bf16 model that normalises in float32 with its own bf16 parameters (the "norm in full
    precision" pattern, `x.float()` before the norm), which the CPU kernels refuse."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(16, 32)
        self.norm = {
            "layer_norm": nn.LayerNorm(8),
            "group_norm": nn.GroupNorm(2, 4),
            "batch_norm": nn.BatchNorm2d(4),
            "instance_norm": nn.InstanceNorm2d(4, affine=True),
        }[kind]
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x).float()
        norm = self.norm
        if self.kind == "layer_norm":
            h = F.layer_norm(h.view(-1, 4, 8), (8,), norm.weight, norm.bias)
        elif self.kind == "group_norm":
            h = F.group_norm(h.view(-1, 4, 2, 4), 2, norm.weight, norm.bias)
        elif self.kind == "batch_norm":
            stats = (norm.running_mean, norm.running_var)
            h = F.batch_norm(h.view(-1, 4, 2, 4), *stats, norm.weight, norm.bias, self.training)
        else:
            h = F.instance_norm(h.view(-1, 4, 2, 4), weight=norm.weight, bias=norm.bias)
        return h.flatten(1)[:, :10].to(torch.bfloat16)


@pytest.mark.parametrize(
    ("kind", "op"),
    [
        ("layer_norm", "native_layer_norm"),
        ("group_norm", "native_group_norm"),
        ("batch_norm", "native_batch_norm"),
        ("instance_norm", "native_batch_norm"),
    ],
)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_float32_input_normalised_with_bf16_parameters_is_refused(
    kind: str, op: str, mode: str
) -> None:
    """The fake kernels promote them: every one was printed as exact where the real step fails
    ("mixed dtype (CPU): expect parameter to have scalar type of Float"; torch 2.8 to 2.14.1)."""
    fields: dict[str, Any] = {"input_size": (16,), "mode": mode, "optimizer": "sgd"}
    with pytest.raises(NinlabError, match=r"^a normalisation of the model has parameters of an"):
        measure(_FloatNorm(kind), batch_size=2, **fields)
    with pytest.raises(NinlabError) as refused:
        predict_memory(_FloatNorm(kind), batch_size=2, **fields)
    assert str(refused.value).startswith(
        f"{op}: the CPU kernel refuses its tensors' mix of dtypes (input float32, weight "
        "bfloat16, bias bfloat16"
    )
    # Batch norm's running statistics too: "weight, bias, running_mean and running_var".
    assert "; cast the weight" in str(refused.value)
    assert str(refused.value).endswith("to float32, the input's dtype")


_CLASS_WEIGHTS = torch.rand(10)


def _loss_step(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
        optimizer.zero_grad()
        value = loss(model(inputs), targets)
        value.backward()
        optimizer.step()
        return value

    return step


def _one_hot(targets: torch.Tensor) -> torch.Tensor:
    return F.one_hot(targets, 10).float()


@pytest.mark.parametrize(
    ("loss", "op", "dtypes", "cast"),
    [
        (
            lambda out, y: F.cross_entropy(out, y, weight=_CLASS_WEIGHTS),
            "nll_loss_forward",
            "input bfloat16, weight float32",
            "cast the weight to bfloat16",
        ),
        (
            lambda out, y: F.nll_loss(out.log_softmax(1), y, weight=_CLASS_WEIGHTS),
            "nll_loss_forward",
            "input bfloat16, weight float32",
            "cast the weight to bfloat16",
        ),
        (
            lambda out, y: F.binary_cross_entropy(out.sigmoid(), _one_hot(y)),
            "binary_cross_entropy",
            "input bfloat16, target float32",
            "cast the target to bfloat16",
        ),
        (
            lambda out, y: F.binary_cross_entropy(out.float().sigmoid(), _one_hot(y).bfloat16()),
            "binary_cross_entropy",
            "input float32, target bfloat16",
            "cast the target to float32",
        ),
        (
            # Its forward runs (a bf16 loss on CPU, float32 on fake tensors), its backward not.
            lambda out, y: F.huber_loss(out, _one_hot(y)),
            "huber_loss_backward",
            "grad_output bfloat16, input bfloat16, target float32",
            "cast the target to bfloat16",
        ),
    ],
)
def test_a_loss_given_a_weight_or_target_of_another_dtype_is_refused(
    loss: Callable[..., torch.Tensor], op: str, dtypes: str, cast: str
) -> None:
    """A bf16 model's loss given float32 class weights or targets (and the reverse): predicted
    as exact where the real step fails."""
    model = nn.Linear(16, 10).to(torch.bfloat16)
    fields = {"input_size": (16,), "step": _loss_step(loss)}
    with pytest.raises(NinlabError):
        measure(model, batch_size=2, **fields)
    with pytest.raises(NinlabError) as refused:
        predict_memory(model, batch_size=2, **fields)
    assert str(refused.value).startswith(f"{op}: the CPU kernel refuses")
    assert f"({dtypes}: RuntimeError: " in str(refused.value)
    assert cast in str(refused.value)


class _SampledFloat(nn.Module):
    """`grid_sample` of a bf16 map on a float32 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        grid = torch.tanh(h[:, :8].float()).reshape(-1, 2, 2, 2)
        return F.grid_sample(h.view(-1, 2, 4, 4), grid, align_corners=False).flatten(1)


def test_an_op_no_one_listed_is_refused_too() -> None:
    """Found by running the op once on small real tensors, not by a list of ops."""
    with pytest.raises(NinlabError, match="expected scalar type"):
        measure(_SampledFloat(), input_size=(16,), batch_size=2, mode="infer")
    with pytest.raises(NinlabError, match=r"^grid_sampler_2d: .*input bfloat16, grid float32"):
        predict_memory(_SampledFloat(), input_size=(16,), batch_size=2, mode="infer")


class _HuberScore(nn.Module):
    """A Huber loss of a bf16 activation against float32 values, as the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 64)
        self.register_buffer("goal", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(self.linear(x), self.goal.expand(x.shape[0], 64), reduction="none")


class _Unaffine(nn.Module):
    """A batch norm without parameters under bf16 autocast: its running statistics, float32,
    make it the mixed-type kernel, which keeps the saved statistics in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8, affine=False)
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("build", "fields"),
    [
        (_HuberScore, {"input_size": (16,), "mode": "infer", "amp": "bf16"}),
        (_Unaffine, {"input_size": (3, 8, 8), "optimizer": "sgd", "amp": "bf16"}),
    ],
)
def test_a_mix_the_cpu_kernel_runs_takes_its_outputs_dtypes(
    build: Callable[[], nn.Module], fields: dict[str, Any]
) -> None:
    """The fake kernels promote a Huber loss of bf16 and float32 to float32 (the CPU kernel
    keeps bfloat16: the output predicted at twice its bytes)."""
    report = predict_memory(build(), batch_size=4, **fields)
    measured = measure(build(), report.spec, batch_size=4)
    assert report.live_trust.exact and report.allocator_trust.exact
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == pytest.approx(measured.allocator_peak_bytes, rel=0.01)
