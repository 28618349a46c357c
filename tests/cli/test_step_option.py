"""`--step package.module:function`: the user's own training step on the command line, and its
one-line errors (exit 2)."""

import json
import sys

import pytest
from cli_run import run

from ninlab.analysis.predict import predict_memory
from ninlab.models import resolve_model

STEPS = """
from torch.nn import functional as F


def accumulate(model, optimizer, inputs, targets):
    optimizer.zero_grad()
    for x, y in zip(inputs.chunk(2), targets.chunk(2)):
        (F.cross_entropy(model(x), y) / 2).backward()
    optimizer.step()


def broken(model, optimizer, inputs, targets):
    raise ValueError("my step is broken")


not_a_function = 3
"""

ARGS = ("summary", "--model", "nin-d2l", "--input", "1x67x67", "--batch", "4")


@pytest.fixture
def my_steps(tmp_path, monkeypatch):
    (tmp_path / "my_steps.py").write_text(STEPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_steps", None)


def test_summary_predicts_the_named_step(capsys, my_steps) -> None:
    code, out, _ = run(capsys, *ARGS, "--step", "my_steps:accumulate", "--format", "json")
    assert code == 0
    memory = json.loads(out)["memory"]
    assert memory["setup"]["step_function"] == "accumulate"
    from my_steps import accumulate

    expected = predict_memory(
        resolve_model("nin-d2l"), input_size=(1, 67, 67), batch_size=4, step=accumulate
    )
    assert memory["live_peak_bytes"] == expected.live_peak_bytes


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            "my_steps:broken",
            "the step broken raised on fake tensors: ValueError: my step is broken",
        ),
        ("my_steps:nope", "'my_steps' has no 'nope'"),
        ("my_steps:not_a_function", "'my_steps:not_a_function' is not a function but a int"),
        ("no_such_steps_module:step", "cannot import 'no_such_steps_module'"),
    ],
)
def test_a_bad_step_is_one_line_and_exit_code_2(capsys, my_steps, step: str, message: str) -> None:
    code, out, err = run(capsys, *ARGS, "--step", step)
    assert code == 2
    assert out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", ["mysteps_in_cwd:accumulate", "mysteps_in_cwd.py:accumulate"])
def test_a_step_in_the_current_directory_needs_no_pythonpath(tmp_path, monkeypatch, name):
    # As the `ninlab` script runs: sys.path holds its own directory, not the current one.
    (tmp_path / "mysteps_in_cwd.py").write_text(STEPS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mysteps_in_cwd", raising=False)
    from ninlab.dotted import import_function

    step = import_function(name, what="step", expects="a step")
    assert step.__name__ == "accumulate"
