"""A hostile runtime, round two: the reader of a run's output goes away, a signal lands at a random
moment of start-up, an unset variable reaches --resume, data files that would exhaust memory,
images in every mode, weights and losses that are not numbers. Each ends in a documented exit code
(0, 1 for a closed pipe, 2, 130) with no traceback and no lost or half-written work."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from PIL import Image

import ninlab
from ninlab.cli import main
from ninlab.errors import NinlabError, NinlabWarning
from ninlab.models import build_nin, parse_variant
from ninlab.outputs import json_text
from ninlab.training import train as train_module
from ninlab.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ninlab.training.console import CONSOLE_LOG_NAME
from ninlab.training.data import FILES, MAX_IDX_BYTES, read_idx
from ninlab.training.evaluate import load_image
from ninlab.training.presets import TrainConfig

_ENV = {**os.environ, "PYTHONPATH": str(Path(ninlab.__file__).parents[1])}
# The command line as its console script runs it, saying "go" on stderr as ninlab's code starts:
# a signal before that lands in the interpreter's own start-up, which is Python's, not ninlab's.
_NINLAB = [
    sys.executable,
    "-c",
    (
        "import sys; sys.stderr.write('go\\n'); sys.stderr.flush(); from ninlab.cli import main; "
        "sys.exit(main())"
    ),
]
_TINY = TrainConfig(
    variant="nin-d2l-0x1",
    image_size=67,
    epochs=2,
    batch_size=4,
    train_examples=24,
    test_examples=4,
    lr=0.01,
)


def _tiny_train_args(output_dir: Path, data_dir: Path) -> list[str]:
    return [
        "train",
        "--output-dir",
        str(output_dir),
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--variant",
        _TINY.variant,
        "--image-size",
        str(_TINY.image_size),
        "--epochs",
        str(_TINY.epochs),
        "--batch",
        str(_TINY.batch_size),
        "--train-examples",
        str(_TINY.train_examples),
        "--test-examples",
        str(_TINY.test_examples),
    ]


def _start(argv: list[str], **streams) -> subprocess.Popen[bytes]:
    # SIGINT's default in the command, as a terminal's shell gives it. A pytest-xdist worker
    # ignores SIGINT, a program inherits an ignored signal as ignored, and Python started so
    # installs no KeyboardInterrupt: the Ctrl-C tests' commands ignored it (trained to the end,
    # exit 0). Set around the start, not in the child (a preexec_fn is unsafe with threads).
    before = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return subprocess.Popen([*_NINLAB, *argv], env=_ENV, **streams)
    finally:
        signal.signal(signal.SIGINT, before)


def _assert_run_intact(run_dir: Path) -> None:
    """Whatever was stopped, the run directory holds nothing half-written: no temporary, no lock,
    and a checkpoint, if any, that verifies."""
    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    assert not [name for name in names if name.endswith(".tmp")], names
    assert ".ninlab.lock" not in names
    if CHECKPOINT_NAME in names:
        load_checkpoint(run_dir)


# -- the reader goes away ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_whose_reader_goes_away_trains_to_the_end_and_says_so_in_its_log(
    fashion_mnist, tmp_path
):
    # `ninlab train ... 2>&1 | head -1`: the reader takes the first line, then leaves, at a random
    # moment of the run (seeded: the same moments each time).
    moments = random.Random(23).sample([0.0, 0.5, 1.0, 2.0, 4.0], 3)
    for moment in moments:
        run_dir = tmp_path / f"closed-after-{moment}"
        # Long enough (2 x 1,200 images, seconds) that the reader leaves while it trains: a tiny
        # run can say all it has to say into the pipe's buffer before the latest moment.
        argv = _tiny_train_args(run_dir, fashion_mnist.directory)
        argv[argv.index("--train-examples") + 1] = "1200"  # given twice, it would be refused
        process = _start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout.readline() == b"go\n"
        process.stdout.readline()  # the data line
        time.sleep(moment)
        process.stdout.close()
        assert process.wait(timeout=300) == 0, moment
        assert load_checkpoint(run_dir)["epoch"] == _TINY.epochs  # trained to the end
        _assert_run_intact(run_dir)
        log = (run_dir / CONSOLE_LOG_NAME).read_text()
        assert "was closed (Broken pipe); the run goes on" in log.splitlines()[0]
        assert f"epoch {_TINY.epochs}/{_TINY.epochs}: train loss" in log


@pytest.mark.parametrize("format", ["table", "json"])
def test_a_command_whose_reader_goes_away_ends_quietly_with_exit_1(format):
    # `ninlab summary | head -1`: Python's advice and rich's, the same in every format. The
    # output is larger than a pipe's buffer, so the reader's exit is seen whatever the timing.
    process = _start(
        ["summary", *(["--explain"] if format == "table" else []), "--format", format],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1
    assert err == "go\n"  # nothing but the test's own line: no traceback, no message


# -- signals at random moments of start-up -------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_start_up_is_exit_130_with_nothing_half_written(
    fashion_mnist, tmp_path
):
    # Start-up imports PyTorch, whose import of NumPy swallowed a KeyboardInterrupt (the run then
    # trained all epochs and exited 0); a moment drawn from each part of it, and the first steps.
    rng = random.Random(6)
    moments = [rng.uniform(low, high) for low, high in ((0.0, 0.4), (0.4, 1.5), (1.5, 4.0))]
    for moment in moments:
        run_dir = tmp_path / f"interrupted-at-{moment:.2f}"
        process = _start(
            _tiny_train_args(run_dir, fashion_mnist.directory),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stderr.readline() == b"go\n"
        time.sleep(moment)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        err = err.decode()
        assert process.returncode == 130, (moment, err)
        assert "Traceback" not in err
        assert err.splitlines()[-1] in ("ninlab: interrupted",) or "interrupted in epoch" in err
        _assert_run_intact(run_dir)


def test_ctrl_c_during_the_imports_of_a_command_is_exit_130():
    for moment in (0.05, 0.3, 0.8):
        process = _start(["summary"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stderr.readline() == b"go\n"
        time.sleep(moment)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        assert (process.returncode, err.decode()) == (130, "ninlab: interrupted\n"), moment


# -- --resume and --output-dir -------------------------------------------------------------------


def test_an_empty_resume_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--resume", "", "--epochs", "1")
    assert code == 2
    assert err == (
        "ninlab: error: --resume '' names no directory; give the run directory (--resume "
        "runs/default), or --resume alone to continue the run in --output-dir\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_resume_with_another_output_dir_is_refused(tmp_path, capsys):
    code, _, err = run(
        capsys, "train", "--resume", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b")
    )
    assert code == 2
    assert err == (
        f"ninlab: error: --resume {tmp_path / 'a'} and --output-dir {tmp_path / 'b'} name two "
        "directories; a resumed run continues in its own directory: give only --resume\n"
    )
    assert list(tmp_path.iterdir()) == []


# -- data files that would exhaust memory --------------------------------------------------------


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)


def test_a_huge_sparse_data_file_is_refused_by_its_size_before_reading(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    with open(path, "wb") as handle:
        handle.write(_idx_header(FILES["train_images"].shape))
        handle.truncate(50 * 2**30)  # 50 GiB, sparse: nothing but the header is on disk
    tracemalloc.start()
    with pytest.raises(NinlabError, match="is longer than its header announces"):
        read_idx(path, expected=FILES["train_images"])
    assert tracemalloc.get_traced_memory()[1] < 2**20  # nothing of it was read
    tracemalloc.stop()
    path.write_bytes(_idx_header((2**16, 2**16, 2**8)))
    with pytest.raises(NinlabError) as refused:
        read_idx(path)
    assert str(refused.value) == (
        f"{path} announces shape (65536, 65536, 256) (1,099,511,627,776 bytes), more than the "
        f"{MAX_IDX_BYTES:,} bytes ninlab reads from an IDX file; replace it with Fashion-MNIST's "
        "file, or delete it so that ninlab downloads it again"
    )


def test_a_gzip_bomb_is_decompressed_no_further_than_its_header_announces(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    zeros = bytes(2**20)
    with gzip.open(path, "wb") as bomb:  # 10,000 labels announced, 256 MiB given
        bomb.write(_idx_header(FILES["test_labels"].shape))
        for _ in range(256):
            bomb.write(zeros)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    with pytest.raises(NinlabError, match="decompresses to more than its header announces"):
        read_idx(path, expected=FILES["test_labels"])
    assert tracemalloc.get_traced_memory()[1] < 8 * 2**20  # a chunk, not 256 MiB
    tracemalloc.stop()


# -- images in every mode ------------------------------------------------------------------------

_LEVELS = np.arange(28 * 28).reshape(28, 28) % 256  # every 8-bit gray level, in a gradient


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("i-of-8-bit-values.tiff", lambda: Image.fromarray(_LEVELS.astype(np.int32), mode="I")),
        (
            "i-of-16-bit-values.tiff",
            lambda: Image.fromarray((_LEVELS * 257).astype(np.int32), mode="I"),
        ),
        ("i16.png", lambda: Image.fromarray((_LEVELS * 257).astype(np.uint16))),
        ("f-0-to-1.tiff", lambda: Image.fromarray((_LEVELS / 255).astype(np.float32), mode="F")),
        ("f-0-to-255.tiff", lambda: Image.fromarray(_LEVELS.astype(np.float32), mode="F")),
        ("rgb.png", lambda: Image.fromarray(np.stack([_LEVELS.astype(np.uint8)] * 3, axis=-1))),
    ],
)
def test_every_mode_reads_as_the_8_bit_image_it_holds(tmp_path, name, image):
    Image.fromarray(_LEVELS.astype(np.uint8)).save(tmp_path / "l.png")
    image().save(tmp_path / name)
    assert torch.equal(load_image(tmp_path / name), load_image(tmp_path / "l.png"))


def test_negative_or_non_finite_gray_levels_are_refused(tmp_path):
    values = _LEVELS.astype(np.float32)
    values[0, 0] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(NinlabError, match=r"mode F.* holds negative or non-finite values"):
        load_image(tmp_path / "nan.tiff")


def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path):
    # A camera's portrait photo: stored on its side, with EXIF orientation 6 (turn 90 degrees
    # clockwise to show it).
    upright = np.zeros((28, 28), dtype=np.uint8)
    upright[:14, :] = 255  # light top half
    stored = np.rot90(upright, k=1)  # as the camera wrote it: rotated 90 degrees anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=100, exif=exif)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    difference = load_image(tmp_path / "photo.jpg").int() - load_image(tmp_path / "upright.png")
    assert difference.abs().max() <= 8  # JPEG's rounding, not a turned picture (255)


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    Image.fromarray(_LEVELS.astype(np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 784 pixels: over twice the limit
    with pytest.raises(NinlabError) as refused:
        load_image(tmp_path / "big.png")
    assert str(refused.value).startswith(f"image {tmp_path / 'big.png'} is too large to read")
    assert "\n" not in str(refused.value)


# -- numbers that are not numbers ----------------------------------------------------------------


def test_json_text_is_strict_json_with_a_warning_naming_what_was_not_a_number():
    with pytest.warns(NinlabWarning) as warned:
        text = json_text({"loss": math.nan, "rows": [1.5, math.inf], "n": 3}, what="the result")
    assert text == '{"loss": null, "rows": [1.5, null], "n": 3}'
    assert str(warned[0].message) == (
        "the result has values that are not finite numbers (nan or inf), written as null: "
        "loss, rows[1]"
    )
    assert json_text({"a": (1, 2.5)}, indent=2) == json.dumps({"a": (1, 2.5)}, indent=2)


def test_nan_weights_warn_and_evaluate_writes_strict_json(fashion_mnist, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_nin(parse_variant(_TINY.variant))
    weights = model.state_dict()
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first][0] = math.nan
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"config": dataclasses.asdict(_TINY), "model": weights, "epoch": 1})
    code, out, err = run(
        capsys,
        "evaluate",
        str(path),
        "--format",
        "json",
        "--test-examples",
        "8",
        "--data-dir",
        str(fashion_mnist.directory),
        "--no-download",
    )
    assert code == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert report["loss"] is None and report["examples"] == 8
    warnings = [line for line in err.splitlines() if line.startswith("ninlab: warning:")]
    assert warnings == [
        (
            f"ninlab: warning: {path}: weights that are not finite numbers (nan or inf) in {first} "
            f"({weights[first][0].numel():,}); what this network predicts is meaningless"
        ),
        (
            "ninlab: warning: the evaluation has values that are not finite numbers (nan or inf), "
            "written as null: loss"
        ),
    ]
    assert "Traceback" not in err


def test_nan_weights_give_no_prediction_but_one_line(tmp_path, capsys):
    """A class picked from nan scores was printed as "T-shirt/top (nan)"."""
    model = build_nin(parse_variant(_TINY.variant))
    weights = model.state_dict()
    last = [name for name, tensor in weights.items() if tensor.is_floating_point()][-1]
    weights[last].fill_(math.nan)
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"config": dataclasses.asdict(_TINY), "model": weights, "epoch": 1})
    image = tmp_path / "shirt.png"
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(image)
    code, out, err = run(capsys, "predict", str(path), str(image))
    assert code == 2
    assert out == ""
    assert err.splitlines()[-1] == (
        f"ninlab: error: the network's scores for {image} are not finite numbers (nan or inf), so "
        "it has no prediction: its weights are not finite (see the warning above) or overflow on "
        "this image; predict with another checkpoint"
    )


# -- a signal during the evaluation or the save --------------------------------------------------


@pytest.fixture(scope="module")
def straight(fashion_mnist, tmp_path_factory) -> Path:
    """The tiny run's directory, trained by the same command line without a signal."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert main(_tiny_train_args(run_dir, fashion_mnist.directory)) == 0
    return run_dir


