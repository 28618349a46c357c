"""The recorder: composite ops as their parts, CUDA's choices, layers named, kernels corrected."""

import pytest
import torch
from torch.torch_version import TorchVersion

from ninlab.analysis import recorder
from ninlab.analysis.allocator.rnn import LSTM_MODE
from ninlab.analysis.recording import LayerInputTooSmall
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import summarize
from ninlab.analysis.torch_internals import FakeTensorMode
from ninlab.analysis.trace import record_step
from ninlab.models import build_nin

aten = torch.ops.aten


@pytest.fixture(scope="module")
def nin():
    return build_nin()


def step_ops(step):
    return step.recording.ops[step.step_start :]


def test_inference_mode_still_sees_max_pool_indices(nin):
    for grad_mode in ("no_grad", "inference_mode"):
        step = record_step(nin, StepSpec((1, 224, 224), mode="infer", grad_mode=grad_mode), 4)
        pools = [o for o in step.recording.ops if o.op == "aten.max_pool2d_with_indices.default"]
        assert [o.outputs[1].dtype for o in pools] == [torch.int64] * 3
        assert step.target_key == -1


@pytest.mark.canary
def test_cuda_step_uses_fused_dropout_and_foreach_optimizers(nin):
    """PyTorch fuses dropout (bool mask) and runs foreach optimizers on CUDA, not on CPU."""
    cpu = step_ops(record_step(nin, StepSpec((1, 224, 224), optimizer="adam"), 2))
    cuda = step_ops(
        record_step(nin, StepSpec((1, 224, 224), optimizer="adam", device_type="cuda"), 2)
    )

    def dropout(ops):
        return [
            (o.op, tuple(t.dtype for t in o.outputs))
            for o in ops
            if o.module == "6" and o.phase == "forward"
        ]

    assert dropout(cuda) == [("aten.native_dropout.default", (torch.float32, torch.bool))]
    assert ("aten.bernoulli_.float", (torch.float32,)) in dropout(cpu)  # CPU keeps a float mask
    assert any(o.op.startswith("aten._foreach_") for o in cuda if o.phase == "optimizer")
    assert not any(o.op.startswith("aten._foreach_") for o in cpu if o.phase == "optimizer")


def test_input_too_small_names_the_layer(nin):
    with pytest.raises(LayerInputTooSmall) as error:
        record_step(nin, StepSpec((1, 66, 66), mode="infer"), 1)
    assert (error.value.module, error.value.module_type, error.value.error.min_input_size) == (
        "5",
        "MaxPool2d",
        3,
    )


@pytest.mark.canary
def test_batch_norm_statistics_stay_float32_under_autocast():
    """PyTorch's autocast lets batch norm take bf16 input but keeps its statistics float32."""
    from cnn_zoo import resnet_bn

    step = record_step(resnet_bn(), StepSpec((3, 32, 32), amp="bf16", optimizer="sgd"), 2)
    norms = [o for o in step_ops(step) if o.op == "aten.native_batch_norm.default"]
    assert norms and all(o.inputs[0].dtype == torch.bfloat16 for o in norms)
    assert {(o.outputs[0].dtype, o.outputs[1].dtype, o.outputs[2].dtype) for o in norms} == {
        (torch.bfloat16, torch.float32, torch.float32)
    }


def test_batch_norm_backward_keeps_a_channels_last_input_layout() -> None:
    """The CPU kernel writes batch norm's grad_input in its channels-last input's layout even when
    grad_output arrives NCHW (from average pooling); the fake kernel would give it NCHW, and the
    convolution backward before it would be predicted to copy it (MobileNet: 32 KB over)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    step = record_step(model, StepSpec(input_size=(16, 8, 8), memory_format="channels_last"), 4)
    (conv_backward,) = [
        op for op in step.recording.ops if op.op == "aten.convolution_backward.default"
    ]
    assert conv_backward.cpu_allocations is not None, conv_backward.cpu_unmodelled
    assert not [a for a in conv_backward.cpu_allocations if "copy of the grad_output" in a.what]


def _strided(shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """A tensor of `shape` whose memory runs in the dims' `order` (outermost first)."""
    return torch.randn([shape[d] for d in order]).permute(
        [order.index(d) for d in range(len(shape))]
    )


