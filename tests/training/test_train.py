"""The trainer on small real subsets of Fashion-MNIST: learning, files, exact resume after Ctrl-C,
two gloo processes against one, and the one-line errors."""

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import ninlab
from ninlab.cli import main
from ninlab.errors import NinlabError
from ninlab.training import train as train_module
from ninlab.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ninlab.training.metrics import METRICS_FIELDS
from ninlab.training.presets import PRESETS, TrainConfig
from ninlab.training.progress import RichReporter
from ninlab.training.train import train

# NiN with batch norm and dropout at the smallest input d2l's NiN accepts (67x67), on 384 training
# images: 12 steps an epoch.
SMALL = TrainConfig(
    variant="nin-d2l-bn",
    image_size=67,
    epochs=3,
    batch_size=32,
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=1,
    normalize=True,
    train_examples=384,
    test_examples=128,
    seed=1,
)

_SRC = str(Path(ninlab.__file__).parents[1])
_CLI = "import sys; from ninlab.cli import main; sys.exit(main())"


def _env() -> dict[str, str]:
    """Subprocesses import the same ninlab as this test, with the thread count this machine uses."""
    return {**os.environ, "PYTHONPATH": _SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli_args(config: TrainConfig, output_dir: Path) -> list[str]:
    args = ["train", "--output-dir", str(output_dir), "--no-download"]
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if value == "none":  # amp: --amp takes a dtype, --no-amp turns autocast off
            args.append(flag.replace("--", "--no-", 1))
        elif isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        elif value is not None:
            args += [flag, str(value)]
    return args


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_cpu_preset_recipe_learns_on_a_subset_and_writes_every_file(
    fashion_mnist, tmp_path, monkeypatch
):
    titles = []  # the curves' titles: a notebook's run directory is temporary, and never shown
    plot_curves = train_module.plot_curves
    monkeypatch.setattr(
        train_module,
        "plot_curves",
        lambda *args, title, **kwargs: (
            titles.append(title) or plot_curves(*args, title=title, **kwargs)
        ),
    )
    config = dataclasses.replace(
        PRESETS["cpu"], image_size=67, epochs=2, train_examples=2048, test_examples=500, seed=0
    )
    out = io.StringIO()
    result = train(
        config,
        output_dir=tmp_path,
        data=fashion_mnist,
        reporter=RichReporter(Console(file=out, width=200)),
    )
    text = " ".join(out.getvalue().split())
    assert (
        "GFLOP per training step" in text
        and "held by the allocator" in text
        and "measured:" in text
        and "examples/s" in text
    )
    assert "epoch 2/2: train loss" in text
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[-1]["test_accuracy"] > 0.4  # chance is 0.1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(result.history) and set(rows[0]) == set(METRICS_FIELDS)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(METRICS_FIELDS)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(titles) == 2 and not [title for title in titles if tmp_path.name in title], titles
    assert json.loads((tmp_path / "config.json").read_text()) == dataclasses.asdict(config)
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 2 and saved["batch"] == 0 and saved["step"] == 2 * 2048 // 128
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(fashion_mnist, tmp_path):
    # three epochs left when the signal is sent; augmented, so a resume must draw the same images
    config = dataclasses.replace(SMALL, epochs=4, flip=True, translate=2, flip_tta=True)
    reference = train(config, output_dir=tmp_path / "straight", data=fashion_mnist)
    assert not reference.interrupted

    run_dir = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI, *_cli_args(config, run_dir)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        not (run_dir / CHECKPOINT_NAME).exists()
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # Ctrl-C, somewhere after the first epoch
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    saved = load_checkpoint(run_dir)
    assert (saved["epoch"], saved["batch"]) < (4, 0), "the signal came after the run had finished"
    assert "interrupted in epoch" in stderr and "--resume" in stderr

    resumed = train(config, output_dir=run_dir, data=fashion_mnist, resume=True)
    assert not resumed.interrupted
    ours, theirs = _weights(run_dir), _weights(tmp_path / "straight")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert [row["test_accuracy"] for row in resumed.history] == [
        row["test_accuracy"] for row in reference.history
    ]
    assert [row["train_loss"] for row in resumed.history] == pytest.approx(
        [row["train_loss"] for row in reference.history], rel=1e-12
    )


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(fashion_mnist, tmp_path):
    # No dropout and no batch norm: two processes would draw their own masks and normalise their
    # own halves of the batch (SyncBatchNorm needs GPUs), so only then is the arithmetic the same.
    config = dataclasses.replace(
        SMALL,
        variant="nin-d2l:dropout=0",
        epochs=2,
        batch_size=64,
        lr=0.1,
        momentum=0,
        warmup_epochs=0,
        schedule="constant",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes below: the same kernels, the same sums
    try:
        single = train(config, output_dir=tmp_path / "one", data=fashion_mnist)
    finally:
        torch.set_num_threads(threads)
    launcher = tmp_path / "ninlab_cli.py"
    launcher.write_text(_CLI + "\n")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(launcher),
        *_cli_args(config, tmp_path / "two"),
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        command,
        env={**_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr
    two = load_checkpoint(tmp_path / "two")
    assert len(two["rng"]) == 2 and two["step"] == single.history[-1]["step"] == 2 * 6
    ours, theirs = two["model"], _weights(tmp_path / "one")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)
    for mine, reference in zip(two["history"], single.history):
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
        assert mine["train_accuracy"] == reference["train_accuracy"]
        assert mine["test_accuracy"] == reference["test_accuracy"]
    assert abs(single.history[-1]["train_loss"] - math.log(10)) > 1e-3, "the weights moved"


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    # One line, after at most the one that says where the data came from.
    if err.startswith("data: Fashion-MNIST from "):
        err = err.split("\n", 1)[1]
    assert err.count("\n") == 1 and err.startswith("ninlab: error: "), err
    return err


@pytest.fixture(scope="module")
def small_run(fashion_mnist, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("small") / "run"
    train(dataclasses.replace(SMALL, epochs=1), output_dir=run_dir, data=fashion_mnist)
    return run_dir


def test_resume_with_another_variant_is_refused(small_run, capsys):
    err = _one_line_error(capsys, ["train", "--resume", str(small_run), "--variant", "nin-d2l-1x1"])
    assert "variant='nin-d2l-1x1' (saved: 'nin-d2l-bn')" in err


def test_new_run_into_a_directory_with_a_checkpoint_is_refused(small_run, capsys):
    before = (small_run / CHECKPOINT_NAME).read_bytes()
    err = _one_line_error(capsys, ["train", "--preset", "cpu", "--output-dir", str(small_run)])
    assert "already holds a checkpoint" in err and "--resume" in err
    assert (small_run / CHECKPOINT_NAME).read_bytes() == before


def test_truncated_checkpoint_is_one_line(small_run, tmp_path, capsys):
    broken = tmp_path / "run"
    broken.mkdir()
    data = (small_run / CHECKPOINT_NAME).read_bytes()
    (broken / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    err = _one_line_error(capsys, ["train", "--resume", str(broken)])
    assert "is truncated or not a checkpoint" in err
    err = _one_line_error(capsys, ["evaluate", str(broken / CHECKPOINT_NAME)])
    assert "is truncated or not a checkpoint" in err


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    err = _one_line_error(capsys, ["train", "--preset", "cpu", "--output-dir", str(target)])
    assert "is a file" in err
    assert target.read_text() == "not a directory"


def test_failed_checkpoint_write_leaves_the_previous_one(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    # A real failed write: the file-size limit makes the kernel refuse bytes past 1 MB (EFBIG).
    script = f"""
import resource, signal, sys
from pathlib import Path
from ninlab.training.checkpoint import load_checkpoint, save_checkpoint
from ninlab.errors import NinlabError
state = load_checkpoint({str(run_dir)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_checkpoint(Path({str(run_dir / CHECKPOINT_NAME)!r}), state)
except NinlabError as error:
    print(error)
    sys.exit(2)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == (
        f"could not write {run_dir / CHECKPOINT_NAME} (File too large); choose another "
        "directory; the previous one is unchanged\n"
    )
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in small_run.iterdir())


def test_divergence_stops_with_the_reason_and_keeps_the_last_good_checkpoint(
    fashion_mnist, tmp_path
):
    config = dataclasses.replace(
        SMALL, variant="nin-d2l", lr=1e6, warmup_epochs=0, schedule="constant", epochs=2
    )
    with pytest.raises(
        NinlabError,
        match=r"training diverged: the loss is no longer finite .* at epoch 1.*lower --lr",
    ):
        train(config, output_dir=tmp_path, data=fashion_mnist)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_a_run_stuck_at_chance_says_so_with_the_evidence(fashion_mnist, tmp_path):
    # d2l's recipe with a learning rate far too large: the last block's ReLUs die in the
    # first steps.
    config = dataclasses.replace(
        PRESETS["d2l"],
        image_size=67,
        epochs=1,
        batch_size=32,
        lr=5.0,
        train_examples=256,
        test_examples=200,
    )
    out = io.StringIO()
    result = train(
        config,
        output_dir=tmp_path,
        data=fashion_mnist,
        reporter=RichReporter(Console(file=out, width=300)),
    )
    assert result.history[0]["test_accuracy"] == pytest.approx(0.1, abs=0.05)
    text = " ".join(out.getvalue().split())
    assert "sat at chance level" in text
    assert "200 of 200 test images give all-zero logits" in text and "--preset default" in text


def test_checkpoint_round_trip_refuses_foreign_files(tmp_path):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"epoch": 1})
    assert load_checkpoint(tmp_path)["epoch"] == 1
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(NinlabError, match="is not a ninlab checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(NinlabError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")


def test_a_shift_as_large_as_the_image_is_refused():
    with pytest.raises(NinlabError, match=r"^--translate must be between 0 and 27 pixels"):
        TrainConfig(translate=28)
    assert TrainConfig(translate=27, flip=True).translate == 27
