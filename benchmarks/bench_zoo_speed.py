"""How long a memory prediction takes on torchvision and timm models nobody here wrote, cold and
warm, beside torchinfo's summary and a real step of the same model, measured in the same process.

Run by hand (not in CI), with torchvision and timm importable (here: /work/venvs/t2141) and
torchinfo on the path:

    PYTHONPATH=src:/path/to/torchinfo python benchmarks/bench_zoo_speed.py [--quick]
        [--only NAME ...] [--batch 8] [--no-reference] [--fit 2GiB] [--output PATH]
        [--predictions PATH] [--no-nin] [--plan BUDGET BATCH]

Each model runs in a fresh process: its first prediction there is cold (it pays the fake-tensor
machinery's warm-up), and each step kind's first prediction pays what that kind needs once per
process (bf16: the kernel probe, unless its disk cache already holds the calls). Then the same
prediction again, warm (the least of `REPEATS`). Step kinds: a training step with SGD momentum,
with Adam, under bf16 autocast (SGD momentum), with channels-last input and parameters (SGD
momentum), and an inference. Beside them, in the same process: torchinfo's `summary` of the model
at the same batch (a real forward) and one real training step (SGD momentum, float32, after a
warm-up step); with `--fit`, `fit_batch` into that budget for SGD momentum in float32 and under
bf16 autocast, after the predictions (the batch planner's cost); with `--plan`, the budget
planner (`plan_budget`, every alternative) for that budget and batch, in float32 and under bf16
autocast (SGD momentum). Times are wall seconds and this
process's CPU seconds (the machine may be shared: CPU time is what the work itself cost); the load
average is recorded at start and end.

Before the models, in a fresh process of its own: d2l's NiN at batch 128 on 1x224x224, its whole
analysis (its summary, the training step's memory and an inference's, as `study_costs` gives
them, each step traced once) cold and warm, beside the same three answers asked one by one
(`summarize`, `predict_memory` twice: checked equal) and torchinfo's summary of it (the issue's
"50x" target), as ratios of CPU and of wall seconds.

`--predictions PATH` writes every prediction's JSON (`ninlab summary`'s memory figures; NiN's
summary and both its predictions; each plan's), to compare two versions byte for byte: a speed
change must move no number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCH = 8
REPEATS = 2
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "bench_zoo_speed-cpu.json"

# (name, library, constructor name, one sample's size)
CORPUS: list[tuple[str, str, str, tuple[int, ...]]] = [
    ("resnet50", "torchvision", "resnet50", (3, 224, 224)),
    ("convnext_tiny", "torchvision", "convnext_tiny", (3, 224, 224)),
    ("efficientnet_b0", "torchvision", "efficientnet_b0", (3, 224, 224)),
    ("vit_b_16", "torchvision", "vit_b_16", (3, 224, 224)),
    ("swin_t", "torchvision", "swin_t", (3, 224, 224)),
    ("densenet121", "torchvision", "densenet121", (3, 224, 224)),
    ("mobilenet_v3_large", "torchvision", "mobilenet_v3_large", (3, 224, 224)),
    ("regnet_y_800mf", "torchvision", "regnet_y_800mf", (3, 224, 224)),
    ("maxvit_t", "torchvision", "maxvit_t", (3, 224, 224)),
    ("resnet18", "torchvision", "resnet18", (3, 224, 224)),
    ("mobilenet_v2", "torchvision", "mobilenet_v2", (3, 224, 224)),
    ("shufflenet_v2_x1_0", "torchvision", "shufflenet_v2_x1_0", (3, 224, 224)),
    ("squeezenet1_1", "torchvision", "squeezenet1_1", (3, 224, 224)),
    ("mnasnet1_0", "torchvision", "mnasnet1_0", (3, 224, 224)),
    ("inception_v3", "torchvision", "inception_v3", (3, 299, 299)),
    ("deit_tiny", "timm", "deit_tiny_patch16_224", (3, 224, 224)),
    ("convnextv2_atto", "timm", "convnextv2_atto", (3, 224, 224)),
    ("mobilevit_xxs", "timm", "mobilevit_xxs", (3, 256, 256)),
    ("poolformer_s12", "timm", "poolformer_s12", (3, 224, 224)),
    ("ghostnet_100", "timm", "ghostnet_100", (3, 224, 224)),
    ("resnet50d", "timm", "resnet50d", (3, 224, 224)),
    ("efficientformer_l1", "timm", "efficientformer_l1", (3, 224, 224)),
]
FITS = ("sgd", "bf16")  # the step kinds whose fit_batch --fit times, and plan_budget --plan
NIN = "nin"  # the child that times NiN against torchinfo
QUICK = ["resnet50", "efficientnet_b0", "vit_b_16", "densenet121", "swin_t", "deit_tiny"]

SGD = "sgd:momentum=0.9"
KINDS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": SGD},
    "adam": {"optimizer": "adam"},
    "bf16": {"optimizer": SGD, "amp": "bf16"},
    "channels_last": {"optimizer": SGD, "memory_format": "channels_last"},
    "infer": {"mode": "infer"},
}


def build(library: str, constructor: str) -> Any:
    if library == "timm":
        import timm

        return timm.create_model(constructor, pretrained=False)
    import torchvision

    extra = {"aux_logits": False, "init_weights": False} if constructor == "inception_v3" else {}
    return getattr(torchvision.models, constructor)(weights=None, **extra)


def clocked(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, the result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def child(
    name: str,
    batch: int,
    reference: bool,
    fit_budget: str | None,
    plan: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """One model in this (fresh) process: every step kind cold then warm, then the references."""
    import torch

    from ninlab.analysis.predict import predict_memory
    from ninlab.viz.render_memory import memory_json

    _, library, constructor, input_size = next(entry for entry in CORPUS if entry[0] == name)
    torch.manual_seed(0)
    model = build(library, constructor)
    row: dict[str, Any] = {"model": name, "modules": sum(1 for _ in model.modules())}
    predictions: dict[str, str] = {}
    for kind, fields in KINDS.items():

        def predict(fields: dict[str, Any] = fields) -> Any:
            return predict_memory(model, input_size=input_size, batch_size=batch, **fields)

        try:
            cold_wall, cold_cpu, report = clocked(predict)
        except Exception as error:  # noqa: BLE001 - a refusal is a result of the benchmark
            row[kind] = {"error": f"{type(error).__name__}: {error}"[:200]}
            continue
        warm = [clocked(predict)[:2] for _ in range(REPEATS)]
        row[kind] = {
            "cold_wall_s": round(cold_wall, 3),
            "cold_cpu_s": round(cold_cpu, 3),
            "warm_wall_s": round(min(w for w, _ in warm), 3),
            "warm_cpu_s": round(min(c for _, c in warm), 3),
            "ops": len(report.timeline.points),
        }
        predictions[kind] = memory_json(report)
    if fit_budget:
        row["fit"] = {}
        for kind in FITS:
            row["fit"][kind], predictions[f"fit {kind}"] = fit_seconds(
                model, input_size, fit_budget, KINDS[kind]
            )
    if plan:
        row["plan"] = {}
        for kind in FITS:
            row["plan"][kind], predictions[f"plan {kind}"] = plan_seconds(
                model, input_size, plan, KINDS[kind]
            )
    if reference:
        row["torchinfo"] = torchinfo_seconds(model, input_size, batch)
        row["real_step"] = real_step_seconds(model, input_size, batch)
    row["predictions"] = predictions
    return row


def nin_child() -> dict[str, Any]:
    """NiN's whole analysis (summary, training memory, inference memory) against torchinfo's
    summary of it, in this (fresh) process: cold, then the least of `REPEATS` more."""
    from torchinfo import summary

    from ninlab.analysis.predict import predict_memory
    from ninlab.analysis.summary import summarize
    from ninlab.models import build_nin
    from ninlab.studies.costs import study_costs
    from ninlab.viz.render import summary_json
    from ninlab.viz.render_memory import memory_json

    model = build_nin()
    size, batch = (1, 224, 224), 128

    def analysis() -> tuple[Any, ...]:
        costs = study_costs(model, input_size=size, batch_size=batch)
        return costs.summary, costs.train, costs.infer

    def three_calls() -> tuple[Any, ...]:
        return (
            summarize(model, input_size=size, batch_size=batch),
            predict_memory(model, input_size=size, batch_size=batch),
            predict_memory(model, input_size=size, batch_size=batch, mode="infer"),
        )

    cold_wall, cold_cpu, answers = clocked(analysis)
    cold = cold_wall, cold_cpu
    warm = min(clocked(analysis)[:2] for _ in range(REPEATS))
    separate = min(clocked(three_calls)[:2] for _ in range(REPEATS))
    separate_answers = three_calls()
    if [summary_json(separate_answers[0]), *map(memory_json, separate_answers[1:])] != [
        summary_json(answers[0]),
        *map(memory_json, answers[1:]),
    ]:
        raise SystemExit("study_costs and the three calls it shares recordings between disagree")
    reference = min(
        clocked(lambda: summary(model, input_size=(batch, *size), verbose=0))[:2]
        for _ in range(REPEATS)
    )
    return {
        "model": "nin-d2l, batch 128, 1x224x224",
        "analysis_cold": {"wall_s": round(cold[0], 3), "cpu_s": round(cold[1], 3)},
        "analysis_warm": {"wall_s": round(warm[0], 3), "cpu_s": round(warm[1], 3)},
        "three_calls_warm": {"wall_s": round(separate[0], 3), "cpu_s": round(separate[1], 3)},
        "torchinfo": {"wall_s": round(reference[0], 3), "cpu_s": round(reference[1], 3)},
        "torchinfo_over_warm": {
            "cpu": round(reference[1] / warm[1], 1),
            "wall": round(reference[0] / warm[0], 1),
        },
        "torchinfo_over_cold": {
            "cpu": round(reference[1] / cold[1], 1),
            "wall": round(reference[0] / cold[0], 1),
        },
        "predictions": {
            "summary": summary_json(answers[0]),  # type: ignore[index]
            "train": memory_json(answers[1]),  # type: ignore[index]
            "infer": memory_json(answers[2]),  # type: ignore[index]
        },
    }


def fit_seconds(
    model: Any, input_size: tuple[int, ...], budget: str, fields: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """`fit_batch` in this process after its predictions, with what it found, and the fit's JSON
    (every field but the count of exact predictions and the peaks found on the way, which depend
    on the search's path: a faster search may ask fewer)."""
    from ninlab.analysis.batch import fit_batch

    try:
        wall, cpu, fit = clocked(
            lambda: fit_batch(model, input_size=input_size, budget=budget, **fields)
        )
    except Exception as error:  # noqa: BLE001 - a refusal is a result of the benchmark
        return {"error": f"{type(error).__name__}: {error}"[:200]}, ""
    answer = dataclasses.asdict(fit)  # type: ignore[call-overload]
    answer.pop("known", None)
    seconds = {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "batch_size": answer["batch_size"],
        "predictions": answer.pop("predictions"),
    }
    return seconds, json.dumps(answer, default=str, sort_keys=True)


def plan_seconds(
    model: Any, input_size: tuple[int, ...], plan: tuple[str, int], fields: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """`plan_budget` in this process after its predictions, and the plan's JSON."""
    from ninlab.analysis.planner import plan_budget
    from ninlab.viz.render_plan import plan_to_dict

    budget, batch = plan
    try:
        wall, cpu, result = clocked(
            lambda: plan_budget(
                model, input_size=input_size, budget=budget, batch_size=batch, **fields
            )
        )
    except Exception as error:  # noqa: BLE001 - a refusal is a result of the benchmark
        return {"error": f"{type(error).__name__}: {error}"[:200]}, ""
    answer = plan_to_dict(result)  # type: ignore[arg-type]
    seconds = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    return {**seconds, "options": len(answer["options"])}, json.dumps(answer, default=str)


def torchinfo_seconds(model: Any, input_size: tuple[int, ...], batch: int) -> dict[str, float]:
    from torchinfo import summary

    wall, cpu, _ = clocked(lambda: summary(model, input_size=(batch, *input_size), verbose=0))
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def real_step_seconds(model: Any, input_size: tuple[int, ...], batch: int) -> dict[str, float]:
    import torch

    from ninlab.analysis.step import train_step
    from ninlab.optimizers import make_optimizer, parse_optimizer

    model.train()
    inputs = torch.randn(batch, *input_size)
    targets = torch.randint(0, 10, (batch,))
    optimizer = make_optimizer(parse_optimizer(SGD), model.parameters())
    train_step(model, optimizer, inputs, targets)  # warm-up: momentum buffers, oneDNN's kernels
    wall, cpu, _ = clocked(lambda: train_step(model, optimizer, inputs, targets))
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def machine() -> dict[str, Any]:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def run_child(
    name: str,
    batch: int,
    reference: bool,
    fit_budget: str | None,
    plan: tuple[str, int] | None = None,
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--batch", str(batch)]
    if name == NIN:
        command = [sys.executable, __file__, "--child", NIN]
    if fit_budget:
        command += ["--fit", fit_budget]
    if plan:
        command += ["--plan", plan[0], str(plan[1])]
    if not reference:
        command.append("--no-reference")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"model": name, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    heads = [f"{kind[:8]:>17}" for kind in KINDS]
    lines = [
        f"{'model':20} {'mods':>5} "
        + " ".join(heads)
        + f" {'tinfo':>6} {'step':>6} "
        + " ".join(f"{'fit ' + kind:>8}" for kind in FITS),
        f"{'':27}"
        + " ".join(f"{'cold/warm cpu s':>17}" for _ in KINDS)
        + f" {'cpu s':>6} {'cpu s':>6} "
        + " ".join(f"{'cpu s':>8}" for _ in FITS),
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:20} error: {row['error']}")
            continue
        cells = []
        for kind in KINDS:
            cell = row.get(kind, {})
            cells.append(
                f"{'error':>17}"
                if "error" in cell
                else f"{cell['cold_cpu_s']:>8.2f}/{cell['warm_cpu_s']:<8.2f}"
            )
        reference = [
            f"{row[what]['cpu_s']:>6.2f}" if what in row else f"{'-':>6}"
            for what in ("torchinfo", "real_step")
        ]
        fits = [
            f"{row['fit'][kind].get('cpu_s', float('nan')):>8.2f}" if "fit" in row else f"{'-':>8}"
            for kind in FITS
        ]
        lines.append(f"{row['model']:20} {row['modules']:>5} " + " ".join(cells + reference + fits))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--predictions", type=Path, help="write every prediction's JSON here")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip torchinfo and the real step"
    )
    parser.add_argument(
        "--fit", metavar="BUDGET", help=f"also time fit_batch into BUDGET ({', '.join(FITS)})"
    )
    parser.add_argument(
        "--plan",
        nargs=2,
        metavar=("BUDGET", "BATCH"),
        help=f"also time plan_budget into BUDGET at BATCH ({', '.join(FITS)})",
    )
    parser.add_argument("--no-nin", action="store_true", help="skip NiN against torchinfo")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = (args.plan[0], int(args.plan[1])) if args.plan else None
    if args.child == NIN:
        print(json.dumps(nin_child()))
        return
    if args.child:
        print(json.dumps(child(args.child, args.batch, not args.no_reference, args.fit, plan)))
        return
    names = [entry[0] for entry in CORPUS]
    names = args.only or (QUICK if args.quick else names)
    info = machine()
    nin = None if args.no_nin else run_child(NIN, args.batch, True, None)
    nin_predictions = nin.pop("predictions", {}) if nin is not None else {}
    if nin is not None:
        print(f"NiN: {json.dumps(nin)}", flush=True)
    rows = []
    for name in names:
        rows.append(run_child(name, args.batch, not args.no_reference, args.fit, plan))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if "plan" in rows[-1]:
            print(f"{'':20} plan_budget: {json.dumps(rows[-1]['plan'])}", flush=True)
    info["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    predictions = {row["model"]: row.pop("predictions", {}) for row in rows}
    if nin_predictions:
        predictions[NIN] = nin_predictions
    print(table(rows))
    result = {
        "what": (
            f"predict_memory at batch {args.batch}, each model in a fresh process: the first "
            f"prediction of each step kind (cold) and the least of {REPEATS} more (warm), beside "
            "torchinfo's summary and one real SGD-momentum step at the same batch"
        ),
        "machine": info,
        "nin_against_torchinfo": nin,
        "results": rows,
    }
    from ninlab.outputs import atomic_write

    with atomic_write(args.output, durable=False, text=True) as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    if args.predictions:
        with atomic_write(args.predictions, durable=False, text=True) as handle:
            handle.write(json.dumps(predictions, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