# (shape, the memory order of the input, of the gradient): a transposed sequence (PatchTST's
# `BatchNorm1d`), NCHW, channels-last, the last two dims swapped, channels-last 3-d.
_BATCH_NORM_LAYOUTS = [
    ((6, 16, 4), (0, 2, 1), (0, 2, 1)),
    ((6, 16, 4), (0, 2, 1), (0, 1, 2)),
    ((6, 16, 4), (0, 1, 2), (0, 2, 1)),
    ((2, 8, 5, 3), (0, 1, 2, 3), (0, 2, 3, 1)),
    ((2, 8, 5, 3), (0, 2, 3, 1), (0, 1, 2, 3)),
    ((2, 8, 5, 3), (0, 1, 3, 2), (0, 1, 3, 2)),
    ((2, 8, 3, 4, 5), (0, 2, 3, 4, 1), (0, 1, 2, 3, 4)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "x_order", "grad_order"), _BATCH_NORM_LAYOUTS)
def test_batch_norm_takes_the_layout_the_cpu_kernel_suggests(
    shape, x_order, grad_order, training
) -> None:
    """CPU batch norm makes its output, and its backward grad_input, in the layout ATen suggests
    for the input: a `BatchNorm1d` over a transposed sequence returns a contiguous map, where the
    fake kernel follows the input (PatchTST's encoder: live 0.93 of the real step)."""
    aten = torch.ops.aten
    x, grad = _strided(shape, x_order), _strided(shape, grad_order)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    mean, var = torch.zeros(channels), torch.ones(channels)
    real = aten.native_batch_norm.default(x, weight, bias, mean, var, training, 0.1, 1e-5)
    real_grad = aten.native_batch_norm_backward.default(
        grad, x, weight, mean, var, real[1], real[2], training, 1e-5, [True, True, True]
    )
    with FakeTensorMode() as mode:
        fx, fgrad, fw, fb, fmean, fvar = (
            mode.from_tensor(t) for t in (x, grad, weight, bias, mean, var)
        )
        forward_args = (fx, fw, fb, fmean, fvar, training, 0.1, 1e-5)
        out = recorder._cpu_batch_norm_layout(
            aten.native_batch_norm.default,
            forward_args,
            aten.native_batch_norm.default(*forward_args),
        )
        backward_args = (fgrad, fx, fw, fmean, fvar, out[1], out[2], training, 1e-5, [True] * 3)
        grad_input = recorder._cpu_batch_norm_layout(
            aten.native_batch_norm_backward.default,
            backward_args,
            aten.native_batch_norm_backward.default(*backward_args),
        )
        assert out[0].stride() == real[0].stride()
        assert grad_input[0].stride() == real_grad[0].stride()


