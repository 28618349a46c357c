"""The package's map holds: the accountant stands alone, the visuals only render results, and the
front door opens onto each part."""

from __future__ import annotations

import ast
import importlib
import re
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
        for path in sorted((PACKAGE / part).rglob("*.py")):
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
        for path in sorted((PACKAGE / "viz").rglob("*.py"))
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


def _parts_loaded_by(part: str) -> list[str]:
    """The parts a fresh interpreter has loaded after importing every module of `part`."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(_modules(PACKAGE / part))!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ninlab.') and "
        "m.count('.') >= 2}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return ast.literal_eval(out.strip())


def test_loading_the_whole_accountant_loads_nothing_else() -> None:
    """At run time too: no lazy import inside a function reaches the trainer, visuals or CLI."""
    assert _parts_loaded_by("analysis") == ["analysis"]


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
    assert _parts_loaded_by("studies") == ["analysis", "studies", "training"]


def _modules(folder: Path) -> dict[str, Path]:
    """Every module under `folder` of the package, subpackages included: its dotted name, its
    file."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_imports(path: Path) -> set[str]:
    """The ninlab modules `path` imports when it runs: at the top or inside a function (a lazy
    import closes a circle too), not under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    imported = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in imported if name.startswith("ninlab.")}


def _import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for module in graph:
        if module not in order:
            visit(module)
    return circles


def test_no_module_imports_itself_through_others() -> None:
    modules = _modules(PACKAGE)
    graph = {name: _runtime_imports(path) & set(modules) - {name} for name, path in modules.items()}
    assert _import_circles(graph) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _import_circles(graph) == [["a", "b", "c"]]


def test_every_file_the_architecture_note_names_exists() -> None:
    """ARCHITECTURE.md stays true: each `name.py` (or `folder/`) it names in backticks is a file
    of the package, its tests or its benchmarks."""
    note = (PACKAGE.parent.parent / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", note))
    repository = PACKAGE.parent.parent
    folders = ("src", "tests", "benchmarks", "examples")
    everything = [*folders] + [
        path.relative_to(repository).as_posix()
        for folder in folders
        for path in (repository / folder).rglob("*")
    ]
    missing = [
        name
        for name in sorted(named)
        if not any(
            path == name.rstrip("/") or path.endswith("/" + name.rstrip("/")) for path in everything
        )
    ]
    assert missing == []
