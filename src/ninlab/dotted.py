"""Functions named `package.module:function` on the command line: a model factory, a step.

The module is looked for where Python looks, and in the current directory, as `python -m` would
(so `mysteps:accumulate` finds ./mysteps.py without PYTHONPATH=.); a file may be named by its
path instead, `path/to/steps.py:accumulate`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ninlab.errors import NinlabError, one_line, shorten
from ninlab.inputs import regular_file

__all__ = ["import_function"]


def import_function(
    path: str, *, what: str, expects: str, error: type[NinlabError] = NinlabError
) -> Callable[..., Any]:
    """The function `path` names, or one line (`error`) saying what is wrong with the name.

    `what` is the role in words ("model", "step"), `expects` the function it must be
    ("a function that returns an nn.Module").
    """
    module_path, _, attribute = path.partition(":")
    if not module_path or not attribute:
        raise error(f"name a {what} as package.module:function, not {shorten(path)!r}")
    if module_path.endswith(".py"):  # a FIFO would be waited on forever
        try:
            regular_file(module_path, what=f"{what} file", fix="name a Python file")
        except NinlabError as refused:
            raise error(str(refused)) from None
    try:
        module = _module(module_path)
    except SystemExit as exit:
        raise error(
            f"importing {module_path!r} for {what} {path!r} exited (SystemExit: {exit.code}): "
            "it runs a program when imported (parses its command line, trains); put that under "
            "if __name__ == '__main__':"
        ) from None
    except Exception as exception:  # noqa: BLE001 - any import failure is the user's, in one line
        raise error(
            f"cannot import {module_path!r} for {what} {path!r} ({one_line(exception)}); "
            "name a module in the current directory or on PYTHONPATH, or a file as path/to/file.py"
        ) from None
    if not hasattr(module, attribute):
        raise error(f"{module_path!r} has no {attribute!r}; name {expects}")
    function = getattr(module, attribute)
    if not callable(function):
        raise error(f"{path!r} is not a function but a {type(function).__name__}; name {expects}")
    return function


def _module(name: str) -> ModuleType:
    """The module `name` names: a dotted module, found on sys.path or in the current directory
    (searched last, so it never hides an installed package), or a file `path/to/file.py`."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
        if spec is None or spec.loader is None or not os.path.isfile(name):
            raise FileNotFoundError(f"no file {shorten(name)}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    return importlib.import_module(name)