@pytest.mark.parametrize(
    "op", [torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.maximum.default]
)
def test_elementwise_outputs_take_the_strides_the_cpu_gives(op) -> None:
    """On a (N, C, 1, 1) map (after global pooling) channels-last strides are contiguous too, and
    TensorIterator then writes a contiguous output where the fake kernel keeps the input's strides;
    a max-pool backward reading the result copies it when the layouts disagree (NiN's dropout)."""
    real = torch.randn(4, 8, 1, 1).as_strided((4, 8, 1, 1), (8, 1, 8, 8))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        output = op(fake, fake)
        assert output.stride() == (8, 1, 8, 8)  # the fake kernel's strides
        corrected = recorder._elementwise_layout(op, (fake, fake), {}, output)
    assert corrected.stride() == op(real, real).stride() == (8, 1, 1, 1)
    wider = torch.randn(4, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(wider)
        output = op(fake, fake)
        assert recorder._elementwise_layout(op, (fake, fake), {}, output) is output
    assert output.stride() == op(wider, wider).stride()


_GRADIENT_FIRST = {
    "elu_backward": lambda g, x: aten.elu_backward.default(g, 1.67, 1.05, 1.0, False, x),
    "hardswish_backward": aten.hardswish_backward.default,
    "hardsigmoid_backward": aten.hardsigmoid_backward.default,
    "hardtanh_backward": lambda g, x: aten.hardtanh_backward.default(g, x, -1.0, 1.0),
    "softplus_backward": lambda g, x: aten.softplus_backward.default(g, x, 1.0, 20.0),
    "logit_backward": lambda g, x: aten.logit_backward.default(g, x.sigmoid(), 1e-6),
    "copysign": aten.copysign.Tensor,
}


@pytest.mark.parametrize("name", list(_GRADIENT_FIRST))
def test_an_activations_backward_takes_the_cpu_kernels_layout(name) -> None:
    """Given an NCHW gradient of a channels-last activation, TensorIterator writes NCHW (it reads
    grad_output first) where the fake kernel writes channels-last: SELU after a channels-last
    convolution was 6,400 allocator bytes under (its convolution backward copies the gradient)."""
    backward = _GRADIENT_FIRST[name]
    grad = torch.randn(2, 8, 10, 10)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    func = aten.copysign.Tensor if name == "copysign" else getattr(aten, name).default
    with FakeTensorMode() as mode:
        fake_grad, fake_x = mode.from_tensor(grad), mode.from_tensor(x)
        output = backward(fake_grad, fake_x)
        positions = recorder._GRADIENT_FIRST_ELEMENTWISE[func]
        args = [fake_grad if i == 0 else None for i in range(max(positions) + 1)]
        args[positions[1]] = fake_x
        corrected = recorder._cpu_elementwise_layout(func, tuple(args), output)
    assert corrected.stride() == backward(grad, x).stride() == (800, 100, 10, 1)


@pytest.mark.parametrize(
    "loss", [aten.mse_loss_backward, aten.smooth_l1_loss_backward, aten.huber_loss_backward]
)
def test_a_losss_backward_makes_a_contiguous_grad_input(loss) -> None:
    """Its kernel makes grad_input contiguous whatever the input's layout; the fake one follows a
    channels-last input (a mean: the gradient a number)."""
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    args = (torch.tensor(1.0), x, torch.randn(2, 8, 10, 10), 1)
    if loss is not aten.mse_loss_backward:
        args = (*args, 1.0)
    with FakeTensorMode() as mode:
        fakes = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        corrected = recorder._cpu_elementwise_layout(loss.default, fakes, loss.default(*fakes))
    assert corrected.stride() == loss.default(*args).stride() == (800, 100, 10, 1)


def test_a_composite_op_run_inside_the_recorder_keeps_the_step_phases(nin):
    """A composite op's parts run under the recorder entered again (torch 2.8 to 2.10 run the
    optimizers' profiler annotations so); leaving that inner `with` must leave the step's phases
    in place: it once labelled every later op "setup" (the forum line then read 0 B of
    activation gradients at the peak)."""
    rec = recorder.Recorder(nin, FakeTensorMode())
    with rec:
        with rec:
            pass
        assert rec.current_phase == "step"
    assert rec.current_phase == "setup"
    phases = {op.phase for op in step_ops(record_step(nin, StepSpec((1, 224, 224)), 2))}
    assert phases >= {"forward", "loss", "backward", "optimizer"}
    assert "setup" not in phases


@pytest.mark.parametrize(
    ("columns", "output_size", "kernel", "stride"),
    [((2, 72, 256), (16, 16), 3, 1), ((2, 16, 16), (8, 8), 2, 2), ((72, 256), (16, 16), 3, 1)],
)
def test_a_fold_keeps_the_storage_the_cpu_kernel_leaves_it_on(
    columns, output_size, kernel, stride
) -> None:
    """`col2im` makes its output like its columns and shrinks it (`resize_` keeps the storage): a
    fold of (2, 72, 256) columns keeps 147,456 bytes for 16,384 bytes of values; where the
    columns are no larger than the output (no overlap), the output's own size."""
    real_columns = torch.randn(*columns)
    padding = 1 if kernel == 3 else 0
    args = (output_size, [kernel] * 2, [1, 1], [padding] * 2, [stride] * 2)
    real = torch.ops.aten.col2im.default(real_columns, *args)
    with FakeTensorMode() as mode:
        fake_columns = mode.from_tensor(real_columns)
        fake = torch.ops.aten.col2im.default(fake_columns, *args)
        corrected = recorder._cpu_output_resized_from_input(
            torch.ops.aten.col2im.default, (fake_columns, *args), fake
        )
        assert corrected.shape == real.shape and corrected.stride() == real.stride()
        assert corrected.untyped_storage().nbytes() == real.untyped_storage().nbytes()


@pytest.mark.parametrize(
    ("op", "args"),
    [
        (torch.ops.aten.hann_window.default, (32,)),
        (torch.ops.aten.hann_window.periodic, (32, False)),
        (torch.ops.aten.hamming_window.periodic_alpha_beta, (16, True, 0.5, 0.5)),
        (torch.ops.aten.blackman_window.default, (9,)),
        (torch.ops.aten.bartlett_window.periodic, (8, True)),
        (torch.ops.aten.kaiser_window.beta, (12, True, 8.0)),
        (torch.ops.aten.hann_window.default, (1,)),
    ],
)
def test_a_periodic_window_keeps_the_storage_aten_leaves_it_on(op, args) -> None:
    """A periodic window is computed one element longer and returned without its last: a view
    on 132 bytes for `torch.hann_window(32)`, where the fake kernel's has 128 (an STFT front
    end's live peak was 4 bytes under)."""
    real = op(*args)
    with FakeTensorMode():
        corrected = recorder._periodic_window_storage(op, args, op(*args))
        assert corrected.shape == real.shape and corrected.stride() == real.stride()
        assert corrected.untyped_storage().nbytes() == real.untyped_storage().nbytes()


@pytest.mark.parametrize("mask", [[True, False], [False, True], [True, True]])
@pytest.mark.parametrize("rank", [4, 5])
def test_a_grid_samplers_backward_makes_grad_grid_whatever_the_mask(mask, rank) -> None:
    """The grid samplers' backward makes grad_grid even where the mask leaves it out (a grid no
    gradient is wanted for: a bf16 step's live peak 0.98 of the real one); grad_input only
    where the mask asks for it."""
    aten = torch.ops.aten
    op = (
        aten.grid_sampler_2d_backward.default
        if rank == 4
        else aten.grid_sampler_3d_backward.default
    )
    x = torch.randn(2, 4, *[5] * (rank - 2))
    grid = torch.rand(2, *[3] * (rank - 2), rank - 2) * 2 - 1
    grad = torch.randn(2, 4, *[3] * (rank - 2))
    args = (grad, x, grid, 0, 0, False, mask)
    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        corrected = recorder._masked_outputs(op, fake_args, {}, op(*fake_args))
    assert [t is None for t in corrected] == [t is None for t in real]


def test_group_norm_backward_keeps_a_bf16_input_dtype() -> None:
    """Under autocast a GroupNorm takes bf16 input with float32 statistics; the CPU kernel's
    grad_input is bf16 (its input's dtype), where the fake kernel promotes it to float32."""
    aten = torch.ops.aten
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    weight = torch.randn(8)
    _, mean, rstd = aten.native_group_norm.default(x, weight, None, 2, 8, 36, 2, 1e-5)
    args = (torch.ones_like(x), x, mean, rstd, weight, 2, 8, 36, 2, [True, True, False])
    real = aten.native_group_norm_backward.default(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = aten.native_group_norm_backward.default(*fake_args)
        corrected = recorder._group_norm_grad_input_dtype(
            aten.native_group_norm_backward.default, fake_args, fake
        )
    assert [t.dtype for t in corrected[:2]] == [t.dtype for t in real[:2]]
    assert corrected[0].dtype == torch.bfloat16


def test_lstm_backward_gradients_are_float32_as_the_cpu_kernel_makes_them() -> None:
    """oneDNN's LSTM backward returns float32 gradients for a bf16 layer (autograd's engine then
    casts them to bf16); torch 2.8's fake kernel gives them the inputs' dtype."""
    aten = torch.ops.aten
    x, hx = torch.randn(5, 2, 8, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16)
    weights = tuple(torch.randn(shape, dtype=torch.bfloat16) for shape in ((16, 8), (16, 4), (16,)))
    weights = (*weights, weights[2])
    with torch.enable_grad():
        out, hy, cy, workspace = aten.mkldnn_rnn_layer(
            x, *weights, hx, hx, False, [], LSTM_MODE, 4, 1, True, False, False, True
        )
    args = (x, *weights, hx, hx, out, hy, cy, out, hy, cy, False, LSTM_MODE, 4, 1, True)
    args = (*args, True, False, [], False, workspace)
    backward = aten.mkldnn_rnn_layer_backward.default
    real = backward(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        corrected = recorder._cpu_lstm_outputs(backward, fake_args, backward(*fake_args))
    assert [t.dtype for t in corrected] == [t.dtype for t in real] == [torch.float32] * 7
    assert [t.shape for t in corrected] == [t.shape for t in real]
    assert corrected[4] is not corrected[3]


@pytest.mark.parametrize("need_weights", [False, True])
def test_fused_attention_returns_weights_only_when_asked(need_weights) -> None:
    """`nn.MultiheadAttention`'s inference path told not to return its weights returns None for
    them, where the fake kernel makes an empty tensor (a summary showed a second output, (0,))."""
    aten = torch.ops.aten
    attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 10, 32)
    weights = (attention.in_proj_weight, attention.in_proj_bias)
    weights += (attention.out_proj.weight, attention.out_proj.bias)
    args = (x, x, x, 32, 4, *weights, None, need_weights)
    op = aten._native_multi_head_attention.default
    with torch.no_grad():
        real = op(*args)
        with FakeTensorMode() as mode:
            fake_args = tuple(
                mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args
            )
            corrected = recorder._attention_weights_not_wanted(op, fake_args, {}, op(*fake_args))
    assert corrected[0].shape == real[0].shape
    if need_weights:
        assert corrected[1].shape == real[1].shape == (3, 10, 10)
    else:
        assert corrected[1] is None and real[1] is None


class _SelfAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_a_summary_shows_the_outputs_an_attention_layer_returns() -> None:
    model = _SelfAttention().eval()
    with torch.no_grad():
        x = torch.randn(3, 10, 32)
        assert model.attention(x, x, x, need_weights=False)[1] is None
    summary = summarize(model, input_size=(10, 32), batch_size=3, mode="infer")
    assert {layer.name: layer.output_shapes for layer in summary.layers}["attention"] == (
        (3, 10, 32),
    )


class _WritesIndexed(torch.nn.Module):
    """A linear layer's output written by index into a float32 tensor (top-k routing, graph
    message passing): under bf16 autocast the output is bfloat16."""

    def __init__(self, write) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        out = self.write(torch.zeros(x.shape[0] + 2, 3, device=x.device), rows, self.linear(x))
        return out[: x.shape[0]]


def _set_rows(out, rows, y):
    out[rows] = y
    return out


SOURCE_DTYPE_WRITES = {
    "index_add": lambda out, rows, y: out.index_add(0, rows, y),
    "index_put_": _set_rows,
    "index_put": lambda out, rows, y: out.index_put((rows,), y, accumulate=True),
    "index_reduce": lambda out, rows, y: out.index_reduce(0, rows, y, "amax"),
    "put": lambda out, rows, y: out.put(rows, y[:, 0]),
}


@pytest.mark.parametrize("op", SOURCE_DTYPE_WRITES)
def test_a_source_dtype_the_cpu_kernel_refuses_is_refused_in_one_line(op) -> None:
    from ninlab.analysis.predict import predict_memory
    from ninlab.errors import NinlabError

    model = _WritesIndexed(SOURCE_DTYPE_WRITES[op])
    with pytest.raises(RuntimeError), torch.autocast("cpu", torch.bfloat16):  # the real step
        model(torch.randn(2, 3))
    name = "values" if op.startswith("index_put") else "source"
    with pytest.raises(NinlabError, match=f"^{op}: its {name} is bfloat16 and the tensor it "):
        predict_memory(model, input_size=(3,), batch_size=2, amp="bf16", optimizer="sgd")
    # In float32 the same model is predicted.
    assert predict_memory(model, input_size=(3,), batch_size=2, optimizer="sgd").live_peak_bytes


class _ConjugateProduct(torch.nn.Module):
    """A complex product with a lazily conjugated operand (`x * y.conj()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex(self.linear(x).view(x.shape[0], -1, 2))
        return torch.view_as_real(z * z.conj()).flatten(1).sum(1)


@pytest.mark.parametrize("fields", [{"mode": "infer"}, {"optimizer": "sgd", "amp": "bf16"}])
def test_a_kernel_resolving_a_conjugate_copies_it_inside_itself(fields) -> None:
    """The copy is the kernel's own block, which a dispatch mode sees as a `clone` of its own:
    an inference was 51,240 allocator bytes against 67,624 (the conjugate bit lost by the fast
    path), then 67,624 live against 51,240 (the copy counted as a storage)."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    torch.manual_seed(0)
    model = _ConjugateProduct()
    report = predict_memory(model, input_size=(16,), batch_size=16, **fields)
    measured = measure(model, report.spec, batch_size=16)
    assert report.allocator_trust.kind == "exact"
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes


class _Spectrum(torch.nn.Module):
    """Singular values (or the full decomposition's) of an activation seen as 16 8x32 matrices."""

    def __init__(self, values) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 256)
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.linear(x).view(x.shape[0], 8, -1)).sum(1)


