"""Shared fixtures. `fashion_mnist` is the real data set: CI installs Debian's dataset-fashion-mnist,
so there a missing copy fails the tests that need it; elsewhere they are skipped with the reason."""

from __future__ import annotations

import functools
import os

import pytest

from ninlab.errors import NinlabError
from ninlab.training.data import FashionMNIST, load_fashion_mnist


@functools.lru_cache(maxsize=1)
def _load() -> FashionMNIST | str:
    try:
        return load_fashion_mnist(download=False)
    except NinlabError as error:
        return str(error)


@pytest.fixture(scope="session")
def fashion_mnist() -> FashionMNIST:
    data = _load()
    if isinstance(data, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real data (apt install dataset-fashion-mnist): {data}")
        pytest.skip(f"real Fashion-MNIST not found: {data}")
    return data
