"""One vocabulary: every command's flags are the ones `ninlab.cli.options` defines, with the same
choices and checks, so the same bad value gets the same one-line refusal from every command."""

import argparse
import dataclasses

import pytest
from cli_run import run

from ninlab.analysis.step import StepSpec
from ninlab.cli import build_parser
from ninlab.cli.options import (
    AMP,
    BATCH,
    DEVICE,
    FLAGS,
    FORMAT,
    OPTIMIZER,
    Flag,
    refuse_unread_step_options,
    spec_from_args,
    training_overrides,
)
from ninlab.errors import NinlabError
from ninlab.training.presets import PRESETS, TrainConfig

# What each command needs before any option (its positionals, plot's required file).
POSITIONALS = {
    "summary": [],
    "measure": [],
    "train": [],
    "evaluate": ["runs/none"],
    "predict": ["runs/none", "shoe.png"],
    "plot": ["flops", "-o", "chart.png"],
    "report": [],
    "compare": ["nin-d2l"],
    "cache": ["path"],
}


def declared(flag: Flag) -> argparse.Action:
    """The flag as argparse makes it (a switch's --no- form included)."""
    return argparse.ArgumentParser().add_argument(*flag.names, **flag.options)


BY_NAME = {name: flag for flag in FLAGS for name in (*declared(flag).option_strings, *flag.aliases)}


def commands() -> dict[str, argparse.ArgumentParser]:
    actions = build_parser()._actions
    subparsers = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def commands_with(flag: str) -> list[str]:
    return [name for name, parser in commands().items() if flag in options(parser)]


def test_every_command_is_known_here():
    assert set(commands()) == set(POSITIONALS)


@pytest.mark.parametrize("command", POSITIONALS)
def test_a_commands_flags_are_the_vocabularys(command):
    """Names, choices, type, action and help as `options` defines them; only the default and
    --format's choices (the command's renderers) are the command's."""
    for name, action in options(commands()[command]).items():
        if name in ("-h", "--help") or name not in BY_NAME:
            continue
        flag = BY_NAME[name]
        expected = declared(flag)
        assert type(action) is type(expected), name
        assert action.type is expected.type and action.nargs == expected.nargs, name
        if flag is FORMAT:
            assert set(action.choices) <= {"table", "json", "markdown", "csv"}
        else:
            assert action.choices == expected.choices, name
        if name in flag.aliases:
            assert action.help == argparse.SUPPRESS, name
        else:
            assert action.option_strings == expected.option_strings, name
            assert action.help.startswith(flag.help), name


def test_a_flag_two_commands_take_is_the_vocabularys():
    """No command declares for itself a flag another command also has."""
    users: dict[str, set[str]] = {}
    for command, parser in commands().items():
        for name in options(parser):
            users.setdefault(name, set()).add(command)
    shared = {name for name, who in users.items() if len(who) > 1} - {"-h", "--help"}
    assert shared <= set(BY_NAME), shared - set(BY_NAME)


def test_the_vocabulary_has_one_definition_per_name():
    names = [name for flag in FLAGS for name in (*declared(flag).option_strings, *flag.aliases)]
    assert len(names) == len(set(names))
    assert all(isinstance(flag, Flag) for flag in FLAGS)