@pytest.mark.parametrize(
    ("values", "trust"),
    [
        (torch.linalg.svdvals, "estimate"),
        (lambda a: torch.linalg.matrix_norm(a, 2).unsqueeze(1), "estimate"),
        (lambda a: torch.linalg.svd(a).S, "exact"),  # full matrices: no decomposition's call
    ],
    ids=["svdvals", "spectral-norm", "svd"],
)
def test_vectors_a_decomposition_computes_only_on_fake_tensors_are_said(values, trust) -> None:
    """Without gradients, `svdvals` computes no vectors unwatched; on a fake tensor (a subclass)
    it does, and the dispatch mode cannot tell its call from `svd`'s: an inference was 55,848
    live bytes against 35,368, printed as exact."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    torch.manual_seed(0)
    model = _Spectrum(values)
    report = predict_memory(model, input_size=(16,), batch_size=16, mode="infer")
    assert report.live_trust.kind == report.allocator_trust.kind == trust
    if trust == "exact":
        measured = measure(model, report.spec, batch_size=16)
        assert report.live_peak_bytes == measured.live_peak_bytes
    else:
        assert "svdvals, eigvalsh and eigvals" in report.live_trust.words()
    # With gradients the vectors are computed for real too: exact.
    trained = predict_memory(model, input_size=(16,), batch_size=16, optimizer="sgd")
    assert trained.live_trust.kind == "exact"


class _Quantiles(torch.nn.Module):
    """A quantile of each row of a linear layer's output (a robust pooling)."""

    def __init__(self, quantile) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 256)
        self.quantile = quantile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantile(self.linear(x), 0.3, dim=1, keepdim=True)


