"""The kernel probe's disk cache (`ninlab.analysis.kernel_cache`): a call measured in one process
is read back in the next, never across a different machine, thread count or torch build, and a
corrupt entry is measured again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_run import run

from ninlab.analysis import kernel_cache, kernel_probe
from ninlab.analysis.kernel_probe import KernelCall, measured_allocations
from ninlab.errors import NinlabWarning

aten = torch.ops.aten


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NINLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NINLAB_NO_CACHE", raising=False)
    monkeypatch.setattr(kernel_probe, "_MEASURED", {})  # as a fresh process starts
    return tmp_path / "kernel-probe"


def _call() -> KernelCall:
    x = torch.randn(2, 16, 10, 10).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3).bfloat16().contiguous(memory_format=torch.channels_last)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    return KernelCall.of("aten.convolution.default", args, (aten.convolution.default(*args),))


def _no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_probe, "_measure", lambda call: pytest.fail("measured again"))


def test_a_measured_call_is_read_back_by_the_next_process(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = measured_allocations(_call())
    assert not isinstance(first, str)
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(kernel_probe, "_MEASURED", {})
    _no_measuring(monkeypatch)
    assert measured_allocations(_call()) == first


def test_another_thread_count_or_torch_build_misses(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = measured_allocations(_call())
    assert not isinstance(first, str)
    signature, output_bytes = repr(_call()), _call().output_bytes
    assert kernel_cache.load(signature, output_bytes) == first
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert kernel_cache.load(signature, output_bytes) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    fixed = kernel_cache._fixed_environment()
    for field, other in (("torch", "0.0.1"), ("cpu", "another CPU"), ("cpu_flags", "sse2")):
        monkeypatch.setattr(
            kernel_cache, "_fixed_environment", lambda f=field, o=other: {**fixed, f: o}
        )
        assert kernel_cache.load(signature, output_bytes) is None, field
    monkeypatch.setattr(kernel_cache, "_fixed_environment", lambda: fixed)
    assert kernel_cache.load(signature, output_bytes) == first


def test_an_entry_of_another_key_under_the_same_name_is_not_trusted(cache: Path) -> None:
    first = measured_allocations(_call())
    assert not isinstance(first, str)
    (entry,) = cache.glob("*.json")
    stored = json.loads(entry.read_text())
    stored["key"]["environment"]["cpu"] = "another CPU"  # a file copied from another machine
    entry.write_text(json.dumps(stored))
    assert kernel_cache.load(repr(_call()), _call().output_bytes) is None


@pytest.mark.parametrize(
    "corrupt",
    ["", "{not json", '{"key": 1}', "[]", "null"],
    ids=["empty", "truncated", "wrong key", "a list", "null"],
)
def test_a_corrupt_entry_is_ignored_and_measured_again(
    cache: Path, monkeypatch: pytest.MonkeyPatch, corrupt: str
) -> None:
    first = measured_allocations(_call())
    (entry,) = cache.glob("*.json")
    entry.write_text(corrupt)
    monkeypatch.setattr(kernel_probe, "_MEASURED", {})
    assert measured_allocations(_call()) == first
    assert json.loads(entry.read_text())["allocations"]  # written again, whole


def test_blocks_that_do_not_add_up_are_ignored(cache: Path) -> None:
    measured_allocations(_call())
    (entry,) = cache.glob("*.json")
    stored = json.loads(entry.read_text())
    stored["allocations"][0][0] += 64
    entry.write_text(json.dumps(stored))
    assert kernel_cache.load(repr(_call()), _call().output_bytes) is None


def test_turned_off_nothing_is_read_or_written(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NINLAB_NO_CACHE", "1")
    assert not isinstance(measured_allocations(_call()), str)
    assert not cache.exists()


def test_the_default_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NINLAB_CACHE_DIR")
    monkeypatch.delenv("NINLAB_NO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache.cache_directory() == tmp_path / "ninlab" / "kernel-probe"


def test_ninlab_cache_clear_empties_it(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measured_allocations(_call())
    assert cache.exists()
    assert run(capsys, "cache", "path") == (0, f"{cache}\n", "")
    assert run(capsys, "cache", "clear") == (0, f"removed {cache}\n", "")
    assert not cache.exists()
    assert run(capsys, "cache", "clear") == (0, f"nothing to remove at {cache}\n", "")


def test_a_cache_that_cannot_be_written_is_said_once_not_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NINLAB_CACHE_DIR naming a file once cost every process its measurements without a word.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NINLAB_CACHE_DIR", str(tmp_path / "a-file"))
    monkeypatch.delenv("NINLAB_NO_CACHE", raising=False)
    monkeypatch.setattr(kernel_probe, "_MEASURED", {})
    kernel_cache._warn_not_caching.cache_clear()
    with pytest.warns(NinlabWarning) as said:
        first = measured_allocations(_call())
        monkeypatch.setattr(kernel_probe, "_MEASURED", {})
        assert measured_allocations(_call()) == first  # measured again, the same blocks
    assert len(said) == 1
    assert str(said[0].message).startswith(
        f"not caching kernel measurements: cannot write {tmp_path / 'a-file' / 'kernel-probe'} "
        "(Not a directory); predictions are unchanged"
    )
