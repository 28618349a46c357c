"""The kernel probe's measurements kept on disk, so a kernel is run once per machine, not once per
process (`ninlab.analysis.kernel_probe`).

What oneDNN allocates inside a call depends on the CPU (its model and instruction set), the
thread count, the build of torch (which fixes oneDNN's version) and the call's sizes, strides and
dtypes; so each entry is keyed by all of them (`environment` plus the call's signature), and
stores that whole key beside the blocks: an entry is used only when its stored key equals this
process's, byte for byte, so a file moved from another machine, written by another torch, or
named by a hash collision is never trusted. An entry that does not parse or does not add up (its
blocks must sum to the call's output bytes, as a measurement does) is ignored and measured again.
Entries are written atomically (`ninlab.outputs.atomic_write`), one file per call, so processes
sharing the directory never see half of one; only calls that were measured are kept (a call not
run, or that failed, is asked again next time).

Where: `$NINLAB_CACHE_DIR`, else `$XDG_CACHE_HOME/ninlab`, else `~/.cache/ninlab`, in its
`kernel-probe/` folder. `NINLAB_NO_CACHE=1` turns it off (nothing read or written);
`ninlab cache clear` removes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ninlab.analysis.allocator.blocks import KernelAllocation
from ninlab.errors import NinlabError, NinlabWarning
from ninlab.outputs import atomic_write

__all__ = ["cache_directory", "clear_cache", "environment", "load", "store"]

_FORMAT = 1
# Settings that cap the instruction set oneDNN and ATen choose kernels for.
_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cache_directory() -> Path | None:
    """Where the probe's entries live; None when `NINLAB_NO_CACHE` turns the cache off."""
    if os.environ.get("NINLAB_NO_CACHE", "") not in ("", "0"):
        return None
    base = os.environ.get("NINLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "ninlab"
    )
    return Path(base) / "kernel-probe"


def clear_cache() -> Path | None:
    """Remove every entry; returns the folder removed (None when there was none)."""
    directory = cache_directory()
    if directory is None or not directory.exists():
        return None
    shutil.rmtree(directory)
    return directory


def environment() -> dict[str, Any]:
    """Everything besides the call that decides the blocks oneDNN allocates: the CPU, its
    instruction set (and any cap put on it), the thread count and torch's build."""
    return {"threads": torch.get_num_threads(), **_fixed_environment()}


@functools.cache
def _fixed_environment() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []

    def first(field: str) -> str:
        found = [
            line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field
        ]
        return found[0] if found else ""

    return {
        "format": _FORMAT,
        "cpu": first("model name") or platform.processor(),
        "cpu_flags": " ".join(sorted(first("flags").split())),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_settings": {name: os.environ.get(name, "") for name in _ISA_VARIABLES},
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        # The build's configuration names oneDNN's version and the flags it was compiled with.
        "torch_config": hashlib.sha256(torch.__config__.show().encode()).hexdigest(),
    }


def _entry_path(directory: Path, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return directory / f"{name}.json"


def _key(signature: str) -> dict[str, Any]:
    return {"environment": environment(), "call": signature}


def load(signature: str, output_bytes: int) -> tuple[KernelAllocation, ...] | None:
    """The blocks stored for the call `signature` in this environment; None when there are none
    to trust."""
    directory = cache_directory()
    if directory is None:
        return None
    key = _key(signature)
    try:
        entry = json.loads(_entry_path(directory, key).read_text(encoding="utf-8"))
        if entry["key"] != key:
            return None
        allocations = tuple(
            KernelAllocation(int(delta), str(what), None if output is None else int(output))
            for delta, what, output in entry["allocations"]
        )
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or corrupt: measure
        return None
    if sum(a.delta_bytes for a in allocations) != output_bytes:
        return None
    return allocations


def store(signature: str, allocations: Sequence[KernelAllocation]) -> None:
    """Keep a measurement for the next process; a cache that cannot be written (a read-only
    home, a full disk, `NINLAB_CACHE_DIR` naming a file) costs only the time to measure again,
    and is said once (`_warn_not_caching`)."""
    directory = cache_directory()
    # An argument shown by its address would key an entry no later process could ask for.
    if directory is None or " at 0x" in signature:
        return
    key = _key(signature)
    entry = {"key": key, "allocations": [[a.delta_bytes, a.what, a.output] for a in allocations]}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(_entry_path(directory, key), durable=False, text=True) as handle:
            handle.write(json.dumps(entry))
    except (OSError, NinlabError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        _warn_not_caching(directory, reason)


@functools.cache
def _warn_not_caching(directory: Path, reason: str) -> None:
    # Once per directory, reason and process: every later kernel would fail the same way.
    warnings.warn(
        f"not caching kernel measurements: cannot write {directory} ({reason}); predictions are "
        "unchanged but each process measures again; set NINLAB_CACHE_DIR to a writable directory, "
        "or NINLAB_NO_CACHE=1",
        NinlabWarning,
        stacklevel=2,
    )
