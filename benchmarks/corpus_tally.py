"""The corpus tally: every case of `tests/corpus/corpus_cases.py` under each of its setups,
predicted and measured on this machine, counted per family as exact / flagged / refused / wrong,
written as Markdown (every case not exact listed, and why) and as JSON (one outcome per line).

    PYTHONPATH=src /work/venvs/t2141/bin/python benchmarks/corpus_tally.py \
        --output benchmarks/corpus_tally-cpu.md

Each outcome is appended to the JSON-lines file beside the Markdown as it comes, so shards run
side by side (`--family`, `--only`, each with its own `--output`) can be joined afterwards:
`--join a.jsonl b.jsonl --output benchmarks/corpus_tally-cpu.md` writes the tally of them all.
Cases whose package (torchvision, timm, transformers) is missing are counted as skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

# The cases import the test suite's shared models (`odd_models`, `steps`) as pytest finds them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "corpus"))

from corpus_cases import CASES, OUTCOMES, Outcome, available, check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the Markdown file to write")
    parser.add_argument("--only", nargs="*", default=(), help="case names to run (default all)")
    parser.add_argument("--family", nargs="*", default=(), help="families to run (default all)")
    parser.add_argument(
        "--join", nargs="*", type=Path, default=(), help="JSON-lines files to tally"
    )
    args = parser.parse_args()
    if args.join:
        lines = [line for path in args.join for line in path.read_text().splitlines() if line]
        # A case run by two shards counts once, as the later file has it.
        latest = {(o.case, o.setup): o for o in (Outcome(**json.loads(line)) for line in lines)}
        joined = list(latest.values())
        args.output.write_text(_markdown(joined, [], None))
        return 0
    outcomes: list[Outcome] = []
    skipped: list[str] = []
    started = time.perf_counter()
    results = args.output.with_suffix(".jsonl")
    results.write_text("")
    for case in CASES:
        if (args.only and case.name not in args.only) or (
            args.family and case.family not in args.family
        ):
            continue
        if not available(case):
            skipped.append(f"{case.name} (no {case.needs})")
            continue
        for setup in case.setups:
            began = time.perf_counter()
            outcome = check(case, setup)
            outcomes.append(outcome)
            with results.open("a") as file:
                file.write(json.dumps(outcome.__dict__) + "\n")
            print(
                f"{time.perf_counter() - began:6.1f}s {outcome.kind:8} {case.family}: "
                f"{case.name} {setup}: {outcome.detail[:160]}",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    args.output.write_text(_markdown(outcomes, skipped, elapsed))
    return 0


def _markdown(outcomes: list[Outcome], skipped: list[str], elapsed: float | None) -> str:
    families = list(dict.fromkeys(outcome.family for outcome in outcomes))
    counts = Counter((outcome.family, outcome.kind) for outcome in outcomes)
    provenance = (
        f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}; "
        f"{len(outcomes)} runs"
        f"{'' if elapsed is None else f' in {elapsed:.0f} s'} (`benchmarks/corpus_tally.py`)."
    )
    meaning = (
        "exact: both levels labelled exact and right (live equal, allocator within 1%); flagged: "
        "a level labelled at least / measured / estimate, and holding; refused: one line; wrong: "
        "a figure off its label, a traceback, or the model left changed."
    )
    lines = [
        "# Corpus tally: the models users bring, predicted against `ninlab.measure`",
        "",
        provenance,
        "",
        meaning,
        "",
        "| family | " + " | ".join(OUTCOMES) + " |",
        "| --- |" + " ---: |" * len(OUTCOMES),
    ]
    for family in families:
        cells = " | ".join(str(counts[family, kind]) for kind in OUTCOMES)
        lines.append(f"| {family} | {cells} |")
    totals = " | ".join(str(sum(counts[f, kind] for f in families)) for kind in OUTCOMES)
    lines += [f"| all | {totals} |", ""]
    for kind in ("wrong", "refused", "flagged"):
        chosen = [outcome for outcome in outcomes if outcome.kind == kind]
        if chosen:
            lines += [f"## {kind}", ""]
            lines += [
                f"- {o.family}: {o.case} ({o.setup}): {o.detail.replace(chr(10), ' ')}"
                for o in chosen
            ]
            lines.append("")
    if skipped:
        lines += ["## skipped", "", *[f"- {name}" for name in skipped], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
