"""Every command, every option, valid and invalid values (hypothesis): a command ends with exit 0,
or with exit 2 and one line naming the option, value or file at fault; never a traceback.

Each argv is built from the command's own parser, so a new option is exercised without a change
here; a value strategy is chosen by the option's name, type or choices. Data options always name
a directory without the data, so no example trains or evaluates for long: those runs are the
fault tests' (tests/training/test_faults.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ninlab.analysis.step import StepSpec
from ninlab.cli import build_parser, main
from ninlab.cli.options import (
    finite_float,
    input_size,
    non_negative_int,
    path_name,
    positive_int,
    thread_count,
)
from ninlab.models import build_nin, parse_variant
from ninlab.studies.charts import chart_source
from ninlab.training.checkpoint import save_checkpoint
from ninlab.training.presets import TrainConfig

_MODELS = (
    "nin-d2l-0x1",
    "nosuch",
    "nin-d2l:dropout=2",
    "nin-d2l:batch_norm=maybe",
    "nin-d2l:num_1x1=-1",
    "nin-d2l:init=foo",
    "nin-d2l:num_classes=0",
    "nin-d2l:num_1x1",
    "nin-d2l:num_1x1=5000",  # bounded: one line, not minutes of work
    "nin-d2l:num_classes=1000000",  # 8 TB of weights: the accountant builds none
)
_BY_DEST: dict[str, tuple[str, ...]] = {
    "model": _MODELS,
    "variant": _MODELS,
    "input": ("1x67x67", "0x67x67", "1x67", "abc", "", "1x99999999999999999999x67"),
    "input_range": ("0:2", "0:99999999999999999999", "3:1", "x"),
    "optimizer": (
        "sgd",
        "adamw:weight_decay=0.01",
        "adam:lr=-1",
        "sgd:lr=nan",
        "adam:weight_decay=-1",
        "foo",
        "adam:implementation=bad",
        "sgd:momentum=1.5",
        "sgd:lr",
        "sgd:momentum=0.5",
        "adam:momentum=0.5",  # Adam has no momentum: refused, never ignored
        "adam:amsgrad=true,betas=(0.8,0.99)",
        "sgd:nesterov=true",
        "adam:betas=(2,0.9)",
    ),
    "budget": ("8GiB", "0", "abc", "1e400GiB", "-1GiB", "8XB", "9" * 400),
    "fit": ("8GiB", "0", "abc", "1e400GiB", "8XB", "9" * 400),
    "layer": ("nosuch",),
    "plot": ("{tmp}/bars.png", "{tmp}/bars.txt", "", "{tmp}/a-dir", "{tmp}/missing/bars.png"),
}
_BY_TYPE: dict[object, tuple[str, ...]] = {
    positive_int: ("1", "2", "0", "-1", "1.5", "99999999999999999999"),
    thread_count: ("1", "2", "0", "1025", "100000"),
    non_negative_int: ("0", "7", "-1", "18446744073709551616"),
    finite_float: ("0.01", "0", "-1", "nan", "inf", "x"),
    input_size: ("1x67x67", "0x67x67", "abc"),
    path_name: (
        "",
        "{tmp}/a-dir",
        "{tmp}/out.txt",
        "{tmp}/missing/out.png",
        "{tmp}/out.png",
        "{tmp}/out.html",
        "{tmp}/a-file",
    ),
}
# Every value of a data option lacks the data: missing, a file, empty, one file of four.
_DATA_DIRS = ("{tmp}/empty", "{tmp}/typo", "{tmp}/a-file", "{tmp}/one-of-four")
_POSITIONALS: dict[tuple[str, str], tuple[str, ...]] = {
    ("evaluate", "checkpoint"): ("{tmp}/run", "{tmp}/flipped.pt", "{tmp}/a-file", "{tmp}/nothere"),
    ("predict", "checkpoint"): ("{tmp}/run", "{tmp}/flipped.pt", "{tmp}/nothere"),
    ("predict", "images"): ("{tmp}/gray16.png", "{tmp}/gray8.png", "{tmp}/a-file", "{tmp}/no.png"),
    ("compare", "specs"): ("nin-d2l-0x1", "nin-d2l-1x1", "nosuch", "nin-d2l:dropout=2"),
    ("cache", "action"): ("path", "clear", "frobnicate"),  # the session's folder (conftest)
}
# Cheap where valid: the smallest input of d2l's NiN, a batch of 2, no real data.
_BASE: dict[str, tuple[str, ...]] = {
    "summary": ("--input", "1x67x67", "--batch", "2"),
    "measure": ("--input", "1x67x67", "--batch", "2", "--model", "nin-d2l-0x1"),
    "plot": ("--input", "1x67x67", "--batch", "2", "-o", "{tmp}/chart.png"),
    "report": ("--input", "1x67x67", "--batch", "2", "--budget", "64MiB"),
    "compare": ("--input", "1x67x67", "--batch", "2"),
    "train": ("--data-dir", "{tmp}/empty", "--no-download", "--output-dir", "{tmp}/runs/x"),
    "evaluate": ("--data-dir", "{tmp}/empty", "--no-download"),
    "predict": (),
    "cache": (),
}
_PLOT_KINDS = ("geometry", "flops", "saved", "foo")  # the cheap kinds, and a wrong one


def _commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _commands()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the values name: a checkpoint, one with a flipped byte, images, bad places."""
    tmp = tmp_path_factory.mktemp("hostile")
    config = TrainConfig(variant="nin-d2l-0x1", image_size=67, epochs=1)
    torch.manual_seed(0)
    model = build_nin(parse_variant(config.variant))
    (tmp / "run").mkdir()
    save_checkpoint(
        tmp / "run" / "checkpoint.pt",
        {"config": dataclasses.asdict(config), "model": model.state_dict(), "epoch": 1},
    )
    data = bytearray((tmp / "run" / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp / "flipped.pt").write_bytes(bytes(data))
    gray = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80
    Image.fromarray(gray).save(tmp / "gray16.png")
    Image.fromarray((gray // 257).astype(np.uint8)).save(tmp / "gray8.png")
    for directory in ("empty", "a-dir", "one-of-four"):
        (tmp / directory).mkdir()
    (tmp / "one-of-four" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    (tmp / "a-file").write_bytes(b"not a checkpoint")
    return tmp


def _value(action: argparse.Action, command: str) -> st.SearchStrategy[str]:
    if action.dest == "data_dir":
        return st.sampled_from(_DATA_DIRS)
    if action.dest in _BY_DEST:
        return st.sampled_from(_BY_DEST[action.dest])
    if action.type in _BY_TYPE:
        return st.sampled_from(_BY_TYPE[action.type])
    if action.choices:
        return st.sampled_from((*map(str, action.choices), "foo"))
    return st.sampled_from(("x", ""))


def _option(action: argparse.Action, command: str) -> st.SearchStrategy[list[str]]:
    name = action.option_strings[-1]
    if action.nargs == 0:  # a switch: given, or its --no- form
        return st.sampled_from([[name], [action.option_strings[0]]])
    if action.dest == "resume":  # --resume, or --resume RUN_DIR
        return st.sampled_from([[name], [name, "{tmp}/nothere"]])
    return _value(action, command).map(lambda value: [name, value])


@st.composite
def command_lines(draw: st.DrawFn, command: str) -> list[str]:
    parser = COMMANDS[command]
    argv = [command]
    if command == "plot":
        argv.append(draw(st.sampled_from(_PLOT_KINDS)))
    for (owner, dest), values in _POSITIONALS.items():
        if owner == command:
            argv += draw(st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True))
            if command == "evaluate" or (command == "predict" and dest == "checkpoint"):
                argv = argv[:2]  # one checkpoint
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    chosen = (
        draw(st.lists(st.sampled_from(options), max_size=3, unique_by=lambda a: a.dest))
        if options  # `cache` has none
        else []
    )
    # A drawn option replaces the base's: given twice with two values, it would be refused.
    base = list(_BASE[command])
    for action in chosen:
        for flag in action.option_strings:
            if flag in base and not isinstance(action, argparse._AppendAction):
                del base[base.index(flag) : base.index(flag) + 2]
    argv += base
    for action in chosen:
        argv += draw(_option(action, command))
        if draw(st.integers(0, 5)) == 0:  # now and then, the same option again
            argv += draw(_option(action, command))
    return argv


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's own exits (--help)
            code = int(exit.code or 0)
    return code, err.getvalue()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI time is known, a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_command_line_ends_in_exit_0_or_one_line_and_exit_2(files, command, data, monkeypatch):
    monkeypatch.delenv("NINLAB_DATA", raising=False)
    template = data.draw(command_lines(command), label="argv")
    argv = [part.replace("{tmp}", str(files)) for part in template]
    with contextlib.chdir(files / "a-dir"):  # report's default -o lands here
        code, err = _run(argv)
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("ninlab: error:")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0].rstrip()), (argv, err)
        # The line names what is at fault: an option given, one of its values, or a file.
        named = [part for part in argv[1:] if part] + [os.sep]  # a path names a file
        assert any(part in errors[0] for part in named), (argv, errors[0])


def _script(*argv: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """`ninlab ARGV` in a fresh process, as the console script runs it."""
    code = "import sys; from ninlab.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **environment},
        timeout=300,
        check=False,
    )


def test_an_environment_matplotlib_cannot_read_is_one_line(tmp_path):
    done = _script("plot", "geometry", "-o", str(tmp_path / "g.png"), MPLBACKEND="nonsense")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("ninlab: error: MPLBACKEND='nonsense' is not a backend")
    assert len(done.stderr.splitlines()) == 1


def test_an_option_a_format_has_no_place_for_is_refused_not_ignored():
    code, err = _run(["summary", "--format", "csv", "--fit", "8GiB", *_BASE["summary"]])
    assert code == 2 and "--fit has no place in --format csv" in err
    code, err = _run(["summary", "--format", "csv", "--fit", "8XB", *_BASE["summary"]])
    assert code == 2 and "argument --fit: cannot read memory size '8XB'" in err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["plot", "saved", "--mode", "infer"], "chart 'saved' is of a training step only"),
        (["plot", "flops", "--optimizer", "adam"], "--optimizer is not read by chart 'flops'"),
        (["plot", "geometry", "--amp", "bf16"], "--amp is not read by chart 'geometry'"),
        (["plot", "flops", "--budget", "1GiB"], "--budget is not read by chart 'flops'"),
        (["plot", "timeline", "--layer", "0.0"], "--layer is not read by chart 'timeline'"),
        (["plot", "timeline", "--mode", "infer", "--optimizer", "sgd"], "--optimizer belongs to"),
        # No abbreviations: --mode was once read as --model, "unknown model 'infer'".
        (["report", "--mode", "infer"], "unrecognized arguments: --mode infer"),
        (["summary", "--inp", "1x67x67"], "unrecognized arguments: --inp"),
    ],
)
def test_an_option_a_chart_does_not_read_is_refused(tmp_path, argv, error):
    code, err = _run([*argv, "-o", str(tmp_path / "x.png"), "--input", "1x67x67", "--batch", "2"])
    assert code == 2 and error in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["summary", "--batch", "2", "--batch", "3"], "--batch 2 and --batch 3 conflict"),
        (["summary", "--format", "json", "--format=csv"], "--format json and --format csv"),
        (["summary", "--channels-last", "--no-channels-last"], "--channels-last and --no-"),
        (["train", "--amp", "bf16", "--no-amp"], "--amp bf16 and --no-amp conflict"),
        (["plot", "flops", "-o", "a.png", "--output", "b.png"], "-o a.png and --output b.png"),
    ],
)
def test_an_option_given_twice_with_two_values_is_refused(argv, error):
    code, err = _run(argv)
    assert code == 2 and error in err and len(err.splitlines()) == 1, err


