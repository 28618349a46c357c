"""Everything ninlab claims about a GPU, checked in one command on one H100/H200-class machine.

Run: `python benchmarks/gpu_check.py` (about 8 minutes), then commit the JSON it writes to
`benchmarks/results/gpu_check-<gpu name>.json`. `--dry-run` runs every step on the CPU at tiny
sizes (a minute or two; part of the tests), so the day a GPU is lent nothing needs debugging.

1. Memory, predicted against measured: for NiN at batch 128 in float32 and under bf16 autocast
   (SGD, Adam, inference) and for each CNN of tests/cnn_zoo.py (SGD training and inference at
   batch 128), `ninlab.predict_memory(device_type="cuda")` beside `ninlab.measure` on the GPU:
   `torch.cuda.max_memory_allocated()` and `max_memory_reserved()` of the steady second step after
   `reset_peak_memory_stats()`, as the predictor counts it. Each case starts from an empty cache
   (`empty_cache()`, cuBLAS's workspaces cleared). Then the CUDA context: what the device has in use
   (`mem_get_info`) beyond the allocator's reserved memory, against the range ninlab states.
2. Training: `ninlab train --preset d2l` and `--preset default`, their full 10 epochs at 224x224,
   each in its own process; time, examples/s and test accuracy per epoch are read from the run's
   metrics.jsonl. Runs share what is left of `--budget-seconds`; a run out of its share is stopped
   (Ctrl-C: the trainer saves its checkpoint) and reported with the epochs it finished.
3. With more than one GPU, `--preset default` again under torchrun with DDP's NCCL backend.

In the dry run the same code runs with the CPU in the GPU's place: predictions still account for
CUDA (ninlab predicts it from any machine), measurements are the CPU's (no reserved level), the
trainings take 16 images at 67x67 for one epoch (`d2l` in one process, `default` under torchrun
in two, with gloo).
Fashion-MNIST must be present (`--data-dir`, or where `ninlab train` finds it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/cnn_zoo.py: the CNNs of the memory tests

from cnn_zoo import ZOO  # noqa: E402

from ninlab.analysis.cuda_allocator import CUDA_CONTEXT_BYTES  # noqa: E402
from ninlab.analysis.measure import measure  # noqa: E402
from ninlab.analysis.predict import predict_memory  # noqa: E402
from ninlab.analysis.step import StepSpec  # noqa: E402
from ninlab.models import build_nin  # noqa: E402
from ninlab.outputs import output_path, write_text_atomically  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NIN_INPUT = (1, 224, 224)
STOP_GRACE_SECONDS = 60  # after Ctrl-C, time for the trainer to save its checkpoint


@dataclass(frozen=True)
class Sizes:
    """What the check runs at: the real sizes on a GPU, tiny ones in the dry run."""

    batch: int
    nin_input: tuple[int, int, int]
    zoo_batch: int
    image_size: int
    epochs: int | None  # None: the preset's own (10)
    train_examples: int | None  # None: all 60,000
    test_examples: int | None
    train_batch: int | None  # None: the preset's (128)
    measure_all: bool  # False: measure two NiN cases (training, and inference under autocast)
    concurrent_training: bool  # the runs side by side: only where their times do not matter


FULL = Sizes(
    batch=128,
    nin_input=NIN_INPUT,
    zoo_batch=128,
    image_size=224,
    epochs=None,
    train_examples=None,
    test_examples=None,
    train_batch=None,
    measure_all=True,
    concurrent_training=False,
)
DRY = Sizes(
    batch=2,
    nin_input=(1, 67, 67),
    zoo_batch=2,
    image_size=67,  # 67: nin-d2l's smallest input
    epochs=1,
    train_examples=16,
    test_examples=16,
    train_batch=8,
    measure_all=False,
    concurrent_training=True,
)


@dataclass(frozen=True)
class MemoryCase:
    model: str
    input_size: tuple[int, ...]
    batch_size: int
    mode: str
    optimizer: str
    amp: str | None


def memory_cases(sizes: Sizes) -> list[MemoryCase]:
    cases = [
        MemoryCase("nin-d2l", sizes.nin_input, sizes.batch, mode, optimizer, amp)
        for amp in (None, "bf16")
        for mode, optimizer in (("train", "sgd"), ("train", "adam"), ("infer", "sgd"))
    ]
    for name, entry in ZOO.items():
        for mode in ("train", "infer"):
            cases.append(MemoryCase(name, entry.input_size, sizes.zoo_batch, mode, "sgd", None))
    return cases


def build(name: str) -> nn.Module:
    return build_nin() if name == "nin-d2l" else ZOO[name].factory()


def measured_in_dry_run(case: MemoryCase) -> bool:
    """The dry run predicts every case but measures two, the CPU being slow: what differs on the
    GPU is the device, not the code."""
    return case.model == "nin-d2l" and (case.mode, case.optimizer, case.amp) in (
        ("train", "sgd", None),
        ("infer", "sgd", "bf16"),
    )


def check_memory(case: MemoryCase, device: str, *, measured: bool = True) -> dict[str, Any]:
    """One case: the prediction for CUDA beside the measurement on `device` (cuda, or the dry
    run's cpu), with the ratios measured / predicted."""
    spec = StepSpec(
        input_size=case.input_size, mode=case.mode, optimizer=case.optimizer, amp=case.amp
    )
    model = build(case.model)
    row: dict[str, Any] = {**case.__dict__}
    started = time.perf_counter()
    try:
        report = predict_memory(model, spec.replace(device_type="cuda"), batch_size=case.batch_size)
        assert report.cuda is not None
        row["predicted"] = {
            "live_peak_bytes": report.live_peak_bytes,
            "max_allocated_bytes": report.cuda.max_allocated_bytes,
            "max_reserved_bytes": report.cuda.max_reserved_bytes,
        }
        row["measured"] = None
        if measured:
            _empty_device_cache(device)
            measurement = measure(
                model, spec.replace(device_type=device), batch_size=case.batch_size
            )
            row["measured"] = {
                "device": measurement.device,
                "live_peak_bytes": measurement.live_peak_bytes,
                "max_allocated_bytes": measurement.allocator_peak_bytes,
                "max_reserved_bytes": measurement.reserved_peak_bytes,
                "method": measurement.allocator_method,
            }
            row["ratio_measured_over_predicted"] = {
                key: value / row["predicted"][key]
                for key, value in row["measured"].items()
                if key.endswith("_bytes") and value is not None
            }
    except Exception as error:  # noqa: BLE001 -- one broken case must not cost the GPU's other results
        row["error"] = f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - started
    return row


def _empty_device_cache(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        # cuBLAS keeps a workspace per handle and stream once a matmul ran: not this case's.
        clear_cublas_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_cublas_workspaces is not None:
            clear_cublas_workspaces()
        torch.cuda.reset_peak_memory_stats()


def cuda_context(device: str) -> dict[str, Any]:
    """What the device has in use beyond the allocator's reserved memory: the CUDA context (and
    any other process on the GPU), against the range ninlab states."""
    low, high = CUDA_CONTEXT_BYTES
    row: dict[str, Any] = {"stated_range_bytes": [low, high]}
    if device != "cuda":
        row["measured_bytes"] = None
        row["note"] = "dry run: no CUDA context on a CPU"
        return row
    _empty_device_cache(device)
    free, total = torch.cuda.mem_get_info()
    row["measured_bytes"] = total - free - torch.cuda.memory_reserved()
    row["within_range"] = low <= row["measured_bytes"] <= high
    return row


# -- training runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRun:
    name: str
    preset: str
    processes: int  # > 1: under torchrun, DDP


def training_runs(device: str, dry_run: bool) -> list[TrainingRun]:
    """Both presets on one GPU, and `default` under DDP on all of them when there are several.
    The dry run trains `d2l` in one process and `default` under torchrun in two: the same code as
    the three GPU runs, in one process less."""
    if dry_run:
        return [TrainingRun("d2l", "d2l", 1), TrainingRun("default-ddp-2", "default", 2)]
    runs = [TrainingRun("d2l", "d2l", 1), TrainingRun("default", "default", 1)]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus > 1:
        runs.append(TrainingRun(f"default-ddp-{gpus}", "default", gpus))
    return runs


def train_command(
    run: TrainingRun, sizes: Sizes, device: str, output_dir: Path, data_dir: str | None
) -> list[str]:
    """`ninlab train` for `run`, through this script's `ninlab` pass-through (which torchrun can
    start as a script)."""
    launcher = [sys.executable, __file__]
    if run.processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={run.processes}",
            __file__,
        ]
    options = {
        "--preset": run.preset,
        "--image-size": sizes.image_size,
        "--epochs": sizes.epochs,
        "--train-examples": sizes.train_examples,
        "--test-examples": sizes.test_examples,
        "--batch": sizes.train_batch,
        "--output-dir": output_dir,
        "--data-dir": data_dir,
    }
    arguments = [
        str(part) for key, value in options.items() if value is not None for part in (key, value)
    ]
    # Under torchrun each rank takes its own GPU; a single run is told the device.
    device_option = ["--device", device] if run.processes == 1 or device == "cpu" else []
    return [*launcher, "ninlab", "train", *arguments, *device_option, "--no-download"]


def start_training(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish_training(
    process: subprocess.Popen[bytes],
    command: list[str],
    output_dir: Path,
    log_path: Path,
    started: float,
    deadline: float,
) -> dict[str, Any]:
    """Wait for a training until `deadline` (then Ctrl-C: the trainer saves its checkpoint), and
    read its metrics."""
    stopped_for_time = False
    try:
        process.wait(timeout=max(deadline - time.perf_counter(), 1.0))
    except subprocess.TimeoutExpired:
        stopped_for_time = True
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    metrics = output_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    epochs = [
        {
            key: row[key]
            for key in (
                "epoch",
                "train_seconds",
                "examples_per_s",
                "test_accuracy",
                "elapsed_seconds",
            )
        }
        for row in rows
    ]
    result: dict[str, Any] = {
        "command": " ".join(command[1:]),
        "log": str(log_path),
        "returncode": process.returncode,
        "stopped_for_time": stopped_for_time,
        "wall_seconds": time.perf_counter() - started,
        "epochs": epochs,
    }
    if process.returncode not in (0, 130) or not epochs:
        result["error"] = log_path.read_text(errors="replace")[-3000:]
    return result


def run_trainings(
    runs: list[TrainingRun],
    sizes: Sizes,
    device: str,
    work_dir: Path,
    data_dir: str | None,
    seconds: float,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each run in turn with an equal share of what is left of `seconds` (side by side in the
    dry run, whose times mean nothing)."""
    begun = time.perf_counter()
    results = []
    pending: list[tuple[TrainingRun, subprocess.Popen[bytes], list[str], float]] = []

    def finish(
        run: TrainingRun,
        process: subprocess.Popen[bytes],
        command: list[str],
        started: float,
        deadline: float,
    ) -> None:
        row: dict[str, Any] = {
            "name": run.name,
            "preset": run.preset,
            "processes": run.processes,
            "image_size": sizes.image_size,
        }
        row |= finish_training(
            process, command, work_dir / run.name, work_dir / f"{run.name}.log", started, deadline
        )
        for epoch in row["epochs"]:
            say(
                f"  {run.name} epoch {epoch['epoch']}: {epoch['train_seconds']:.1f} s, "
                f"{epoch['examples_per_s']:,.0f} ex/s, test accuracy {epoch['test_accuracy']:.4f}"
            )
        results.append(row)

    for position, run in enumerate(runs):
        command = train_command(run, sizes, device, work_dir / run.name, data_dir)
        share = (seconds - (time.perf_counter() - begun)) / (len(runs) - position)
        say(
            f"training {run.name} ({run.processes} process(es))"
            + ("" if sizes.concurrent_training else f", at most {share:.0f} s")
        )
        started = time.perf_counter()
        process = start_training(command, work_dir / f"{run.name}.log")
        if sizes.concurrent_training:
            pending.append((run, process, command, started))
        else:
            finish(run, process, command, started, started + share)
    for run, process, command, started in pending:
        finish(run, process, command, started, begun + seconds)
    return results


# -- the check ----------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING"),
        "device": device,
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": properties.name,
            "gpus": torch.cuda.device_count(),
            "capability": f"{properties.major}.{properties.minor}",
            "gpu_memory_bytes": properties.total_memory,
        }
    return info


def default_output(device: str) -> Path:
    name = torch.cuda.get_device_name(0) if device == "cuda" else "dry-run-cpu"
    return RESULTS / f"gpu_check-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.json"


def check(
    *,
    dry_run: bool,
    output: Path,
    budget_seconds: float,
    data_dir: str | None,
    work_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    device = "cpu" if dry_run else "cuda"
    sizes = DRY if dry_run else FULL
    started = time.perf_counter()
    results: dict[str, Any] = {
        "check": "benchmarks/gpu_check.py" + (" --dry-run" if dry_run else ""),
        "work_dir": str(work_dir),
        "environment": environment(device),
        "memory": [],
        "training": [],
    }
    for case in memory_cases(sizes):
        row = check_memory(case, device, measured=sizes.measure_all or measured_in_dry_run(case))
        results["memory"].append(row)
        ratios = row.get("ratio_measured_over_predicted", {})
        outcome = (
            ", ".join(f"{key} {ratio:.3f}" for key, ratio in ratios.items()) or "predicted only"
        )
        say(
            f"memory {case.model} {case.mode} {case.optimizer} amp={case.amp}: "
            f"{row.get('error', outcome)}"
        )
        _write(output, results)  # a crash later keeps what is done
    results["cuda_context"] = cuda_context(device)
    left = budget_seconds - (time.perf_counter() - started)
    runs = training_runs(device, dry_run)
    results["training"] = run_trainings(runs, sizes, device, work_dir, data_dir, left, say)
    _write(output, results)
    results["wall_seconds"] = time.perf_counter() - started
    _write(output, results)
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(results, indent=2) + "\n", durable=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ninlab"]:  # the training processes, and torchrun's ranks
        from ninlab.cli import main as ninlab_main

        return ninlab_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="every step on the CPU at tiny sizes"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="the JSON to write (default: benchmarks/results/gpu_check-<GPU>.json)",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=450,
        help="the whole check's time; trainings share what is left",
    )
    parser.add_argument(
        "--data-dir", help="where Fashion-MNIST is (default: where ninlab train finds it)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="the training runs' directories (default: a new temporary one)",
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here; run with --dry-run to check the steps on the CPU",
            file=sys.stderr,
        )
        return 2
    if args.output is None:
        RESULTS.mkdir(exist_ok=True)
    output = output_path(
        args.output or default_output(device),
        suffixes=(".json",),
        what="results",
        option="--output",
    )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    results = check(
        dry_run=args.dry_run,
        output=output,
        budget_seconds=args.budget_seconds,
        data_dir=args.data_dir,
        work_dir=work_dir,
        say=lambda line: print(line, flush=True),
    )
    failures = [row for row in results["memory"] + results["training"] if "error" in row]
    print(f"wrote {output} ({results['wall_seconds']:.0f} s); {len(failures)} step(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
