"""NiN variants side by side: parameters, FLOPs, training and inference peak memory, smallest valid
input and the last layer's receptive field, each variant against the first; optionally trained.

Every figure comes from the one place that computes it (`summarize`, `predict_memory`,
`ninlab.training.train.train`); this module only gathers them per variant and formats the table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, step_spec
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.models import get_config, list_configs, resolve_model
from ninlab.training.data import FashionMNIST
from ninlab.training.presets import TrainConfig
from ninlab.training.progress import Reporter
from ninlab.training.train import train
from ninlab.units import format_bytes, format_count, format_flops
from ninlab.viz.html import html_table
from ninlab.viz.render import wide_console

__all__ = [
    "METRICS",
    "TRAINING_METRICS",
    "Comparison",
    "Metric",
    "TrainPlan",
    "Training",
    "VariantResult",
    "compare",
    "comparison_dict",
    "comparison_html",
    "comparison_json",
    "comparison_markdown",
    "print_comparison",
]

Unit = Literal["count", "flops", "bytes", "pixels", "size", "fraction", "seconds"]


@dataclass(frozen=True)
class Metric:
    key: str  # a `VariantResult` attribute (or its `training`'s, for the training metrics)
    label: str
    unit: Unit


METRICS: tuple[Metric, ...] = (
    Metric("parameters", "Parameters", "count"),
    Metric("forward_flops", "Forward FLOPs per batch (inference)", "flops"),
    Metric("training_step_flops", "Training-step FLOPs per batch", "flops"),
    Metric("train_peak_bytes", "Training peak: live tensors", "bytes"),
    Metric("train_allocator_peak_bytes", "Training peak: allocator", "bytes"),
    Metric("infer_peak_bytes", "Inference peak: live tensors", "bytes"),
    Metric("infer_allocator_peak_bytes", "Inference peak: allocator", "bytes"),
    Metric("smallest_input_size", "Smallest valid input", "size"),
    Metric("last_field_size", "Receptive field of the last conv/pool layer", "pixels"),
)
TRAINING_METRICS: tuple[Metric, ...] = (
    Metric("test_accuracy", "Test accuracy", "fraction"),
    Metric("train_seconds", "Training time", "seconds"),
)


@dataclass(frozen=True)
class Training:
    """One variant trained with `config` (the preset, its overrides, this variant)."""

    config: TrainConfig
    output_dir: str
    test_accuracy: float  # after the last epoch
    train_seconds: float  # the epochs' training time, evaluation not included


@dataclass(frozen=True)
class TrainPlan:
    """How to train each variant: `config` is the preset with any overrides; its variant is
    replaced by each compared one. Runs go to `output_dir`/<variant>."""

    preset: str
    config: TrainConfig
    data: FashionMNIST
    output_dir: Path
    device: str | None = None
    reporter: Reporter | None = None


@dataclass(frozen=True)
class VariantResult:
    spec: str
    description: str
    parameters: int
    forward_flops: int
    training_step_flops: int
    train_peak_bytes: int  # live tensor storage (`MemoryReport.live_peak_bytes`)
    train_allocator_peak_bytes: int  # what the allocator holds, kernel workspace included
    infer_peak_bytes: int
    infer_allocator_peak_bytes: int
    smallest_input_size: tuple[int, ...]  # channels, then each spatial axis
    last_field_layer: str  # the last conv or pooling layer with a receptive field
    last_field_size: tuple[int, ...]  # per spatial axis, in input pixels
    training: Training | None = None

    def value(self, metric: Metric) -> Any:
        if metric in TRAINING_METRICS:
            return getattr(self.training, metric.key) if self.training else None
        return getattr(self, metric.key)


@dataclass(frozen=True)
class Comparison:
    input_size: tuple[int, ...]
    batch_size: int
    dtype: str
    optimizer: str
    variants: tuple[VariantResult, ...]
    preset: str | None  # the training preset, when the variants were trained

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS + (TRAINING_METRICS if self.preset else ())

    def difference(self, metric: Metric, variant: VariantResult) -> Any:
        """`variant`'s value minus the first column's (per axis for sizes); None if either is missing."""
        value, first = variant.value(metric), self.variants[0].value(metric)
        if value is None or first is None:
            return None
        if isinstance(value, tuple):
            return tuple(a - b for a, b in zip(value, first))
        return value - first

    def _repr_html_(self) -> str:
        """Jupyter shows the comparison as the terminal's table."""
        return comparison_html(self)