def test_an_option_given_twice_alike_or_one_that_adds_is_taken():
    parser = build_parser()
    assert parser.parse_args(["summary", "--batch", "2", "--batch=2"]).batch == 2
    assert len(parser.parse_args(["summary", "--input", "8", "--input", "4"]).input) == 2


def test_plot_batch_of_an_inference_fits_the_inference(tmp_path):
    """--mode infer reaches the batch chart: it fits the inference, a larger batch than the
    training step's in the same budget (once it was the training step's, whatever --mode said)."""
    model = build_nin(parse_variant("nin-d2l-0x1"))
    spec = StepSpec(input_size=(1, 67, 67))
    train, infer = (
        chart_source(
            "batch", model, spec.replace(mode=mode), batch_size=2, budget="64MiB", model_name="m"
        )
        for mode in ("train", "infer")
    )
    assert (train.mode, infer.mode) == ("train", "infer")
    assert infer.fit.batch_size > train.fit.batch_size
    argv = ["plot", "batch", "--mode", "infer", "--budget", "64MiB", "--model", "nin-d2l-0x1"]
    code, err = _run([*argv, "--input", "1x67x67", "-o", str(tmp_path / "batch.png")])
    assert code == 0, err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("form", ["table", "json"])
def test_an_output_stream_that_is_full_is_one_line(form):
    # Once an OSError traceback and exit 1 (`ninlab summary > /dev/full`).
    code = "import sys; from ninlab.cli import main; sys.exit(main())"
    argv = ["summary", *_BASE["summary"], "--model", "nin-d2l-0x1", "--format", form]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "ninlab: error: cannot write the output (No space left on device); free space, or send "
        "it elsewhere (> FILE on another disk)\n"
    )


