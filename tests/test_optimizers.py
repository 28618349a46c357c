"""Every optimizer setting the command line accepts reaches the optimizer built, so the
prediction changes exactly when the optimizer's state does; every other setting is refused."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ninlab import predict_memory
from ninlab.errors import NinlabError
from ninlab.optimizers import parse_optimizer

# What each name means, written out independently of ninlab: the torch optimizer and its presets.
MEANING = {
    "sgd": (torch.optim.SGD, {}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.0}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
}
# Settings worth drawing per torch optimizer, as (text, value) choices.
SETTINGS = {
    torch.optim.SGD: {
        "momentum": [("0", 0.0), ("0.5", 0.5)],
        "weight_decay": [("0", 0.0), ("0.01", 0.01)],
        "dampening": [("0", 0.0)],
        "maximize": [("true", True), ("false", False)],
    },
    torch.optim.Adam: {
        "amsgrad": [("true", True), ("false", False)],
        "betas": [("(0.8,0.99)", (0.8, 0.99))],
        "weight_decay": [("0.01", 0.01)],
        "eps": [("1e-6", 1e-6)],
    },
    torch.optim.RMSprop: {
        "momentum": [("0", 0.0), ("0.5", 0.5)],
        "centered": [("true", True), ("false", False)],
        "alpha": [("0.9", 0.9)],
    },
    torch.optim.Adagrad: {
        "lr_decay": [("0.1", 0.1)],
        "initial_accumulator_value": [("0.5", 0.5)],
    },
}
SETTINGS[torch.optim.AdamW] = SETTINGS[torch.optim.Adam]
INPUT = (3, 8, 8)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


def real_state_bytes(optimizer_class: type, keywords: dict) -> int:
    """Bytes of optimizer state after two real steps of the optimizer built by hand."""
    model = net()
    optimizer = optimizer_class(model.parameters(), lr=0.01, **keywords)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, *INPUT)).sum().backward()
        optimizer.step()
    return sum(
        value.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


@st.composite
def optimizer_texts(draw: st.DrawFn) -> tuple[str, type, dict]:
    name = draw(st.sampled_from(sorted(MEANING)))
    optimizer_class, presets = MEANING[name]
    choices = SETTINGS[optimizer_class]
    keys = draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=3))
    if name == "nesterov":
        keys = [key for key in keys if key not in ("momentum", "dampening")]
    picked = {key: draw(st.sampled_from(choices[key])) for key in keys}
    text = name + (":" + ",".join(f"{k}={t}" for k, (t, _) in picked.items()) if picked else "")
    return text, optimizer_class, {**presets, **{k: v for k, (_, v) in picked.items()}}


@settings(max_examples=25, deadline=None)
@given(optimizer_texts())
def test_each_accepted_setting_reaches_the_prediction(drawn):
    text, optimizer_class, keywords = drawn
    report = predict_memory(net(), input_size=INPUT, batch_size=2, optimizer=text)
    assert report.breakdown.optimizer_state_bytes == real_state_bytes(optimizer_class, keywords)
    # The report names what was built, setting by setting.
    used = report.spec.optimizer.used()
    assert used["class"] == optimizer_class.__name__
    for key, value in keywords.items():
        assert used[key] == (list(value) if isinstance(value, tuple) else value), key


def test_momentum_given_to_sgd_is_the_momentum_predicted():
    # The case: sgd:momentum=0.5 predicted plain SGD.
    def state(text: str) -> int:
        report = predict_memory(net(), input_size=INPUT, batch_size=2, optimizer=text)
        return report.breakdown.optimizer_state_bytes

    assert state("sgd") == 0
    assert state("sgd:momentum=0.5") == state("sgd-momentum") == 4 * (4 * 3 * 9 + 4 + 144 * 10 + 10)
    assert parse_optimizer("sgd").used()["momentum"] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adam:momentum=0.5", "adam (Adam) takes no setting 'momentum'"),
        ("sgd:amsgrad=true", "sgd (SGD) takes no setting 'amsgrad'"),
        ("sgd:foreach=true", "and implementation="),
        ("sgd:nesterov=true", "Nesterov momentum requires a momentum"),
        ("adam:betas=(0.9)", "betas takes 2 numbers"),
        ("adam:amsgrad=maybe", "amsgrad must be true or false"),
        ("sgd:momentum=1.5", "momentum must be in [0, 1)"),
        ("sgd:lr=1e400", "lr must be a finite number"),
        ("sgd:momentum", "write key=value"),
        ("sgd:momentum=0.5,momentum=0.6", "given twice"),
        ("rmsprop:implementation=fused", "no fused rmsprop"),
    ],
)
def test_a_setting_the_optimizer_does_not_take_is_refused(text, message):
    with pytest.raises(NinlabError, match=re.escape(message)):
        parse_optimizer(text)


def test_the_apis_error_names_its_argument_and_the_command_lines_its_flag(capsys):
    """The library's refusal once named --optimizer, a flag a library user never wrote."""
    from ninlab.cli import main

    with pytest.raises(NinlabError) as refused:
        predict_memory(nn.Linear(4, 2), input_size=(4,), batch_size=2, optimizer="lion")
    assert str(refused.value).startswith("optimizer 'lion': unknown optimizer 'lion'; choose")
    assert main(["summary", "--input", "1x8x8", "--batch", "2", "--optimizer", "lion"]) == 2
    assert capsys.readouterr().err.startswith("ninlab: error: --optimizer 'lion': unknown")
