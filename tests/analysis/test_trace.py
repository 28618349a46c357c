"""Recording a whole step: its phases, what it leaves of the model, the collector."""

import gc
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec, builtin_loss
from ninlab.analysis.trace import record_step
from ninlab.models import build_nin


@pytest.fixture(scope="module")
def nin():
    return build_nin()


def step_ops(step):
    return step.recording.ops[step.step_start :]


def test_training_step_phases_and_backward_attribution(nin):
    step = record_step(nin, StepSpec((1, 224, 224), optimizer="sgd-momentum"), 2)
    ops = step_ops(step)
    assert [p for i, p in enumerate(o.phase for o in ops) if i == 0 or p != ops[i - 1].phase] == [
        "zero_grad",
        "forward",
        "loss",
        "backward",
        "optimizer",
    ]
    conv_backward = [
        (o.module, o.autograd_node) for o in ops if o.op == "aten.convolution_backward.default"
    ]
    assert conv_backward[0] == ("7.4", "ConvolutionBackward0")  # backward runs last layer first
    assert conv_backward[-1] == ("0.0", "ConvolutionBackward0")
    assert len(conv_backward) == 12
    assert step.parameter_keys.keys() == step.gradient_keys.keys()
    assert len(step.optimizer_state_keys) == 24  # one momentum buffer per parameter tensor


@pytest.mark.canary
def test_bf16_autocast_runs_convolutions_in_bf16(nin):
    """PyTorch's CPU autocast runs convolutions in bf16 and log-softmax in float32."""
    ops = step_ops(record_step(nin, StepSpec((1, 224, 224), amp="bf16", optimizer="sgd"), 2))
    convs = [o for o in ops if o.op == "aten.convolution.default"]
    assert {o.outputs[0].dtype for o in convs} == {torch.bfloat16}
    log_softmax = next(o for o in ops if o.op == "aten._log_softmax.default")
    assert log_softmax.outputs[0].dtype == torch.float32


def test_the_model_is_left_untouched(nin):
    before = {name: p.clone() for name, p in nin.named_parameters()}
    nin.eval()
    record_step(nin, StepSpec((1, 224, 224), optimizer="adam"), 2)
    assert not nin.training
    assert all(
        torch.equal(before[name], p) and p.grad is None for name, p in nin.named_parameters()
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_recording_leaves_the_collector_as_it_was(enabled):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    (gc.enable if enabled else gc.disable)()
    try:
        record_step(model, StepSpec((4,), optimizer="sgd"), 2)
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


class _CachesInEval(nn.Module):
    """Caches a tensor in a dict attribute on its first call in eval mode, as LeViT caches its
    attention biases: every later inference finds it there."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.linear(x)
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.linear.weight.detach() * 2
        return x @ self.cache[key]


class _ReplacesAPlaceholder(nn.Module):
    """Holds a placeholder tensor in a list that each forward replaces, as RAFT's correlation
    block holds `[torch.tensor(0)]` until its first pyramid."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.pyramid = [torch.tensor(0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pyramid = [self.linear(x)]
        return self.pyramid[0].relu()


class _ReplacesAPlaceholderBuffer(nn.Module):
    """Registers a placeholder buffer that its first forward replaces, as ConViT's attention does
    with `rel_indices` (a (1, 1, 1, 3) zeros until the number of patches is known)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.register_buffer("scales", torch.zeros(1, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales.shape[1] != x.shape[1]:
            self.scales = torch.ones(1, x.shape[1])
        return self.linear(x * self.scales)


@pytest.mark.parametrize(
    ("model", "mode"),
    [
        (_CachesInEval, "infer"),
        (_ReplacesAPlaceholder, "infer"),
        (_ReplacesAPlaceholder, "train"),
        (_ReplacesAPlaceholderBuffer, "infer"),  # was 12 B over, as ConViT's inference
        (_ReplacesAPlaceholderBuffer, "train"),
    ],
)
def test_what_a_first_call_leaves_in_the_model_is_the_steady_states(model, mode):
    """The recorded step is the second, for inference too, as measured: a cache the first made
    is there (LeViT inference was 2,280 B short), a placeholder it replaced is gone (RAFT 8 B
    over), and the user's model is left as it was."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    net = model()
    before = dict(vars(net))
    report = predict_memory(net, input_size=(16,), batch_size=4, mode=mode)
    assert vars(net) == before
    measured = measure(net, report.spec, batch_size=4)
    assert report.live_peak_bytes == measured.live_peak_bytes


def _ema_factory(model: nn.Module) -> tuple[torch.optim.Optimizer, nn.Module]:
    ema = torch.optim.swa_utils.get_ema_multi_avg_fn(0.99)
    averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema)
    return torch.optim.SGD(model.parameters(), lr=0.1), averaged


