"""Memory prediction: its speed against a real forward pass, and its accuracy against measurement.

Run by hand (not in CI): `python benchmarks/bench_memory.py [--quick] [--cuda] [--markdown PATH]`.

1. Speed: `predict_memory` for NiN at batch 128 (first call in the process, which pays the
   fake-tensor machinery's warm-up, then the median of several), the process's peak RSS after
   predicting (before anything real is allocated), and one real no_grad forward of the batch.
2. Accuracy: predicted / measured (`ninlab.analysis.measure`, real runs on this CPU) at both levels,
   live storage and allocator, for
   - NiN (nin-d2l, 224x224) at batch 1, 32 and 128 with SGD, SGD+momentum and Adam, training and
     inference, float32;
   - the CNNs in tests/cnn_zoo.py at batch 2 and 32, float32;
   - the networks in tests/layer_zoo.py at batch 8, float32 and bf16 autocast, NCHW and
     channels-last, training with Adam and inference;
   - NiN as the `cpu` training preset runs it (nin-d2l-bn, 72x72, batch 128, bf16 autocast,
     channels-last, SGD+momentum), training and inference.
   `--quick` drops the batch-128 rows.
3. With `--cuda` (on a machine with a GPU) instead of 2: NiN at batch 128, float32 and bfloat16
   autocast, against `torch.cuda.max_memory_allocated` (`ninlab.analysis.measure`), with the
   GPU's name.

The machine is shared: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.models import build_nin, get_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cnn_zoo import ZOO
from layer_zoo import LAYER_ZOO

NIN_INPUT = (1, 224, 224)
REPEATS = 5
OPTIMIZERS = ("sgd", "sgd-momentum", "adam")


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def speed() -> list[str]:
    model = build_nin()
    lines = []
    for mode, optimizer in (("train", "sgd"), ("train", "adam"), ("infer", "sgd")):

        def predict(mode: str = mode, optimizer: str = optimizer) -> object:
            return predict_memory(
                model, input_size=NIN_INPUT, batch_size=128, mode=mode, optimizer=optimizer
            )

        first = timed(predict)
        median = statistics.median(timed(predict) for _ in range(REPEATS))
        lines.append(
            f"predict_memory NiN b128 {mode:5} {optimizer:5}: first call {first:.3f} s, median of "
            f"{REPEATS} {median:.3f} s"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines.append(f"peak RSS after predicting (nothing real allocated yet): {rss / 2**20:.0f} MiB")
    x = torch.randn(128, *NIN_INPUT)
    with torch.no_grad():
        model(x)  # warm-up: oneDNN picks its kernels on the first call
        forward = statistics.median(timed(lambda: model(x)) for _ in range(REPEATS))
    lines.append(f"one real forward of NiN b128 (no_grad), median of {REPEATS}: {forward:.3f} s")
    return lines


class Case(NamedTuple):
    name: str
    factory: Callable[[], torch.nn.Module]
    input_size: tuple[int, ...]
    batch: int
    mode: str
    optimizer: str
    amp: str | None = None
    memory_format: str = "contiguous"
    device: str = "cpu"


def nin_cpu_preset() -> torch.nn.Module:
    return build_nin(get_config("nin-d2l-bn"))


def cuda_cases() -> list[Case]:
    return [
        Case("nin-d2l", build_nin, NIN_INPUT, 128, mode, optimizer, amp, device="cuda")
        for amp in (None, "bf16")
        for mode, optimizer in (("train", "sgd"), ("train", "adam"), ("infer", "sgd"))
    ]


def cases(quick: bool) -> list[Case]:
    out: list[Case] = []
    for batch in (1, 32, 128):
        for optimizer in OPTIMIZERS:
            out.append(Case("nin-d2l", build_nin, NIN_INPUT, batch, "train", optimizer))
        out.append(Case("nin-d2l", build_nin, NIN_INPUT, batch, "infer", "sgd"))
    for name, entry in ZOO.items():
        for batch in (2, 32):
            for optimizer in ("sgd", "adam"):
                out.append(Case(name, entry.factory, entry.input_size, batch, "train", optimizer))
            out.append(Case(name, entry.factory, entry.input_size, batch, "infer", "sgd"))
    for name, entry in LAYER_ZOO.items():
        for amp in (None, "bf16"):
            for memory_format in ("contiguous", "channels_last"):
                for mode in ("train", "infer"):
                    out.append(
                        Case(
                            name,
                            entry.factory,
                            entry.input_size,
                            8,
                            mode,
                            "adam",
                            amp,
                            memory_format,
                        )
                    )
    for mode in ("train", "infer"):
        out.append(
            Case(
                "nin-d2l-bn (cpu preset)",
                nin_cpu_preset,
                (1, 72, 72),
                128,
                mode,
                "sgd-momentum",
                "bf16",
                "channels_last",
            )
        )
    return [case for case in out if not (quick and case.batch == 128)]


def accuracy(selected: list[Case]) -> list[str]:
    header = (
        "| model | batch | mode | optimizer | amp | format | device | live predicted | live "
        "measured | ratio | allocator predicted | allocator measured | ratio | allocator peak op |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    worst = 0.0
    for case in selected:
        model = case.factory()
        report = predict_memory(
            model,
            input_size=case.input_size,
            batch_size=case.batch,
            mode=case.mode,
            optimizer=case.optimizer,
            amp=case.amp,
            memory_format=case.memory_format,
            device_type=case.device,
        )
        measured = measure(model, report.spec, batch_size=report.batch_size)
        live_ratio = report.live_peak_bytes / measured.live_peak_bytes
        allocator_ratio = report.allocator_peak_bytes / measured.allocator_peak_bytes
        worst = max(worst, abs(allocator_ratio - 1))
        where = (
            f"{report.allocator.op} ({report.allocator.phase} {report.allocator.module})"
            if report.allocator
            else ""
        )
        optimizer = case.optimizer if case.mode == "train" else "-"
        lines.append(
            f"| {case.name} | {case.batch} | {case.mode} | {optimizer} | {case.amp or '-'} | "
            f"{case.memory_format} | {measured.device} | {report.live_peak_bytes:,} | "
            f"{measured.live_peak_bytes:,} | {live_ratio:.4f} | {report.allocator_peak_bytes:,} | "
            f"{measured.allocator_peak_bytes:,} | {allocator_ratio:.4f} | {where} |"
        )
        print(lines[-1], flush=True)
    lines.append(f"\nworst allocator-level error: {worst:.2%}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the batch-128 measurements")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="compare with max_memory_allocated on this machine's GPU",
    )
    parser.add_argument("--markdown", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    title = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print(title, flush=True)
    lines = speed()
    print("\n".join(lines), flush=True)
    lines += ["", *accuracy(cuda_cases() if args.cuda else cases(args.quick))]
    if args.markdown:
        temporary = args.markdown.with_suffix(".tmp")
        temporary.write_text("\n".join([f"# Memory benchmark ({title})", "", *lines, ""]))
        os.replace(temporary, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
