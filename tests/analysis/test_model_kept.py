"""After any ninlab call, succeeded or refused, the user's model is exactly as before: every
module's attributes by identity (parameters, buffers, submodules, hooks, train/eval, plain tensor
attributes and the lists and dicts holding them), each tensor's values, requires_grad, device,
dtype and grad (tests/model_invariants.py), and a real forward gives the same output. Over a
corpus of odd models (tests/odd_models.py) and the kinds users bring (tests/any_models.py,
tests/layer_zoo.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import any_models
import layer_zoo
import odd_models
import pytest
import torch
from model_invariants import assert_kept, model_state, same
from torch import nn

from ninlab.analysis.batch import fit_batch
from ninlab.analysis.measure import measure
from ninlab.analysis.model_state import model_kept
from ninlab.analysis.planner import plan_budget
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.summary import summarize
from ninlab.errors import NinlabError
from ninlab.studies.costs import study_costs

# name: (model factory, StepSpec fields, the input of a real forward)
CORPUS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], Any]]] = {
    "shared layer": (odd_models.shared_layer, {"input_size": (8,)}, lambda: torch.randn(2, 8)),
    "caches in forward": (
        odd_models.caches_in_forward,
        {"input_size": (8,)},
        lambda: torch.randn(2, 8),
    ),
    "plain tensor attributes": (
        odd_models.plain_tensor_attributes,
        {"input_size": (8,)},
        lambda: torch.randn(2, 8),
    ),
    "hooked, frozen, eval": (odd_models.hooked, {"input_size": (8,)}, lambda: torch.randn(2, 8)),
    "step registers": (
        lambda: nn.Linear(8, 4),
        {"input_size": (8,), "step": odd_models.registering_step},
        lambda: torch.randn(2, 8),
    ),
    "teacher in the step": (
        lambda: nn.Linear(8, 8),
        {"input_size": (8,), "step": odd_models.distillation_step},
        lambda: torch.randn(2, 8),
    ),
    "mlp": (any_models.mlp, {"input_size": (784,)}, lambda: torch.randn(2, 784)),
    "lstm": (any_models.lstm, {"input_size": (20, 12)}, lambda: torch.randn(2, 20, 12)),
    "token ids": (
        any_models.text_cnn,
        {"input_size": (10,), "input_dtype": "long", "input_range": (0, 100)},
        lambda: torch.randint(0, 100, (2, 10)),
    ),
    "lazy": (any_models.lazy_cnn, {"input_size": (1, 16, 16)}, lambda: torch.randn(2, 1, 16, 16)),
    "needs targets (refused)": (
        any_models.needs_targets,
        {"input_size": (8,)},
        None,
    ),
    "branches on values": (
        any_models.branches_on_values,
        {"input_size": (8,)},
        lambda: torch.randn(2, 8),
    ),
    "wrong input (refused)": (odd_models.shared_layer, {"input_size": (5,)}, None),
    "mbconv": (
        lambda: layer_zoo.mbconv_silu(width=8),
        {"input_size": (3, 16, 16)},
        lambda: torch.randn(2, 3, 16, 16),
    ),
}

CALLS: dict[str, Callable[..., Any]] = {
    "summarize": lambda model, fields: summarize(model, batch_size=2, **fields),
    "predict_memory": lambda model, fields: predict_memory(model, batch_size=2, **fields),
    "predict_memory infer": lambda model, fields: predict_memory(
        model, batch_size=2, **{**fields, "mode": "infer", "step": None}
    ),
    "measure": lambda model, fields: measure(model, batch_size=2, **fields),
    "study_costs": lambda model, fields: study_costs(model, batch_size=2, **fields),
    "fit_batch": lambda model, fields: fit_batch(model, budget="4MiB", max_batch_size=64, **fields),
    "plan_budget": lambda model, fields: plan_budget(model, budget="4MiB", batch_size=2, **fields),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("kind", CORPUS)
def test_a_call_leaves_the_model_exactly_as_it_was(kind: str, call: str) -> None:
    factory, fields, example = CORPUS[kind]
    torch.manual_seed(0)
    model = factory()
    probe = example() if example is not None else None
    if probe is not None and not isinstance(model, torch.jit.ScriptModule):
        with torch.no_grad():
            model(probe)  # a lazy model gets its shapes, a caching one fills its cache
    torch.manual_seed(1)  # the same dropout masks in both real forwards
    with torch.no_grad():
        expected = model(probe) if probe is not None else None
    before = model_state(model)
    with contextlib.suppress(NinlabError):  # refused: the model must be untouched all the same
        CALLS[call](model, fields)
    assert_kept(before, model_state(model))
    if probe is not None:
        torch.manual_seed(1)
        with torch.no_grad():
            assert same(expected, model(probe))


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "cache-filled"])
@pytest.mark.parametrize("call", ["summarize", "predict_memory", "predict_memory infer", "measure"])
def test_an_lru_cache_of_the_models_code_keeps_no_fake_and_gives_none(
    call: str, forward_first: bool
) -> None:
    """An index cached by `functools.lru_cache` in the model's code, keyed by a size alone: a
    prediction left a fake tensor there, and every later real forward of the class failed (a
    BEiT from transformers, fresh instances too); a cache filled by a real forward made the
    prediction, and a measurement after a prediction, fail on a real tensor among fakes."""
    fields: dict[str, Any] = {"input_size": (8,)}
    odd_models.clear_lru_caches()
    torch.manual_seed(0)
    model = odd_models.caches_in_an_lru_cache()
    x = torch.randn(2, 8)
    if forward_first:
        with torch.no_grad():
            model(x)
    CALLS[call](model, fields)
    with torch.no_grad():
        after = model(x)
        fresh = odd_models.caches_in_an_lru_cache()(x)
        odd_models.clear_lru_caches()
        assert same(after, model(x))
        assert type(fresh) is torch.Tensor


def test_an_lru_cache_of_the_models_code_is_predicted_as_measured() -> None:
    """The cached index is made in the first step and held from then on, as a real run holds it."""
    odd_models.clear_lru_caches()
    torch.manual_seed(0)
    model = odd_models.caches_in_an_lru_cache()
    with torch.no_grad():
        model(torch.randn(2, 8))
    report = predict_memory(model, input_size=(8,), batch_size=2)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "cache-filled"])
@pytest.mark.parametrize("call", ["summarize", "predict_memory", "predict_memory infer", "measure"])
def test_a_dict_cache_of_the_models_code_keeps_no_fake_and_gives_none(
    call: str, forward_first: bool
) -> None:
    """A table cached in a dict at the top of the model's module (or of its class): a prediction
    left a fake tensor there, and every later real forward failed ("Please convert all Tensors
    to FakeTensors first"); a table cached by a real forward made the prediction fail so."""
    fields: dict[str, Any] = {"input_size": (8,)}
    odd_models.clear_dict_caches()
    torch.manual_seed(0)
    model = odd_models.caches_in_a_module_dict()
    x = torch.randn(2, 8)
    if forward_first:
        with torch.no_grad():
            model(x)
    tables = dict(odd_models._TABLES)
    CALLS[call](model, fields)
    assert odd_models._TABLES.keys() == tables.keys()
    assert all(odd_models._TABLES[n] is table for n, table in tables.items())
    with torch.no_grad():
        after = model(x)
        assert type(after) is torch.Tensor
        assert all(type(t) is torch.Tensor for t in odd_models.CachesInAModuleDict.scales.values())
    odd_models.clear_dict_caches()


@pytest.mark.parametrize(
    "factory",
    [odd_models.caches_in_a_module_dict, odd_models.caches_on_first_use],
    ids=["module dict", "attribute"],
)
@pytest.mark.parametrize("fields", [{"optimizer": "sgd"}, {"mode": "infer"}], ids=["sgd", "infer"])
def test_a_table_cached_on_first_use_is_predicted_as_measured(factory, fields) -> None:
    """The table is made in the first step and held from then on. The forward that fits the
    built-in loss made it off the record and left it there, so a training step's warm-up made
    none and it was never counted: 792 live bytes predicted against 824 measured."""
    odd_models.clear_dict_caches()
    torch.manual_seed(0)
    model = factory()
    report = predict_memory(model, input_size=(8,), batch_size=2, **fields)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_trust.exact
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
    odd_models.clear_dict_caches()


def test_model_kept_puts_back_what_the_body_did_even_when_it_raises() -> None:
    model = odd_models.plain_tensor_attributes()
    scale, weight = model.scale, model.linear.weight
    hooks = len(model._forward_hooks)
    with pytest.raises(RuntimeError), model_kept(model):
        model.scale = torch.zeros(8)
        model.anchors.append(torch.ones(1))
        model.register_buffer("extra", torch.zeros(1))
        model.linear.weight = nn.Parameter(torch.zeros(8, 8))
        model.register_forward_hook(lambda *_: None)
        model.linear.weight.requires_grad_(False)
        model.eval()
        raise RuntimeError("the step failed")
    assert model.scale is scale and model.linear.weight is weight
    assert weight.requires_grad and model.training
    assert len(model.anchors) == 2 and "extra" not in model._buffers
    assert len(model._forward_hooks) == hooks


def test_a_teacher_in_the_step_is_predicted_as_when_the_factory_builds_it() -> None:
    """The frozen teacher's parameters count as memory the step keeps, in the prediction as in
    the measurement, whether the step names it or the optimizer factory builds it."""
    closure = {"input_size": (8,), "step": odd_models.distillation_step}
    factory = {
        "input_size": (8,),
        "step": odd_models.factory_distillation_step,
        "optimizer": odd_models.teacher_factory,
    }
    peaks = []
    for fields in (closure, factory):
        predicted = predict_memory(nn.Linear(8, 8), batch_size=4, **fields)
        measured = measure(nn.Linear(8, 8), batch_size=4, **fields)
        assert predicted.live_peak_bytes == measured.live_peak_bytes
        assert predicted.allocator_peak_bytes == measured.allocator_peak_bytes
        peaks.append(predicted.live_peak_bytes)
    assert peaks[0] == peaks[1]
    teacher_bytes = sum(p.numel() * 4 for p in odd_models.TEACHER.parameters())
    assert peaks[0] > teacher_bytes


@pytest.mark.parametrize(
    "factory",
    [odd_models.plain_tensor_attributes, odd_models.caches_in_forward],
    ids=["plain tensor attributes", "caches in forward"],
)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_attribute_tensors_are_predicted_as_measured(
    factory: Callable[[], nn.Module], mode: str
) -> None:
    model = factory()
    predicted = predict_memory(model, batch_size=4, input_size=(8,), mode=mode)
    measured = measure(model, batch_size=4, input_size=(8,), mode=mode)
    assert predicted.live_peak_bytes == measured.live_peak_bytes
    assert predicted.allocator_peak_bytes == measured.allocator_peak_bytes


def _weighted_step(class_weights: torch.Tensor) -> Callable[..., torch.Tensor]:
    def step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets, weight=class_weights)
        loss.backward()
        optimizer.step()
        return loss

    return step


