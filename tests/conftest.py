"""Shared fixtures and markers.

`fashion_mnist` is the real data set: CI installs Debian's dataset-fashion-mnist, so there a
missing copy fails the tests that need it; elsewhere they are skipped with the reason.

`machine` tests pin golden numbers measured on the reference CPU below, and are skipped on any
other CPU; `torch_build` tests pin numbers measured with the reference torch build, and are
skipped under any other torch (CI runs the rest under the oldest and newest supported releases
too: .ci/torch_matrix). `avx512` tests replay the CPU kernel rules, read off oneDNN's AVX-512
kernels, against the profiler on the running CPU, and are skipped on a CPU without AVX-512; `amx`
tests replay the bfloat16 rules read off oneDNN's AMX kernels, skipped on a CPU without AMX
(AMD EPYC), where those rules stand down (`no_amx` tests check that they do). `cuda`
tests need a GPU and are skipped without one; `canary` tests only label PyTorch behaviour that
ninlab relies on (they always run).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ninlab.analysis.torch_internals import amx_tiles_supported
from ninlab.errors import NinlabError
from ninlab.training.data import FashionMNIST, load_fashion_mnist


@dataclasses.dataclass(frozen=True)
class Machine:
    """What decides the CPU allocator's bytes (oneDNN's blocked copies and scratchpads):

    - torch: the build, which fixes the oneDNN version and ATen's kernels;
    - cpu_capability: ATen's vector ISA, which oneDNN's follows on a real CPU: "AVX512" blocks
      float32 channels by 16, "AVX2" by 8 (seen with ATEN_CPU_CAPABILITY=avx2 and
      ONEDNN_MAX_CPU_ISA=AVX2 here: a grouped net's allocator peak moves from 2,393,280 to
      2,630,720 bytes), and a bfloat16 convolution runs on oneDNN only with AVX-512;
    - vendor: oneDNN picks kernels and blocking by the CPU it detects; not checkable on this
      machine, so an AMD AVX-512 CPU is not assumed to be the reference.
    AMX is not a field: capping oneDNN below it (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 or
    AVX512_CORE) changes none of the golden numbers, as float32 convolutions run on the same
    avx512_core kernels; only bfloat16 ones would differ, and no golden number is bfloat16.
    """

    torch: str
    cpu_capability: str
    vendor: str

    def __str__(self) -> str:
        return f"{self.vendor} {self.cpu_capability} with torch {self.torch}"


# Where the `machine` tests' golden numbers were measured.
REFERENCE = Machine(torch="2.13.0+cpu", cpu_capability="AVX512", vendor="GenuineIntel")


def this_machine() -> Machine:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    vendors = [line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")]
    return Machine(
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        vendor=vendors[0] if vendors else platform.machine(),
    )


def reference_machine() -> Machine:
    """REFERENCE, with fields replaced by NINLAB_REFERENCE_MACHINE ("vendor=AuthenticAMD,...") to
    see the `machine` tests skipped here, or run them on another machine to re-measure."""
    override = os.environ.get("NINLAB_REFERENCE_MACHINE", "")
    fields = dict(pair.split("=", 1) for pair in override.split(",") if pair)
    return dataclasses.replace(REFERENCE, **fields)


def machine_mismatch(reference: Machine, here: Machine) -> str | None:
    """Why `machine` tests are skipped here (another CPU), or None on the reference CPU."""
    if (here.vendor, here.cpu_capability) == (reference.vendor, reference.cpu_capability):
        return None
    return (
        f"golden numbers measured on {reference.vendor} {reference.cpu_capability}; "
        f"this is {here.vendor} {here.cpu_capability}"
    )


def torch_mismatch(reference: Machine, here: Machine) -> str | None:
    """Why `torch_build` tests are skipped here (another torch), or None under the reference."""
    if here.torch == reference.torch:
        return None
    return f"golden numbers measured with torch {reference.torch}; this is torch {here.torch}"


def avx512_missing(here: Machine) -> str | None:
    """Why `avx512` tests are skipped here, or None on a CPU with AVX-512."""
    if here.cpu_capability.startswith("AVX512"):
        return None
    return (
        "the CPU kernel rules were read off oneDNN's AVX-512 kernels; "
        f"this CPU is {here.vendor} {here.cpu_capability}"
    )


def amx_missing() -> str | None:
    """Why `amx` tests are skipped here, or None on a CPU with AMX tiles."""
    if amx_tiles_supported():
        return None
    return "the bf16 convolution rules were read off oneDNN's AMX kernels; this CPU has no AMX"


def pytest_report_header() -> str:
    reference, here = reference_machine(), this_machine()
    reasons = [machine_mismatch(reference, here), torch_mismatch(reference, here)]
    reasons = [reason for reason in reasons if reason]
    return f"golden tests: {'skipped, ' + '; '.join(reasons) if reasons else 'run (reference)'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reference, here = reference_machine(), this_machine()
    reasons = {
        "machine": machine_mismatch(reference, here),
        "torch_build": torch_mismatch(reference, here),
        "avx512": avx512_missing(here),
        "amx": amx_missing(),
        "no_amx": None if amx_missing() else "checks the rules standing down on a CPU without AMX",
        "cuda": None
        if torch.cuda.is_available()
        else f"CUDA-only: needs a CUDA GPU; torch {torch.__version__} sees none here",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@functools.lru_cache(maxsize=1)
def _load() -> FashionMNIST | str:
    try:
        return load_fashion_mnist(download=False)
    except NinlabError as error:
        return str(error)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Pin the intra-op thread count to 2: allocator figures depend on it (oneDNN's choices)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_mnist() -> FashionMNIST:
    data = _load()
    if isinstance(data, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real data (apt install dataset-fashion-mnist): {data}")
        pytest.skip(f"real Fashion-MNIST not found: {data}")
    return data


@pytest.fixture(scope="session", autouse=True)
def kernel_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The kernel probe's disk cache (`ninlab.analysis.kernel_cache`) goes to a folder of this
    session, never the user's own, for the library and the command line's child processes alike."""
    before = os.environ.get("NINLAB_CACHE_DIR")
    os.environ["NINLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("ninlab-cache"))
    yield
    if before is None:
        del os.environ["NINLAB_CACHE_DIR"]
    else:
        os.environ["NINLAB_CACHE_DIR"] = before


def _has_cpu_grouped_mm() -> bool:
    try:
        torch._grouped_mm(
            torch.ones(4, 4), torch.ones(1, 4, 4), torch.tensor([4], dtype=torch.int32)
        )
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


# A mixture of experts' batched matmul, which Hugging Face's MoE layers call on CPU.
needs_cpu_grouped_mm = pytest.mark.skipif(
    not _has_cpu_grouped_mm(), reason="this torch has no CPU kernel of torch._grouped_mm (< 2.9)"
)