def _ema_step(model: nn.Module, optimizers: Any, inputs: Any, targets: Any) -> Any:
    optimizer, averaged = optimizers
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    averaged.update_parameters(model)  # a foreach lerp of the copy towards the model
    return loss


def test_an_optimizer_factorys_deep_copy_of_the_model_is_fake_in_the_steps_mode() -> None:
    # PyTorch deep-copies a fake tensor into a fake mode of its own, and the EMA's update
    # mixing the two modes was refused ("Mixing fake modes NYI").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    report = predict_memory(
        model, batch_size=4, input_size=(16,), optimizer=_ema_factory, step=_ema_step
    )
    measured = measure(model, report.spec, batch_size=4)
    assert report.live_trust.exact
    # The copy's parameters and its step count are held beside the model's and its gradients.
    assert report.live_peak_bytes == measured.live_peak_bytes == 9_328


def test_sharing_recordings_hands_back_the_same_step_of_the_same_model():
    from ninlab.analysis.trace import sharing_recordings

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    spec = StepSpec(input_size=(1, 8, 8)).for_model(model)
    with sharing_recordings():
        first = record_step(model, spec, 2)
        assert record_step(model, spec, 2) is first
        assert record_step(model, spec, 3) is not first  # another batch
        # An inference builds no optimizer: the same under any.
        inference = record_step(model, spec.inference(), 2)
        assert record_step(model, spec.replace(optimizer="adam").inference(), 2) is inference
        assert record_step(model, spec.replace(optimizer="adam"), 2) is not first
        with sharing_recordings():  # an inner scope shares the outer one's
            assert record_step(model, spec, 2) is first
    assert record_step(model, spec, 2) is not first


def test_a_summarys_forward_and_backward_are_read_from_a_steady_training_step():
    """The built-in step's forward and backward ran the same ops in its warm-up: the summary's
    `optimizer_step=False` recording is that step, whatever its optimizer."""
    from ninlab.analysis.trace import sharing_recordings

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    spec = StepSpec(input_size=(1, 8, 8), optimizer="adam").for_model(model)
    with sharing_recordings():
        full = record_step(model, spec, 2)
        assert full.steady
        assert record_step(model, spec.replace(optimizer="sgd"), 2, optimizer_step=False) is full
        # Another program (autocast) is not the same forward.
        bf16 = spec.replace(amp="bf16", optimizer="sgd")
        assert record_step(model, bf16, 2, optimizer_step=False) is not full


class _GrowsAHistory(nn.Module):
    """Keeps every batch's mean in a tensor attribute that grows by a row at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.history = torch.zeros(0, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.history = torch.cat([self.history, x.mean(0, keepdim=True).detach()])
        return self.linear(x) + self.history.mean(0)


def test_a_first_step_unlike_the_next_is_not_steady():
    """A forward that grows a history runs its ops on other shapes at each call: the summary
    records its own forward and backward, not the steady step's."""
    from ninlab.analysis.trace import sharing_recordings

    model = _GrowsAHistory()
    spec = StepSpec(input_size=(16,)).for_model(model)
    with sharing_recordings():
        full = record_step(model, spec, 4)
        assert not full.steady
        first = record_step(model, spec, 4, optimizer_step=False)
    assert first is not full
    # A placeholder the first call replaces is replaced by the forward that fits the loss to
    # the output, before the warm-up: the warm-up and the recorded step run alike.
    assert record_step(_ReplacesAPlaceholderBuffer(), spec, 4).steady


class _ViewBuffers(nn.Module):
    """Buffers that are views of larger storages: a periodic Hann window (one element more), and
    two halves of one table, which hold it once."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(16))
        table = torch.randn(2, 40)
        self.register_buffer("low", table[0, :16])
        self.register_buffer("high", table[1, :16])
        # As parameters, the measured copy's are clones of their own elements.
        self.frozen_window = nn.Parameter(torch.hann_window(16), requires_grad=False)
        self.every_other = nn.Parameter(torch.randn(2, 32)[:, ::2])
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.window * self.frozen_window + self.every_other.sum(0)
        return self.linear(x) * self.low + self.high


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_buffer_viewing_a_larger_storage_is_counted_with_all_of_it(mode: str) -> None:
    """A registered `torch.hann_window(n)` keeps n + 1 elements, and slices of one table keep the
    whole table, once: the fakes had storages of their own elements (an STFT front end's live
    peak 4 bytes under, printed as exact). A parameter over such a view is cloned by the copy
    `measure` runs (`Parameter.__deepcopy__`): its whole storage counted, 4 bytes over."""
    torch.manual_seed(0)
    model = _ViewBuffers()
    report = predict_memory(model, input_size=(16,), batch_size=2, mode=mode)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


# Forwards of `_Switchable`, counted outside the model, which a trace puts back as it was.
_FORWARDS = SimpleNamespace(calls=0)


class _Switchable(nn.Module):
    """Logits, or with `pooled` off the unpooled map (whose loss is the stand-in sum): the same
    inputs, another fit of the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pooled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _FORWARDS.calls += 1
        y = self.conv(x)
        return y.mean((2, 3)) if self.pooled else y


