"""Models (and steps) that write to themselves or hold tensors outside their parameters and
buffers: what a ninlab call must leave exactly as it found (tests/analysis/test_model_kept.py).
Small on purpose; every factory takes no argument (`ActNorm`, a layer, its channels)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F


def shared_layer() -> nn.Module:
    """One module registered under two names: the swap of fakes puts it back under one only."""
    layer = nn.Linear(8, 8)
    return nn.Sequential(layer, nn.ReLU(), layer)


class CachesInForward(nn.Module):
    """A forward that keeps a tensor in an attribute (the rotary/positional cache pattern), in a
    dict of them, and in a list it appends to."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.cache: torch.Tensor | None = None
        self.tables: dict[str, torch.Tensor] = {}
        self.history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = torch.ones_like(x)
        self.tables["cos"] = torch.cos(x[0])
        self.history.append(x.detach())
        return self.linear(x) + self.cache


def caches_in_forward() -> nn.Module:
    return CachesInForward()


class PlainTensorAttributes(nn.Module):
    """Tensors held as plain attributes, not buffers: a scale, an STFT-like window, anchors in a
    list, as torchvision's detection models and audio front ends keep them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.scale = torch.full((8,), 0.5)
        self.window = torch.hann_window(8)
        self.anchors = [torch.ones(8), torch.zeros(8)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self.window + self.anchors[0]


def plain_tensor_attributes() -> nn.Module:
    return PlainTensorAttributes()


class Hooked(nn.Module):
    """A model with its own forward hook and a frozen layer, in eval mode by default."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 4)
        self.seen = 0
        self.head.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.frozen(x)))


def hooked() -> nn.Module:
    return Hooked().eval()


def registering_step(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    """A step that registers a buffer and a parameter on the model it is given."""
    model.register_buffer("steps_seen", torch.zeros(1))
    model.register_parameter("bias_shift", nn.Parameter(torch.zeros(1), requires_grad=False))
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


TEACHER = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)).eval().requires_grad_(False)


def distillation_step(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    """Knowledge distillation from a frozen teacher that is no part of the model: a global the
    step names (a closure's cell is found the same way)."""
    with torch.no_grad():
        soft = TEACHER(x)
    optimizer.zero_grad()
    output = model(x)
    loss = F.cross_entropy(output, y) + F.mse_loss(output, soft)
    loss.backward()
    optimizer.step()
    return loss


def teacher_factory(model: nn.Module) -> Any:
    """The same teacher built by the optimizer factory, beside the optimizer."""
    teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))
    return torch.optim.SGD(model.parameters(), lr=0.1), teacher.eval().requires_grad_(False)


def factory_distillation_step(
    model: nn.Module, optimizers: Any, x: torch.Tensor, y: torch.Tensor
) -> Any:
    optimizer, teacher = optimizers
    with torch.no_grad():
        soft = teacher(x)
    optimizer.zero_grad()
    output = model(x)
    loss = F.cross_entropy(output, y) + F.mse_loss(output, soft)
    loss.backward()
    optimizer.step()
    return loss


_CACHES: list[Any] = []


def _cached(function: Callable[..., Any]) -> Callable[..., Any]:
    """An `lru_cache` behind a wrapper, as transformers' `compile_compatible_method_lru_cache`
    puts it."""
    cache = functools.lru_cache(maxsize=4)(function)
    _CACHES.append(cache)

    @functools.wraps(function)
    def wrapper(*args: Any) -> Any:
        return cache(*args)

    return wrapper


@functools.lru_cache(maxsize=4)
def _reversed_positions(n: int) -> torch.Tensor:
    return torch.arange(n - 1, -1, -1)


class CachesInAnLruCache(nn.Module):
    """Index tensors kept in `functools.lru_cache`s of the model's code, keyed by a size alone
    (shared by every instance), as Hugging Face's BEiT and DPT keep their relative position
    index: a cached static method behind a wrapper, and a cached function of its module."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    @staticmethod
    @_cached
    def shifted(n: int) -> torch.Tensor:
        return torch.roll(torch.arange(n), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y[:, self.shifted(y.shape[1])] + y[:, _reversed_positions(y.shape[1])]


def caches_in_an_lru_cache() -> nn.Module:
    return CachesInAnLruCache()


def clear_lru_caches() -> None:
    """Empty the caches `CachesInAnLruCache` reads, as a fresh process has them."""
    for cache in (*_CACHES, _reversed_positions):
        cache.cache_clear()


_TABLES: dict[int, torch.Tensor] = {}


class CachesInAModuleDict(nn.Module):
    """Tensors cached in a dict at the top of the model's module, and in one of its class,
    keyed by a size alone (shared by every instance): a positional table made on first use."""

    scales: ClassVar[dict[int, torch.Tensor]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if n not in _TABLES:
            _TABLES[n] = torch.arange(n, dtype=x.dtype) / n
        if n not in CachesInAModuleDict.scales:
            CachesInAModuleDict.scales[n] = torch.full((n,), 2.0, dtype=x.dtype)
        return self.linear(x) * _TABLES[n] + CachesInAModuleDict.scales[n]


def caches_in_a_module_dict() -> nn.Module:
    return CachesInAModuleDict()


def clear_dict_caches() -> None:
    """Empty the dicts `CachesInAModuleDict` caches in, as a fresh process has them."""
    _TABLES.clear()
    CachesInAModuleDict.scales.clear()


class CachesOnFirstUse(nn.Module):
    """A table made on the first forward and kept in an attribute (a rotary cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.arange(x.shape[-1], dtype=x.dtype) / x.shape[-1]
        return self.linear(x) * self.table


def caches_on_first_use() -> nn.Module:
    return CachesOnFirstUse()


class ActNorm(nn.Module):
    """Glow's activation norm, initialised from its first batch as a buffer flag records: a read
    of the model's own buffer, as a BatchNorm with momentum=None reads `num_batches_tracked`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialised", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialised:
            with torch.no_grad():
                spread = x.transpose(0, 1).flatten(1).std(dim=1)
                self.log_scale.copy_(-spread.clamp_min(1e-6).log().view(1, -1, 1, 1))
                self.initialised.fill_(1)
        return x * self.log_scale.exp()
