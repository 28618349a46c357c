"""A model whose input is token ids (an embedding first) in every command that takes a model: the
step options (--input-dtype long, --input-range) reach every question, so none draws
float inputs."""

import importlib
import json
import sys

import pytest
from cli_run import run

from ninlab.analysis.batch import fit_batch
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec

MODULE = """
import torch
from torch import nn


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(128, 4))
"""

MODEL = (
    "--model",
    "token_models:classifier",
    "--input",
    "16",
    "--input-dtype",
    "long",
    "--input-range",
    "0:100",
    "--batch",
    "2",
)
SPEC = StepSpec(input_size=(16,), input_dtype="long", input_range=(0, 100))
PARAMETERS = 100 * 8 + 128 * 4 + 4
FORWARD_FLOPS = 2 * 2 * 128 * 4  # the linear layer's multiply-adds at batch 2; a lookup has none


@pytest.fixture
def token_models(tmp_path, monkeypatch):
    (tmp_path / "token_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("token_models").classifier
    sys.modules.pop("token_models", None)


def test_summary_in_every_format(capsys, token_models) -> None:
    code, out, err = run(capsys, "summary", *MODEL, "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert (data["totals"]["parameters"], data["totals"]["forward_flops"]) == (
        PARAMETERS,
        FORWARD_FLOPS,
    )
    assert data["input_dtype"] == "int64"
    memory = predict_memory(token_models(), SPEC, batch_size=2)
    assert data["memory"]["live_peak_bytes"] == memory.live_peak_bytes
    assert data["memory"]["setup"]["input_dtype"] == "int64"
    code, out, _ = run(capsys, "summary", *MODEL)
    assert code == 0 and "batch 2 x 16 int64 inputs, float32" in out and "Parameters: 1,316" in out
    code, out, _ = run(capsys, "summary", *MODEL, "--format", "markdown", "--explain")
    assert code == 0 and "- Parameters: 1,316" in out
    code, out, _ = run(capsys, "summary", *MODEL, "--format", "csv")
    assert code == 0 and out.splitlines()[1].split(",")[5] == str(PARAMETERS)


def test_summary_fit(capsys, token_models) -> None:
    code, out, _ = run(capsys, "summary", *MODEL, "--fit", "1MiB", "--format", "json")
    assert code == 0
    fit = fit_batch(token_models(), SPEC, budget="1MiB")
    data = json.loads(out)["memory"]
    assert (
        data["fit"]["batch_size"] == fit.batch_size and data["fit"]["peak_bytes"] == fit.peak_bytes
    )
    assert data["batch_scaling"]["batch_sizes"] == [fit.batch_size, fit.batch_size + 1]
    assert data["plan"]["batch_size"] == 2


def test_measure(capsys, token_models) -> None:
    code, out, _ = run(capsys, "measure", *MODEL, "--format", "json")
    assert code == 0
    train, infer = json.loads(out)
    assert (
        train["predicted_bytes"]["live"]
        == predict_memory(token_models(), SPEC, batch_size=2).live_peak_bytes
    )
    assert train["baseline_bytes"]["parameters_bytes"] == PARAMETERS * 4
    assert (
        train["baseline_bytes"]["input_bytes"]
        == infer["baseline_bytes"]["input_bytes"]
        == 2 * 16 * 8
    )


@pytest.mark.parametrize("kind", ["flops", "timeline", "saved", "batch"])
def test_plot(capsys, tmp_path, token_models, kind) -> None:
    path = tmp_path / f"{kind}.svg"
    budget = ("--budget", "1MiB") if kind == "batch" else ()  # only the batch chart reads one
    code, out, err = run(capsys, "plot", kind, *MODEL, *budget, "-o", str(path))
    assert (code, out, err) == (0, f"wrote {path}\n", "")
    assert path.stat().st_size > 5_000


@pytest.mark.parametrize("kind", ["geometry", "receptive-field"])
def test_plot_of_windows_says_there_are_none(capsys, tmp_path, token_models, kind) -> None:
    code, _, err = run(capsys, "plot", kind, *MODEL, "-o", str(tmp_path / "chart.svg"))
    assert code == 2 and "Long" not in err and err.count("\n") == 1


def test_report(capsys, tmp_path, token_models) -> None:
    path = tmp_path / "report.html"
    code, out, _ = run(capsys, "report", *MODEL, "--budget", "1MiB", "-o", str(path))
    assert code == 0 and out == f"wrote {path}\n"
    page = path.read_text()
    assert "<b>1,316</b><span>parameters" in page
    assert "Batch 2 x 16, float32" in page


def test_compare(capsys, token_models) -> None:
    code, out, _ = run(capsys, "compare", *MODEL[2:], "token_models:classifier", "--format", "json")
    assert code == 0
    (variant,) = json.loads(out)["variants"]
    assert (variant["parameters"], variant["forward_flops"]) == (PARAMETERS, FORWARD_FLOPS)
    memory = predict_memory(token_models(), SPEC, batch_size=2)
    assert variant["train_peak_bytes"] == memory.live_peak_bytes


KEYWORD_MODULE = """
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(100, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(self.embed(input_ids) * attention_mask[..., None])}


def tagger():
    torch.manual_seed(0)
    return Tagger()
"""


def test_inputs_by_name_each_with_its_own_dtype_and_range(capsys, tmp_path, monkeypatch) -> None:
    """--input NAME=SIZE:DTYPE:LOW:HIGH: a model called with keywords, token ids and a float
    mask, the loss the cross-entropy of its output's logits."""
    (tmp_path / "keyword_models.py").write_text(KEYWORD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    given = (
        "--model",
        "keyword_models:tagger",
        "--input",
        "input_ids=16:int64:0:100",
        "--input",
        "attention_mask=16:float32",
        "--batch",
        "2",
    )
    code, out, err = run(capsys, "summary", *given, "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["input_dtype"] == "int64 and float32"
    setup = data["memory"]["setup"]
    assert setup["input_names"] == ["input_ids", "attention_mask"]
    assert setup["input_dtype"] == ["int64", "float32"]
    assert setup["input_range"] == [[0, 100], None]  # a float input has no range
    spec = StepSpec(
        input_size={"input_ids": (16,), "attention_mask": (16,)},
        input_dtype=("int64", "float32"),
        input_range=((0, 100), None),
    )
    model = importlib.import_module("keyword_models").tagger()
    assert (
        data["memory"]["live_peak_bytes"]
        == predict_memory(model, spec, batch_size=2).live_peak_bytes
    )
    sys.modules.pop("keyword_models", None)
    code, _, err = run(capsys, "summary", *given[:4], "--input", "16", "--batch", "2")
    assert code == 2 and "name every input (NAME=SIZE) or none" in err
    code, _, err = run(capsys, "summary", "--input", "16:int8")
    assert code == 2 and "input dtype 'int8' in '16:int8' is not one of" in err
    code, _, err = run(capsys, "summary", "--input", "16:int64:5")
    assert code == 2 and "write [NAME=]SIZE[:DTYPE[:LOW:HIGH]]" in err
