"""The package's map holds: the accountant stands alone, the visuals only render results, and the
front door opens onto each part."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
import typing
from pathlib import Path

import ninlab

PACKAGE = Path(ninlab.__file__).parent
PARTS = ("analysis", "training", "studies", "viz", "cli")
# What each part may import from the others (top-level shared modules are open to all).
ALLOWED = {
    "analysis": set(),
    "training": {"analysis"},
    "studies": {"analysis", "training"},
    "viz": {"analysis", "training", "studies"},
    "cli": {"analysis", "training", "studies", "viz"},
}
# The parts whose results the visuals render, and must never compute.
COMPUTING = ("analysis", "training", "studies")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "ninlab" and len(pieces) > 1 and pieces[1] in PARTS:
                parts.add(pieces[1])
    return parts


def test_each_part_imports_only_what_the_rule_allows() -> None:
    broken = []
    for path in sorted(PACKAGE.glob("*.py")):
        # Shared modules serve every part; the front door only re-exports, and lazily.
        if path.name != "__init__.py":
            broken += [f"{path.name} imports ninlab.{other}" for other in _imported_parts(path)]
    for part in PARTS:
        for path in sorted((PACKAGE / part).glob("*.py")):
            for other in _imported_parts(path) - ALLOWED[part] - {part}:
                broken.append(f"{path.relative_to(PACKAGE)} imports ninlab.{other}")
    assert broken == []


def test_the_rule_checker_sees_every_import_form(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import ninlab.viz.charts\nfrom ninlab.training import train\nfrom ninlab import cli\n"
        "def f():\n    from ninlab.analysis.predict import predict_memory\n"
    )
    assert _imported_parts(module) == {"viz", "training", "cli", "analysis"}


def _imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) of each `from ninlab.<part>... import name`; (module, "") for a module
    imported whole (`import ninlab.analysis.predict`, `from ninlab.analysis import predict`)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, "") for alias in node.names if alias.name.startswith("ninlab.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ninlab."):
            names += [(node.module, alias.name) for alias in node.names]
    return names


def _is_result_type_or_constant(module: str, name: str) -> bool:
    value = (
        getattr(importlib.import_module(module), name) if name else importlib.import_module(module)
    )
    if isinstance(value, types.ModuleType):
        return False
    # A class, a type alias (`Literal[...]`), or a value such as a table of meanings.
    return isinstance(value, type) or typing.get_origin(value) is not None or not callable(value)


def test_the_visuals_render_results_and_call_nothing_that_computes() -> None:
    """viz takes from analysis, training and studies only result types and constants (a
    category's meaning), never a function: whatever it shows was computed before it."""
    broken = [
        f"{path.name} imports {module}{f'.{name}' if name else ''}"
        for path in sorted((PACKAGE / "viz").glob("*.py"))
        for module, name in _imported_names(path)
        if module.split(".")[1] in COMPUTING and not _is_result_type_or_constant(module, name)
    ]
    assert broken == []


def test_the_visuals_rule_sees_a_function_and_a_whole_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from ninlab.analysis.summary import Summary, summarize\n"
        "from ninlab.analysis.categories import CATEGORIES\n"
        "from ninlab.studies.compare import Unit\n"
        "import ninlab.studies.memory\n"
    )
    names = _imported_names(module)
    verdicts = {(m, n): _is_result_type_or_constant(m, n) for m, n in names}
    assert verdicts == {
        ("ninlab.analysis.summary", "Summary"): True,
        ("ninlab.analysis.summary", "summarize"): False,
        ("ninlab.analysis.categories", "CATEGORIES"): True,
        ("ninlab.studies.compare", "Unit"): True,
        ("ninlab.studies.memory", ""): False,
    }


def test_loading_the_whole_accountant_loads_nothing_else() -> None:
    """At run time too: no lazy import inside a function reaches the trainer, visuals or CLI."""
    modules = [
        f"ninlab.analysis.{path.stem}" for path in sorted((PACKAGE / "analysis").glob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ninlab.') and "
        "m.count('.') >= 2}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['analysis']"


def test_the_front_door_names_the_library_api() -> None:
    from ninlab.analysis.batch import fit_batch
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory
    from ninlab.analysis.step import StepSpec
    from ninlab.analysis.summary import summarize
    from ninlab.training.train import train

    expected = {
        "StepSpec": StepSpec,
        "summarize": summarize,
        "predict_memory": predict_memory,
        "fit_batch": fit_batch,
        "measure": measure,
        "train": train,
    }
    for name, value in expected.items():
        assert name in ninlab.__all__ and getattr(ninlab, name) is value
    assert {"build_nin", "resolve_model"} <= set(ninlab.__all__)


def test_loading_every_study_loads_neither_the_visuals_nor_the_cli() -> None:
    modules = [f"ninlab.studies.{path.stem}" for path in sorted((PACKAGE / "studies").glob("*.py"))]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ninlab.') and "
        "m.count('.') >= 2}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['analysis', 'studies', 'training']"
