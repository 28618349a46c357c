"""The inputs a user's model takes: example tensors with their batch, inputs of several dtypes (a
graph network's float features and int64 edges), inputs by keyword name with a loss read from
the output (the Hugging Face calling convention), and one-line causes where inputs cannot work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, builtin_loss_words
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError


class Graph(nn.Module):
    """Message passing over a batch of graphs: x (N, V, 3) node features, edge_index (N, 2, E)
    int64 node numbers, which must stay below V."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        n, v, f = h.shape
        offset = (torch.arange(n, device=x.device) * v)[:, None]
        src, dst = ((edge_index[:, k] + offset).flatten() for k in (0, 1))
        messages = h.reshape(n * v, f).index_select(0, src)
        agg = torch.zeros(n * v, f, dtype=h.dtype).index_add(0, dst, messages)
        return self.out(agg.view(n, v, f).relu()).mean(1)


class TokenClassifier(nn.Module):
    """Called with keywords as a Hugging Face model is, returning a dict with its loss when given
    labels and its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids) * attention_mask[..., None]
        logits = self.head(hidden.mean(1))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = F.cross_entropy(logits, labels)
        return output


def test_an_example_tensor_gives_its_batch() -> None:
    summary = summarize(nn.Linear(8, 4), input_size=torch.randn(5, 8))
    assert summary.batch_size == 5 and summary.totals.forward_flops == 2 * 5 * 8 * 4  # was 64
    assert summarize(nn.Linear(8, 4), input_size=torch.randn(5, 8), batch_size=5).batch_size == 5
    with pytest.raises(NinlabError, match="batch size 3 differs from the example inputs' batch, 5"):
        summarize(nn.Linear(8, 4), input_size=torch.randn(5, 8), batch_size=3)
    with pytest.raises(NinlabError, match="give batch_size"):
        summarize(nn.Linear(8, 4), input_size=(8,))
    with pytest.raises(NinlabError, match="must share their batch"):
        StepSpec(input_size=(torch.randn(5, 8), torch.randn(4, 8)))


def test_examples_of_several_dtypes_and_by_name() -> None:
    x, edges = torch.randn(2, 10, 3), torch.randint(0, 10, (2, 2, 40))
    spec = StepSpec(input_size=(x, edges))
    assert spec.input_dtypes == (torch.float32, torch.int64) and spec.example_batch == 2
    assert spec.input_ranges == ((0, 2), (int(edges.min()), int(edges.max()) + 1))
    named = StepSpec(input_size={"x": x, "edge_index": edges})
    assert named.input_names == ("x", "edge_index") and named.input_sizes == ((10, 3), (2, 40))


def test_a_graph_network_of_float_and_int64_inputs_is_predicted_exactly() -> None:
    torch.manual_seed(0)
    model = Graph()
    spec = StepSpec(
        input_size=((10, 3), (2, 40)),
        input_dtype=(None, "int64"),
        input_range=(None, (0, 10)),
        optimizer="adam",
    )
    assert spec.input_dtypes == (torch.float32, torch.int64)
    assert spec.describe(2).endswith("float32 and int64 inputs, batch 2")
    for step in (spec, spec.inference()):
        report = predict_memory(model, step, batch_size=2)
        measured = measure(model, step, batch_size=2)
        assert report.live_peak_bytes == measured.live_peak_bytes
        assert report.held_peak_bytes == measured.allocator_peak_bytes
    summary = summarize(model, spec, batch_size=2)
    assert summary.input_dtype == "float32 and int64"


def test_inputs_by_name_and_the_loss_in_the_output() -> None:
    torch.manual_seed(0)
    model = TokenClassifier()
    sizes = {"input_ids": (16,), "attention_mask": (16,), "labels": ()}
    spec = StepSpec(input_size=sizes, input_dtype="int64", input_range=(0, 3), optimizer="adam")
    assert spec.input_names == ("input_ids", "attention_mask", "labels")
    assert spec.as_dict()["input_names"] == ["input_ids", "attention_mask", "labels"]
    report = predict_memory(model, spec, batch_size=4)
    measured = measure(model, spec, batch_size=4)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.held_peak_bytes == pytest.approx(measured.allocator_peak_bytes, rel=0.01)
    summary = summarize(model, spec, batch_size=4)
    assert summary.loss == "the model's own loss (its output's loss)"
    # Without labels, cross-entropy of the output's logits.
    unlabelled = summarize(
        model,
        input_size={"input_ids": (16,), "attention_mask": (16,)},
        input_dtype="long",
        batch_size=4,
    )
    assert unlabelled.loss == "cross-entropy of the output's logits against class labels"
    assert unlabelled.totals.backward_flops == summary.totals.backward_flops


def test_per_input_settings_are_checked() -> None:
    with pytest.raises(NinlabError, match="input dtype given for 3 inputs, but there are 2"):
        StepSpec(input_size=((3,), (4,)), input_dtype=("long", "long", "long"))
    with pytest.raises(NinlabError, match="input range given for mask, but the inputs are ids"):
        StepSpec(input_size={"ids": (3,)}, input_range={"mask": (0, 2)})
    with pytest.raises(NinlabError, match="an input name must be a keyword argument"):
        StepSpec(input_size={"not a name": (3,)})
    assert StepSpec(
        input_size={"ids": (3,), "mask": (3,)}, input_dtype={"ids": "long"}
    ).input_dtypes == (
        torch.int64,
        torch.float32,
    )


def test_a_step_given_no_targets_is_told_to_make_its_own() -> None:
    def regression_step(model, optimizer, inputs, targets):
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    model = nn.Conv2d(3, 4, 3)  # a feature map out: no class labels fit it
    with pytest.raises(NinlabError, match=r"given targets=None.*must make its own targets"):
        predict_memory(model, input_size=(3, 8, 8), step=regression_step, batch_size=2)

    def own_targets(model, optimizer, inputs, targets):
        optimizer.zero_grad()
        output = model(inputs)  # dense class labels, one per output position
        labels = torch.zeros((output.shape[0], *output.shape[2:]), dtype=torch.long)
        F.cross_entropy(output, labels).backward()
        optimizer.step()

    spec = StepSpec(input_size=(3, 8, 8), step=own_targets)
    report = predict_memory(model, spec, batch_size=2)
    assert report.live_peak_bytes == measure(model, spec, batch_size=2).live_peak_bytes


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask


class ReturnsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    ("model", "fields", "cause"),
    [
        (
            nn.Embedding(10, 4, sparse=True),
            {"input_size": (3,), "input_dtype": "long"},
            "Embedding has sparse=True: its gradients are sparse tensors.*sparse=False",
        ),
        (
            KeywordOnly(),
            {"input_size": (4,)},
            (
                r"requires the keyword argument mask; give every input by name, as "
                r"input_size=\{'x': \(...\), 'mask': \(...\)\}"
            ),
        ),
        (ReturnsInput(), {"input_size": (4,)}, "output does not depend on any trainable parameter"),
        (
            nn.Conv2d(1, 4, 3),
            {"input_size": (128, 1, 28, 28)},
            (
                r"starts with the batch \(torchinfo's convention\).*input_size=\(1, 28, 28\) "
                r"and batch_size=128 \(--input 1x28x28 --batch 128\)"
            ),
        ),
    ],
)
def test_what_the_inputs_cannot_do_is_one_line_naming_the_cause(model, fields, cause) -> None:
    for run in (summarize, predict_memory):
        with pytest.raises(NinlabError, match=cause) as refused:
            run(model, batch_size=2, **fields)
        assert "\n" not in str(refused.value) and "give the input sizes" not in str(refused.value)


def test_keyword_only_arguments_given_by_name_run() -> None:
    spec = StepSpec(input_size={"x": (4,), "mask": (4,)})
    report = predict_memory(KeywordOnly(), spec, batch_size=2)
    assert report.live_peak_bytes == measure(KeywordOnly(), spec, batch_size=2).live_peak_bytes


def test_loss_words_name_what_was_used() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    assert builtin_loss_words({"loss": logits.sum(), "logits": logits}).startswith("the model's")
    assert builtin_loss_words(logits) == "cross-entropy against class labels"
    assert builtin_loss_words({"logits": logits, "box": logits * 2}).startswith("stand-in")
