"""`refusals.cannot_run`: a step that fails is refused in one line naming its real cause."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ninlab import measure, predict_memory
from ninlab.analysis.refusals import cannot_run
from ninlab.analysis.step import step_spec
from ninlab.errors import NinlabError

# Each fails in the optimizer's own code, on fake tensors and real ones alike.
_FAILING_OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "capturable on CPU": lambda model: torch.optim.Adam(model.parameters(), capturable=True),
    "differentiable": lambda model: torch.optim.Adam(model.parameters(), differentiable=True),
    "SparseAdam, dense gradients": lambda model: torch.optim.SparseAdam(model.parameters()),
}


@pytest.mark.parametrize("call", [predict_memory, measure])
@pytest.mark.parametrize("kind", _FAILING_OPTIMIZERS)
def test_an_optimizer_that_fails_is_blamed_not_the_input(kind: str, call: Callable) -> None:
    # They were refused as "the model cannot run a train step on a batch of 16 inputs (...);
    # give the input sizes and dtype its forward expects".
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(NinlabError) as refused:
        call(model, input_size=(16,), batch_size=2, optimizer=_FAILING_OPTIMIZERS[kind])
    message = str(refused.value)
    assert message.startswith("the optimizer <lambda> fails on this model's parameters (")
    assert "input size" not in message and "\n" not in message


def _own_step(model: nn.Module, optimizers, inputs: torch.Tensor, targets: torch.Tensor):
    for optimizer in optimizers if isinstance(optimizers, tuple) else (optimizers,):
        optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    for optimizer in optimizers if isinstance(optimizers, tuple) else (optimizers,):
        optimizer.step()
    return loss


class _SparseBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1))


def _sparse_adam_and_adam(model: _SparseBag) -> tuple[torch.optim.Optimizer, ...]:
    return torch.optim.SparseAdam(model.embedding.parameters()), torch.optim.Adam(
        model.head.parameters()
    )


@pytest.mark.parametrize("call", [predict_memory, measure])
def test_a_step_functions_failure_beyond_its_code_names_the_cause(call: Callable) -> None:
    # A user's step got the raw error: "the step _own_step raised on fake tensors:
    # AssertionError: If capturable=True, ..." and "NotImplementedError: Cannot access storage
    # of SparseTensorImpl", where the built-in step named the optimizer and the sparse layer.
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(NinlabError) as refused:
        call(
            model,
            input_size=(16,),
            batch_size=2,
            optimizer=_FAILING_OPTIMIZERS["capturable on CPU"],
            step=_own_step,
        )
    assert str(refused.value).startswith("the optimizer <lambda> fails on this model's parameters")
    # measure predicts first, and refuses it in the same line.
    with pytest.raises(NinlabError) as refused:
        call(
            _SparseBag(),
            input_size=(6,),
            input_dtype="long",
            input_range=(0, 20),
            batch_size=2,
            optimizer=_sparse_adam_and_adam,
            step=_own_step,
        )
    assert str(refused.value).startswith("the model's embedding has sparse=True: its gradients")


def _divides_by_zero(model: nn.Module, optimizer, inputs: torch.Tensor, targets: torch.Tensor):
    return 1 / 0


def test_a_step_functions_own_error_is_its_own() -> None:
    with pytest.raises(NinlabError, match=r"^the step _divides_by_zero raised on fake tensors: Z"):
        predict_memory(
            _SparseBag(), input_size=(6,), input_dtype="long", batch_size=2, step=_divides_by_zero
        )


def test_a_model_that_rejects_its_input_is_still_told_about_the_input() -> None:
    model = nn.Linear(8, 4)
    with pytest.raises(NinlabError, match="give the input sizes and dtype its forward expects"):
        predict_memory(model, input_size=(16,), batch_size=2, optimizer="adam")


class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids).sum(-1) @ torch.ones(3, 3)  # the wrong sizes


def test_inputs_given_by_name_are_named_in_the_refusal() -> None:
    # Was "on a batch of 16 and 16 int64 inputs": sizes without the names they were given by.
    with pytest.raises(NinlabError) as refused:
        predict_memory(
            _Keywords(),
            input_size={"input_ids": (16,), "mask": (16,)},
            input_dtype=torch.long,
            input_range=(0, 10),
            batch_size=2,
        )
    assert str(refused.value).startswith(
        "the model cannot run a train step on a batch of inputs input_ids=16, mask=16 (int64) ("
    )


class _Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


@pytest.mark.parametrize("call", [predict_memory, measure])
def test_batch_norm_given_a_batch_of_one_in_training_names_the_batch(call: Callable) -> None:
    # Refused as "the model cannot run a train step on a batch of 8 inputs (...); give the input
    # sizes and dtype its forward expects": the sizes were right, the batch was not.
    with pytest.raises(NinlabError) as refused:
        call(_Normalised(), input_size=(8,), batch_size=1)
    message = str(refused.value)
    assert message.startswith("a batch norm of the model has one value per channel to normalise")
    assert message.endswith("use a batch of 2 or more, or mode 'infer'")


class _TakesAList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(tensors[0] + tensors[1])


def test_more_inputs_than_the_forward_takes_says_how_many_it_takes() -> None:
    with pytest.raises(NinlabError) as refused:
        predict_memory(_TakesAList(), input_size=((8,), (8,)), batch_size=2)
    assert str(refused.value).startswith(
        "the model's forward takes 1 input and 2 were given, each as an argument of its own; "
    )
    assert "(def forward(self, x, y): return model({'x': x, 'y': y}))" in str(refused.value)


class _TakesADict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image, self.tabular = nn.Linear(8, 4), nn.Linear(3, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.image(batch["image"]) + self.tabular(batch["tabular"])


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return self.model({"image": image, "tabular": tabular})


def test_a_forward_that_takes_one_dict_is_told_how_to_pass_it() -> None:
    """A forward reading `batch["image"]` from the one tensor it is given once got the generic
    hint about input sizes; it is told to wrap the model, and the wrapped one is exact."""
    for size in ((8,), {"batch": (8,)}):
        with pytest.raises(NinlabError) as refused:
            predict_memory(_TakesADict(), input_size=size, batch_size=2)
        assert str(refused.value).startswith(
            "the model's forward reads its one argument as a dict or list of tensors "
            '(batch["image"]: IndexError: too many indices'
        )
        assert "return model({'x': x, 'y': y})), with one size per input" in str(refused.value)
    model = _Wrapped(_TakesADict())
    report = predict_memory(model, input_size={"image": (8,), "tabular": (3,)}, batch_size=2)
    measured = measure(model, report.spec, batch_size=2)
    assert report.live_trust.exact and report.live_peak_bytes == measured.live_peak_bytes


class _FlexAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v).mean((1, 2))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_higher_order_operator_is_named_not_the_input(mode: str) -> None:
    # Refused as "the model cannot run a forward on a batch of 8x32 inputs (NotImplementedError:
    # There was no rule registered for HigherOrderOperator flex_attention and mode
    # <ninlab.analysis.recorder.Recorder object at 0x...>...); give the input sizes and dtype its
    # forward expects".
    pytest.importorskip("torch.nn.attention.flex_attention")
    with pytest.raises(NinlabError) as refused:
        predict_memory(_FlexAttention(), input_size=(8, 32), batch_size=2, mode=mode)
    message = str(refused.value)
    assert message.startswith("the model calls torch's higher-order operator flex_attention, ")
    assert "input size" not in message and " at 0x" not in message


class _ChangesASavedTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 8)
        self.register_buffer("keys", torch.randn(8, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.linear(x) @ self.keys
        with torch.no_grad():
            self.keys[:, : x.shape[0]] = 0  # a queue of keys updated in place, after its use
        return scores


@pytest.mark.parametrize("call", [predict_memory, measure])
def test_a_saved_tensor_changed_in_place_is_named_not_the_input(call: Callable) -> None:
    with pytest.raises(NinlabError) as refused:
        call(_ChangesASavedTensor(), input_size=(16,), batch_size=2)
    message = str(refused.value)
    assert message.startswith("the model changes in place a tensor autograd saved for backward (")
    assert message.endswith("clone the tensor before changing it, or change it after the backward")


@pytest.mark.parametrize("call", [predict_memory, measure])
def test_an_input_named_as_no_argument_of_the_forward_names_the_arguments(call: Callable) -> None:
    # Refused as "the model cannot run a train step on a batch of 8 inputs (TypeError: ...
    # unexpected keyword argument 'x'); give the input sizes and dtype its forward expects".
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(NinlabError) as refused:
        call(model, input_size={"x": (8,)}, batch_size=2)
    message = str(refused.value)
    assert message.startswith("the model's forward takes no argument named x (TypeError: ")
    assert message.endswith(
        "its arguments are input: name the inputs as they are, or give them by position "
        "(input_size without names, --input SIZE)"
    )


def test_code_torch_compile_fails_to_compile_is_named_not_the_input() -> None:
    # A compiled submodule whose compilation failed on the fake tensors of one probe's trace
    # (inductor raising while the real step compiled and ran) was refused as "the model cannot
    # run a train step on a batch of 16 inputs (BackendCompilerFailed: backend='inductor'
    # raised:); give the input sizes and dtype its forward expects".
    from torch._dynamo.exc import BackendCompilerFailed

    failed = BackendCompilerFailed(lambda *_: None, RuntimeError("cannot compile"), None)
    model = nn.Linear(16, 8)
    message = str(cannot_run(failed, model, step_spec(model=model, input_size=(16,))))
    assert message.startswith("the model runs code compiled by torch.compile, which fails ")
    assert "input size" not in message


class _SparseAdjacency(nn.Module):
    """A graph convolution over a sparse adjacency matrix, held as a buffer or made in forward."""

    def __init__(self, held: bool) -> None:
        super().__init__()
        index = torch.tensor([[0, 1, 2, 3, 1], [1, 2, 3, 0, 0]])
        self.register_buffer("index", index)
        self.held = held
        if held:
            self.register_buffer("adjacency", torch.sparse_coo_tensor(index, torch.ones(5), (4, 4)))
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adjacency = (
            self.adjacency
            if self.held
            else torch.sparse_coo_tensor(self.index, torch.ones(5), (4, 4))
        )
        return torch.stack([torch.sparse.mm(adjacency, self.linear(g)) for g in x]).mean(1)


@pytest.mark.parametrize("held", [True, False])
def test_a_sparse_tensor_is_refused_in_one_line(held: bool) -> None:
    """A sparse buffer was predicted "exact" at 4 bytes (its fake copy's one element) and the
    measurement raised a traceback (it has no storage); one made in forward was blamed on the
    input sizes. Both are refused, by what they are, for predictions and measurements alike."""
    model = _SparseAdjacency(held)
    for call in (predict_memory, measure):
        with pytest.raises(NinlabError) as refused:
            call(model, input_size=(4, 8), batch_size=2)
        words = "holds a sparse tensor (adjacency)" if held else "makes a sparse tensor ("
        assert f"the model {words}" in str(refused.value)
        assert str(refused.value).endswith(
            "use it dense (tensor.to_dense() and an ordinary matmul), which ninlab predicts"
        )