@pytest.fixture
def no_hang():
    """A test that once hung (reading a FIFO) fails after a minute instead."""

    def hung(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _not_regular(tmp: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp / "fifo")
        return tmp / "fifo"
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(tmp / "sock"))  # the file stays after the socket closes
        server.close()
        return tmp / "sock"
    return {"device": Path(os.devnull), "directory": tmp}[kind]


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("socket", "is a socket, not a regular file"),
        ("device", "is a character device, not a regular file"),
    ],
)
def test_a_file_to_read_that_is_not_a_regular_file_is_refused_before_it_is_opened(
    files, tmp_path, no_hang, kind, said
):
    # `ninlab predict RUN fifo.png` once waited forever for a writer.
    odd = _not_regular(tmp_path, kind)
    data = tmp_path / "data"
    data.mkdir()
    (data / "t10k-labels-idx1-ubyte").symlink_to(odd)
    step = tmp_path / "step.py"
    step.symlink_to(odd)
    for argv, what in [
        (["predict", str(files / "run"), str(odd)], "image"),
        (["evaluate", str(odd)], "checkpoint"),
        (["evaluate", str(files / "run"), "--data-dir", str(data), "--no-download"], "data file"),
        (["summary", *_BASE["summary"], "--step", f"{step}:f"], "step file"),
    ]:
        code, err = _run(argv)
        assert code == 2 and err.startswith(f"ninlab: error: {what} "), (argv, err)
        assert said in err and len(err.splitlines()) == 1, (argv, err)


