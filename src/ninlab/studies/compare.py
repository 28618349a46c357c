"""NiN variants side by side: parameters, FLOPs, training and inference peak memory, smallest valid
input and the last layer's receptive field, each variant against the first; optionally trained.

Every figure comes from the one place that computes it (`summarize`, `predict_memory`,
`ninlab.training.train.train`); this module gathers them per variant. `ninlab.viz.compare` shows
a `Comparison` as a table, Markdown, JSON or HTML (in Jupyter, through the front door).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, model_dtype, step_spec
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.models import get_config, list_configs, resolve_model
from ninlab.training.data import FashionMNIST
from ninlab.training.presets import TrainConfig
from ninlab.training.progress import Reporter
from ninlab.training.train import train
from ninlab.units import dtype_name

__all__ = [
    "METRICS",
    "TRAINING_METRICS",
    "Comparison",
    "Metric",
    "TrainPlan",
    "Training",
    "Unit",
    "VariantResult",
    "check_specs",
    "compare",
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
        """`variant`'s value minus the first column's (per axis for sizes); None if either
        is missing."""
        value, first = variant.value(metric), self.variants[0].value(metric)
        if value is None or first is None:
            return None
        if isinstance(value, tuple):
            return tuple(a - b for a, b in zip(value, first))
        return value - first


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
    check_specs(specs, trained=training is not None)
    variants = tuple(_analyse(spec, step, batch_size) for spec in specs)
    if training is not None:
        variants = tuple(
            dataclasses.replace(v, training=_train(v.spec, training)) for v in variants
        )
    return Comparison(
        input_size=step.input_size,
        batch_size=batch_size,
        # A dtype left to the models is the first one's (the others' are in their summaries).
        dtype=dtype_name(step.dtype or model_dtype(resolve_model(specs[0]))),
        optimizer=step.optimizer_name,
        variants=variants,
        preset=training.preset if training else None,
    )


def check_specs(specs: Sequence[str], *, trained: bool) -> None:
    """Refuse, before any work (the command line calls it before it loads the data), model specs
    `compare` cannot take: none, one named twice, a factory to train, a registry variant whose
    settings its network refuses (built on meta: no weights)."""
    if not specs:
        raise NinlabError(
            "name at least one model to compare, e.g. nin-d2l nin-d2l-1x1 (registry: "
            f"{', '.join(sorted(list_configs()))})"
        )
    if len(set(specs)) < len(specs):
        raise NinlabError(f"a model is named twice in {' '.join(specs)}; name each once")
    for spec in specs:
        if spec.partition(":")[0] in list_configs():
            resolve_model(spec, weights=False)
        elif trained:
            raise NinlabError(
                f"--train trains registry models and their variants only; {spec!r} is a factory"
            )


def _analyse(spec: str, step: StepSpec, batch_size: int) -> VariantResult:
    model = resolve_model(spec, weights=False)  # the accountant needs no weights
    summary = summarize(model, step, batch_size=batch_size, model_name=spec)
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
    result = train(
        config, output_dir=output_dir, data=plan.data, device=plan.device, reporter=plan.reporter
    )
    if result.interrupted or not result.history:
        raise NinlabError(
            f"training {spec} was interrupted; continue it with 'ninlab train --resume "
            f"{output_dir}'"
        )
    return Training(
        config=config,
        output_dir=str(output_dir),
        test_accuracy=float(result.history[-1]["test_accuracy"]),
        train_seconds=float(sum(row["train_seconds"] for row in result.history)),
    )