def test_a_tensor_in_the_step_is_predicted_and_left_in_place() -> None:
    """Class weights in the step's closure were real tensors among fake ones (PyTorch's
    "convert all Tensors to FakeTensors" AssertionError): a fake copy stands in for the step, is
    counted as what the step keeps, and the real one is put back."""
    class_weights = torch.rand(5)
    step = _weighted_step(class_weights)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    fields = {"input_size": (16,), "optimizer": "sgd", "step": step}
    report = predict_memory(model, batch_size=4, **fields)
    measured = measure(model, report.spec, batch_size=4)
    assert report.live_peak_bytes == measured.live_peak_bytes == 6_504
    assert step.__closure__[0].cell_contents is class_weights  # type: ignore[index]


def _weighted_by_containers(weights: dict[str, Any]) -> Callable[..., torch.Tensor]:
    def step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> torch.Tensor:
        optimizer.zero_grad()
        scale, (shift,) = weights["pair"]
        logits = model(inputs) * scale + shift
        loss = nn.functional.cross_entropy(logits, targets, weight=weights["class"][0])
        loss.backward()
        optimizer.step()
        return loss

    return step


def test_tensors_in_a_closures_lists_tuples_and_dicts_are_predicted_and_left_in_place() -> None:
    """The step's tensors sit inside a dict of a tuple (holding a list) and a list: each is found,
    swapped for a fake and put back, the very tuple included; a list holding itself ends."""
    class_weights, scale, shift = torch.rand(5), torch.rand(5), torch.rand(5)
    looped: list[Any] = [class_weights]
    looped.append(looped)
    pair = (scale, [shift])
    weights = {"pair": pair, "class": looped}
    step = _weighted_by_containers(weights)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    fields = {"input_size": (16,), "optimizer": "sgd", "step": step}
    report = predict_memory(model, batch_size=4, **fields)
    measured = measure(model, report.spec, batch_size=4)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert weights["pair"] is pair and pair[0] is scale and pair[1][0] is shift
    assert weights["class"] is looped and looped[0] is class_weights and looped[1] is looped


