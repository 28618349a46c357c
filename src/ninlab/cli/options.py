"""The command line's vocabulary. Every flag that more than one command takes, and every setting
of a training recipe, is a `Flag` here, defined once (names, help, choices, range check), and
reaches a command through a group:

- model options: which model and the batch (`model_choice`); one sample's size, the inputs'
  dtype and range and the dtype describe the step, so `spec_from_args` reads them;
- step options: the step to account for or run (`spec_from_args` turns them into a `StepSpec`);
- training options: a recipe's settings over a preset (`training_overrides`);
- chart options: the geometry picture's layer and the largest-batch question's budget;
- data options: where Fashion-MNIST comes from (`load_data`);
- output options: what a command prints and the file it writes.

A group takes only what differs between commands: a default (evaluate's batch is 256) and which
of its flags a command has. Every value type refuses what PyTorch would fail on later (a count
beyond 32 bits, a seed beyond 64, nan, an empty path); `check_device` refuses a --device this
machine lacks in the commands that run there (`runs_on_device`). Checks beyond argparse's (an
optimizer's settings, a variant's, a recipe's consistency) are the library's, made where the
`StepSpec`, `NiNConfig` or `TrainConfig` is built.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from ninlab.analysis.step import (
    AMP_DTYPES,
    DTYPES,
    INPUT_DTYPES,
    DeviceType,
    GradMode,
    Mode,
    StepSpec,
    load_step,
)
from ninlab.errors import NinlabError
from ninlab.models import resolve_model
from ninlab.optimizers import OPTIMIZER_NAMES, parse_optimizer
from ninlab.studies.report import DEFAULT_BUDGET
from ninlab.training.data import FashionMNIST, load_fashion_mnist, named_data_dir
from ninlab.training.presets import MAX_COUNT, MAX_SEED, Schedule
from ninlab.training.progress import download_progress
from ninlab.units import parse_bytes

__all__ = [
    "FLAGS",
    "Flag",
    "InputArg",
    "ModelChoice",
    "add_chart_options",
    "add_data_options",
    "add_format_option",
    "add_model_options",
    "add_output_option",
    "add_step_options",
    "add_training_options",
    "check_device",
    "input_arg",
    "input_range",
    "input_size",
    "load_data",
    "memory_size",
    "model_choice",
    "non_negative_int",
    "path_name",
    "positive_int",
    "refuse_unread_step_options",
    "runs_on_device",
    "spec_from_args",
    "training_overrides",
]


# Value types: a bad value is argparse's one line, "argument --batch: must be at least 1, got 0".


def _whole(text: str, minimum: int, maximum: int = MAX_COUNT) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(
            f"must be at least {minimum}, got {value}"
            if value < minimum
            else f"must be at most {maximum:,}, got {value:,}"
        )
    return value


def positive_int(text: str) -> int:
    """Counts: a batch, epochs, a number of examples."""
    return _whole(text, 1)


# Each intra-op thread is a thread of this process, made when the first parallel op runs: far
# beyond the machine's limit (`--threads 100000`) the profiler failed to start and the process
# crashed on exit (a segmentation fault). No CPU has this many cores for one process.
MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """Intra-op threads: a count, at most `MAX_THREADS`."""
    return _whole(text, 1, MAX_THREADS)


def non_negative_int(text: str) -> int:
    """Seeds, where 0 is a seed like any other (as large as torch.manual_seed takes)."""
    return _whole(text, 0, MAX_SEED)


def finite_float(text: str) -> float:
    """Rates and factors: a number, not nan or inf (the recipe checks its range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def memory_size(text: str) -> str:
    """A memory budget, '8GiB' or '500MB', checked now (whatever else the command is asked)
    and passed on as written."""
    try:
        parse_bytes(text)
    except NinlabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def path_name(text: str) -> Path:
    """A file or directory name; "" is refused (as a Path it would be ".", the
    working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a file or directory")
    return Path(text)


def runs_on_device(parser: argparse.ArgumentParser, *, when: str | None = None) -> None:
    """Mark a command that runs on --device (train, evaluate, predict, measure; compare when its
    option `when`, --train, is given), unlike those that predict for any device from any
    machine: `check_device` then refuses one this machine lacks."""
    parser.set_defaults(runs_on_device=when or True)


def check_device(args: argparse.Namespace) -> None:
    """Refuse, in argparse's words, a --device that a command running there cannot use."""
    device = getattr(args, "device", None)
    runs = getattr(args, "runs_on_device", False)
    if isinstance(runs, str):
        runs = getattr(args, runs, None) is not None
    if not runs or not device:
        return
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise NinlabError(
            f"argument --device: cannot run on {device}: this PyTorch ({torch.__version__}) "
            f"{why}; use --device cpu"
        )


def input_size(text: str) -> tuple[int, ...]:
    """'1x224x224' (an image, channels first) -> (1, 224, 224); '784' (a vector) -> (784,)."""
    if not re.fullmatch(r"\d+(x\d+)*", text.strip().lower()):
        raise argparse.ArgumentTypeError(
            f"cannot read input size {text!r}; write one sample's sizes joined by x, e.g. "
            "1x224x224 or 784"
        )
    sizes = tuple(int(part) for part in text.strip().lower().split("x"))
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"input size {text!r} has a zero; every size must be at least 1, e.g. 1x224x224"
        )
    if max(sizes) > MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"input size {text!r} has a size above {MAX_COUNT:,}, more than PyTorch takes"
        )
    return sizes


