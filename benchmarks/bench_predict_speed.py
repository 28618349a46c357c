"""How long a memory prediction takes, beside one real step of the same model, for every model in
the tests: NiN, the CNNs of tests/cnn_zoo.py and the networks of tests/layer_zoo.py (among them
the three of 188 to 435 modules whose training step must predict in under 1 s once warm:
`deep_mbconv`, `dense_net` with DenseNet-121's blocks, `vit_encoder` with 12 ViT blocks).

Run by hand (not in CI): `python benchmarks/bench_predict_speed.py [--output PATH] [--quick]
[--only NAME ...]`.

Per model, one training step with Adam at batch 8 on the model's natural input (NiN: 1x224x224):
the first prediction in the process (it pays the fake-tensor machinery's warm-up once for all),
then several warm predictions, in wall time and in this process's CPU time (the machine may be
shared: CPU time is what the prediction itself costs; the minimum of the repeats is the least
disturbed), one prediction at another batch size (what the batch planner asks next: new
activation shapes, the same parameters), the number of ops and modules, and beside them real
steps of the same model (`train_step` on real tensors, after one warm-up step; the minimum of
the repeats). Results go to a JSON file with the machine's description and its load, and a table
to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import train_step
from ninlab.models import build_nin
from ninlab.optimizers import make_optimizer, parse_optimizer
from ninlab.outputs import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cnn_zoo import ZOO
from layer_zoo import LAYER_ZOO

BATCH = 8
OTHER_BATCH = 12  # the next size a planner tries
REPEATS = 5
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "bench_predict_speed-cpu.json"


def models(
    quick: bool, only: list[str] | None
) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    found: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = []
    if not quick:
        found.append(("nin-d2l", build_nin, (1, 224, 224)))
    found += [
        (name, entry.factory, entry.input_size) for name, entry in {**ZOO, **LAYER_ZOO}.items()
    ]
    return [entry for entry in found if only is None or entry[0] in only]


def clocked(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def real_step_seconds(model: nn.Module, input_size: tuple[int, ...]) -> float:
    torch.manual_seed(0)
    inputs = torch.randn(BATCH, *input_size)
    with torch.no_grad():
        classes = model.eval()(inputs[:1]).shape[-1]
    model.train()
    targets = torch.randint(0, classes, (BATCH,))
    optimizer = make_optimizer(parse_optimizer("adam"), model.parameters())
    train_step(model, optimizer, inputs, targets)  # warm-up: optimizer state, oneDNN's kernels
    return min(
        clocked(lambda: train_step(model, optimizer, inputs, targets))[0] for _ in range(REPEATS)
    )


def bench(
    name: str, factory: Callable[[], nn.Module], input_size: tuple[int, ...]
) -> dict[str, object]:
    model = factory()

    def predict(batch_size: int = BATCH) -> object:
        return predict_memory(model, input_size=input_size, batch_size=batch_size, optimizer="adam")

    first_wall, _ = clocked(predict)
    warm = [clocked(predict) for _ in range(REPEATS)]
    other_wall, other_cpu = clocked(lambda: predict(OTHER_BATCH))
    report = predict_memory(model, input_size=input_size, batch_size=BATCH, optimizer="adam")
    step = real_step_seconds(model, input_size)
    predict_wall = min(wall for wall, _ in warm)
    return {
        "model": name,
        "modules": sum(1 for _ in model.modules()),
        "ops": len(report.timeline.points),
        "first_prediction_s": round(first_wall, 3),
        "prediction_wall_s": round(predict_wall, 3),
        "prediction_cpu_s": round(min(cpu for _, cpu in warm), 3),
        "prediction_wall_median_s": round(statistics.median(wall for wall, _ in warm), 3),
        "other_batch_prediction_wall_s": round(other_wall, 3),
        "other_batch_prediction_cpu_s": round(other_cpu, 3),
        "real_step_s": round(step, 3),
        "prediction_over_real_step": round(predict_wall / step, 2),
    }


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min_at_start": load_average(),
    }


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--quick", action="store_true", help="skip NiN at 224x224 (its real step is the slow one)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    args = parser.parse_args()
    info = machine()
    rows = [bench(*entry) for entry in models(args.quick, args.only)]
    info["load_average_1min_at_end"] = load_average()
    header = (
        f"{'model':16} {'modules':>7} {'ops':>5} {'first s':>8} {'warm s':>7} {'cpu s':>6} "
        f"{f'batch {OTHER_BATCH} cpu s':>14} {'step s':>7} {'ratio':>6}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['model']:16} {row['modules']:>7} {row['ops']:>5} "
            f"{row['first_prediction_s']:>8.3f} {row['prediction_wall_s']:>7.3f} "
            f"{row['prediction_cpu_s']:>6.3f} {row['other_batch_prediction_cpu_s']:>14.3f} "
            f"{row['real_step_s']:>7.3f} {row['prediction_over_real_step']:>6.2f}"
        )
    result = {
        "what": (
            f"predict_memory of a training step (adam, batch {BATCH}) against a real step; warm "
            f"figures are the least of {REPEATS} repeats (and the median wall time), then one "
            f"prediction at batch {OTHER_BATCH}"
        ),
        "machine": info,
        "results": rows,
    }
    with atomic_write(args.output, durable=False, text=True) as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
