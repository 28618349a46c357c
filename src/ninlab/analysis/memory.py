"""The memory accountant's public names in one place, for callers outside `ninlab.analysis`.

Each idea has its own module, and code inside `ninlab.analysis` imports from the one that owns
the name:

- `ninlab.analysis.predict`: `predict_memory`, what one step needs and why, tensor by tensor
  (and what is counted);
- `ninlab.analysis.memory_report`: what a prediction returns (`MemoryReport` and its parts);
- `ninlab.analysis.categories`: the category of every storage and why autograd keeps a tensor;
- `ninlab.analysis.batch`: the peak against the batch size, and the largest batch that fits.

This module only re-exports them: the trainer, the visuals and the CLI import from here, and
batch fitting imports prediction, so prediction cannot live here without an import cycle.
"""

from ninlab.analysis.batch import (
    BatchFit,
    BatchScaling,
    BatchStudy,
    fit_batch,
    memory_vs_batch,
    study_batch,
)
from ninlab.analysis.categories import (
    CATEGORIES,
    CATEGORY_MEANINGS,
    describe_categories,
    saved_reason,
)
from ninlab.analysis.memory_report import (
    AllocatorPeak,
    Breakdown,
    DDPBuckets,
    ForumRule,
    MeasuredFallback,
    MemoryReport,
    PeakOp,
    PhaseSpan,
    SavedLayer,
    SavedRow,
    Timeline,
    TimelinePoint,
)
from ninlab.analysis.predict import predict_memory

__all__ = [
    "CATEGORIES",
    "CATEGORY_MEANINGS",
    "AllocatorPeak",
    "BatchFit",
    "BatchScaling",
    "BatchStudy",
    "Breakdown",
    "DDPBuckets",
    "ForumRule",
    "MeasuredFallback",
    "MemoryReport",
    "PeakOp",
    "PhaseSpan",
    "SavedLayer",
    "SavedRow",
    "Timeline",
    "TimelinePoint",
    "describe_categories",
    "fit_batch",
    "memory_vs_batch",
    "predict_memory",
    "saved_reason",
    "study_batch",
]