@dataclass(frozen=True)
class InputArg:
    """One --input: a sample's size, and where given its keyword name, dtype and value range."""

    size: tuple[int, ...]
    name: str | None = None
    dtype: str | None = None
    range: tuple[int, int] | None = None


def input_arg(text: str) -> InputArg:
    """'[NAME=]SIZE[:DTYPE[:LOW:HIGH]]': 'input_ids=16:int64:0:50257' -> the input called with
    the keyword input_ids, 16 token ids drawn from [0, 50257); '3x32x32' -> a positional image."""
    name, equals, rest = text.strip().rpartition("=")
    size, *kind = rest.split(":")
    if equals and not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"input name {name!r} is not a keyword argument name; write NAME=SIZE, e.g. "
            "input_ids=16:int64"
        )
    if len(kind) not in (0, 1, 3):
        raise argparse.ArgumentTypeError(
            f"cannot read input {text!r}; write [NAME=]SIZE[:DTYPE[:LOW:HIGH]], e.g. 3x32x32, "
            "2x100:int64 or input_ids=16:int64:0:50257"
        )
    dtype = kind[0] if kind else None
    if dtype is not None and dtype not in INPUT_DTYPES:
        raise argparse.ArgumentTypeError(
            f"input dtype {dtype!r} in {text!r} is not one of {', '.join(INPUT_DTYPES)}"
        )
    values = input_range(":".join(kind[1:])) if len(kind) == 3 else None
    # An empty SIZE among several inputs: one value per sample (a class label, labels=:int64).
    return InputArg(input_size(size) if size else (), name if equals else None, dtype, values)


def input_range(text: str) -> tuple[int, int]:
    """'0:1000' -> (0, 1000): integer inputs are drawn from [0, 1000)."""
    low, colon, high = text.strip().partition(":")
    try:
        if not colon:
            raise ValueError
        values = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read input range {text!r}; write LOW:HIGH, e.g. 0:1000"
        ) from None
    if values[1] <= values[0]:
        raise argparse.ArgumentTypeError(
            f"input range {text!r} is empty; LOW must be below HIGH, e.g. 0:1000"
        )
    if values[0] < -MAX_SEED - 1 or values[1] > MAX_SEED:  # int64, where token ids are drawn
        raise argparse.ArgumentTypeError(
            f"input range {text!r} is beyond int64; give values of at most {MAX_SEED:,}"
        )
    return values