def test_a_directory_given_as_an_image_is_named_as_one(files):
    code, err = _run(["predict", str(files / "run"), str(files / "a-dir")])
    said = f"image {files / 'a-dir'} is a directory, not a regular file; give a PNG, JPEG or"
    assert (code, err) == (2, f"ninlab: error: {said} other image file\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["summary", "--model", "{long}"],  # the registry's "unknown model"
        ["summary", "--model", "nin-d2l:{long}=1"],  # a part of a value
        ["summary", "--optimizer", "sgd:lr={long}"],
        ["summary", "--batch", "{long}"],  # argparse's own message
        ["summary", "--format={long}"],
        ["compare", "{long}"],
        ["summary", "--step", "{long}.py:f"],
    ],
)
def test_a_long_value_is_echoed_shortened(argv):
    # A 5,000-character --model was once repeated in full in the error line.
    code, err = _run([part.replace("{long}", "x" * 5000) for part in argv])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert len(err) < 500 and "x" * 80 + "... (5,0" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "{long}"],
        ["predict", "{long}", "a.png"],
        ["train", "--resume", "{long}"],
        ["train", "--output-dir", "{long}", "--data-dir", "{long}"],
        ["plot", "geometry", "-o", "{long}.png"],
    ],
)
def test_a_file_name_too_long_for_the_system_is_one_line(argv):
    # Once an OSError traceback (ENAMETOOLONG) from the first look at the path.
    code, err = _run([part.replace("{long}", "x" * 5000) for part in argv])
    assert code == 2 and err.startswith("ninlab: error: file name too long: " + "x" * 80), err
    assert len(err.splitlines()) == 1 and len(err) < 200, err