def _signalling(function, sig: signal.Signals, *, on_call: int):
    """`function`, which sends `sig` to this process during its `on_call`-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(None)
        if len(calls) == on_call:
            os.kill(os.getpid(), sig)
        return function(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize(
    ("moment", "sig", "on_call", "saved_at"),
    [
        ("save_run", signal.SIGHUP, 1, (1, 1)),  # epoch 1's save: stops after epoch 2's 1st step
        ("evaluate_model", signal.SIGINT, 1, (1, 1)),  # epoch 1's evaluation: likewise
        ("evaluate_model", signal.SIGINT, 2, (2, 0)),  # the last evaluation: the run is complete
        ("save_run", signal.SIGTERM, 2, (2, 0)),  # the last save
    ],
)
def test_a_signal_during_evaluation_or_save_is_exit_130_and_resume_ends_the_same(
    fashion_mnist, straight, tmp_path, capsys, monkeypatch, moment, sig, on_call, saved_at
):
    # A Ctrl-C during the last epoch's evaluation or save was once lost: "trained", exit 0.
    run_dir = tmp_path / "signalled"
    argv = _tiny_train_args(run_dir, fashion_mnist.directory)
    # Under `nohup` (a CI started so) SIGHUP is ignored, and the trainer rightly keeps it so; the
    # run tested here is one started from a terminal.
    ignored = signal.getsignal(sig) is signal.SIG_IGN
    if ignored:
        signal.signal(sig, signal.SIG_DFL)
    try:
        with monkeypatch.context() as patch:
            patched = _signalling(getattr(train_module, moment), sig, on_call=on_call)
            patch.setattr(train_module, moment, patched)
            code, _, err = run(capsys, *argv)
    finally:
        if ignored:
            signal.signal(sig, signal.SIG_IGN)
    assert code == 130 and "Traceback" not in err, err
    saved = load_checkpoint(run_dir)
    assert (saved["epoch"], saved["batch"]) == saved_at
    _assert_run_intact(run_dir)
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    ours, theirs = load_checkpoint(run_dir)["model"], load_checkpoint(straight)["model"]
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"garbage", "(Not a gzipped file (b'ga'))"),
        (gzip.compress(b""), "is not an IDX file of unsigned bytes (bad magic number)"),
        (gzip.compress(_idx_header((10_000,))[:6]), "is truncated: its header ends early"),
        (gzip.compress(_idx_header((10_000, 1)) + bytes(10_000)), "holds shape (10000, 1)"),
        (gzip.compress(_idx_header((10_000,)) + bytes(99)), "is truncated: its header announces"),
    ],
    ids=["not-gzip", "empty", "short-header", "wrong-dimensions", "short"],
)
def test_a_damaged_data_file_in_the_data_directory_is_one_line_with_the_fix(
    fashion_mnist, tmp_path, capsys, content, said
):
    data = tmp_path / "data"
    data.mkdir()
    for spec in FILES.values():
        (data / f"{spec.name}.gz").symlink_to(fashion_mnist.directory / f"{spec.name}.gz")
    damaged = data / "t10k-labels-idx1-ubyte.gz"
    damaged.unlink()
    damaged.write_bytes(content)
    code, _, err = run(capsys, *_tiny_train_args(tmp_path / "run", data))
    last = err.splitlines()[-1]
    assert code == 2 and err.count("ninlab: error:") == 1 and last.startswith("ninlab: error:")
    assert said in last and str(damaged) in last, err
    assert "delete it so that ninlab downloads it again" in last, err
