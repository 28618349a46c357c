"""ninlab: Network in Network (d2l.ai) as software.

The front door: d2l's NiN and its variants, the accountant's questions (what does a step cost,
how large a batch fits) and the trainer, importable from `ninlab` itself. See ARCHITECTURE.md for
where each lives. Everything loads on first use, so `import ninlab` (and every `ninlab` command)
pays only for what it touches, and imports no PyTorch before the command line can catch a Ctrl-C.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ninlab.analysis.batch import fit_batch
    from ninlab.analysis.measure import measure
    from ninlab.analysis.planner import plan_budget
    from ninlab.analysis.predict import predict_memory
    from ninlab.analysis.step import StepSpec
    from ninlab.analysis.summary import summarize
    from ninlab.models import NiNConfig, build_nin, get_config, list_configs, resolve_model
    from ninlab.training.train import train

_LAZY = {
    **dict.fromkeys(
        ("NiNConfig", "build_nin", "get_config", "list_configs", "resolve_model"), "ninlab.models"
    ),
    "StepSpec": "ninlab.analysis.step",
    "summarize": "ninlab.analysis.summary",
    "predict_memory": "ninlab.analysis.predict",
    "fit_batch": "ninlab.analysis.batch",
    "plan_budget": "ninlab.analysis.planner",
    "measure": "ninlab.analysis.measure",
    "train": "ninlab.training.train",
}

__all__ = [
    "NiNConfig",
    "StepSpec",
    "build_nin",
    "fit_batch",
    "get_config",
    "list_configs",
    "measure",
    "plan_budget",
    "predict_memory",
    "resolve_model",
    "summarize",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ninlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


# The accountant's and the studies' results, shown under a Jupyter cell, render as the terminal's
# tables in HTML. They cannot carry `_repr_html_` themselves (neither imports the visuals), so the
# front door hands IPython the visuals' renderers by class name: nothing loads until one is shown.
_HTML_RENDERERS = {
    ("ninlab.analysis.summary", "Summary"): ("ninlab.viz.render", "summary_html"),
    ("ninlab.analysis.memory_report", "MemoryReport"): ("ninlab.viz.render_memory", "memory_html"),
    ("ninlab.studies.compare", "Comparison"): ("ninlab.viz.compare", "comparison_html"),
}


def _renderer(module: str, name: str) -> Any:
    def render(result: Any) -> str:
        return getattr(importlib.import_module(module), name)(result)

    return render


def _show_results_as_html(shell: Any) -> None:
    """Make `shell` (an IPython shell) display `Summary`, `MemoryReport` and `Comparison` as HTML
    tables; done on `import ninlab` inside IPython or Jupyter."""
    formatter = shell.display_formatter.formatters["text/html"]
    for (module, name), (renderer_module, renderer) in _HTML_RENDERERS.items():
        formatter.for_type_by_name(module, name, _renderer(renderer_module, renderer))


if "IPython" in sys.modules and (_shell := sys.modules["IPython"].get_ipython()) is not None:
    _show_results_as_html(_shell)