def compare(
    specs: Sequence[str],
    step: StepSpec | None = None,
    *,
    batch_size: int = 128,
    training: TrainPlan | None = None,
    **fields: Any,
) -> Comparison:
    """Analyse each model spec (a registry name, `name:key=value,...` or `package.module:factory`)
    for the training step `step` describes (or its fields, as keywords: `input_size`, `dtype`,
    `optimizer`, ...) and its inference at `batch_size`; with `training`, also train each one and
    add its test accuracy and training time."""
    step = step_spec(step, **fields).replace(mode="train")
    if not specs:
        raise NinlabError(f"name at least one model to compare, e.g. nin-d2l nin-d2l-1x1 (registry: {', '.join(sorted(list_configs()))})")
    if len(set(specs)) < len(specs):
        raise NinlabError(f"a model is named twice in {' '.join(specs)}; name each once")
    if training is not None:
        for spec in specs:
            if spec.partition(":")[0] not in list_configs():
                raise NinlabError(f"--train trains registry models and their variants only; {spec!r} is a factory")
    variants = tuple(_analyse(spec, step, batch_size) for spec in specs)
    if training is not None:
        variants = tuple(dataclasses.replace(v, training=_train(v.spec, training)) for v in variants)
    return Comparison(
        input_size=step.input_size,
        batch_size=batch_size,
        dtype=str(step.dtype).removeprefix("torch."),
        optimizer=step.optimizer_name,
        variants=variants,
        preset=training.preset if training else None,
    )


def _analyse(spec: str, step: StepSpec, batch_size: int) -> VariantResult:
    model = resolve_model(spec)
    summary = summarize(model, input_size=step.input_size, batch_size=batch_size, dtype=step.dtype, model_name=spec)
    train = predict_memory(model, step, batch_size=batch_size)
    infer = predict_memory(model, step.inference(), batch_size=batch_size)
    fields = [layer for layer in summary.layers if layer.is_leaf and layer.receptive_field]
    last = fields[-1] if fields else None
    name, _, settings = spec.partition(":")
    description = get_config(name).description if name in list_configs() else ""
    return VariantResult(
        spec=spec,
        description=f"{description}; with {settings}" if description and settings else description,
        parameters=summary.totals.parameters,
        forward_flops=summary.totals.forward_flops,
        training_step_flops=summary.totals.training_step_flops,
        train_peak_bytes=train.live_peak_bytes,
        train_allocator_peak_bytes=train.allocator_peak_bytes,
        infer_peak_bytes=infer.live_peak_bytes,
        infer_allocator_peak_bytes=infer.allocator_peak_bytes,
        smallest_input_size=summary.smallest_input_size,
        last_field_layer=last.name if last else "",
        last_field_size=tuple(f.size for f in last.receptive_field or ()) if last else (),
    )


def _train(spec: str, plan: TrainPlan) -> Training:
    config = dataclasses.replace(plan.config, variant=spec)
    output_dir = plan.output_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
    result = train(config, output_dir=output_dir, data=plan.data, device=plan.device, reporter=plan.reporter)
    if result.interrupted or not result.history:
        raise NinlabError(
            f"training {spec} was interrupted; continue it with 'ninlab train --resume {output_dir}'"
        )
    return Training(
        config=config,
        output_dir=str(output_dir),
        test_accuracy=float(result.history[-1]["test_accuracy"]),
        train_seconds=float(sum(row["train_seconds"] for row in result.history)),
    )


# -- formatting -----------------------------------------------------------------------------------


def _format(unit: Unit, value: Any) -> str:
    if value is None:
        return ""
    if unit == "count":
        return format_count(value)
    if unit == "flops":
        return format_flops(value)
    if unit == "bytes":
        return format_bytes(value)
    if unit == "size":
        return "x".join(map(str, value))
    if unit == "pixels":
        return " x ".join(map(str, sorted(set(value), key=value.index))) + " px" if value else ""
    if unit == "fraction":
        return f"{value:.2%}"
    return f"{value:.1f} s"


