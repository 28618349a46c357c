"""Faults a careless or hostile user causes, each met by one line and exit 2 (or 130 for Ctrl-C),
with no run lost: two runs into one directory, a full disk, a kill during the save, corrupted
checkpoints, a named data directory without the data, a run that cannot start, a 16-bit image."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from PIL import Image

import ninlab
from ninlab.cli.options import load_data
from ninlab.errors import NinlabError
from ninlab.models import build_nin, parse_variant
from ninlab.training import checkpoint as checkpoint_module
from ninlab.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ninlab.training.data import NamedDataDir, load_fashion_mnist
from ninlab.training.evaluate import load_image, load_trained_model
from ninlab.training.preflight import check_compiler, check_fits_data, check_memory
from ninlab.training.presets import MAX_SEED, TrainConfig
from ninlab.training.rundir import LOCK_NAME, owning
from ninlab.training.train import train

# The cheapest run that trains: d2l's NiN without 1x1 convs at its smallest input, two steps;
# with the largest seed the command line accepts, which must train too.
TINY = TrainConfig(
    variant="nin-d2l-0x1",
    image_size=67,
    epochs=1,
    batch_size=4,
    train_examples=8,
    test_examples=4,
    lr=0.01,
    seed=MAX_SEED,
)
_ENV = {**os.environ, "PYTHONPATH": str(Path(ninlab.__file__).parents[1])}


def _tiny_args(output_dir: Path, data_dir: Path) -> list[str]:
    return [
        "train",
        "--output-dir",
        str(output_dir),
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--variant",
        TINY.variant,
        "--image-size",
        "67",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--train-examples",
        "8",
        "--test-examples",
        "4",
        "--lr",
        "0.01",
        "--seed",
        str(MAX_SEED),
    ]


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("ninlab: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# -- lost work: a run directory has one owner ------------------------------------------------------


def _hold_lock(directory: Path) -> subprocess.Popen[str]:
    """Another process that owns `directory` until killed."""
    code = (
        "import sys, time; from pathlib import Path; from ninlab.training.rundir import owning\n"
        f"with owning(Path({str(directory)!r})):\n    print('owned', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=_ENV, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "owned"
    return holder


def test_a_second_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(
    fashion_mnist, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        code, _, err = run(capsys, *_tiny_args(run_dir, fashion_mnist.directory))
        assert code == 2
        assert _one_error_line(err) == (
            f"ninlab: error: {run_dir} is in use by another ninlab run (pid {holder.pid} on "
            f"{socket.gethostname()}); wait for it to end or choose another --output-dir"
        )
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing overwritten
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed owner left its lock file; the operating system released its lock.
    assert (run_dir / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    with owning(run_dir):
        assert (run_dir / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (run_dir / LOCK_NAME).exists()


def test_the_run_directory_is_checked_before_the_data_is_loaded(tmp_path, capsys):
    # A refused directory costs no loading: the data directory here is empty, and the directory's
    # own refusal is what the user reads.
    (tmp_path / "empty").mkdir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / CHECKPOINT_NAME).write_bytes(b"")
    code, _, err = run(capsys, *_tiny_args(kept, tmp_path / "empty"))
    assert code == 2 and _one_error_line(err).startswith(
        f"ninlab: error: {kept} already holds a checkpoint"
    )
    with (
        owning(tmp_path / "owned"),
        pytest.raises(NinlabError, match="is in use by another ninlab run"),
    ):
        train(TINY, output_dir=tmp_path / "owned", data=lambda: pytest.fail("the data was loaded"))
    # A usable directory, then the missing data: refused, and every directory the run made is gone.
    code, _, err = run(capsys, *_tiny_args(tmp_path / "runs" / "x", tmp_path / "empty"))
    assert code == 2 and "holds none of the 4 Fashion-MNIST files" in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept"]


def test_a_refused_configuration_leaves_no_directory_behind(fashion_mnist, tmp_path):
    with pytest.raises(NinlabError, match="num_classes=5, but Fashion-MNIST has 10 classes"):
        train(
            dataclasses.replace(TINY, variant="nin-d2l-0x1:num_classes=5"),
            output_dir=tmp_path / "run",
            data=fashion_mnist,
        )
    assert not (tmp_path / "run").exists()


def test_an_image_size_the_network_cannot_take_is_refused_naming_the_option(
    fashion_mnist, tmp_path
):
    with pytest.raises(NinlabError) as refused:
        train(
            dataclasses.replace(TINY, image_size=10),
            output_dir=tmp_path / "run",
            data=fashion_mnist,
        )
    message = str(refused.value)
    assert message.startswith(
        f"--image-size 10 is too small for {TINY.variant}: input 1x10x10 is too small"
    )
    assert message.endswith("use --image-size 67 or more") and "\n" not in message
    assert not (tmp_path / "run").exists()


# -- a kill during the save, a full disk, a second Ctrl-C ------------------------------------------


def _small_state() -> dict:
    torch.manual_seed(0)
    model = build_nin(parse_variant(TINY.variant))
    return {"config": dataclasses.asdict(TINY), "model": model.state_dict(), "epoch": 1}


def test_a_save_killed_midway_leaves_the_checkpoint_and_its_temporary_is_cleared(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _small_state())
    before = path.read_bytes()
    code = (
        "import os, signal; from ninlab.outputs import atomic_write\n"
        f"with atomic_write({str(path)!r}, durable=True) as out:\n"
        "    out.write(b'half a checkpoint'); out.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", code], env=_ENV, check=False)
    assert killed.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]
    assert len(left) == 1 and left[0].name.startswith(f".{CHECKPOINT_NAME}.")
    assert path.read_bytes() == before
    load_checkpoint(path)  # intact: its checksum verifies
    with owning(tmp_path):  # the next run to own the directory clears the temporary
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


class _FailingWrites(io.RawIOBase):
    """A file whose writes fail after `limit` bytes with `failure` (a full disk, a Ctrl-C)."""

    def __init__(self, failure: BaseException, limit: int = 4096) -> None:
        self.written, self.failure, self.limit = 0, failure, limit

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise self.failure
        return len(data)


def _failing_save(monkeypatch, failure: BaseException) -> None:
    @contextlib.contextmanager
    def failing(path, *, durable):
        yield _FailingWrites(failure)

    monkeypatch.setattr(checkpoint_module, "atomic_write", failing)


def test_a_full_disk_during_the_save_says_disk_full_and_whether_a_checkpoint_remains(
    tmp_path, monkeypatch
):
    path = tmp_path / CHECKPOINT_NAME
    _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(NinlabError) as first:
        save_checkpoint(path, _small_state())
    assert str(first.value) == (
        f"could not write {path} (disk full); free disk space or choose another directory; "
        "no checkpoint was written"
    )
    monkeypatch.undo()
    save_checkpoint(path, _small_state())
    _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(NinlabError, match=r"disk full.*; the previous one is unchanged$"):
        save_checkpoint(path, _small_state())


def test_a_second_ctrl_c_during_the_save_is_an_interrupt_not_a_disk_error(tmp_path, monkeypatch):
    _failing_save(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / CHECKPOINT_NAME, _small_state())


def test_a_disk_that_fills_while_writing_metrics_keeps_the_checkpoint(
    fashion_mnist, tmp_path, capsys, monkeypatch
):
    real_replace = os.replace

    def replace(source, target):
        if Path(target).name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr("ninlab.outputs.os.replace", replace)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, *_tiny_args(run_dir, fashion_mnist.directory))
    assert code == 2
    assert _one_error_line(err) == (
        f"ninlab: error: could not write {run_dir / 'metrics.jsonl'} (disk full); free disk "
        "space or choose another directory"
    )
    assert load_checkpoint(run_dir)["epoch"] == 1  # the epoch's checkpoint, verified
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not (run_dir / LOCK_NAME).exists()


def test_ctrl_c_during_start_up_is_exit_130_without_a_traceback(capsys, monkeypatch):
    def interrupted() -> argparse.ArgumentParser:
        raise KeyboardInterrupt

    monkeypatch.setattr("ninlab.cli.build_parser", interrupted)
    assert run(capsys, "summary") == (130, "", "ninlab: interrupted\n")


# -- corrupted checkpoints -------------------------------------------------------------------------


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _small_state())
    data = bytearray(path.read_bytes())
    # A byte inside the first weight tensor's bytes: torch's zip format would load it.
    offset = data.index(b"data/0") + 200
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(NinlabError, match="is corrupt: its contents do not match the checksum"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _small_state())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(NinlabError, match="is truncated or not a checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("junk", [b"junk\n", b"\x80\x02}q\x00", b"PK\x03\x04" + bytes(40), b""])
def test_bytes_that_are_no_checkpoint_are_refused_in_one_line(tmp_path, junk):
    """Whatever torch's unpickler raises on them (a stray memo index is a KeyError)."""
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(junk)
    with pytest.raises(NinlabError, match="is truncated or not a checkpoint"):
        load_checkpoint(path)