BAD_VALUES = [
    ("--batch", "0", "argument --batch: must be at least 1, got 0"),
    ("--batch-size", "-1", "argument --batch-size: must be at least 1, got -1"),
    ("--amp", "fp8", "argument --amp: invalid choice: 'fp8'"),
    ("--device", "foo", "argument --device: invalid choice: 'foo'"),
    ("--threads", "0", "argument --threads: must be at least 1, got 0"),
    # Far beyond the machine's thread limit the profiler failed to start: a traceback, then a
    # segmentation fault on exit.
    ("--threads", "100000", "argument --threads: must be at most 1,024, got 100,000"),
    ("--epochs", "0", "argument --epochs: must be at least 1, got 0"),
    ("--test-examples", "0", "argument --test-examples: must be at least 1, got 0"),
    ("--seed", "-1", "argument --seed: must be at least 0, got -1"),
    ("--input", "1x0x9", "argument --input: input size '1x0x9' has a zero"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_VALUES)
def test_a_bad_value_is_refused_alike_by_every_command_that_takes_it(capsys, flag, value, message):
    takers = commands_with(flag)
    assert takers, f"no command takes {flag}"
    for command in takers:
        code, out, err = run(capsys, command, *POSITIONALS[command], flag, value)
        assert code == 2 and out == "", command
        assert err.startswith(f"ninlab: error: {message}"), (command, err)
        assert err.endswith(f" (see 'ninlab {command} --help')\n") and err.count("\n") == 1, err


def test_a_bad_optimizer_is_refused_by_the_step_it_describes(capsys, tmp_path):
    """StepSpec reads the optimizer's text, so it refuses it: before any work, in every command."""
    takers = commands_with(OPTIMIZER.names[0])
    assert set(takers) == {"summary", "measure", "plot", "report", "compare"}
    positionals = {**POSITIONALS, "plot": ["flops", "-o", str(tmp_path / "chart.png")]}
    for command in takers:
        code, out, err = run(capsys, command, *positionals[command], "--optimizer", "lion")
        assert code == 2 and out == "", command
        assert err.startswith(
            "ninlab: error: --optimizer 'lion': unknown optimizer 'lion'; choose one of sgd,"
        ), err
        assert err.count("\n") == 1, command


def test_bf16_autocast_is_accepted_wherever_amp_is():
    takers = commands_with(AMP.names[0])
    assert set(takers) == {"summary", "measure", "plot", "report", "compare", "train"}
    for command in takers:
        args = build_parser().parse_args([command, *POSITIONALS[command], "--amp", "bf16"])
        if command == "train":
            config = dataclasses.replace(PRESETS["default"], **training_overrides(args))
            assert config.amp == "bf16"
        else:
            assert spec_from_args(args).amp == "bf16"


def test_step_options_are_the_step_spec_they_describe():
    args = build_parser().parse_args(
        [
            "summary",
            "--input",
            "3x96x96",
            "--dtype",
            "bfloat16",
            "--mode",
            "infer",
            "--amp",
            "fp16",
            "--device",
            "cuda",
            "--grad-mode",
            "inference_mode",
            "--channels-last",
        ]
    )
    assert spec_from_args(args) == StepSpec(
        input_size=(3, 96, 96),
        mode="infer",
        dtype="bfloat16",
        amp="fp16",
        device_type="cuda",
        grad_mode="inference_mode",
        memory_format="channels_last",
    )
    train = build_parser().parse_args(["summary", "--mode", "train", "--optimizer", "adam"])
    assert spec_from_args(train).optimizer == StepSpec(optimizer="adam").optimizer
    # An option the step would never read is refused, not dropped.
    infer = build_parser().parse_args(["summary", "--mode", "infer", "--optimizer", "adam"])
    with pytest.raises(NinlabError, match="--optimizer belongs to a training step"):
        refuse_unread_step_options(infer, spec_from_args(infer))
    # It was dropped: a training step has no inference guard.
    guarded = build_parser().parse_args(["summary", "--grad-mode", "inference_mode"])
    with pytest.raises(NinlabError, match="--grad-mode guards an inference, and this is a tra"):
        refuse_unread_step_options(guarded, spec_from_args(guarded, mode="train"))
    # measure without --mode runs both steps, and reads it in the inference.
    refuse_unread_step_options(guarded, spec_from_args(guarded, mode="train"), both_steps=True)
    # Nothing given: StepSpec's own defaults, for the model options' input and dtype.
    assert spec_from_args(build_parser().parse_args(["compare", "nin-d2l"])) == StepSpec()


def test_compare_keeps_its_step_and_its_training_apart():
    args = build_parser().parse_args(
        ["compare", "nin-d2l", "--batch", "4", "--amp", "fp16", "--epochs", "2", "--seed", "0"]
    )
    assert training_overrides(args) == {"epochs": 2, "seed": 0}
    assert spec_from_args(args).amp == "fp16" and args.batch == 4


@pytest.mark.parametrize(
    "config",
    [*PRESETS.values(), TrainConfig(amp="bf16", channels_last=False, train_examples=64, seed=0)],
)
def test_a_saved_recipe_as_flags_gives_the_same_recipe(config):
    """Every TrainConfig field as a flag (--batch-size, the old spelling, included) gives the
    config back: a saved command line still runs the same recipe."""
    argv = ["train"]
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if value == "none":
            argv.append("--no-amp")
        elif isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        elif value is not None:
            argv += [flag, str(value)]
    given = training_overrides(build_parser().parse_args(argv))
    assert dataclasses.replace(TrainConfig(), **given) == config


def test_trainer_and_accountant_share_the_batch_and_device_spellings():
    for command in ("summary", "measure", "plot", "report", "compare", "train", "evaluate"):
        assert {*BATCH.names, *BATCH.aliases} <= set(options(commands()[command])), command
    # Every command that runs a model; `cache` only shows or removes a folder.
    assert set(commands_with(DEVICE.names[0])) == set(POSITIONALS) - {"cache"}
    assert commands_with("--device-type") == []


def test_help_is_for_users_and_errors_name_the_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "thin" not in out and "module" not in out
    assert "Network in Network" in out and "examples:" in out and "ninlab summary --explain" in out
    for command in POSITIONALS:
        assert f"\n  {command} " in out, command
    code, _, err = run(capsys, "frobnicate")
    assert code == 2
    assert err.startswith("ninlab: error: argument COMMAND: invalid choice: 'frobnicate'")
    assert err.endswith("(see 'ninlab --help')\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["summary", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["summary", "--device-type", "cuda"], "unrecognized arguments: --device-type cuda"),
        (["measure", "--ddp"], "unrecognized arguments: --ddp"),
        (["measure", "--mode", "both"], "argument --mode: invalid choice: 'both'"),
    ],
)
def test_a_usage_error_points_at_the_commands_help(capsys, argv, error):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"ninlab: error: {error}") and err.count("\n") == 1
    assert err.endswith(f" (see 'ninlab {argv[0]} --help')\n")