@dataclass(frozen=True, eq=False)  # each flag is itself: compared and hashed by identity
class Flag:
    """One flag of the vocabulary: its names, what it means and what it accepts (argparse's
    `type`, `choices`, `action`, ...); commands choose only its default."""

    names: tuple[str, ...]
    dest: str
    help: str
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # older spellings, not shown: saved command lines still run

    def add(
        self,
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        *,
        default: Any = None,
        shown: str | None = None,
        note: str | None = None,
        **extra: Any,
    ) -> None:
        """Add the flag with `default`, described in the help as `shown` (or the default itself);
        `note` says what it is for in this command; `extra` is what only a command can say (its
        --format choices, whether -o is required)."""
        words = shown if shown is not None else default
        text = self.help + (f": {note}" if note else "")
        text += f" (default: {words})" if words is not None else ""
        options = {**self.options, **extra}
        parser.add_argument(*self.names, dest=self.dest, default=default, help=text, **options)
        for alias in self.aliases:
            parser.add_argument(
                alias, dest=self.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **options
            )


def _flag(name: str, text: str, **options: Any) -> Flag:
    """The flag --NAME, stored under NAME with underscores."""
    return Flag((f"--{name}",), name.replace("-", "_"), text, options)


def _switch(name: str, text: str) -> Flag:
    """A yes/no setting with its --no- form; None when neither is given."""
    return _flag(name, text, action=argparse.BooleanOptionalAction)


def _count(name: str, text: str) -> Flag:
    return _flag(name, text, type=positive_int, metavar="N")


def _number(name: str, text: str) -> Flag:
    return _flag(name, text, type=finite_float, metavar="X")


# Model options.
MODEL = _flag(
    "model",
    "a registry name (nin-d2l), a variant (nin-d2l:num_1x1=1) or package.module:factory",
    metavar="NAME",
)
INPUT = _flag(
    "input",
    "one sample's size, any rank, without the batch (an image channels first: 1x28x28; a "
    "vector: 784); once per input for a model of several; NAME= passes it as the keyword NAME "
    "(input_ids=16), :DTYPE gives its own dtype and :LOW:HIGH an integer input's values "
    "(2x100:int64:0:50); an empty SIZE is one value per sample (labels=:int64)",
    type=input_arg,
    action="append",
    metavar="[NAME=]SIZE[:DTYPE[:LOW:HIGH]]",
)
INPUT_DTYPE = _flag(
    "input-dtype",
    "the dtype of inputs that do not give their own (long: token ids for an embedding)",
    choices=tuple(INPUT_DTYPES),
)
INPUT_RANGE = _flag(
    "input-range",
    "integer inputs' values, drawn from [LOW, HIGH), where an input does not give its own",
    type=input_range,
    metavar="LOW:HIGH",
)
BATCH = Flag(
    ("--batch",),
    "batch",
    "batch size",
    {"type": positive_int, "metavar": "N"},
    aliases=("--batch-size",),  # the trainer's spelling until the vocabulary was one
)
DTYPE = _flag(
    "dtype", "parameter and input dtype, as model.to(dtype) makes them", choices=tuple(DTYPES)
)

# Step options: each is the StepSpec field of the same meaning.
MODE = _flag("mode", "the step: a training step or an inference", choices=get_args(Mode))
OPTIMIZER = _flag(
    "optimizer",
    f"the training step's optimizer: {', '.join(OPTIMIZER_NAMES)}, with settings such as "
    "adamw:weight_decay=0.01,implementation=foreach",
    metavar="NAME[:SETTINGS]",
    type=functools.partial(parse_optimizer, argument="--optimizer"),
)
AMP = _flag(
    "amp",
    "mixed precision: forward and loss under autocast to this dtype",
    choices=tuple(AMP_DTYPES),
)
DEVICE = _flag(
    "device",
    "where to run, and the device predictions account for, from any machine",
    choices=get_args(DeviceType),
)
GRAD_MODE = _flag("grad-mode", "inference's guard against autograd", choices=get_args(GradMode))
DDP = _flag(
    "ddp", "add DistributedDataParallel's gradient buckets (its defaults)", action="store_true"
)
CHANNELS_LAST = _switch(
    "channels-last",
    "channels-last memory layout of the input and 4-d weights (faster on CPUs and tensor cores)",
)