def test_the_loss_fit_is_reused_where_the_steps_forward_agrees_and_found_again_where_not():
    """The loss is fitted to the output by a forward before the step; a second trace of the same
    model on inputs of the same layout reuses that fit (one forward fewer) where the step's own
    first forward gives the same fit, and every figure is that of a fresh trace. Where the model
    changed (another output), the step stops at its first forward and is traced anew."""
    model = _Switchable()
    spec = StepSpec((3, 16, 16), optimizer="sgd-momentum")
    first = predict_memory(model, spec, batch_size=4)
    calls = _FORWARDS.calls
    again = predict_memory(model, spec, batch_size=4)
    assert _FORWARDS.calls - calls == 2  # the warm-up's forward and the step's: no loss-fitting one
    assert again.live_peak_bytes == first.live_peak_bytes
    assert again.allocator_peak_bytes == first.allocator_peak_bytes
    assert again.notes == first.notes == ()  # cross-entropy, the loss a classifier trains with

    model.pooled = False
    calls = _FORWARDS.calls
    changed = predict_memory(model, spec, batch_size=4)
    # The reused fit stopped at the first forward; then the loss-fitting forward and two more.
    assert _FORWARDS.calls - calls == 4
    assert changed.notes == ("loss: stand-in sum of outputs — not your loss",)
    fresh = predict_memory(_unseen_copy(model), spec, batch_size=4)
    assert changed.live_peak_bytes == fresh.live_peak_bytes
    assert changed.allocator_peak_bytes == fresh.allocator_peak_bytes


def _unseen_copy(model: _Switchable) -> _Switchable:
    copy = _Switchable()
    copy.load_state_dict(model.state_dict())
    copy.pooled = model.pooled
    return copy


class _Drawing(nn.Module):
    """Draws from Python's random numbers in its forward (a stochastic depth of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import random

        return self.linear(x) * (1.0 if random.random() < 2 else 0.0)


def test_a_forward_that_draws_random_numbers_keeps_its_loss_fitting_forward():
    """Skipping a forward that draws would move every later draw, so the step's: its fit is
    not reused, and the random state moves as it always did, by three forwards a trace."""
    import random

    model = _Drawing()
    spec = StepSpec((8,), optimizer="sgd")
    for _ in range(2):
        random.seed(0)
        predict_memory(model, spec, batch_size=2)
        after = random.random()
        random.seed(0)
        for _ in range(3):
            random.random()
        assert after == random.random()


def _forgiving_step(model, optimizer, inputs, targets):
    """A step that calls the model again where its first call raised."""
    optimizer.zero_grad(set_to_none=True)
    try:
        output = model(inputs)
    except Exception:  # noqa: BLE001 - what the test is about
        output = model(inputs)
    builtin_loss(output, targets).backward()
    optimizer.step()


def test_a_step_that_catches_the_stop_at_its_first_forward_is_traced_anew():
    model = _Switchable()
    spec = StepSpec((3, 16, 16), optimizer="sgd", step=_forgiving_step)
    predict_memory(model, spec, batch_size=4)  # fits the loss to the logits
    model.pooled = False
    changed = predict_memory(model, spec, batch_size=4)
    fresh = predict_memory(_unseen_copy(model), spec, batch_size=4)
    assert changed.live_peak_bytes == fresh.live_peak_bytes
    assert changed.allocator_peak_bytes == fresh.allocator_peak_bytes
    assert changed.notes == fresh.notes


def test_a_kept_loss_fit_does_not_keep_the_model_alive():
    import weakref

    model = _Switchable()

    def step(model_, optimizer, inputs, targets, held=model):  # a step that holds the model
        _forgiving_step(model_, optimizer, inputs, targets)

    predict_memory(model, StepSpec((3, 16, 16), optimizer="sgd", step=step), batch_size=2)
    gone = weakref.ref(model)
    del model, step
    gc.collect()
    assert gone() is None
