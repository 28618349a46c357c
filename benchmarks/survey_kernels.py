"""Which kernels without an allocator rule allocate only their outputs: the survey behind
`ninlab.analysis.allocator.outputs_only.SURVEYED`.

Every op call of the test corpus (`tests/corpus/corpus_cases.py`: the layer zoo, torchvision,
timm and Hugging Face transformers, each under its setups) and of full-size torchvision models
(`--zoo`, at batch 8, 224x224) that no rule names and that is neither a view nor pointwise, and
every contiguous call of the ops `probed.PROBED_IN_ANOTHER_LAYOUT` measures only in another
layout, is run on its own by the kernel probe (`ninlab.analysis.kernel_probe`), and its blocks
beyond its outputs compared with what `ninlab.analysis.allocator.scalars` counts beside it (its
input casts). An op whose every call holds nothing more is a candidate for `SURVEYED`; the
others, with their largest excess, stay measured at each call. Run by hand (torchvision, timm
and transformers importable):

    PYTHONPATH=src python benchmarks/survey_kernels.py [--zoo] [--only NAME ...]
        [--output benchmarks/survey_kernels-cpu.md]

The probe's disk cache is pointed at a fresh folder, so every call is measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "corpus")]
os.environ["NINLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="ninlab-survey-")

import torch  # noqa: E402

from ninlab.analysis import recorder  # noqa: E402
from ninlab.analysis.allocator import peak_above_start_bytes  # noqa: E402
from ninlab.analysis.allocator.outputs_only import SURVEYED, outputs_only_by_kind  # noqa: E402
from ninlab.analysis.allocator.probed import PROBED_IN_ANOTHER_LAYOUT  # noqa: E402
from ninlab.analysis.allocator.registry import (  # noqa: E402
    ALLOCATION_RULES,
    OUTPUTS_ONLY,
    UNKNOWN_KERNEL,
    KernelBlocks,
    cpu_kernel_allocations,
)
from ninlab.analysis.kernel_probe import measured_allocations  # noqa: E402
from ninlab.analysis.predict import predict_recorded  # noqa: E402
from ninlab.errors import NinlabError  # noqa: E402

LAYOUT_PROBED = {op for ops in PROBED_IN_ANOTHER_LAYOUT.values() for op in ops}
ZOO = ("resnet50", "densenet121", "efficientnet_b0", "vit_b_16", "swin_t", "convnext_tiny")
ZOO_SETUPS = {
    "sgd": {"optimizer": "sgd-momentum"},
    "adam": {"optimizer": "adam"},
    "bf16": {"optimizer": "sgd-momentum", "amp": "bf16"},
    "infer": {"mode": "infer"},
}


SURVEYED_CALL = "surveyed: measured at every call"


def every_call_measured(name: str, args: Any) -> KernelBlocks:
    """The recorder's lookup, with every call the survey vouches for (`SURVEYED`, and the
    contiguous calls of the ops measured in another layout) measured instead: the survey
    checks its own list again."""
    blocks = cpu_kernel_allocations(name, args)
    if blocks == OUTPUTS_ONLY and not outputs_only_by_kind(name):
        return KernelBlocks(None, SURVEYED_CALL)
    return blocks


recorder.cpu_kernel_allocations = every_call_measured


@dataclass
class OpTally:
    calls: int = 0
    beyond: int = 0
    most_beyond_bytes: int = 0
    unmeasured: dict[str, int] = field(default_factory=dict)
    where: set[str] = field(default_factory=set)


def survey(model: Any, fields: dict[str, Any], batch: int, label: str, tally: dict) -> str:
    """Record one step, measure each of its calls no rule knows, add them to `tally`."""
    torch.manual_seed(0)
    try:
        _, step = predict_recorded(model, batch_size=batch, probe_kernels=False, **fields)
    except NinlabError as error:
        return f"refused: {error}"
    if step is None:
        return "measured for real (not traceable)"
    for op in step.recording.ops[step.step_start :]:
        if op.cpu_call is None or op.cpu_unmodelled not in (
            UNKNOWN_KERNEL.unmodelled,
            SURVEYED_CALL,
        ):
            continue
        entry = tally[op.op]
        entry.calls += 1
        entry.where.add(label)
        measured = measured_allocations(op.cpu_call)
        if isinstance(measured, str):
            entry.unmeasured[measured] = entry.unmeasured.get(measured, 0) + 1
            continue
        outputs = sum(a.delta_bytes for a in measured if a.output is not None)
        beyond = peak_above_start_bytes(measured) - outputs - op.cpu_scalar_bytes
        if beyond > 0:
            entry.beyond += 1
            entry.most_beyond_bytes = max(entry.most_beyond_bytes, beyond)
    return "ok"


def corpus_runs(only: set[str] | None) -> list[tuple[str, Any, dict[str, Any], int]]:
    from corpus_cases import BATCH_SIZE, CASES, available, spec_fields

    return [
        (f"{case.name} ({setup})", case.build, spec_fields(case, setup), BATCH_SIZE)
        for case in CASES
        if available(case) and (only is None or case.name in only)
        for setup in case.setups
    ]


def zoo_runs(only: set[str] | None) -> list[tuple[str, Any, dict[str, Any], int]]:
    import torchvision

    return [
        (
            f"{name} 224 ({setup})",
            lambda name=name: getattr(torchvision.models, name)(),
            {"input_size": (3, 224, 224), **fields},
            8,
        )
        for name in ZOO
        if only is None or name in only
        for setup, fields in ZOO_SETUPS.items()
    ]


def markdown(tally: dict[str, OpTally], runs: int, seconds: float, machine: str) -> str:
    lines = [
        "# Kernels without an allocator rule, measured at every call",
        "",
        f"{machine}; {runs} steps recorded (`benchmarks/survey_kernels.py --zoo`). Every call of",
        "an op that has no rule and is neither a view nor pointwise, and every contiguous call of",
        "the ops measured only in another layout, measured on its own by the kernel probe",
        f"({seconds:.0f} s). 'beyond': calls holding blocks beyond their outputs and the input",
        "casts `scalars` counts. 'now': what the predictor does with the op's calls ('its rule':",
        "the calls a rule gives as outputs only, checked here too).",
        "",
        "| op | now | calls | beyond | most beyond (bytes) | not measured | e.g. |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for name, entry in sorted(tally.items(), key=lambda item: (-item[1].beyond, item[0])):
        unmeasured = "; ".join(f"{count}: {why}" for why, count in entry.unmeasured.items())
        example = sorted(entry.where)[0]
        now = (
            "surveyed"
            if name in SURVEYED
            else "measured in another layout"
            if name in LAYOUT_PROBED
            else "its rule"
            if name in ALLOCATION_RULES
            else "measured"
        )
        lines.append(
            f"| {name} | {now} | {entry.calls} | {entry.beyond} | {entry.most_beyond_bytes:,} | "
            f"{unmeasured} | {example} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="store_true", help="full-size torchvision models too")
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    only = set(args.only) if args.only else None
    runs = corpus_runs(only) + (zoo_runs(only) if args.zoo else [])
    tally: dict[str, OpTally] = defaultdict(OpTally)
    start = time.perf_counter()
    for label, build, fields, batch in runs:
        print(label, survey(build(), fields, batch, label, tally), file=sys.stderr, flush=True)
    machine = (
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    text = markdown(tally, len(runs), time.perf_counter() - start, machine)
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