def test_invalid_stored_settings_say_they_are_the_checkpoints(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    state = _small_state()
    state["config"]["lr"] = -1.0
    save_checkpoint(path, state)
    with pytest.raises(NinlabError) as error:
        load_trained_model(path)
    assert str(error.value) == (
        "the checkpoint's stored settings are invalid (--lr (learning rate) must be positive); "
        "it was not written by 'ninlab train' or was edited"
    )


# -- a run that cannot start is refused before its first step --------------------------------------


def test_batch_norm_gets_two_images_a_step_or_the_run_is_refused():
    model = build_nin(parse_variant("nin-d2l-bn"))
    config = dataclasses.replace(TINY, variant="nin-d2l-bn")
    check_fits_data(model, config, world_size=1)
    with pytest.raises(NinlabError, match=r"--batch 1 gives each of 1 process.* use --batch 2"):
        check_fits_data(model, dataclasses.replace(config, batch_size=1), world_size=1)
    with pytest.raises(NinlabError, match="--train-examples 1 is too few"):
        check_fits_data(model, dataclasses.replace(config, train_examples=1), world_size=1)


def test_a_run_beyond_the_memory_available_is_refused_unless_forced(
    fashion_mnist, tmp_path, monkeypatch
):
    monkeypatch.setattr("ninlab.training.train.available_memory", lambda device: 1 << 20)
    with pytest.raises(NinlabError, match=r"but 1\.00 MiB is available; .* --force-memory"):
        train(TINY, output_dir=tmp_path / "run", data=fashion_mnist)
    assert not (tmp_path / "run").exists()
    with pytest.raises(NinlabError, match=r"needs about 3\.00 KiB"):
        check_memory(1024, 2048, torch.device("cpu"), available=1000)
    check_memory(1024, 2048, torch.device("cpu"), available=3072)


def test_compile_without_a_compiler_is_refused(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler-ninlab",))
    with pytest.raises(NinlabError, match="--compile needs a working C\\+\\+ compiler"):
        check_compiler(torch.device("cpu"))


# -- the data: a named directory is used or refused, and every run says which ----------------------


def test_a_named_data_directory_without_the_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte").write_bytes(b"")
    cases = {
        "typo": "--data-dir {p} does not exist",
        "a-file": "--data-dir {p} is not a directory",
        "partial": "{p} (--data-dir) holds 1 of the 4 Fashion-MNIST files; missing: "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]",
        "empty": "--data-dir {p} holds none of the 4 Fashion-MNIST files",
    }
    for name, message in cases.items():
        path = tmp_path / name
        with pytest.raises(NinlabError) as error:
            load_fashion_mnist(named=NamedDataDir(path, "--data-dir"), download=False)
        assert str(error.value).startswith(message.format(p=path)), str(error.value)


def test_every_run_says_where_its_data_came_from(fashion_mnist, monkeypatch, capsys):
    monkeypatch.setenv("NINLAB_DATA", str(fashion_mnist.directory))
    data = load_data(argparse.Namespace(data_dir=None, no_download=True))
    assert data.source == "$NINLAB_DATA"
    assert capsys.readouterr().err == (
        f"data: Fashion-MNIST from {fashion_mnist.directory} ($NINLAB_DATA), verified\n"
    )


# -- silently wrong: a 16-bit image ----------------------------------------------------------------


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    Image.fromarray((levels * 257).astype(np.uint16)).save(tmp_path / "wide.png")
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "narrow.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    assert torch.equal(load_image(tmp_path / "wide.png"), load_image(tmp_path / "narrow.png"))