class _TiedList(nn.Module):
    """Holds its own weight again in a plain list, as an LSTM's `_flat_weights` does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.weights = [self.linear.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weights[0].t() + self.linear.bias)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_parameter_held_again_in_an_attribute_is_counted_once(mode: str) -> None:
    """The list's weight is the parameter's fake during the step, not a buffer of its own (a
    one-layer LSTM's `_flat_weights` counted its 100,352 bytes of weights twice)."""
    model = _TiedList()
    report = predict_memory(model, input_size=(16,), batch_size=4, mode=mode)
    measured = measure(model, report.spec, batch_size=4)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
    assert model.weights[0] is model.linear.weight


class _LastStep(nn.Module):
    """An LSTM classifier: `nn.LSTM` lists its weights in `_flat_weights`, a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_an_attribute_holding_parameters_is_not_counted_again(mode: str) -> None:
    # A fake copy of `_flat_weights` counted the LSTM's 16,128 bytes of weights twice.
    torch.manual_seed(0)
    model = _LastStep()
    predicted = predict_memory(model, batch_size=2, input_size=(12, 16), mode=mode)
    measured = measure(model, predicted.spec, batch_size=2)
    assert predicted.live_peak_bytes == measured.live_peak_bytes
    assert predicted.allocator_peak_bytes == measured.allocator_peak_bytes
