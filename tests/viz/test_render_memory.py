"""The memory section of `ninlab summary`: the same numbers as `ninlab.predict_memory`, as a table,
JSON and Markdown, with the flags that choose the step."""

from __future__ import annotations

import json

import pytest
import torch
from cli_run import run
from torch import nn

from ninlab import predict_memory
from ninlab.viz.render_memory import memory_lines


def test_table_gives_the_peak_the_breakdown_the_reasons_and_the_forum_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "summary", "--optimizer", "sgd-momentum")
    assert code == 0
    assert (
        "Live tensor peak: 987.46 MiB (1,035,429,584 bytes), during threshold_backward in "
        "backward, layer 4.5 (ReLU)"
    ) in out
    assert "937,033,728" in out  # saved for backward, at the peak
    assert "max pool keeps the int64 index of each window's maximum" in out
    assert "also kept by 0.2 ConvolutionBackward0.input: counted once, here" in out
    assert "1.70x ours" in out


def test_json_carries_the_report_and_the_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "summary", "--format", "json", "--batch", "128", "--optimizer", "adam"
    )
    memory = json.loads(out)["memory"]
    assert code == 0
    assert memory["live_peak_bytes"] == 1_043_398_344
    assert memory["setup"]["optimizer"]["name"] == "adam"
    assert memory["peak"]["module"] == "4.5"
    timeline = memory["timeline"]
    totals = [
        sum(series[i] for series in timeline["alive_bytes"].values())
        for i in range(len(timeline["ops"]))
    ]
    assert max(totals) == memory["live_peak_bytes"]
    assert max(timeline["allocator_bytes"]) == memory["allocator_peak_bytes"]


def test_markdown_inference_with_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "summary",
        "--format",
        "markdown",
        "--mode",
        "infer",
        "--batch",
        "2",
        "--fit",
        "1GiB",
    )
    assert code == 0
    assert "**Memory of one inference (no_grad), float32, cpu, batch 2:**" in out
    assert "- Live tensor peak: 12.25 MiB (12,849,048 bytes)" in out
    assert "Largest batch within 1.00 GiB (allocator level)" in out
    assert "parameters (7.60 MiB) + the two largest consecutive activations" in out


def test_cuda_ddp_and_amp_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "summary", "--device", "cuda", "--amp", "bf16", "--batch", "8", "--ddp"
    )
    assert code == 0
    assert "bfloat16 autocast, cuda, DDP, batch 8" in out
    assert "of block rounding" in out
    assert "DDP gradient buckets: 1.26 MiB, 6.34 MiB" in out
    assert (
        "CUDA: max_memory_allocated 55.17 MiB (57,846,784 bytes), max_memory_reserved 72.00 MiB"
        in out
    )
    assert "CUDA context: outside the caching allocator: about 300 MiB" in out
    assert "cuDNN: cuDNN's workspace is not predicted" in out


def test_cuda_json_and_fit_count_reserved_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "summary",
        "--format",
        "json",
        "--device",
        "cuda",
        "--mode",
        "infer",
        "--fit",
        "64MiB",
    )
    memory = json.loads(out)["memory"]
    assert code == 0
    cuda = memory["cuda"]
    assert (
        cuda["max_allocated_bytes"] == memory["allocator_peak_bytes"] <= cuda["max_reserved_bytes"]
    )
    reserved = cuda["max_reserved_bytes"]
    assert cuda["process_bytes"] == [reserved + (300 << 20), reserved + (700 << 20)]
    fit = memory["fit"]
    assert fit["peak_bytes"] <= 64 << 20 < fit["next_peak_bytes"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fit", "10MB"], "is too small for batch 1"),
        (["--fit", "lots"], "cannot read memory size 'lots'"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--mode", "infer", "--ddp"], "only in training"),
    ],
)
def test_bad_memory_options_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "summary", "--batch", "2", *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_an_estimate_of_a_traced_step_says_why() -> None:
    """A prediction flagged an estimate for a reason (here torch.compile'd code, traced as its
    eager program) prints the reason under the kinds, not the bare word."""
    model = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)))
    lines = memory_lines(predict_memory(model, input_size=(16,), batch_size=8))
    assert "What these figures are: live peak estimate, allocator peak estimate" in lines
    assert any(
        line.startswith("Estimate, because its code holds torch.compile'd code (the model)")
        for line in lines
    )