@pytest.mark.parametrize("quantile", [torch.quantile, torch.nanquantile])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_quantile_that_may_select_without_sorting_is_said(quantile, mode) -> None:
    """Torch 2.14's CPU quantile selects a few k-th values without the sort it runs on a fake
    tensor (and sorts where it asks for many): an inference was 24,764 live bytes against
    19,094 (1.30), printed as exact; now an estimate, with why. Before 2.14 it sorts both ways,
    and is exact (torch 2.8 measures its training step for real)."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    torch.manual_seed(0)
    model = _Quantiles(quantile)
    fields = {"mode": "infer"} if mode == "infer" else {"optimizer": "sgd"}
    report = predict_memory(model, input_size=(16,), batch_size=2, **fields)
    sorts = TorchVersion(torch.__version__) < "2.14"  # then the CPU program sorts too
    if sorts:
        measured = measure(model, report.spec, batch_size=2)
        # Torch 2.8's quantile backward reads values: its training step is measured for real.
        trusts = ("exact",) if mode == "infer" else ("exact", "measured")
        assert report.live_trust.kind == report.allocator_trust.kind
        assert report.live_trust.kind in trusts
        assert report.live_peak_bytes == measured.live_peak_bytes
        assert report.allocator_peak_bytes == measured.allocator_peak_bytes
    else:
        assert report.live_trust.kind == report.allocator_trust.kind == "estimate"
        assert "quantile (or nanquantile) on CPU tensors" in report.live_trust.words()


class _MixedOperands(torch.nn.Module):
    """Under bf16 autocast a linear layer's bfloat16 output meets a float32 tensor in an op
    whose CPU kernel refuses two dtypes that its fake kernel promotes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(16, 8)
        self.bag = torch.nn.EmbeddingBag(10, 8, mode="sum")
        self.register_buffer("rows", torch.tensor([1, 2, 3, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.kind == "heaviside":  # a step function of the activation, values in float32
            return h * torch.heaviside(h.detach(), torch.tensor([0.5]))
        rows, starts = self.rows.repeat(x.shape[0]), torch.arange(0, 4 * x.shape[0], 4)
        return h + self.bag(rows, starts, per_sample_weights=h[:, :4].reshape(-1))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("heaviside", "heaviside is not yet implemented for tensors with different dtypes"),
        ("embedding-bag", "expected both operands to have the same dtype"),
    ],
)
def test_operands_of_two_dtypes_the_cpu_kernel_refuses_are_refused(kind, reason) -> None:
    """The fake kernels promote them: both steps were printed as exact where the real step
    fails (and `measure` refuses it)."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory
    from ninlab.errors import NinlabError

    model = _MixedOperands(kind)
    fields = {"input_size": (16,), "optimizer": "sgd", "amp": "bf16"}
    with pytest.raises(NinlabError):
        measure(model, batch_size=2, **fields)
    with pytest.raises(NinlabError, match=reason):
        predict_memory(model, batch_size=2, **fields)


class _LogNormalTail(torch.nn.Module):
    """`log_ndtr` of a linear layer's output: under bf16 autocast a bfloat16 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.log_ndtr(self.linear(x))


def test_a_pointwise_kernel_this_torch_lacks_for_the_dtype_is_refused_as_measure_refuses() -> None:
    """A pointwise op is never probed (it allocates its outputs alone), so a CPU kernel missing
    for bfloat16 (`log_ndtr`'s on torch 2.14.1) went unnoticed: the step the real run refuses
    was printed as exact. Found by running the op once on 0-d tensors of its dtypes."""
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory
    from ninlab.errors import NinlabError

    model = _LogNormalTail()
    fields = {"input_size": (16,), "optimizer": "sgd", "amp": "bf16"}
    try:
        with torch.autocast("cpu", torch.bfloat16):
            torch.special.log_ndtr(torch.zeros(2, dtype=torch.bfloat16))
    except NotImplementedError:
        with pytest.raises(NinlabError) as measured:
            measure(model, batch_size=2, **fields)
        with pytest.raises(NinlabError) as predicted:
            predict_memory(model, batch_size=2, **fields)
        assert str(predicted.value) == str(measured.value)
        assert str(predicted.value).startswith("this PyTorch has no cpu kernel log_ndtr")
    else:  # a torch with the kernel: the step is predicted
        assert predict_memory(model, batch_size=2, **fields).live_trust.kind == "exact"


_AMBIGUOUS_OPS = {
    "add": lambda x, y: (torch.ops.aten.add.Tensor, (x, y)),
    "mul by a number": lambda x, y: (torch.ops.aten.mul.Tensor, (x, 2)),
    "rsub of a number": lambda x, y: (torch.ops.aten.rsub.Scalar, (x, 1)),
    "where": lambda x, y: (torch.ops.aten.where.self, (x > 0, x, y)),
    "sigmoid": lambda x, y: (torch.ops.aten.sigmoid.default, (x,)),
    "hardtanh (relu6)": lambda x, y: (torch.ops.aten.hardtanh.default, (x, 0.0, 6.0)),
}


@pytest.mark.parametrize("op", list(_AMBIGUOUS_OPS))
@pytest.mark.parametrize(
    "shape", [(2, 1, 3, 3), (16, 1, 7, 7), (2, 4, 1, 1), (1, 1, 1, 3), (2, 3, 1, 2)]
)
def test_elementwise_outputs_take_the_cpu_kernels_strides_where_sizes_of_one_blur_layouts(
    op, shape
) -> None:
    """A channels-last tensor with a size of 1 is contiguous too: TensorIterator gives such
    operands contiguous output strides where the fake kernel keeps the channels-last ones, but a
    number operand (`x * 2`) or a kernel that allocates like its input (`hardtanh`) keeps them
    for real too. A one-channel masked convolution weight (`weight * mask`) once ran the
    convolution channels-last in the prediction only: 1.59 of the allocator peak."""
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    y = torch.randn(shape)
    func, args = _AMBIGUOUS_OPS[op](x, y)
    real = func(*args)
    with FakeTensorMode() as mode:
        fakes = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        output = recorder._elementwise_layout(func, fakes, {}, func(*fakes))
    assert output.stride() == real.stride()


class _MaskedConv(torch.nn.Module):
    """PixelCNN's masked convolution on a one-channel image: the weight times a fixed mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 7, padding=3)
        mask = torch.ones_like(self.conv.weight)
        mask[:, :, 3, 3:] = 0
        mask[:, :, 4:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight * self.mask
        return torch.nn.functional.conv2d(x, weight, self.conv.bias, padding=3).mean((2, 3))


def test_a_masked_one_channel_convolution_is_exact_channels_last() -> None:
    from ninlab.analysis.measure import measure
    from ninlab.analysis.predict import predict_memory

    model = _MaskedConv()
    report = predict_memory(
        model, input_size=(1, 8, 8), batch_size=2, memory_format="channels_last"
    )
    measured = measure(model, report.spec, batch_size=2)
    assert report.allocator_trust.exact
    assert report.live_peak_bytes == measured.live_peak_bytes
    assert report.allocator_peak_bytes == measured.allocator_peak_bytes
