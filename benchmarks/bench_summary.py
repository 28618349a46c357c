"""Time `ninlab summary` of NiN at batch 128 against one real forward pass of the same batch.

Run by hand: `python benchmarks/bench_summary.py`. Both are measured in this one process, side by
side, after one warm-up each (the machine is shared, so compare ratios, not absolute times). The
first analysis in a process also pays a one-off import of PyTorch's fake-tensor machinery; that
and the whole command-line run are reported too.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time

import torch

from ninlab.analysis.summary import summarize
from ninlab.models import build_nin

BATCH = 128
INPUT = (1, 224, 224)
REPEATS = 5


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    model = build_nin()
    first_analysis = timed(lambda: summarize(model, input_size=INPUT, batch_size=BATCH))
    analysis = [
        timed(lambda: summarize(model, input_size=INPUT, batch_size=BATCH)) for _ in range(REPEATS)
    ]
    rss_after_analysis = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    x = torch.randn(BATCH, *INPUT)
    with torch.no_grad():
        model(x)  # warm-up: oneDNN picks its kernels on the first call
        forward = [timed(lambda: model(x)) for _ in range(REPEATS)]
    rss_after_forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cli = timed(lambda: subprocess.run(["ninlab", "summary"], check=True, capture_output=True))

    analysis_s, forward_s = statistics.median(analysis), statistics.median(forward)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, NiN batch {BATCH} x "
        f"{'x'.join(map(str, INPUT))} float32"
    )
    print(f"summarize(), first call in a process : {first_analysis:.3f} s")
    print(f"summarize(), median of {REPEATS}            : {analysis_s:.3f} s")
    print(f"real forward (no_grad), median of {REPEATS} : {forward_s:.3f} s")
    print(f"ratio forward / summarize            : {forward_s / analysis_s:.1f}x")
    print(f"`ninlab summary` whole process       : {cli:.2f} s (imports included)")
    print(f"peak RSS after analysis              : {rss_after_analysis / 2**20:.0f} MiB")
    print(f"peak RSS after real forwards         : {rss_after_forward / 2**20:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
