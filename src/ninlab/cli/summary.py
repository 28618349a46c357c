"""`ninlab summary`: the per-layer table, with the rounding explained on request, and the memory
section (`ninlab.analysis.predict`) after it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ninlab.analysis.batch import BatchFit, BatchScaling, fit_batch, memory_vs_batch
from ninlab.analysis.memory_report import MemoryReport
from ninlab.analysis.planner import BudgetPlan, plan_budget
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import summarize
from ninlab.cli.options import (
    ModelChoice,
    add_format_option,
    add_model_options,
    add_step_options,
    model_choice,
    step_spec,
)
from ninlab.viz.render import print_summary, summary_csv, summary_markdown, summary_to_dict
from ninlab.viz.render_memory import memory_markdown, memory_to_dict, print_memory
from ninlab.viz.render_plan import plan_lines, plan_to_dict


@dataclass(frozen=True)
class MemorySection:
    report: MemoryReport
    scaling: BatchScaling | None  # with --fit: the peak as fixed + per-sample bytes
    fit: BatchFit | None
    plan: BudgetPlan | None  # with --fit, training: the largest batch under each alternative


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="shapes, rounding, parameters and FLOPs per layer, and the memory of a step",
        description="One row per layer (output shape, where its size was rounded, parameters, "
        "FLOPs, output size), the totals, then the memory of a training step or an inference.",
    )
    add_model_options(parser)
    add_step_options(parser, mode="train; infer for a model with nothing to train")
    add_format_option(parser, "table", "json", "markdown", "csv")
    parser.add_argument(
        "--explain", action="store_true", help="print the arithmetic behind every rounded size"
    )
    parser.add_argument(
        "--fit",
        metavar="BUDGET",
        help="largest batch whose peak fits, e.g. 8GiB, 500MB; for training, also under bf16, "
        "checkpointing, accumulation and other optimizers, with a recommendation",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choice = model_choice(args)
    trains = any(p.requires_grad for p in choice.model.parameters())
    spec = step_spec(args, mode=args.mode or ("train" if trains else "infer"))
    summary = summarize(
        choice.model,
        input_size=spec.input_size,
        batch_size=choice.batch_size,
        dtype=choice.dtype,
        input_dtype=spec.input_dtype,
        input_range=spec.input_range,
        mode=spec.mode,
        model_name=choice.name,
    )
    if args.format == "csv":  # one row per module: the memory section has no place there
        print(summary_csv(summary), end="")
        return 0
    memory = _memory_section(choice, spec, fit=args.fit)
    if args.format == "json":
        data = summary_to_dict(summary)
        data["memory"] = memory_to_dict(memory.report, scaling=memory.scaling, fit=memory.fit)
        data["memory"]["plan"] = plan_to_dict(memory.plan) if memory.plan else None
        print(json.dumps(data, indent=2))
    elif args.format == "markdown":
        print(summary_markdown(summary, explain=args.explain))
        print(memory_markdown(memory.report, scaling=memory.scaling, fit=memory.fit), end="")
        if memory.plan:
            heading, *options, recommendation = plan_lines(memory.plan)
            print("\n".join(["", f"**{heading}**", "", *(f"- {line.strip()}" for line in options), "", f"**{recommendation}**"]))
    else:
        print_summary(summary, explain=args.explain)
        print()
        print_memory(memory.report, scaling=memory.scaling, fit=memory.fit)
        if memory.plan:
            print("\n".join(plan_lines(memory.plan)))
    return 0


def _memory_section(choice: ModelChoice, spec: StepSpec, *, fit: str | None) -> MemorySection:
    report = predict_memory(
        choice.model, spec, batch_size=choice.batch_size, model_name=choice.name
    )
    if fit is None:
        return MemorySection(report, None, None, None)
    batch_fit = fit_batch(choice.model, spec, budget=fit)
    scaling = memory_vs_batch(
        choice.model,
        spec,
        batch_sizes=(batch_fit.batch_size, batch_fit.batch_size + 1),
        check_batch_size=choice.batch_size,
        level=batch_fit.level,
    )
    plan = None
    if spec.mode == "train":
        plan = plan_budget(choice.model, spec, budget=fit, batch_size=choice.batch_size)
    return MemorySection(report, scaling, batch_fit, plan)
