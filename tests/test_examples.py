"""examples/: the chapter's notebook is stored without outputs and runs top to bottom in a fresh
kernel, showing its tables as HTML and its charts as pictures."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import ninlab

NOTEBOOK = Path(__file__).parent.parent / "examples" / "nin_chapter.ipynb"


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert all(set(cell.metadata) <= {"tags"} for cell in notebook.cells)  # no timings, no widgets
    assert set(notebook.metadata) == {"kernelspec", "language_info"}


def _outputs(notebook, start):
    """The outputs of the first code cell whose source starts with `start`."""
    cell = next(c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(start))
    return cell.outputs


def _text(outputs, kind="text/plain"):
    return "".join(
        o.text if o.output_type == "stream" else o.get("data", {}).get(kind, "") for o in outputs
    )


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_a_fresh_kernel(tmp_path, monkeypatch, fashion_mnist):
    # The kernel imports the ninlab under test, whatever is installed.
    source = str(Path(ninlab.__file__).parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the training run's directory
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises stops the run with CellExecutionError, which fails the test.
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()

    summary = _outputs(notebook, "model = ninlab.build_nin()")
    assert "Parameters: 1,992,166 (1,989,928 weights + 2,238 biases" in _text(summary, "text/html")
    assert "forum, by hand:       1,989,928" in _text(_outputs(notebook, "forum_hand_count"))
    assert "(54.25, 54)" in _text(_outputs(notebook, "first = summary.layers[2]"))
    for start in ("step = ninlab.StepSpec", "infer_memory = "):
        assert "Live tensor peak" in _text(_outputs(notebook, start), "text/html")
    # Each difference sits under its value, so the five-variant table fits the page.
    assert '1,769,112<br><small style="white-space:normal">(-223,054, -11.2%)</small>' in _text(
        _outputs(notebook, "from ninlab.studies.compare import compare"), "text/html"
    )
    pictures = [
        "from ninlab.viz.charts import geometry_chart",
        "from ninlab.viz.charts import flops_chart",
        "from ninlab.viz.charts import timeline_chart",
        "compare_chart(exercises)",
        "Image(filename=run.output_dir",
        "from ninlab.training.evaluate import",
    ]
    for start in pictures:
        assert any("image/png" in o.get("data", {}) for o in _outputs(notebook, start)), start
    training = _outputs(notebook, "from ninlab.training.data import")
    # Two epochs: two outputs that ended as the epoch's line, after the run's own messages.
    lines = [o.data["text/plain"] for o in training if o.output_type == "display_data"]
    assert [line.splitlines()[-1].split(":")[0] for line in lines[-2:]] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert "on 500 test images" in _text(_outputs(notebook, "from ninlab.training.evaluate import"))