def _format_difference(unit: Unit, difference: Any, first: Any) -> str:
    if difference is None:
        return ""
    if unit == "size":
        return "x".join(f"{d:+d}" for d in difference[1:]) if any(difference) else "same"
    if unit == "pixels":
        return _format(unit, tuple(f"{d:+d}" for d in difference)) if any(difference) else "same"
    if not difference:
        return "same"
    sign = "+" if difference > 0 else "-"
    if unit == "fraction":
        return f"{difference * 100:+.2f} points"
    magnitude = _format(unit, abs(difference))
    relative = f", {difference / first:+.1%}" if first else ""
    return f"{sign}{magnitude}{relative}"


def _cells(comparison: Comparison, metric: Metric) -> list[str]:
    first = comparison.variants[0].value(metric)
    cells = []
    for index, variant in enumerate(comparison.variants):
        text = _format(metric.unit, variant.value(metric))
        if index:
            difference = _format_difference(metric.unit, comparison.difference(metric, variant), first)
            text += f" ({difference})" if difference else ""
        cells.append(text)
    return cells


def _title(comparison: Comparison) -> str:
    title = (
        f"Batch {comparison.batch_size} x {'x'.join(map(str, comparison.input_size))}, {comparison.dtype}, "
        f"optimizer {comparison.optimizer}; differences from the first column in brackets"
    )
    if comparison.preset:
        trained = comparison.variants[0].training
        config = trained.config if trained else None
        if config is not None:
            title += (
                f". Trained with preset {comparison.preset}: {config.image_size}x{config.image_size}, "
                f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}, batch {config.batch_size}"
            )
    return title


def print_comparison(comparison: Comparison, *, console: Console | None = None) -> None:
    console = console or wide_console()
    table = Table(title=_title(comparison), title_justify="left")
    table.add_column("")
    for variant in comparison.variants:
        table.add_column(variant.spec, justify="right")
    for metric in comparison.metrics:
        table.add_row(metric.label, *_cells(comparison, metric))
    console.print(table)
    for variant in comparison.variants:
        if variant.description:
            console.print(f"{variant.spec}: {variant.description}", highlight=False, markup=False)


def comparison_markdown(comparison: Comparison) -> str:
    header = "| | " + " | ".join(v.spec for v in comparison.variants) + " |"
    lines = [f"**{_title(comparison)}**", "", header, "|---" * (len(comparison.variants) + 1) + "|"]
    for metric in comparison.metrics:
        lines.append(f"| {metric.label} | " + " | ".join(_cells(comparison, metric)) + " |")
    return "\n".join(lines) + "\n"


def comparison_html(comparison: Comparison) -> str:
    columns = ("", *(v.spec for v in comparison.variants))
    rows = [(metric.label, *_cells(comparison, metric)) for metric in comparison.metrics]
    notes = [f"{v.spec}: {v.description}" for v in comparison.variants if v.description]
    return html_table(columns, rows, numeric=columns[1:], caption=_title(comparison), notes=notes)


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """Exact numbers (bytes in bytes, FLOPs in FLOPs) and each difference from the first variant."""
    variants = []
    for variant in comparison.variants:
        row: dict[str, Any] = {"spec": variant.spec, "description": variant.description, "last_field_layer": variant.last_field_layer}
        for metric in comparison.metrics:
            value, difference = variant.value(metric), comparison.difference(metric, variant)
            row[metric.key] = list(value) if isinstance(value, tuple) else value
            row[f"{metric.key}_difference"] = list(difference) if isinstance(difference, tuple) else difference
        if variant.training:
            row["training"] = {"config": dataclasses.asdict(variant.training.config), "output_dir": variant.training.output_dir}
        variants.append(row)
    return {
        "input_size": list(comparison.input_size),
        "batch_size": comparison.batch_size,
        "dtype": comparison.dtype,
        "optimizer": comparison.optimizer,
        "preset": comparison.preset,
        "variants": variants,
    }


def comparison_json(comparison: Comparison) -> str:
    return json.dumps(comparison_dict(comparison), indent=2)
