"""Private PyTorch names live in one module: `ninlab.analysis.torch_internals`.

A static scan of the package's source: no other module imports from a private torch module, binds
a private torch name, reads a private attribute of a torch object (one no module of ninlab
defines) or names a private torch module in a string. ATen's own op names (`aten._softmax`) are
the vocabulary of the recordings, not an API, and may be named anywhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ninlab

PACKAGE = Path(ninlab.__file__).parent
ALLOWED = {Path("analysis/torch_internals.py")}
# Private names of other libraries the package uses knowingly: argparse's, for the CLI.
OTHER_LIBRARIES = {
    "_SubParsersAction",
    "_ArgumentGroup",
    "_get_subactions",
    "_option_string_actions",
    "_AppendAction",
}
_PRIVATE_MODULE_IN_TEXT = re.compile(r"\btorch(\.\w+)*\._[A-Za-z]")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(trees: list[ast.Module]) -> set[str]:
    """Every name the package defines itself: a private attribute of one of these is its own."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def _chain(node: ast.expr) -> list[str]:
    """`torch.ops.aten._softmax` as ["torch", "ops", "aten", "_softmax"]; "?" for a call's."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")
    return parts[::-1]


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def private_torch_names(tree: ast.Module, own: set[str]) -> list[str]:
    """Where `tree` names a private torch name: "line: what"."""
    found = []
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names = [alias.name for alias in node.names]
            if any(map(_private, node.module.split("."))) or any(map(_private, names)):
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] == "torch" and any(map(_private, alias.name.split(".")))
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _chain(node)
            aten_op = chain[0] == "aten" or chain[:3] == ["torch", "ops", "aten"]
            if node.attr not in own and node.attr not in OTHER_LIBRARIES and not aten_op:
                found.append(f"{node.lineno}: {'.'.join(chain)}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _PRIVATE_MODULE_IN_TEXT.search(node.value)
        ):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_only_torch_internals_names_private_torch_names() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in paths}
    own = _defined_names(list(trees.values()))
    named = []
    for path, tree in trees.items():
        relative = path.relative_to(PACKAGE)
        if relative not in ALLOWED:
            named += [f"{relative}:{where}" for where in private_torch_names(tree, own)]
    assert named == []


def test_the_scan_sees_every_form() -> None:
    source = '''
"""A docstring may explain torch._C._current_autograd_node."""
import logging
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils.stateless import _reparametrize_module
from torch import nn
from torch.nn import functional as F

aten = torch.ops.aten
node = torch._C._current_autograd_node()
is_dropout = isinstance(nn.Dropout(), nn.modules.dropout._DropoutNd)
log = logging.getLogger("torch._subclasses.fake_tensor")

def run(func, storage, ledger):
    ledger._freed(1)  # the package's own
    aten._softmax.default, torch.ops.aten._local_scalar_dense  # ATen ops
    return func._schema, storage._cdata
'''
    tree = ast.parse(source)
    found = private_torch_names(tree, _defined_names([tree]) | {"_freed"})
    assert sorted(line.split(": ", 1)[1] for line in found) == sorted(
        [
            "import torch._dynamo",
            "from torch._subclasses.fake_tensor import FakeTensor",
            "from torch.nn.utils.stateless import _reparametrize_module",
            "torch._C._current_autograd_node",
            "torch._C",
            "nn.modules.dropout._DropoutNd",
            "'torch._subclasses.fake_tensor'",
            "func._schema",
            "storage._cdata",
        ]
    )