STEP = _flag(
    "step",
    "your own training step, a function step(model, optimizer, inputs, targets) named as "
    "package.module:function; it is run on fake tensors to predict, on real ones to measure",
    metavar="MODULE:FUNCTION",
)

# Training options: TrainConfig's fields, each over the preset's value when given.
VARIANT = _flag(
    "variant",
    "NiN from the registry, optionally with settings, e.g. nin-d2l:num_1x1=1",
    metavar="NAME",
)
IMAGE_SIZE = _count("image-size", "side of the square the images are resized to")
EPOCHS = _count("epochs", "epochs (the learning-rate schedule spans them all)")
LR = _number("lr", "peak learning rate")
MOMENTUM = _number("momentum", "SGD momentum (0: plain SGD, as in d2l)")
NESTEROV = _switch("nesterov", "Nesterov momentum")
WEIGHT_DECAY = _number("weight-decay", "L2 weight decay")
SCHEDULE = _flag("schedule", "learning-rate schedule", choices=get_args(Schedule))
WARMUP_EPOCHS = _number("warmup-epochs", "linear warm-up in epochs (fractions allowed)")
LABEL_SMOOTHING = _number("label-smoothing", "label smoothing of the cross-entropy")
FLIP = _switch("flip", "augment: mirror each training image left-right with probability 1/2")
TRANSLATE = _flag(
    "translate",
    "augment: shift each 28x28 training image by up to N pixels each way (0: none)",
    type=non_negative_int,
    metavar="N",
)
FLIP_TTA = _switch("flip-tta", "evaluate on the mean of each test image's and its mirror's logits")
NORMALIZE = _switch("normalize", "standardise inputs with the training set's mean and std")
NO_AMP = Flag(  # the trainer's "none", so a run can turn off a preset's bf16
    ("--no-amp",),
    "amp",
    "no autocast, whatever the preset says",
    {"action": "store_const", "const": "none"},
)
COMPILE = _switch("compile", "torch.compile the model")
SEED = _flag(
    "seed", "seed of initialisation, shuffling and dropout", type=non_negative_int, metavar="N"
)
TRAIN_EXAMPLES = _count("train-examples", "train on the first N training images only")
TEST_EXAMPLES = _count("test-examples", "test on the first N test images only")
_TRAINING: dict[Flag, str] = {  # each flag's TrainConfig field
    VARIANT: "variant",
    IMAGE_SIZE: "image_size",
    EPOCHS: "epochs",
    BATCH: "batch_size",
    LR: "lr",
    MOMENTUM: "momentum",
    NESTEROV: "nesterov",
    WEIGHT_DECAY: "weight_decay",
    SCHEDULE: "schedule",
    WARMUP_EPOCHS: "warmup_epochs",
    LABEL_SMOOTHING: "label_smoothing",
    FLIP: "flip",
    TRANSLATE: "translate",
    FLIP_TTA: "flip_tta",
    NORMALIZE: "normalize",
    AMP: "amp",
    NO_AMP: "amp",
    CHANNELS_LAST: "channels_last",
    COMPILE: "compile",
    SEED: "seed",
    TRAIN_EXAMPLES: "train_examples",
    TEST_EXAMPLES: "test_examples",
}

# Chart options.
LAYER = _flag("layer", "the conv or pooling layer of the geometry picture", metavar="NAME")
BUDGET = _flag(
    "budget",
    "memory budget of the largest training batch, e.g. 8GiB, 500MB",
    type=memory_size,
    metavar="SIZE",
)

# Data options.
DATA_DIR = _flag(  # "" (an unset variable) is refused, not read as "not given"
    "data-dir",
    "directory with the four Fashion-MNIST IDX files (.gz or not)",
    type=path_name,
    metavar="DIR",
)
NO_DOWNLOAD = _flag(
    "no-download", "never download; fail if the files are not found", action="store_true"
)

# Output options.
FORMAT = _flag("format", "how to print the results")  # choices: the command's formats
OUTPUT = Flag(
    ("-o", "--output"), "output", "the file to write", {"type": path_name, "metavar": "FILE"}
)
OUTPUT_DIR = _flag(
    "output-dir", "where runs write checkpoint, metrics and plots", type=path_name, metavar="DIR"
)