# A value of each train option that passes argparse or not, but never a run: the checks of the
# options, the recipe and the network all come before the data is loaded (item 1 of the second
# hostile probe: `--variant bad` used to print the "data: ..." line before its error).
_BAD_TRAIN_VALUES: dict[str, tuple[str, ...]] = {
    "preset": ("--preset", "foo"),
    "variant": ("--variant", "bad"),
    "image_size": ("--image-size", "20"),
    "epochs": ("--epochs", "0"),
    "batch": ("--variant", "nin-d2l-bn", "--batch", "1"),
    "lr": ("--lr", "0"),
    "momentum": ("--momentum", "1"),
    "nesterov": ("--preset", "d2l", "--nesterov"),
    "weight_decay": ("--weight-decay", "-1"),
    "schedule": ("--schedule", "foo"),
    "warmup_epochs": ("--warmup-epochs", "99"),
    "label_smoothing": ("--label-smoothing", "1"),
    "translate": ("--translate", "28"),
    "amp": ("--amp", "fp8"),
    "seed": ("--seed", "-1"),
    "train_examples": ("--train-examples", "1"),
    "test_examples": ("--test-examples", "0"),
    "device": ("--device", "tpu"),
    "output_dir": ("--output-dir", "{tmp}/a-file"),
    "resume": ("--resume", "{tmp}/nothere"),
    "force_memory": ("--image-size", "5000", "--batch", "4096"),  # the memory check it skips
    "data_dir": ("--data-dir", ""),
}
# Switches with no bad value of their own (any of them, given alone, is a valid run).
_TRAIN_SWITCHES = {"flip", "flip_tta", "normalize", "channels_last", "compile", "no_download"}


def test_every_train_option_has_a_bad_value_here():
    dests = {a.dest for a in COMMANDS["train"]._actions if a.option_strings and a.dest != "help"}
    assert dests == set(_BAD_TRAIN_VALUES) | _TRAIN_SWITCHES


@pytest.mark.parametrize("dest", sorted(_BAD_TRAIN_VALUES))
def test_a_bad_train_option_is_one_line_before_any_data_or_output(files, dest, monkeypatch):
    def loaded(args):
        raise AssertionError(f"the data was loaded before {dest} was checked")

    monkeypatch.setattr("ninlab.cli.train.load_data", loaded)
    argv = [
        "train",
        "--epochs",
        "1",
        "--output-dir",
        str(files / "runs" / dest),
        *(part.replace("{tmp}", str(files)) for part in _BAD_TRAIN_VALUES[dest]),
    ]
    # The value under test replaces the base's --epochs or --output-dir (argparse keeps the last).
    if argv.count("--epochs") == 2 or argv.count("--output-dir") == 2:
        option = "--epochs" if argv.count("--epochs") == 2 else "--output-dir"
        del argv[argv.index(option) : argv.index(option) + 2]
    if dest == "resume":
        del argv[argv.index("--output-dir") : argv.index("--output-dir") + 2]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = int(exit.code or 0)
    assert (code, out.getvalue()) == (2, ""), (argv, err.getvalue())
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("ninlab: error:"), (
        argv,
        err.getvalue(),
    )
    assert not (files / "runs" / dest).exists()  # nothing written either


