"""benchmarks/gpu_check.py: its dry run, every step on the CPU at tiny sizes, as CI runs it; and
the commands it gives the GPU's trainings, which a CPU cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ninlab.training.data import default_search_path, find_data_dir

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.skipif(
    find_data_dir(default_search_path()) is None,
    reason="the dry run trains on Fashion-MNIST, which is not installed here",
)
def test_dry_run_runs_every_step_and_writes_the_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "gpu_check.py"),
        "--dry-run",
        "--output",
        str(output),
        "--work-dir",
        str(tmp_path / "runs"),
    ]
    finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    results = json.loads(output.read_text())
    assert results["environment"]["device"] == "cpu"

    memory = results["memory"]
    assert len(memory) == 6 + 2 * len(
        gpu_check.ZOO
    )  # NiN: 3 steps x 2 precisions; the CNNs: 2 each
    assert not [row for row in memory if "error" in row]
    for row in memory:
        predicted = row["predicted"]
        assert (
            predicted["live_peak_bytes"]
            <= predicted["max_allocated_bytes"]
            <= predicted["max_reserved_bytes"]
        )
    measured = [row for row in memory if row["measured"] is not None]
    assert [(row["mode"], row["amp"]) for row in measured] == [("train", None), ("infer", "bf16")]
    for row in measured:
        # The CPU measures the storages the CUDA prediction replays; they differ only in dropout's
        # mask (float32 on CPU, bool on CUDA), which is not alive at these peaks.
        assert row["measured"]["live_peak_bytes"] == row["predicted"]["live_peak_bytes"]
        assert row["measured"]["max_reserved_bytes"] is None  # a CPU has no caching allocator
    assert results["cuda_context"]["stated_range_bytes"] == [300 * MIB, 700 * MIB]

    training = results["training"]
    assert [(row["preset"], row["processes"]) for row in training] == [("d2l", 1), ("default", 2)]
    for row in training:
        assert row["returncode"] == 0 and not row["stopped_for_time"]
        (epoch,) = row["epochs"]
        assert (
            epoch["epoch"] == 1 and 0 <= epoch["test_accuracy"] <= 1 and epoch["examples_per_s"] > 0
        )


def test_gpu_trainings_run_the_presets_in_full_and_ddp_under_torchrun(tmp_path: Path) -> None:
    single = gpu_check.train_command(
        gpu_check.TrainingRun("d2l", "d2l", 1), gpu_check.FULL, "cuda", tmp_path / "d2l", None
    )
    assert single[2:] == [
        "ninlab",
        "train",
        "--preset",
        "d2l",
        "--image-size",
        "224",
        "--output-dir",
        str(tmp_path / "d2l"),
        "--device",
        "cuda",
        "--no-download",
    ]  # the preset's 10 epochs, batch 128 and all the data
    ddp = gpu_check.train_command(
        gpu_check.TrainingRun("ddp", "default", 8),
        gpu_check.FULL,
        "cuda",
        tmp_path / "ddp",
        "/data",
    )
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8"]
    assert "--device" not in ddp  # each rank takes its own GPU
    assert ddp[-3:] == ["--data-dir", "/data", "--no-download"]
