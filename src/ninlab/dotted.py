"""Functions named `package.module:function` on the command line: a model factory, a step."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ninlab.errors import NinlabError, one_line

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
        raise error(f"name a {what} as package.module:function, not {path!r}")
    try:
        module = importlib.import_module(module_path)
    except Exception as exception:  # noqa: BLE001 - any import failure is the user's, in one line
        raise error(
            f"cannot import {module_path!r} for {what} {path!r} ({one_line(exception)}); "
            "check the module path and that it is on PYTHONPATH"
        ) from None
    if not hasattr(module, attribute):
        raise error(f"{module_path!r} has no {attribute!r}; name {expects}")
    function = getattr(module, attribute)
    if not callable(function):
        raise error(f"{path!r} is not a function but a {type(function).__name__}; name {expects}")
    return function
