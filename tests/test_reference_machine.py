"""The reference-machine check in conftest.py: `machine` tests run only where the fingerprint
matches, and the skip reason names what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REFERENCE, Machine, machine_mismatch, reference_machine, this_machine


def test_the_reference_machine_runs_machine_tests() -> None:
    assert machine_mismatch(REFERENCE, dataclasses.replace(REFERENCE)) is None


def test_another_machine_is_named_in_the_skip_reason() -> None:
    intel = Machine(torch="2.13.0+cpu", cpu_capability="AVX512", vendor="GenuineIntel")
    amd = dataclasses.replace(intel, vendor="AuthenticAMD")
    assert machine_mismatch(intel, amd) == (
        "golden numbers measured on GenuineIntel AVX512 with torch 2.13.0+cpu; "
        "this is AuthenticAMD AVX512 with torch 2.13.0+cpu"
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
