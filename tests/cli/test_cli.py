import csv
import io
import json
import subprocess

import pytest
from cli_run import run


def test_summary_table_answers_the_forum_question(capsys):
    code, out, _ = run(capsys, "summary", "--explain")
    assert code == 0
    assert "nin-d2l: batch 128 x 1x224x224, float32" in out
    assert "1,992,166 (1,989,928 weights + 2,238 biases" in out
    assert (
        "(224 - 11 + 2*0)/4 + 1 = 54.25 -> 54; the last 1 row and column (bottom/right) of real "
        "pixels are never read"
    ) in out
    assert "Smallest valid input: 1x67x67" in out
    assert "FlopCounterMode" in out


def test_summary_json_carries_exact_numbers(capsys):
    code, out, _ = run(capsys, "summary", "--format", "json", "--batch", "2")
    data = json.loads(out)
    assert code == 0
    assert data["totals"]["parameters"] == 1_992_166
    assert data["totals"]["forward_flops"] == 3_049_189_408
    assert data["smallest_input_size"] == [1, 67, 67]
    first = next(layer for layer in data["layers"] if layer["name"] == "0.0")
    assert first["output_shape"] == [2, 96, 54, 54]
    assert first["windows"][0]["textbook_output"] == 54.25
    assert first["windows"][0]["trailing_unread_real"] == 1
    leaves = [layer for layer in data["layers"] if layer["is_leaf"]]
    assert sum(layer["parameters"] for layer in leaves) == data["totals"]["parameters"]


def test_summary_markdown_and_csv(capsys):
    _, markdown, _ = run(
        capsys, "summary", "--format", "markdown", "--model", "nin-d2l-1x1", "--batch", "1"
    )
    assert "| Layer | Type | Output shape |" in markdown
    assert "1,769,112" in markdown
    _, text, _ = run(capsys, "summary", "--format", "csv", "--batch", "1")
    rows = list(csv.DictReader(io.StringIO(text)))
    first = next(row for row in rows if row["name"] == "0.0")
    assert (first["output_shape"], first["parameters"], first["forward_flops"]) == (
        "1x96x54x54",
        "11712",
        str(2 * 54 * 54 * 121 * 96),
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "224x224x"], "cannot read input size '224x224x'"),
        (["--input", "1x60x60"], "the smallest input this network accepts is 1x67x67"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--batch", "-3"], "argument --batch: must be at least 1, got -3"),
        (["--model", "no_such_pkg.mod:make"], "cannot import 'no_such_pkg.mod'"),
        (["--model", "collections:OrderedDict"], "returned OrderedDict, not an nn.Module"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, "summary", *argv)
    assert code == 2
    assert out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_exit_code_and_single_line():
    result = subprocess.run(
        ["ninlab", "summary", "--input", "1x60x60"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "ninlab: error: input 1x60x60 is too small: layer 5 (MaxPool2d)"
    )
    assert result.stderr.count("\n") == 1


def test_measure_prints_prediction_beside_measurement(capsys):
    code, out, _ = run(capsys, "measure", "--batch", "2", "--format", "json")
    assert code == 0
    train, infer = json.loads(out)
    for step in (train, infer):
        assert step["predicted_bytes"]["live"] == step["live_peak_bytes"]
        assert abs(step["predicted_over_measured"]["allocator"] - 1) < 0.02
    assert train["step"] == "train" and infer["step"] == "infer"
    assert train["step_function"] == "built-in" and infer["step_function"] is None


def test_summary_verify_runs_the_step_and_says_verified(capsys):
    argv = ("summary", "--model", "nin-d2l-1x1", "--input", "1x67x67", "--batch", "8")
    code, out, _ = run(capsys, *argv, "--verify")
    assert code == 0
    assert "Verification: verified at batch 2 on this machine" in out
    assert "What these figures are: live peak exact, allocator peak" in out