# Every flag, each once: what the tests hold every command's parser to.
FLAGS: tuple[Flag, ...] = tuple(
    dict.fromkeys(
        (
            MODEL,
            INPUT,
            INPUT_DTYPE,
            INPUT_RANGE,
            BATCH,
            DTYPE,
            MODE,
            OPTIMIZER,
            AMP,
            DEVICE,
            GRAD_MODE,
            DDP,
            CHANNELS_LAST,
            STEP,
            *_TRAINING,
            LAYER,
            BUDGET,
            DATA_DIR,
            NO_DOWNLOAD,
            FORMAT,
            OUTPUT,
            OUTPUT_DIR,
        )
    )
)


@dataclass(frozen=True)
class ModelChoice:
    """The model options but the step's (--input, --input-dtype, --input-range, --dtype), which
    `spec_from_args` reads: the model as named, and the batch. A registry model is built on the
    meta device (the accountant needs no weights); `with_weights` builds it for real."""

    name: str
    model: nn.Module
    batch: int

    def with_weights(self) -> nn.Module:
        """The model with real weights, for a command that runs it."""
        on_meta = any(tensor.is_meta for tensor in self.model.parameters())
        return resolve_model(self.name) if on_meta else self.model


_DEFAULT_INPUT = (1, 224, 224)


def add_model_options(
    parser: argparse.ArgumentParser, *, batch: int = 128, model: bool = True
) -> None:
    """--model (unless the command names models otherwise), --input (repeated for several
    inputs), --input-dtype, --input-range, --batch, --dtype."""
    group = parser.add_argument_group("model options")
    if model:
        MODEL.add(group, default="nin-d2l")
    INPUT.add(group, shown="x".join(map(str, _DEFAULT_INPUT)))  # appended to: no default list
    INPUT_DTYPE.add(group, shown="--dtype")
    INPUT_RANGE.add(group, shown="0:2")
    BATCH.add(group, default=batch)
    DTYPE.add(group, shown="the model's own")


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """--input, --input-dtype and --input-range as StepSpec's fields: one size, or one per input
    when given more than once (by name where they are named), and each input's dtype and range,
    its own or the flags' (None where neither says: StepSpec's default)."""
    given: list[InputArg] = args.input or [InputArg(_DEFAULT_INPUT)]
    names = [arg.name for arg in given]
    if any(names) and not all(names):
        raise NinlabError(
            "argument --input: name every input (NAME=SIZE) or none, got "
            f"{', '.join(name or 'an unnamed one' for name in names)}"
        )
    sizes = [arg.size for arg in given]
    dtypes = [arg.dtype or args.input_dtype for arg in given]
    ranges = [arg.range or args.input_range for arg in given]
    return {
        "input_size": sizes[0] if len(sizes) == 1 else tuple(sizes),
        "input_names": tuple(names) if all(names) else (),
        "input_dtype": dtypes[0] if len(set(dtypes)) == 1 else tuple(dtypes),
        "input_range": ranges[0] if len(set(ranges)) == 1 else tuple(ranges),
    }


def model_choice(args: argparse.Namespace) -> ModelChoice:
    return ModelChoice(args.model, resolve_model(args.model, weights=False), args.batch)


_STEP_DEFAULTS = StepSpec()


def add_step_options(
    parser: argparse.ArgumentParser, *, mode: str | None = "train", ddp: bool = True
) -> None:
    """--mode (`mode`: what the command does without it; None: the command has no --mode),
    --optimizer, --amp, --device, --grad-mode, --ddp (unless `ddp` is False), --channels-last,
    --step.

    Defaults are StepSpec's: a flag not given leaves its field to StepSpec."""
    group = parser.add_argument_group("step options")
    if mode is not None:
        MODE.add(group, shown=mode)
    OPTIMIZER.add(group, shown=_STEP_DEFAULTS.optimizer.name)
    AMP.add(group, shown="none")
    DEVICE.add(group, shown=_STEP_DEFAULTS.device_type)
    GRAD_MODE.add(group, shown=_STEP_DEFAULTS.grad_mode)
    if ddp:
        DDP.add(group)
    CHANNELS_LAST.add(group, shown="no")
    STEP.add(group, shown="the built-in step")


