"""The reference-machine check in conftest.py: `machine` tests run only on the reference CPU,
`torch_build` tests only under the reference torch, `avx512` tests on any CPU with AVX-512, and
each skip reason names what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    REFERENCE,
    Machine,
    avx512_missing,
    machine_mismatch,
    reference_machine,
    this_machine,
    torch_mismatch,
)


def test_the_reference_machine_runs_machine_tests() -> None:
    assert machine_mismatch(REFERENCE, dataclasses.replace(REFERENCE)) is None


def test_another_machine_is_named_in_the_skip_reason() -> None:
    intel = Machine(torch="2.13.0+cpu", cpu_capability="AVX512", vendor="GenuineIntel")
    amd = dataclasses.replace(intel, vendor="AuthenticAMD")
    assert machine_mismatch(intel, amd) == (
        "golden numbers measured on GenuineIntel AVX512; this is AuthenticAMD AVX512"
    )
    assert torch_mismatch(intel, amd) is None
    assert avx512_missing(amd) is None


def test_another_torch_skips_only_torch_build_tests() -> None:
    newest = dataclasses.replace(REFERENCE, torch="2.14.1+cu130")
    assert machine_mismatch(REFERENCE, newest) is None
    assert torch_mismatch(REFERENCE, newest) == (
        "golden numbers measured with torch 2.13.0+cpu; this is torch 2.14.1+cu130"
    )


def test_a_cpu_without_avx512_skips_the_kernel_rules() -> None:
    avx2 = dataclasses.replace(REFERENCE, cpu_capability="AVX2")
    assert avx512_missing(avx2) == (
        "the CPU kernel rules were read off oneDNN's AVX-512 kernels; this CPU is GenuineIntel AVX2"
    )


def test_the_environment_can_fake_another_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NINLAB_REFERENCE_MACHINE", "vendor=AuthenticAMD,cpu_capability=AVX2")
    assert reference_machine() == dataclasses.replace(
        REFERENCE, vendor="AuthenticAMD", cpu_capability="AVX2"
    )
    monkeypatch.delenv("NINLAB_REFERENCE_MACHINE")
    assert reference_machine() == REFERENCE


def test_this_machine_reads_torch_and_the_cpu() -> None:
    here = this_machine()
    assert here.torch == torch.__version__
    assert here.cpu_capability == torch.backends.cpu.get_cpu_capability() and here.vendor
