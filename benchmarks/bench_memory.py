"""Memory prediction: its speed against a real forward pass, and its accuracy against measurement.

Run by hand (not in CI): `python benchmarks/bench_memory.py [--quick] [--cuda] [--markdown PATH]`.

1. Speed: `predict_memory` for NiN at batch 128 (first call in the process, which pays the
   fake-tensor machinery's warm-up, then the median of several), the process's peak RSS after
   predicting (before anything real is allocated), and one real no_grad forward of the batch.
2. Accuracy: predicted / measured (`ninlab.analysis.measure`, real runs on this CPU) at both levels, live
   storage and allocator, for NiN at batch 1, 32 and 128 with SGD, SGD+momentum and Adam,
   training and inference, and for the CNNs in tests/cnn_zoo.py. `--quick` drops batch 128.
3. With `--cuda` (on a machine with a GPU) instead of 2: NiN at batch 128, float32 and bfloat16
   autocast, against `torch.cuda.max_memory_allocated` (`ninlab.analysis.measure`), with the GPU's name.

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

import torch

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.models import build_nin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cnn_zoo import ZOO

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
        def predict() -> object:
            return predict_memory(model, input_size=NIN_INPUT, batch_size=128, mode=mode, optimizer=optimizer)  # noqa: B023

        first = timed(predict)
        median = statistics.median(timed(predict) for _ in range(REPEATS))
        lines.append(f"predict_memory NiN b128 {mode:5} {optimizer:5}: first call {first:.3f} s, median of {REPEATS} {median:.3f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines.append(f"peak RSS after predicting (nothing real allocated yet): {rss / 2**20:.0f} MiB")
    x = torch.randn(128, *NIN_INPUT)
    with torch.no_grad():
        model(x)  # warm-up: oneDNN picks its kernels on the first call
        forward = statistics.median(timed(lambda: model(x)) for _ in range(REPEATS))
    lines.append(f"one real forward of NiN b128 (no_grad), median of {REPEATS}: {forward:.3f} s")
    return lines


Case = tuple[str, Callable[[], torch.nn.Module], tuple[int, ...], int, str, str, str | None, str]


def cuda_cases() -> list[Case]:
    return [
        ("nin-d2l", build_nin, NIN_INPUT, 128, mode, optimizer, amp, "cuda")
        for amp in (None, "bf16")
        for mode, optimizer in (("train", "sgd"), ("train", "adam"), ("infer", "sgd"))
    ]


def cases(quick: bool) -> list[Case]:
    out: list[Case] = []
    for batch in (1, 32) if quick else (1, 32, 128):
        for optimizer in OPTIMIZERS:
            out.append(("nin-d2l", build_nin, NIN_INPUT, batch, "train", optimizer, None, "cpu"))
        out.append(("nin-d2l", build_nin, NIN_INPUT, batch, "infer", "sgd", None, "cpu"))
    for name, entry in ZOO.items():
        for batch in (2, 32):
            for optimizer in ("sgd", "adam"):
                out.append((name, entry.factory, entry.input_size, batch, "train", optimizer, None, "cpu"))
            out.append((name, entry.factory, entry.input_size, batch, "infer", "sgd", None, "cpu"))
    return out


def accuracy(selected: list[Case]) -> list[str]:
    header = "| model | batch | mode | optimizer | amp | device | live predicted | live measured | ratio | allocator predicted | allocator measured | ratio | allocator peak op |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    worst = 0.0
    for name, factory, size, batch, mode, optimizer, amp, device in selected:
        model = factory()
        report = predict_memory(model, input_size=size, batch_size=batch, mode=mode, optimizer=optimizer, amp=amp, device_type=device)  # type: ignore[arg-type]
        measured = measure(model, report.spec, batch_size=report.batch_size)
        live_ratio = report.live_peak_bytes / measured.live_peak_bytes
        allocator_ratio = report.allocator_peak_bytes / measured.allocator_peak_bytes
        worst = max(worst, abs(allocator_ratio - 1))
        where = f"{report.allocator.op} ({report.allocator.phase} {report.allocator.module})" if report.allocator else ""
        lines.append(
            f"| {name} | {batch} | {mode} | {optimizer if mode == 'train' else '-'} | {amp or '-'} | {measured.device} | {report.live_peak_bytes:,} | "
            f"{measured.live_peak_bytes:,} | {live_ratio:.4f} | {report.allocator_peak_bytes:,} | "
            f"{measured.allocator_peak_bytes:,} | {allocator_ratio:.4f} | {where} |"
        )
        print(lines[-1], flush=True)
    lines.append(f"\nworst allocator-level error: {worst:.2%}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the batch-128 measurements")
    parser.add_argument("--cuda", action="store_true", help="compare with max_memory_allocated on this machine's GPU")
    parser.add_argument("--markdown", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    title = f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
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