def spec_from_args(args: argparse.Namespace, **fields: Any) -> StepSpec:
    """The `StepSpec` of the model and step options given, for --input and --dtype; `fields` are
    what the command itself decides (a mode). StepSpec checks every value, once."""
    given = {
        "mode": getattr(args, "mode", None),  # a command that predicts both steps has no --mode
        "optimizer": args.optimizer,
        "amp": args.amp,
        "device_type": args.device,
        "grad_mode": args.grad_mode,
        "ddp": getattr(args, "ddp", None),  # nor one that runs a single process
        "memory_format": {True: "channels_last", False: "contiguous"}.get(args.channels_last),
        "step": load_step(args.step) if args.step else None,
        **_inputs(args),
    }
    given = {name: value for name, value in given.items() if value is not None}
    spec = StepSpec(dtype=args.dtype, **{**given, **fields})
    # An option the step never reads is refused rather than ignored.
    if args.input_range is not None and all(dtype.is_floating_point for dtype in spec.input_dtypes):
        raise NinlabError(
            "--input-range draws integer inputs (token ids); add --input-dtype long or drop it"
        )
    return spec


def refuse_unread_step_options(
    args: argparse.Namespace, spec: StepSpec, *, both_steps: bool = False
) -> None:
    """In a command whose step is `spec` alone (summary, measure and plot; measure runs both steps
    without --mode, `both_steps`): --optimizer with an inference, or --grad-mode with a training
    step, would be read by nothing."""
    if spec.mode == "infer" and args.optimizer is not None:
        raise NinlabError(
            "--optimizer belongs to a training step, and this is an inference; drop it or "
            "use --mode train"
        )
    if spec.mode == "train" and not both_steps and args.grad_mode is not None:
        raise NinlabError(
            "--grad-mode guards an inference, and this is a training step; drop it or use "
            "--mode infer"
        )


def add_training_options(
    parser: argparse.ArgumentParser, *, only: Sequence[Flag] | None = None
) -> None:
    """The settings of a training recipe, each over the preset's when given (`only`: a few)."""
    group = parser.add_argument_group("training options (default: the preset's)")
    flags = [flag for flag in _TRAINING if only is None or flag in only]
    for flag in flags:
        flag.add(group)
    # Remembered for `training_overrides`: compare's --batch and --amp are its step's, not these.
    parser.set_defaults(training_options=flags)


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given as training options."""
    given = {_TRAINING[flag]: getattr(args, flag.dest) for flag in args.training_options}
    return {field: value for field, value in given.items() if value is not None}


def add_chart_options(parser: argparse.ArgumentParser) -> None:
    """--layer and --budget, None when not given (a chart that does not read one refuses it)."""
    group = parser.add_argument_group("chart options")
    LAYER.add(group, shown="the first that loses pixels to rounding")
    BUDGET.add(group, shown=DEFAULT_BUDGET)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data options")
    DATA_DIR.add(group)
    NO_DOWNLOAD.add(group)


def load_data(args: argparse.Namespace) -> FashionMNIST:
    """Fashion-MNIST as the data options say, with a progress bar if it is downloaded; says on
    stderr where it came from (stdout may be a command's JSON)."""
    with download_progress() as hook:
        data = load_fashion_mnist(
            named=named_data_dir(args.data_dir),
            download=not args.no_download,
            progress=hook,
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(
            f"data: Fashion-MNIST from {data.directory} ({data.source}), verified", file=sys.stderr
        )
    return data


def add_format_option(parser: argparse.ArgumentParser, *formats: str) -> None:
    """--format with the command's formats, the first the default."""
    FORMAT.add(parser, default=formats[0], choices=formats)


def add_output_option(
    parser: argparse.ArgumentParser,
    what: str,
    *,
    default: str | None = None,
    shown: str | None = None,
) -> None:
    """-o/--output: the file `what` names; required when there is no default to show."""
    required = default is None and shown is None
    OUTPUT.add(parser, default=default, shown=shown, note=what, required=required)
