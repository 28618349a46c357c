"""Any model a user brings (tests/any_models.py): every kind either summarises to PyTorch's own
counts (parameters as `sum(p.numel())`, FLOPs as `FlopCounterMode` on a real forward and backward)
or is refused in one line that names the real cause."""

from __future__ import annotations

from typing import Any

import any_models
import pytest
import torch
from cli_run import run
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, builtin_loss, builtin_targets, example_inputs
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.viz.render import summary_csv

STAND_IN = "stand-in sum of outputs — not your loss"
CROSS_ENTROPY = "cross-entropy against class labels"


def torch_counts(model: nn.Module, spec: StepSpec, batch_size: int) -> tuple[int, int, int]:
    """Parameters, forward FLOPs (eval, no grad) and backward FLOPs (a training forward, the
    built-in loss and backward), counted by PyTorch itself on real tensors."""
    torch.manual_seed(0)
    inputs = example_inputs(spec, batch_size, torch.device("cpu"))
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model.eval()(*inputs)
    model.train()
    output = model(*inputs)
    loss = builtin_loss(output, builtin_targets(output, torch.device("cpu")))
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return (
        sum(p.numel() for p in model.parameters()),
        forward.get_total_flops(),
        backward.get_total_flops(),
    )


KINDS: dict[str, tuple[Any, dict[str, Any], tuple[tuple[int, ...], ...], str]] = {
    # name: (factory, summarize's input, the model's output shapes at batch 2, the loss)
    "vector in (784)": (any_models.mlp, {"input_size": (784,)}, ((2, 10),), CROSS_ENTROPY),
    "feature map out": (
        any_models.autoencoder,
        {"input_size": (1, 16, 16)},
        ((2, 1, 16, 16),),
        STAND_IN,
    ),
    **{
        f"{kind} out": (
            lambda kind=kind: any_models.TwoHeads(kind),
            {"input_size": (3, 8, 8)},
            ((2, 5), (2, 4)),
            STAND_IN,
        )
        for kind in ("tuple", "list", "dict", "namedtuple", "dataclass")
    },
    "lstm (20x12)": (
        any_models.lstm,
        {"input_size": (20, 12)},
        ((2, 20, 16), (1, 2, 16), (1, 2, 16)),
        STAND_IN,
    ),
    "two inputs": (
        any_models.siamese,
        {"input_size": ((1, 16, 16), (1, 16, 16))},
        ((2,),),
        STAND_IN,
    ),
    "token ids": (
        any_models.text_cnn,
        {"input_size": (10,), "input_dtype": "long", "input_range": (0, 100)},
        ((2, 3),),
        CROSS_ENTROPY,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_summarises_to_pytorchs_own_counts(kind: str) -> None:
    factory, given, output_shapes, loss = KINDS[kind]
    model = factory()
    summary = summarize(model, batch_size=2, **given)
    spec = StepSpec(**given)
    parameters, forward, backward = torch_counts(model, spec, 2)
    totals = summary.totals
    assert (totals.parameters, totals.forward_flops, totals.backward_flops) == (
        parameters,
        forward,
        backward,
    )
    assert summary.layers[0].output_shapes == output_shapes
    assert summary.loss == loss
    assert summary.input_sizes == spec.input_sizes


def test_the_table_shows_every_output_and_states_the_stand_in_loss(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = summarize(any_models.lstm(), input_size=(20, 12), batch_size=2)
    assert summary_csv(summary).splitlines()[1].startswith(',LSTM,0,"2x20x16, 1x2x16, 1x2x16",')
    code, out, err = run(
        capsys, "summary", "--model", "any_models:autoencoder", "--input", "1x16x16", "--batch", "2"
    )
    assert (code, err) == (0, "")
    assert f"loss: {STAND_IN}" in out  # in the FLOPs line and again in the memory section
    assert out.count(STAND_IN) == 2


def test_geometry_speaks_where_there_are_windows_and_only_there() -> None:
    mlp = summarize(any_models.mlp(), input_size=(784,), batch_size=1)
    assert mlp.smallest_input_size is None and mlp.input_reach == ()
    assert not any(layer.axes for layer in mlp.layers)
    text = summarize(
        any_models.text_cnn(), input_size=(10,), input_dtype="long", mode="infer", batch_size=1
    )
    conv = next(layer for layer in text.layers if layer.name == "conv")
    assert (conv.axes[0].input_size, conv.axes[0].output_size) == (
        10,
        8,
    )  # a window, on embedded tokens
    assert text.smallest_input_size is None  # its axis is not an axis of the input
    assert summarize(
        any_models.autoencoder(), input_size=(1, 15, 15), mode="infer", batch_size=1
    ).smallest_input_size == (1, 1, 1)


def test_frozen_parameters_summarise_in_a_forward():
    model = any_models.fine_tuned()
    summary = summarize(model, input_size=(3, 8, 8), batch_size=2, mode="infer")
    parameters, forward, _ = torch_counts(model, StepSpec(input_size=(3, 8, 8)), 2)
    assert (summary.totals.parameters, summary.totals.forward_flops) == (parameters, forward)
    assert summary.totals.frozen_parameters == 4 * 3 * 3 * 3
    assert summary.loss == "" and summary.totals.backward_flops == 0


def test_frozen_parameters_train():
    model = any_models.fine_tuned()
    summary = summarize(model, input_size=(3, 8, 8), batch_size=2)
    assert (
        summary.totals.backward_flops == torch_counts(model, StepSpec(input_size=(3, 8, 8)), 2)[2]
    )


def test_lazy_modules_take_their_shapes_from_the_input_and_stay_lazy():
    lazy, eager = any_models.lazy_cnn(), any_models.eager_cnn()
    summary = summarize(lazy, input_size=(1, 8, 8), batch_size=2)
    parameters, forward, backward = torch_counts(eager, StepSpec(input_size=(1, 8, 8)), 2)
    assert (
        summary.totals.parameters,
        summary.totals.forward_flops,
        summary.totals.backward_flops,
    ) == (
        parameters,
        forward,
        backward,
    )
    lazy_report = predict_memory(lazy, batch_size=4, input_size=(1, 8, 8), optimizer="adam")
    eager_report = predict_memory(eager, batch_size=4, input_size=(1, 8, 8), optimizer="adam")
    assert lazy_report.live_peak_bytes == eager_report.live_peak_bytes
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in lazy.parameters())
    assert type(lazy[0]) is nn.LazyConv2d


def test_d2l_nin_written_lazily_summarises_as_the_eager_one():
    summary = summarize(any_models.d2l_nin(), input_size=(1, 224, 224), mode="infer", batch_size=1)
    assert summary.totals.parameters == 1_992_166
    assert summary.smallest_input_size == (1, 67, 67)


def test_example_tensors_give_sizes_dtype_and_range():
    spec = StepSpec(input_size=[torch.zeros(5, 1, 28, 28), torch.zeros(5, 1, 28, 28)])
    assert spec.input_sizes == ((1, 28, 28), (1, 28, 28))
    tokens = StepSpec(input_size=torch.tensor([[3, 7, 9]]))
    assert (tokens.input_size, tokens.input_dtype, tokens.input_range) == (
        (3,),
        torch.int64,
        (3, 10),
    )
    # The examples' batch is the batch: 3 samples of 10 token ids.
    summary = summarize(any_models.text_cnn(), input_size=torch.randint(0, 100, (3, 10)))
    assert summary.input_dtype == "int64" and summary.layers[0].output_shapes == ((3, 3),)


@pytest.mark.parametrize(
    ("factory", "size", "cause"),
    [
        (any_models.scripted, (4,), "the model is a scripted module"),
        (
            any_models.needs_targets,
            (8,),
            "the model needs its targets to run in training mode .*mode 'infer'",
        ),
        (
            any_models.branches_on_values,
            (8,),
            "forward depends on tensor values .*data-dependent control flow",
        ),
        (any_models.returns_number, (8,), "ReturnsNumber.forward returned no tensor"),
        (any_models.siamese, (1, 16, 16), "forward takes 2 inputs and 1 were given"),
    ],
)
def test_what_cannot_work_is_one_line_naming_the_cause(factory, size, cause):
    with pytest.raises(NinlabError, match=cause) as refused:
        summarize(factory(), input_size=size, batch_size=2)
    message = str(refused.value)
    assert "\n" not in message and "--input" not in message.replace("--input once", "")


def test_cli_takes_vectors_several_inputs_and_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "summary",
        "--model",
        "any_models:mlp",
        "--input",
        "784",
        "--batch",
        "2",
        "--format",
        "csv",
    )
    assert code == 0 and ",Linear,1,2x32," in out
    code, out, _ = run(
        capsys,
        "summary",
        "--model",
        "any_models:siamese",
        "--input",
        "1x16x16",
        "--input",
        "1x16x16",
        "--batch",
        "2",
        "--format",
        "csv",
    )
    assert code == 0 and out.splitlines()[1].startswith(",Siamese,0,2,")
    code, out, _ = run(
        capsys,
        "summary",
        "--model",
        "any_models:text_cnn",
        "--input",
        "10",
        "--input-dtype",
        "long",
        "--input-range",
        "0:100",
        "--batch",
        "2",
    )
    assert code == 0 and "batch 2 x 10 int64 inputs" in out
    code, _, err = run(capsys, "summary", "--model", "any_models:scripted", "--input", "4")
    assert code == 2 and err.count("\n") == 1 and "scripted module" in err


@pytest.mark.parametrize(
    ("factory", "given"),
    [
        (any_models.siamese, {"input_size": ((1, 16, 16), (1, 16, 16))}),
        (
            any_models.text_cnn,
            {"input_size": (10,), "input_dtype": "long", "input_range": (0, 100)},
        ),
        (lambda: any_models.TwoHeads("dataclass"), {"input_size": (3, 8, 8)}),
        (any_models.lazy_cnn, {"input_size": (1, 8, 8)}),
    ],
    ids=["two inputs", "token ids", "dataclass out", "lazy"],
)
def test_predicted_training_memory_equals_measured(factory, given):
    predicted = predict_memory(factory(), batch_size=4, optimizer="adam", **given)
    assert (
        predicted.live_peak_bytes
        == measure(factory(), batch_size=4, optimizer="adam", **given).live_peak_bytes
    )


class _TakesLabelsFailsElsewhere(nn.Module):
    """Takes `labels=None` as a Hugging Face model does, and trains without them; its forward
    fails for a reason of its own (Mixtral's experts under float32 on fake tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("Expected mat_a to be BFloat16 or supported Float16 matrix")


def test_an_optional_labels_argument_is_not_blamed_for_an_error_of_another_kind():
    with pytest.raises(NinlabError) as refused:
        predict_memory(_TakesLabelsFailsElsewhere(), input_size=(8,), batch_size=2)
    assert "needs its targets" not in str(refused.value)
    assert "Expected mat_a to be BFloat16" in str(refused.value)