# Settings that change what a trained network predicts or how its data is read (item 2): a
# resumed run refuses them changed; evaluate and predict take them from the checkpoint alone.
_PIPELINE_OPTIONS = (
    ("--image-size", "32"),
    ("--normalize",),
    ("--amp", "bf16"),
    ("--flip-tta",),
    ("--variant", "nin-d2l"),
)


@pytest.mark.parametrize("option", _PIPELINE_OPTIONS, ids=lambda option: option[0])
@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_a_setting_of_the_checkpoint_is_never_changed_on_the_command_line(files, command, option):
    run = str(files / "run")
    argv = {
        "train": ["train", "--resume", run],
        "evaluate": ["evaluate", run],
        "predict": ["predict", run, str(files / "gray8.png")],
    }[command]
    code, err = _run([*argv, *option])
    assert code == 2 and err.count("\n") == 1, err
    name = option[0].removeprefix("--").replace("-", "_")
    expected = f"{name}=" if command == "train" else f"unrecognized arguments: {' '.join(option)}"
    assert expected in err, err


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_checkpoint_whose_weights_are_not_its_variant_says_the_fix(files, tmp_path, command):
    state = torch.load(files / "run" / "checkpoint.pt", weights_only=True)
    state["config"]["variant"] = "nin-d2l-1x1"  # nin-d2l-0x1's weights, labelled as another
    del state["format"], state["checksum"]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    rest = [str(files / "gray8.png")] if command == "predict" else ["--data-dir", str(tmp_path)]
    code, err = _run([command, str(tmp_path), *rest])
    assert code == 2 and err.count("\n") == 1, err
    assert "do not fit variant 'nin-d2l-1x1'" in err
    assert err.rstrip().endswith("train it again with 'ninlab train --variant nin-d2l-1x1'"), err
    assert "?" not in err


@pytest.mark.parametrize(
    "specs",
    [
        ["nin-d2l", "nin-d2l:num_1x1=-1"],  # a variant setting its network refuses
        ["nin-d2l", "nin-d2l"],  # named twice
        ["nin-d2l", "torch.nn:Identity"],  # a factory cannot be trained
    ],
)
def test_compare_train_refuses_bad_models_before_it_loads_the_data(tmp_path, monkeypatch, specs):
    def loaded(args):
        raise AssertionError(f"the data was loaded before {specs} were checked")

    monkeypatch.setattr("ninlab.cli.compare.load_data", loaded)
    argv = ["compare", *specs, "--train", "--output-dir", str(tmp_path / "runs")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = int(exit.code or 0)
    assert (code, out.getvalue()) == (2, ""), err.getvalue()
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("ninlab: error:")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["summary", "--fit", "-1GiB"], "argument --fit: cannot read memory size '-1GiB'"),
        (["report", "--budget", "-1.5GiB"], "argument --budget: cannot read memory size '-1.5GiB'"),
        (["summary", "--input", "-1x2"], "argument --input: cannot read input size '-1x2'"),
        (["summary", "--batch", "2", "--batch", "-3"], "--batch 2 and --batch -3 conflict"),
    ],
)
def test_a_value_that_starts_with_a_dash_gets_its_options_own_refusal(argv, error):
    """argparse read `--fit -1GiB` as an option with no value ("expected one argument"); the
    value reaches the option's own check, which says what is wrong with it."""
    code, err = _run(argv)
    assert code == 2 and error in err and len(err.splitlines()) == 1
