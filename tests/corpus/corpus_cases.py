"""The models users bring, at small sizes, and what ninlab makes of each: the corpus.

A `Case` is a model family member built small (torchvision, timm, Hugging Face transformers from
tiny configs, no download; and a zoo of layers written here), its input, and the setups it runs
under (`SETUPS`: float32 SGD and Adam, bf16 autocast, channels-last, inference). `check` predicts
one case under one setup, runs the same step for real with `ninlab.measure` on this machine, and
sorts the outcome into one of `OUTCOMES`:

- exact: both levels say "exact", the live peak equals the measured one and the allocator's is
  within `ALLOCATOR_TOLERANCE` of it;
- flagged: a level says what it is instead ("at least" and at most the measurement; "measured" or
  "estimate" for a step fake tensors cannot run), and holds;
- refused: one `NinlabError` line (from the prediction or the measurement);
- wrong: anything else: a figure labelled exact that is off, a lower bound above the measurement,
  a traceback, or the user's model left changed.

`tests/corpus/test_corpus.py` runs every case; `benchmarks/corpus_tally.py` tallies them.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from layer_zoo import VmapEnsemble
from odd_models import ActNorm, caches_in_a_module_dict
from steps import reentrant_step
from torch import nn
from torch.nn.utils import prune

from ninlab.analysis.measure import measure
from ninlab.analysis.memory_report import ALLOCATOR_TOLERANCE
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import train_step
from ninlab.errors import NinlabError

OUTCOMES = ("exact", "flagged", "refused", "wrong")
BATCH_SIZE = 2
SETUPS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "adam": {"optimizer": "adam"},
    "bf16": {"optimizer": "sgd", "amp": "bf16"},
    "channels-last": {"optimizer": "sgd", "memory_format": "channels_last"},
    "infer": {"mode": "infer"},
}
# Channels-last applies to 4-d inputs (images); the others to every case.
IMAGE_SETUPS = tuple(SETUPS)
OTHER_SETUPS = ("sgd", "adam", "bf16", "infer")


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "layer zoo", "torchvision", "timm", "transformers"
    build: Callable[[], nn.Module]
    input_size: tuple[int, ...] | tuple[tuple[int, ...], ...]
    setups: tuple[str, ...] = OTHER_SETUPS
    input_dtype: torch.dtype | None = None
    input_range: tuple[int, int] = (0, 2)
    step: Callable[..., Any] | None = None
    needs: str = ""  # the package it needs beyond torch ("" none)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    case: str
    family: str
    setup: str
    kind: str  # one of OUTCOMES
    detail: str  # why (the ratios, the refusal, the error)


def available(case: Case) -> bool:
    return not case.needs or importlib.util.find_spec(case.needs) is not None


# -- the layer zoo --------------------------------------------------------------------------------


class _Recurrent(nn.Module):
    """A sequence classifier: a recurrent layer, its last step, a linear head."""

    def __init__(self, kind: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.rnn = kind(16, 24, batch_first=True, **options)
        width = 24 * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _Packed(nn.Module):
    """An LSTM over packed sequences of lengths 12, 11, ... (a padded batch, as users pack it)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.arange(x.shape[1], x.shape[1] - x.shape[0], -1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1])


class _Attention(nn.Module):
    """Self-attention over a sequence, optionally with a key padding mask (the last 3 keys)."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.masked:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, -3:] = True
        out, _ = self.attention(x, x, x, key_padding_mask=mask, need_weights=False)
        return self.head(out.mean(1))


class _Encoder(nn.Module):
    """A two-layer Transformer encoder, optionally with a source key padding mask."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.masked:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, -3:] = True
        return self.head(self.encoder(x, src_key_padding_mask=mask).mean(1))


class _Embedding(nn.Module):
    def __init__(self, bag: bool, sparse: bool = False) -> None:
        super().__init__()
        self.bag = bag
        self.embedding: nn.Module = (
            nn.EmbeddingBag(100, 16, mode="mean", sparse=sparse)
            if bag
            else nn.Embedding(100, 16, sparse=sparse)
        )
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(ids)
        return self.head(embedded if self.bag else embedded.mean(1))


class _Conv(nn.Module):
    """One convolution of any kind, then a pooled linear head."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        return self.head(y.flatten(2).mean(2))


class _TopOneRouting(nn.Module):
    """A mixture of two experts with top-1 routing by `nonzero`: a shape that depends on data."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 2)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            out = out.index_add(0, rows, expert(x[rows]))
        return self.head(out)


def item_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """A step that reads a value (`.item()`), as a loss logger does."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    if loss.item() > 1e9:
        loss = loss * 0.5
    loss.backward()
    optimizer.step()
    return loss


def _linear_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))


def _pruned_net() -> nn.Module:
    """Pruned (`torch.nn.utils.prune`): its `weight` is computed by a forward pre-hook and kept."""
    model = _linear_net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


# Kinds beyond the first zoo (issue 20: layers, steps and inputs nobody had tried), each built
# small: an image body then a pooled head, a sequence body then a mean over time.


class _Pooled(nn.Module):
    """Any image body, ReLU, a global mean and a linear head."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(x)).flatten(2).mean(2))


class _Lambda(nn.Module):
    """A functional op with no module of its own (`F.interpolate`, `F.fold`) after a 1x1
    convolution that gives it a gradient."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(self.conv(x))


def _interpolate(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=1.5, mode="bilinear")


def _fold(x: torch.Tensor) -> torch.Tensor:
    return F.fold(F.unfold(x, 3, padding=1), x.shape[-2:], 3, padding=1)


class _Spectral(nn.Module):
    """A global filter in the frequency domain (`torch.fft.rfft2`, a learned complex weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 16, 9, 2) * 0.1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        spectrum = torch.fft.rfft2(y, norm="ortho") * torch.view_as_complex(self.weight)
        z = torch.fft.irfft2(spectrum, s=y.shape[-2:], norm="ortho")
        return self.head(z.flatten(2).mean(2))


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(16, 16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bilinear(x, x * 2)))


class _Unpool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unpool(*self.pool(self.conv(x)))
        return self.head(y.flatten(2).mean(2))


class _Decoder(nn.Module):
    """A two-layer Transformer decoder over its own input, with a causal mask and a memory mask."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(steps, device=x.device)
        memory_mask = torch.zeros(steps, steps, dtype=torch.bool, device=x.device)
        memory_mask[:, -2:] = True
        out = self.decoder(x, x, tgt_mask=causal, memory_mask=memory_mask, tgt_is_causal=True)
        return self.head(out.mean(1))


class _AttentionWeights(nn.Module):
    """Attention returning its per-head weights, with keys and values of their own widths."""

    def __init__(self) -> None:
        super().__init__()
        self.keys, self.values = nn.Linear(32, 16), nn.Linear(32, 24)
        self.attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=24, batch_first=True)
        self.head = nn.Linear(32 + 4 * 10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attention(
            x, self.keys(x), self.values(x), need_weights=True, average_attn_weights=False
        )
        return self.head(torch.cat([out.mean(1), weights.mean(2).flatten(1)], 1))


class _Checkpointed(nn.Module):
    """Two residual MLP blocks, each recomputed in backward (`torch.utils.checkpoint`)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(2)
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


class _CellLoop(nn.Module):
    """An LSTM cell stepped over time in a Python loop."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(16, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = cell = x.new_zeros(x.shape[0], 24)
        for step in range(x.shape[1]):
            hidden, cell = self.cell(x[:, step], (hidden, cell))
        return self.head(hidden)


class _Sequence(nn.Module):
    """Any sequence body returning (output, state), a mean over time and a linear head."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)[0].mean(1))


def clipped_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """A step that clips the gradients' norm (foreach), as most training loops do."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    return loss


def accumulated_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """Gradient accumulation over two micro-batches."""
    optimizer.zero_grad()
    for micro_inputs, micro_targets in zip(inputs.chunk(2), targets.chunk(2), strict=True):
        (F.cross_entropy(model(micro_inputs), micro_targets) / 2).backward()
    optimizer.step()


def two_optimizers(model: nn.Module) -> tuple[torch.optim.Optimizer, ...]:
    first, *rest = model.parameters()
    return torch.optim.SGD([first], lr=0.1, momentum=0.9), torch.optim.Adam(rest, lr=1e-3)


def two_optimizers_step(
    model: nn.Module, optimizers: Any, inputs: torch.Tensor, targets: Any
) -> Any:
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return loss


def ctc_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """A CTC loss over per-step log-probabilities (a speech recogniser's step)."""
    optimizer.zero_grad()
    log_probs = model(inputs).log_softmax(-1).transpose(0, 1)
    batch, steps = inputs.shape[:2]
    labels = torch.ones(batch, 4, dtype=torch.long)
    loss = F.ctc_loss(
        log_probs,
        labels,
        torch.full((batch,), steps, dtype=torch.long),
        torch.full((batch,), 4, dtype=torch.long),
    )
    loss.backward()
    optimizer.step()
    return loss


# The losses a logging loop keeps: module state the step reaches, left by each call as it was.
LOSS_HISTORY: list[torch.Tensor] = []


def logged_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """A step that appends its detached loss to a history list, as a logging loop does."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    LOSS_HISTORY.append(loss.detach())
    return loss


def averaged_model(model: nn.Module) -> tuple[Any, ...]:
    """SGD, and an exponential moving average of the model (`AveragedModel`, a deep copy)."""
    ema = torch.optim.swa_utils.get_ema_multi_avg_fn(0.99)
    averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema)
    return torch.optim.SGD(model.parameters(), lr=0.1), averaged


def averaged_step(model: nn.Module, optimizers: Any, inputs: torch.Tensor, targets: Any) -> Any:
    optimizer, averaged = optimizers
    loss = train_step(model, optimizer, inputs, targets)
    averaged.update_parameters(model)
    return loss


def frozen_copy(model: nn.Module) -> tuple[Any, ...]:
    """SGD, and a frozen copy of the model moved towards it by hand (its buffers never read)."""
    return torch.optim.SGD(model.parameters(), lr=0.1), copy.deepcopy(model).requires_grad_(False)


def copy_step(model: nn.Module, optimizers: Any, inputs: torch.Tensor, targets: Any) -> Any:
    optimizer, kept = optimizers
    loss = train_step(model, optimizer, inputs, targets)
    with torch.no_grad():
        for average, parameter in zip(kept.parameters(), model.parameters(), strict=True):
            average.lerp_(parameter, 0.01)
    return loss


def penalty_step(model: nn.Module, optimizer: Any, inputs: torch.Tensor, targets: Any) -> Any:
    """A gradient penalty on the input: a double backward (`create_graph=True`)."""
    optimizer.zero_grad()
    inputs = inputs.clone().requires_grad_(True)
    loss = F.cross_entropy(model(inputs), targets)
    (gradient,) = torch.autograd.grad(loss, inputs, create_graph=True)
    (loss + gradient.pow(2).sum()).backward()
    optimizer.step()
    return loss.detach()


class _PerStep(nn.Module):
    """A GRU's per-step class scores (N, T, C): what a CTC loss reads."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 24, batch_first=True)
        self.out = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0])


class _MaxNormEmbedding(nn.Embedding):
    """An embedding renormalised in place to a maximal norm, returning (output, None)."""

    def __init__(self) -> None:
        super().__init__(50, 16, max_norm=1.0, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(ids), None


class _PickedRows(nn.Module):
    """Rows of a parameter picked by index (`index_select`, indexing, `gather`) and a maximum
    along a dim: backward formulas that fill the zeros they make."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(12, 16))
        self.register_buffer("rows", torch.tensor([1, 4, 7, 4, 9]))
        self.register_buffer("cells", torch.randint(0, 12, (5, 16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = self.table.index_select(0, self.rows) + self.table[self.rows]
        picked = picked + torch.gather(self.table, 0, self.cells)
        return x @ picked.t() + self.table.max(dim=0).values @ picked.t()


class _Deformable(nn.Module):
    """torchvision's deformable convolution (a C++ op of another library, whose columns buffer is
    its workspace), its offsets predicted by a convolution."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.offsets = nn.Conv2d(8, 18, 3, padding=1)
        self.deformable = DeformConv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        return self.head(self.deformable(y, self.offsets(y)).mean((2, 3)))


class _Conv1dPooled(nn.Module):
    """A 1-d CNN over time with max pooling, first of its input: CPU's `max_pool1d` makes no
    indices where no gradient is wanted."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool1d(3, 2)
        self.conv = nn.Conv1d(4, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.relu(self.conv(self.pool(x)))).mean(-1))


class _Elementwise(nn.Module):
    """Backward formulas that differ on fake tensors: `torch.maximum`, a clamp between tensors
    and `take` (in place unwatched), a spectrum's magnitude (`abs` of a complex tensor), a
    `masked_scatter` (its backward's blocks depend on the mask's values)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 64)
        self.register_buffer("picked", torch.tensor([3, 17, 40, 63]))
        self.head = nn.Linear(64 + 4 + 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        bounded = torch.maximum(h, h.flip(1)) + torch.clamp(h, h.flip(1) - 1, h.flip(1) + 1)
        taken = h.take(self.picked).expand(h.shape[0], 4)
        magnitude = torch.fft.fft(h).abs()
        scattered = bounded.masked_scatter(h > 0, magnitude)
        return self.head(torch.cat([scattered, taken, magnitude], 1))


class _CumulativeProduct(nn.Module):
    """A cumulative product of gates (a stick-breaking attention's): its backward chooses its
    path by whether the input holds a zero, so the step is an estimate."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.linear(x)).cumprod(1))


class _PlaceholderBuffer(nn.Module):
    """A buffer registered as a placeholder that the first forward replaces by its real size,
    as ConViT's attention does with `rel_indices`."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.register_buffer("scales", torch.zeros(1, 3), persistent=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales.shape[1] != x.shape[1]:
            self.scales = torch.ones(1, x.shape[1])
        return self.head(F.relu(self.linear(x * self.scales)))


def _orthogonal() -> nn.Module:
    """An orthogonal parametrization (`matrix_exp` of a skew-symmetric weight) and a head."""
    return nn.Sequential(
        nn.utils.parametrizations.orthogonal(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 5)
    )


class _Spectrogram(nn.Module):
    """An audio front end: an STFT with a Hann window made in forward, log magnitudes, a
    convolution over time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(17, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(32, device=wave.device)
        spectrum = torch.stft(wave, 32, hop_length=8, window=window, return_complex=True)
        return self.head(F.relu(self.conv(torch.log1p(spectrum.abs()))).mean(-1))


class _SequenceBatchNorm(nn.Module):
    """A `BatchNorm1d` over a transposed sequence, then a linear layer (PatchTST's encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        return self.head(self.embed(h).mean(1))


class _FixedGridSample(nn.Module):
    """A map resampled at random points (a grid no gradient is wanted for)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.rand(x.shape[0], 8, 8, 2, device=x.device) * 2 - 1
        return self.head(F.grid_sample(self.conv(x), grid, align_corners=False).mean((2, 3)))


class _QuantilePooled(nn.Module):
    """Each feature's median over a sequence by `quantile` (a robust pooling), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.quantile(self.embed(x), 0.5, dim=1))


class _FlexAttention(nn.Module):
    """Causal attention by `flex_attention` in eager mode (no `torch.compile`): a higher-order
    operator, which a trace under a dispatch mode cannot run; refused, naming it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        attended = flex_attention(q, k, v, score_mod=_causal_score)
        return self.head(attended.transpose(1, 2).reshape(b, n, 32).mean(1))


def _causal_score(score: torch.Tensor, b: Any, h: Any, query: Any, key: Any) -> torch.Tensor:
    return torch.where(query >= key, score, -float("inf"))


def _quantized_lstm() -> nn.Module:
    """An LSTM classifier dynamically quantized to int8, as deployed: its packed weights are
    TorchScript objects, handed to `quantized_lstm` as they are."""
    return torch.ao.quantization.quantize_dynamic(
        _Recurrent(nn.LSTM), {nn.LSTM, nn.Linear}, dtype=torch.qint8
    )


class _WhereANumber(nn.Module):
    """Scores masked by `torch.where` with a Python number, as attention masks are written."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.linear(x)
        return self.head(torch.where(scores > 0, scores, -1.0).softmax(-1))


_IMAGE = (3, 16, 16)


LAYER_ZOO = (
    Case("lstm", "layer zoo", lambda: _Recurrent(nn.LSTM), (12, 16)),
    Case("gru", "layer zoo", lambda: _Recurrent(nn.GRU), (12, 16)),
    Case(
        "lstm-bidirectional-2",
        "layer zoo",
        lambda: _Recurrent(nn.LSTM, bidirectional=True, num_layers=2),
        (12, 16),
    ),
    Case("lstm-packed", "layer zoo", _Packed, (12, 16)),
    Case("mha", "layer zoo", lambda: _Attention(False), (10, 32)),
    Case("mha-key-padding-mask", "layer zoo", lambda: _Attention(True), (10, 32)),
    Case("transformer-encoder", "layer zoo", lambda: _Encoder(False), (10, 32)),
    Case("transformer-encoder-mask", "layer zoo", lambda: _Encoder(True), (10, 32)),
    Case(
        "embedding",
        "layer zoo",
        lambda: _Embedding(False),
        (12,),
        input_dtype=torch.long,
        input_range=(0, 100),
    ),
    Case(
        "embedding-bag-sparse",
        "layer zoo",
        lambda: _Embedding(True, sparse=True),
        (12,),
        setups=("sgd", "infer"),
        input_dtype=torch.long,
        input_range=(0, 100),
    ),
    Case("conv1d", "layer zoo", lambda: _Conv(nn.Conv1d(4, 8, 3), 8), (4, 32)),
    Case(
        "conv2d-dilated",
        "layer zoo",
        lambda: _Conv(nn.Conv2d(8, 16, 3, dilation=2), 16),
        (8, 20, 20),
        setups=IMAGE_SETUPS,
    ),
    Case(
        "conv2d-transposed",
        "layer zoo",
        lambda: _Conv(nn.ConvTranspose2d(8, 16, 4, stride=2), 16),
        (8, 10, 10),
        setups=IMAGE_SETUPS,
    ),
    Case(
        "conv2d-grouped",
        "layer zoo",
        lambda: _Conv(nn.Conv2d(8, 16, 3, groups=4), 16),
        (8, 16, 16),
        setups=IMAGE_SETUPS,
    ),
    Case("conv3d", "layer zoo", lambda: _Conv(nn.Conv3d(3, 8, 3), 8), (3, 6, 12, 12)),
    Case("top1-routing-nonzero", "layer zoo", _TopOneRouting, (16,)),
    Case("step-with-item", "layer zoo", _linear_net, (16,), setups=("sgd",), step=item_step),
    # -- layers, steps and inputs beyond the first zoo (issue 20) --
    Case(
        "conv-reflect-padding",
        "layer zoo",
        lambda: _Pooled(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), 8),
        _IMAGE,
        setups=("sgd", "channels-last"),
    ),
    Case(
        "conv3d-transposed-output-padding",
        "layer zoo",
        lambda: _Pooled(nn.ConvTranspose3d(3, 4, 3, stride=2, output_padding=1), 4),
        (3, 4, 6, 6),
        setups=("sgd",),
    ),
    Case(
        "pixel-unshuffle-conv",
        "layer zoo",
        lambda: _Pooled(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3)), 8),
        _IMAGE,
        setups=("sgd", "infer"),
    ),
    Case(
        "upsample-bilinear",
        "layer zoo",
        lambda: _Pooled(
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.Upsample(scale_factor=2, mode="bilinear")), 8
        ),
        _IMAGE,
        setups=("sgd", "infer"),
    ),
    Case(
        "interpolate-by-1.5",
        "layer zoo",
        lambda: _Pooled(_Lambda(_interpolate), 8),
        _IMAGE,
        setups=("sgd", "infer"),
    ),
    Case("fold-unfold", "layer zoo", lambda: _Pooled(_Lambda(_fold), 8), _IMAGE, ("sgd", "infer")),
    Case("fft-global-filter", "layer zoo", _Spectral, _IMAGE, setups=("sgd", "infer")),
    Case("bilinear", "layer zoo", _Bilinear, (16,), setups=("sgd", "bf16")),
    Case(
        "groupnorm",
        "layer zoo",
        lambda: _Pooled(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), 8),
        _IMAGE,
        setups=("bf16", "channels-last"),
    ),
    Case(
        "local-response-norm",
        "layer zoo",
        lambda: _Pooled(nn.Sequential(nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(3)), 8),
        _IMAGE,
        setups=("sgd",),
    ),
    Case("max-unpool", "layer zoo", _Unpool, _IMAGE, setups=("sgd", "bf16")),
    Case("transformer-decoder-causal", "layer zoo", _Decoder, (8, 32), setups=("sgd", "infer")),
    Case("mha-head-weights-kdim-vdim", "layer zoo", _AttentionWeights, (10, 32), ("sgd", "infer")),
    Case("checkpoint", "layer zoo", lambda: _Checkpointed(False), (16,), setups=("sgd",)),
    Case("checkpoint-reentrant", "layer zoo", lambda: _Checkpointed(True), (16,), ("sgd",)),
    Case("lstm-cell-loop", "layer zoo", _CellLoop, (6, 16), setups=("sgd",)),
    Case(
        "rnn-relu-2-dropout",
        "layer zoo",
        lambda: _Sequence(nn.RNN(16, 24, 2, "relu", dropout=0.2, batch_first=True), 24),
        (10, 16),
        setups=("sgd",),
    ),
    Case(
        "embedding-max-norm",
        "layer zoo",
        lambda: _Sequence(_MaxNormEmbedding(), 16),
        (12,),
        setups=("sgd",),
        input_dtype=torch.long,
        input_range=(0, 50),
    ),
    Case("step-clip-grad-norm", "layer zoo", _linear_net, (16,), ("adam",), step=clipped_step),
    Case("step-accumulate", "layer zoo", _linear_net, (16,), ("sgd",), step=accumulated_step),
    Case(
        "step-two-optimizers",
        "layer zoo",
        _linear_net,
        (16,),
        setups=("sgd",),
        step=two_optimizers_step,
        extra={"optimizer": two_optimizers},
    ),
    Case("step-ctc-loss", "layer zoo", _PerStep, (10, 16), setups=("sgd",), step=ctc_step),
    # Steps, optimizers and their state beyond the setups (issue 20).
    Case("step-loss-history", "layer zoo", _linear_net, (16,), ("sgd", "adam"), step=logged_step),
    Case("step-gradient-penalty", "layer zoo", _linear_net, (16,), ("adam",), step=penalty_step),
    Case("pruned-linear", "layer zoo", _pruned_net, (16,), setups=("sgd", "infer")),
    Case(
        "step-reentrant-checkpoint", "layer zoo", _linear_net, (16,), ("sgd",), step=reentrant_step
    ),
    Case(
        "step-ema-averaged-model",
        "layer zoo",
        _linear_net,
        (16,),
        setups=("sgd",),
        step=averaged_step,
        extra={"optimizer": averaged_model},
    ),
    Case(
        "step-ema-frozen-copy",
        "layer zoo",
        lambda: _Pooled(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 8),
        _IMAGE,
        setups=("sgd",),
        step=copy_step,
        extra={"optimizer": frozen_copy},
    ),
    Case(
        "optimizer-rmsprop-centered",
        "layer zoo",
        _linear_net,
        (16,),
        setups=("sgd",),
        extra={"optimizer": "rmsprop:momentum=0.9,centered=true"},
    ),
    Case(
        "optimizer-adamw-fused",
        "layer zoo",
        _linear_net,
        (16,),
        setups=("sgd",),
        extra={"optimizer": "adamw:implementation=fused,weight_decay=0.01"},
    ),
    Case(
        "batch-norm-on-the-input",
        "layer zoo",
        lambda: _Pooled(nn.BatchNorm2d(3), 3),
        _IMAGE,
        setups=("sgd", "adam", "channels-last"),
    ),
    Case("rows-picked-by-index", "layer zoo", _PickedRows, (16,), setups=("sgd", "adam")),
    # -- found by the red-team probe (issue 20, second round) --
    Case(
        "deformable-conv",
        "layer zoo",
        _Deformable,
        _IMAGE,
        setups=("sgd", "infer"),
        needs="torchvision",
    ),
    Case("conv1d-max-pool", "layer zoo", _Conv1dPooled, (4, 40), setups=("sgd", "infer")),
    Case("elementwise-backwards", "layer zoo", _Elementwise, (16,), setups=("sgd", "infer")),
    Case("cumulative-product", "layer zoo", _CumulativeProduct, (16,), setups=("sgd",)),
    Case("placeholder-buffer", "layer zoo", _PlaceholderBuffer, (16,), setups=("infer",)),
    Case(
        "selu-hardswish-channels-last",
        "layer zoo",
        lambda: _Pooled(
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.SELU(), nn.Conv2d(8, 8, 3), nn.Hardswish()), 8
        ),
        _IMAGE,
        setups=("channels-last",),
    ),
    Case(
        "strided-1x1-stem",
        "layer zoo",
        lambda: _Pooled(nn.Conv2d(3, 16, 1, stride=2), 16),
        (3, 32, 32),
        setups=("sgd", "channels-last", "infer"),
    ),
    # -- found by the model-family probe (issue 20, third round) --
    Case("orthogonal-parametrization", "layer zoo", _orthogonal, (16,), setups=("sgd", "infer")),
    Case("stft-hann-window", "layer zoo", _Spectrogram, (256,), setups=("sgd", "infer")),
    Case("batchnorm-transposed-sequence", "layer zoo", _SequenceBatchNorm, (12, 16), ("infer",)),
    Case("grid-sample-fixed-grid", "layer zoo", _FixedGridSample, _IMAGE, setups=("bf16",)),
    # -- found by the silent-error probe (issue 20, fourth round) --
    Case("quantile-pooling", "layer zoo", _QuantilePooled, (12, 16), setups=("infer",)),
    # -- found by the red-model probe (issue 20, fourth round) --
    Case("lstm-quantized-dynamic", "layer zoo", _quantized_lstm, (12, 16), setups=("infer",)),
    Case("flex-attention-eager", "layer zoo", _FlexAttention, (8, 32), setups=("infer",)),
    # -- found by the step probe (issue 20, fourth round) --
    Case("where-a-number", "layer zoo", _WhereANumber, (16,), setups=("sgd", "infer")),
    Case("module-dict-cache", "layer zoo", caches_in_a_module_dict, (8,), setups=("sgd",)),
)


# -- torchvision, timm, transformers --------------------------------------------------------------


def _torchvision(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **options)

    return build


def _torchvision_class(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(**options)

    return build


TORCHVISION = tuple(
    Case(name, "torchvision", build, size, setups=setups, needs="torchvision")
    for name, build, size, setups in (
        ("resnet18", _torchvision("resnet18", num_classes=10), (3, 32, 32), ("sgd", "infer")),
        (
            "mobilenet_v3_small",
            _torchvision("mobilenet_v3_small", num_classes=10),
            (3, 32, 32),
            IMAGE_SETUPS,
        ),
        (
            "efficientnet_b0",
            _torchvision("efficientnet_b0", num_classes=10),
            (3, 32, 32),
            ("sgd", "bf16"),
        ),
        (
            "squeezenet1_1",
            _torchvision("squeezenet1_1", num_classes=10),
            (3, 64, 64),
            ("sgd", "channels-last"),
        ),
        (
            "shufflenet_v2_x0_5",
            _torchvision("shufflenet_v2_x0_5", num_classes=10),
            (3, 32, 32),
            ("adam", "infer"),
        ),
        ("regnet_x_400mf", _torchvision("regnet_x_400mf", num_classes=10), (3, 32, 32), ("sgd",)),
        ("mnasnet0_5", _torchvision("mnasnet0_5", num_classes=10), (3, 32, 32), ("bf16",)),
        ("densenet121", _torchvision("densenet121", num_classes=10), (3, 32, 32), ("infer",)),
        (
            "vit-tiny",
            _torchvision_class(
                "VisionTransformer",
                image_size=32,
                patch_size=8,
                num_layers=2,
                num_heads=2,
                hidden_dim=32,
                mlp_dim=64,
                num_classes=10,
            ),
            (3, 32, 32),
            IMAGE_SETUPS,
        ),
        (
            "swin-tiny",
            _torchvision_class(
                "SwinTransformer",
                patch_size=[4, 4],
                embed_dim=16,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=[4, 4],
                num_classes=10,
            ),
            (3, 32, 32),
            OTHER_SETUPS,
        ),
        (
            "lraspp_mobilenet_v3_large",
            _torchvision("lraspp_mobilenet_v3_large", num_classes=3, weights_backbone=None),
            (3, 64, 64),
            ("sgd", "infer"),
        ),
        (
            "deeplabv3_mobilenet_v3_large",
            _torchvision(
                "deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone=None, aux_loss=False
            ),
            (3, 64, 64),
            ("sgd", "infer"),
        ),
        ("r3d_18", _torchvision("r3d_18", num_classes=5), (3, 4, 32, 32), ("infer",)),
        (
            "fasterrcnn_mobilenet_v3_large_320_fpn",
            _torchvision(
                "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, weights_backbone=None
            ),
            (3, 64, 64),
            ("sgd", "infer"),
        ),
    )
)


def _timm(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **options)

    return build


TIMM = tuple(
    Case(name, "timm", _timm(name, **options), size, setups=setups, needs="timm")
    for name, options, size, setups in (
        ("resnet10t", {}, (3, 32, 32), ("sgd", "channels-last")),
        ("mobilenetv3_small_050", {}, (3, 32, 32), IMAGE_SETUPS),
        ("convnext_atto", {}, (3, 32, 32), ("sgd", "infer")),
        ("vit_tiny_patch16_224", {"img_size": 32}, (3, 32, 32), ("sgd", "infer")),
        ("pvt_v2_b0", {}, (3, 32, 32), ("sgd",)),
        ("regnetx_002", {}, (3, 32, 32), ("adam",)),
    )
)


# -- families beyond the first corpus: video, detection, optical flow, timm's other families ------
# Each built at its smallest (few channels, one block a stage) on a small input.


def _timm_class(module: str, name: str, **options: Any) -> Callable[[], nn.Module]:
    """A timm architecture built from its class with a tiny configuration (timm's registered
    variants are all too large for a corpus that runs in CI)."""

    def build() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"timm.models.{module}"), name)(
            num_classes=10, **options
        )

    return build


def _mlp_mixer(kind: str) -> Callable[[], nn.Module]:
    """An all-MLP network (MLP-Mixer, gMLP's spatial gating, ResMLP's affine blocks) at two
    blocks over 16 patches: timm's registered variants fix their sizes."""

    def build() -> nn.Module:
        from timm.layers import GatedMlp
        from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock

        blocks = {
            "mixer": {},
            "gmlp": {"block_layer": SpatialGatingBlock, "mlp_layer": GatedMlp, "mlp_ratio": 6},
            "resmlp": {"block_layer": ResBlock, "norm_layer": Affine, "mlp_ratio": 4},
        }[kind]
        return MlpMixer(
            num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, **blocks
        )

    return build


def _nfnet() -> nn.Module:
    """A normalizer-free network (weight-standardised convolutions, no batch norm)."""
    from timm.models.nfnet import NfCfg, NormFreeNet

    return NormFreeNet(NfCfg(depths=(1, 1, 1, 1), channels=(16, 32, 48, 64)), num_classes=10)


class _OpticalFlow(nn.Module):
    """RAFT as a user calls it: two frames in, the last of two flow estimates out."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.raft = torchvision.models.optical_flow.raft_small(weights=None)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.raft(first, second, num_flow_updates=2)[-1]


WIDER = (
    *(
        Case(name, "torchvision", build, size, setups=setups, needs="torchvision")
        for name, build, size, setups in (
            ("mc3_18", _torchvision("mc3_18", num_classes=5), (3, 4, 32, 32), ("sgd", "bf16")),
            ("r2plus1d_18", _torchvision("r2plus1d_18", num_classes=5), (3, 4, 32, 32), ("infer",)),
            ("s3d", _torchvision("s3d", num_classes=5), (3, 4, 32, 32), ("infer",)),
            (
                "ssdlite320_mobilenet_v3_large",
                _torchvision("ssdlite320_mobilenet_v3_large", num_classes=3, weights_backbone=None),
                (3, 64, 64),
                ("sgd", "infer"),
            ),
            ("raft_small", _OpticalFlow, ((3, 128, 128), (3, 128, 128)), ("sgd", "infer")),
        )
    ),
    *(
        Case(name, "timm", build, size, setups=setups, needs="timm")
        for name, build, size, setups in (
            ("mobilevit_xxs", _timm("mobilevit_xxs"), (3, 64, 64), ("sgd", "bf16", "infer")),
            (
                "levit-tiny",
                _timm_class(
                    "levit",
                    "Levit",
                    img_size=64,
                    embed_dim=(32, 48, 64),
                    key_dim=8,
                    depth=(1, 1, 1),
                    num_heads=(1, 2, 2),
                ),
                (3, 64, 64),
                ("sgd", "infer"),
            ),
            (
                "efficientformer-tiny",
                _timm_class(
                    "efficientformer",
                    "EfficientFormer",
                    depths=(1, 1, 1, 1),
                    embed_dims=(16, 24, 32, 48),
                    num_vit=1,
                ),
                (3, 224, 224),  # its attention's bias is laid out for a 7x7 map
                ("sgd", "channels-last"),
            ),
            (
                "poolformer-tiny",
                _timm_class("metaformer", "MetaFormer", depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)),
                (3, 64, 64),
                ("adam", "infer"),
            ),
            (
                "convmixer-tiny",
                _timm_class("convmixer", "ConvMixer", dim=32, depth=2, kernel_size=5, patch_size=4),
                (3, 32, 32),
                ("sgd", "bf16", "channels-last"),
            ),
            *(
                (f"{kind}-tiny", _mlp_mixer(kind), (3, 32, 32), ("sgd", "infer"))
                for kind in ("mixer", "gmlp", "resmlp")
            ),
            ("nfnet-tiny", _nfnet, (3, 32, 32), ("sgd", "bf16")),
            ("cs3darknet_focus_s", _timm("cs3darknet_focus_s"), (3, 32, 32), ("sgd",)),
            ("dla46_c", _timm("dla46_c"), (3, 32, 32), ("sgd", "channels-last")),
            ("ghostnet_050", _timm("ghostnet_050"), (3, 32, 32), ("adam", "infer")),
            (
                "xcit-tiny",
                _timm("xcit_nano_12_p16_224", img_size=32, patch_size=8, depth=2),
                (3, 32, 32),
                ("sgd", "infer"),
            ),
            (
                "coat-lite-tiny",
                _timm_class(
                    "coat",
                    "CoaT",
                    img_size=32,
                    patch_size=4,
                    embed_dims=(16, 32, 48, 64),
                    serial_depths=(1, 1, 1, 1),
                    num_heads=8,  # its convolutional position encoding splits 8 heads 2/3/3
                ),
                (3, 32, 32),
                ("sgd", "infer"),
            ),
            ("maxvit_pico", _timm("maxvit_pico_rw_256", img_size=64), (3, 64, 64), ("sgd",)),
            (
                "convit-tiny",
                _timm_class(
                    "convit",
                    "ConVit",
                    img_size=32,
                    patch_size=8,
                    embed_dim=32,
                    depth=2,
                    num_heads=2,
                    local_up_to_layer=1,
                ),
                (3, 32, 32),
                ("infer",),
            ),
            (
                "fastvit-tiny",
                _timm_class(
                    "fastvit",
                    "FastVit",
                    layers=(1, 1, 1, 1),
                    embed_dims=(16, 32, 64, 128),
                    mlp_ratios=(2, 2, 2, 2),
                ),
                (3, 64, 64),
                ("infer",),
            ),
        )
    ),
)


class _Seq2Seq(nn.Module):
    """An encoder-decoder language model as a user trains it: the ids in, shifted by the model
    for the decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, decoder_input_ids=ids).logits


def _transformers(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as hf

        torch.manual_seed(0)
        small = {"vocab_size": 100}
        if kind == "gpt2":
            return hf.GPT2LMHeadModel(
                hf.GPT2Config(
                    n_layer=2, n_embd=32, n_head=2, n_positions=32, use_cache=False, **small
                )
            )
        if kind == "bert":
            return hf.BertForSequenceClassification(
                hf.BertConfig(
                    num_hidden_layers=2,
                    hidden_size=32,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=32,
                    num_labels=5,
                    **small,
                )
            )
        if kind == "llama":
            return hf.LlamaForCausalLM(
                hf.LlamaConfig(
                    num_hidden_layers=2,
                    hidden_size=32,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    intermediate_size=64,
                    max_position_embeddings=32,
                    use_cache=False,
                    **small,
                )
            )
        if kind == "t5":
            return _Seq2Seq(
                hf.T5ForConditionalGeneration(
                    hf.T5Config(
                        num_layers=1,
                        num_decoder_layers=1,
                        d_model=32,
                        d_ff=64,
                        num_heads=2,
                        d_kv=16,
                        use_cache=False,
                        **small,
                    )
                )
            )
        return hf.ViTForImageClassification(
            hf.ViTConfig(
                image_size=32,
                patch_size=8,
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=5,
            )
        )

    return build


TRANSFORMERS = (
    *(
        Case(
            kind,
            "transformers",
            _transformers(kind),
            (16,),
            input_dtype=torch.long,
            input_range=(0, 100),
            needs="transformers",
        )
        for kind in ("gpt2", "bert", "llama", "t5")
    ),
    Case("vit", "transformers", _transformers("vit"), (3, 32, 32), needs="transformers"),
)

# -- more Hugging Face families, from tiny configs, called by keyword as users call them ----------


def _hugging_face(kind: str) -> Callable[[], nn.Module]:
    """A tiny model of a transformers family, built from its config (no download)."""

    def build() -> nn.Module:
        import transformers as hf

        torch.manual_seed(0)
        width = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
        layers = {"num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 32}
        models = {
            "bert-masked": (
                hf.BertForSequenceClassification,
                hf.BertConfig,
                {**layers, **width, "num_labels": 5},
            ),
            "bart": (
                hf.BartForConditionalGeneration,
                hf.BartConfig,
                {
                    "d_model": 32,
                    "encoder_layers": 1,
                    "decoder_layers": 1,
                    "encoder_attention_heads": 2,
                    "decoder_attention_heads": 2,
                    "encoder_ffn_dim": 64,
                    "decoder_ffn_dim": 64,
                    "vocab_size": 100,
                    "max_position_embeddings": 32,
                    "use_cache": False,
                },
            ),
            "opt": (
                hf.OPTForCausalLM,
                hf.OPTConfig,
                {
                    **layers,
                    "hidden_size": 32,
                    "num_attention_heads": 2,
                    "ffn_dim": 64,
                    "word_embed_proj_dim": 32,
                    "use_cache": False,
                },
            ),
            "gpt-neox": (
                hf.GPTNeoXForCausalLM,
                hf.GPTNeoXConfig,
                {**layers, **width, "use_cache": False},
            ),
            "mistral": (
                hf.MistralForCausalLM,
                hf.MistralConfig,
                {
                    **layers,
                    **width,
                    "num_key_value_heads": 1,
                    "sliding_window": 8,
                    "use_cache": False,
                },
            ),
            "reformer": (
                hf.ReformerModelWithLMHead,
                hf.ReformerConfig,
                {
                    "vocab_size": 100,
                    "hidden_size": 32,
                    "num_attention_heads": 2,
                    "attention_head_size": 16,
                    "feed_forward_size": 64,
                    "attn_layers": ["local", "lsh"],
                    "axial_pos_embds": False,
                    "max_position_embeddings": 32,
                    "is_decoder": True,
                    "local_attn_chunk_length": 8,
                    "lsh_attn_chunk_length": 8,
                    "num_buckets": 2,
                    "use_cache": False,
                },
            ),
            # a mixture of experts: its experts multiply through `torch._grouped_mm` on CPU
            "mixtral": (
                hf.MixtralForCausalLM,
                hf.MixtralConfig,
                {
                    **layers,
                    **width,
                    "num_key_value_heads": 1,
                    "num_local_experts": 4,
                    "num_experts_per_tok": 2,
                    "use_cache": False,
                },
            ),
            "qwen2": (
                hf.Qwen2ForCausalLM,
                hf.Qwen2Config,
                {**layers, **width, "num_key_value_heads": 1, "use_cache": False},
            ),
            "roberta": (
                hf.RobertaForSequenceClassification,
                hf.RobertaConfig,
                {**layers, **width, "num_labels": 5, "max_position_embeddings": 40},
            ),
            "beit": (
                hf.BeitForImageClassification,
                hf.BeitConfig,
                {
                    **width,
                    "num_hidden_layers": 1,
                    "image_size": 32,
                    "patch_size": 8,
                    "num_labels": 5,
                    "use_relative_position_bias": True,
                },
            ),
            "distilbert": (
                hf.DistilBertForSequenceClassification,
                hf.DistilBertConfig,
                {
                    "n_layers": 2,
                    "dim": 32,
                    "n_heads": 2,
                    "hidden_dim": 64,
                    "vocab_size": 100,
                    "max_position_embeddings": 32,
                    "num_labels": 5,
                },
            ),
        }
        model_class, config_class, fields = models[kind]
        return model_class(config_class(**fields))

    return build


_TOKENS = (0, 100)
_ALL_ONES = (1, 2)  # an attention mask without padding


def _lm(
    kind: str, *, mask: tuple[int, int] = _ALL_ONES, setups: tuple[str, ...] = OTHER_SETUPS
) -> Case:
    """A causal LM called with input_ids, attention_mask and labels (its own loss)."""
    return Case(
        kind,
        "transformers",
        _hugging_face(kind),
        {"input_ids": (16,), "attention_mask": (16,), "labels": (16,)},  # type: ignore[arg-type]
        setups,
        input_dtype=torch.long,
        input_range=(  # type: ignore[arg-type] # one range per input
            _TOKENS,
            mask,
            _TOKENS,
        ),
        needs="transformers",
    )


HUGGING_FACE = (
    Case(
        "bert-masked",
        "transformers",
        _hugging_face("bert-masked"),
        {"input_ids": (16,), "attention_mask": (16,), "labels": ()},  # type: ignore[arg-type]
        input_dtype=torch.long,
        input_range=(  # type: ignore[arg-type] # one range per input
            _TOKENS,
            (0, 2),
            (0, 5),
        ),
        needs="transformers",
    ),
    Case(
        "roberta",
        "transformers",
        _hugging_face("roberta"),
        {"input_ids": (16,), "attention_mask": (16,)},  # type: ignore[arg-type]
        input_dtype=torch.long,
        input_range=(  # type: ignore[arg-type] # one range per input
            (2, 100),
            _ALL_ONES,
        ),
        needs="transformers",
    ),
    Case(
        "distilbert",
        "transformers",
        _hugging_face("distilbert"),
        {"input_ids": (16,), "attention_mask": (16,)},  # type: ignore[arg-type]
        input_dtype=torch.long,
        input_range=(  # type: ignore[arg-type] # one range per input
            _TOKENS,
            (0, 2),
        ),
        needs="transformers",
    ),
    Case(
        "bart",
        "transformers",
        _hugging_face("bart"),
        {"input_ids": (16,), "attention_mask": (16,), "labels": (16,)},  # type: ignore[arg-type]
        input_dtype=torch.long,
        input_range=(  # type: ignore[arg-type] # one range per input
            _TOKENS,
            _ALL_ONES,
            _TOKENS,
        ),
        needs="transformers",
    ),
    # Its relative position index is cached by `lru_cache`, shared by every instance.
    Case(
        "beit",
        "transformers",
        _hugging_face("beit"),
        (3, 32, 32),
        ("sgd", "infer"),
        needs="transformers",
    ),
    _lm("opt"),
    _lm("gpt-neox"),
    _lm("mistral"),
    _lm("qwen2", mask=(0, 2)),
    # Its experts multiply by `F.grouped_mm`, whose fake kernel refused float32.
    _lm("mixtral", setups=("sgd", "infer")),
    # Reversible layers: its backward recomputes each and calls backward inside its own.
    Case(
        "reformer",
        "transformers",
        _hugging_face("reformer"),
        {"input_ids": (16,), "labels": (16,)},  # type: ignore[arg-type]
        ("sgd",),
        input_dtype=torch.long,
        input_range=(_TOKENS, _TOKENS),  # type: ignore[arg-type] # one range per input
        needs="transformers",
    ),
)

CASES = (*LAYER_ZOO, *TORCHVISION, *TIMM, *WIDER, *TRANSFORMERS, *HUGGING_FACE)


# -- one case under one setup ---------------------------------------------------------------------


def spec_fields(case: Case, setup: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"input_size": case.input_size, **SETUPS[setup], **case.extra}
    if case.input_dtype is not None:
        fields.update(input_dtype=case.input_dtype, input_range=case.input_range)
    if case.step is not None:
        fields["step"] = case.step
    return fields


def _state(model: nn.Module) -> tuple[Any, ...]:
    """What a call must leave as it was: every tensor of the state dict (what else it holds, a
    quantized layer's packed weights, as printed), which need grad, the mode, and the forward
    hooks."""
    tensors = {
        # A sparse tensor compared by its dense values (`torch.equal` takes strided ones only).
        name: _dense(value.detach()).clone() if isinstance(value, torch.Tensor) else repr(value)
        for name, value in model.state_dict().items()
    }
    flags = tuple((name, p.requires_grad) for name, p in model.named_parameters())
    modes = tuple(module.training for module in model.modules())
    return tensors, flags, modes


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.layout == torch.strided else tensor.to_dense()


def _changed(model: nn.Module, before: tuple[Any, ...]) -> str:
    tensors, flags, modes = _state(model)
    old_tensors, old_flags, old_modes = before
    if tensors.keys() != old_tensors.keys():
        return "its state dict's keys changed"
    for name, tensor in tensors.items():
        old = old_tensors[name]
        if isinstance(old, str):
            if tensor != old:
                return f"{name} changed"
            continue
        if type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter):
            return f"{name} is now a {type(tensor).__name__}"
        if tensor.shape != old.shape or tensor.dtype != old.dtype or not torch.equal(tensor, old):
            return f"{name} changed"
    if flags != old_flags:
        return "requires_grad changed"
    if modes != old_modes:
        return "train/eval modes changed"
    return ""


def check(case: Case, setup: str) -> Outcome:
    """Predict `case` under `setup` at `BATCH_SIZE`, measure the same step, and sort the outcome."""

    def outcome(kind: str, detail: str) -> Outcome:
        return Outcome(case.name, case.family, setup, kind, detail)

    torch.manual_seed(0)
    random.seed(0)
    model = case.build()
    before = _state(model)
    fields = spec_fields(case, setup)
    try:
        report = predict_memory(model, batch_size=BATCH_SIZE, **fields)
        changed = _changed(model, before)
        if changed:
            return outcome("wrong", f"the model was left changed by the prediction: {changed}")
        measured = measure(model, report.spec, batch_size=BATCH_SIZE)
    except NinlabError as error:
        changed = _changed(model, before)
        if changed:
            return outcome("wrong", f"refused, and left the model changed: {changed}")
        return outcome("refused", str(error))
    except Exception as error:  # noqa: BLE001 - a traceback is the finding
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return outcome(
            "wrong", f"traceback: {type(error).__name__}: {error} ({frame.filename}:{frame.lineno})"
        )
    changed = _changed(model, before)
    if changed:
        return outcome("wrong", f"the model was left changed: {changed}")
    live_ratio = report.live_peak_bytes / measured.live_peak_bytes
    allocator_ratio = report.allocator_peak_bytes / measured.allocator_peak_bytes
    ratios = (
        f"live {live_ratio:.4f}, allocator {allocator_ratio:.4f}; predicted "
        f"{report.live_peak_bytes:,} / {report.allocator_peak_bytes:,}, measured "
        f"{measured.live_peak_bytes:,} / {measured.allocator_peak_bytes:,} bytes"
    )
    live, allocator = report.live_trust, report.allocator_trust
    problems = []
    if live.kind in ("exact", "measured") and report.live_peak_bytes != measured.live_peak_bytes:
        problems.append(f"live peak labelled {live.kind} is off")
    within = abs(allocator_ratio - 1) <= ALLOCATOR_TOLERANCE
    if allocator.kind in ("exact", "measured") and not within:
        problems.append(f"allocator peak labelled {allocator.kind} is off by more than 1%")
    if allocator.kind == "at least" and allocator_ratio > 1 + ALLOCATOR_TOLERANCE:
        problems.append("allocator lower bound is above the measurement")
    if problems:
        return outcome("wrong", f"{'; '.join(problems)} ({ratios})")
    if live.exact and allocator.exact:
        return outcome("exact", ratios)
    return outcome("flagged", f"{ratios}; live {live.kind}, allocator {allocator.kind}")


# -- fallback (issue 20): an ensemble run at once under torch.func.vmap ----------------------------

CASES = (*CASES, Case("vmap-ensemble", "layer zoo", VmapEnsemble, (16,)))


# -- branch dtypes: mixed dtypes and reduced-precision kernels (issue 20) ------------------------


class _FullPrecisionNorm(nn.Module):
    """A bf16 model that layer-norms `x.float()` with its bf16 parameters: the CPU kernel refuses
    the mix its fake kernel promotes (was predicted as exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(self.linear(x).float(), (32,), self.norm.weight, self.norm.bias)
        return self.head(h.to(torch.bfloat16))


def _bf16_sum_bag() -> nn.Module:
    # The CPU kernel sums a bf16 bag by its fast path, with no offset2bag (+72 B live before).
    return nn.Sequential(nn.EmbeddingBag(50, 8, mode="sum"), nn.Linear(8, 10)).to(torch.bfloat16)


class _InstanceNormed(nn.Module):
    """Instance norm without parameters: a training batch norm without running statistics,
    whose mean and variance sums the rule missed (inference allocator 0.989)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.instance_norm(self.linear(x).view(-1, 4, 2, 4))
        return self.head(h.flatten(1))


class _PickedInHalf(nn.Module):
    """`take_along_dim` (a gather) in a bf16 model: the CPU kernel gathers through a float32
    copy, and its backward scatter_adds into one (0.87 to 0.91 of the allocator peak before)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 64)
        self.head = nn.Linear(16, 10)
        self.register_buffer("picked", torch.arange(0, 64, 4))
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        picked = self.picked.expand(h.shape[0], -1)
        return self.head(torch.take_along_dim(h, picked, 1))


class _FrozenWindowSpectrogram(nn.Module):
    """An STFT whose Hann window is a frozen parameter: the copy `measure` runs clones it onto
    a storage of its own 8 elements (predicted 4 B over before)."""

    def __init__(self) -> None:
        super().__init__()
        self.window = nn.Parameter(torch.hann_window(8), requires_grad=False)
        self.head = nn.Linear(5 * 17, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(x, 8, hop_length=2, window=self.window, return_complex=True)
        return self.head(spectrum.abs().flatten(1))


DTYPES = (
    Case("full-precision-norm", "layer zoo", _FullPrecisionNorm, (16,), setups=("sgd", "infer")),
    Case(
        "bf16-sum-bag",
        "layer zoo",
        _bf16_sum_bag,
        (12,),
        setups=("sgd", "infer"),
        input_dtype=torch.long,
        input_range=(0, 50),
    ),
    Case("instance-norm", "layer zoo", _InstanceNormed, (16,)),
    Case("bf16-take-along", "layer zoo", _PickedInHalf, (16,), setups=("sgd", "infer")),
    Case("frozen-window-stft", "layer zoo", _FrozenWindowSpectrogram, (32,)),
)
CASES = (*CASES, *DTYPES)


# -- redteam: the round's finds ----------------------------------------------------------------


class _MaskedConv(nn.Module):
    """PixelCNN's masked convolutions on a one-channel image (the weight times a fixed mask, a
    buffer): `weight * mask` is contiguous in both layouts, and the fake kernel kept it
    channels-last where the CPU kernel's is contiguous (1.59 of the allocator peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 16, 7, padding=3), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        for conv in (self.first, self.second):
            mask = torch.ones_like(conv.weight)
            middle = conv.kernel_size[0] // 2
            mask[:, :, middle, middle:] = 0
            mask[:, :, middle + 1 :] = 0
            conv.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.first, self.second):
            x = F.relu(F.conv2d(x, conv.weight * conv.mask, conv.bias, padding=conv.padding))
        return self.head(x).mean((2, 3))


def _normalised(norm: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), norm(), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)
    )


class _SparseGraph(nn.Module):
    """A graph convolution over a sparse adjacency buffer (refused: its bytes were counted as one
    element's, and the measurement had no storage to read)."""

    def __init__(self) -> None:
        super().__init__()
        index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 1, 2], [1, 2, 3, 4, 5, 6, 7, 0, 0, 1]])
        self.register_buffer("adjacency", torch.sparse_coo_tensor(index, torch.ones(10), (8, 8)))
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.stack([torch.sparse.mm(self.adjacency, self.first(g)) for g in x])
        return self.second(F.relu(mixed)).mean(1)


REDTEAM = (
    Case("graph-sparse-adjacency", "layer zoo", _SparseGraph, (8, 16), ("sgd", "infer")),
    Case("pixelcnn-masked-conv", "layer zoo", _MaskedConv, (1, 8, 8), IMAGE_SETUPS),
    Case(
        "batchnorm-cumulative-average",
        "layer zoo",
        _normalised(lambda: nn.BatchNorm2d(8, momentum=None)),
        _IMAGE,
        ("sgd", "channels-last", "infer"),
    ),
    Case("actnorm-initialised-flag", "layer zoo", _normalised(lambda: ActNorm(8)), _IMAGE),
)
CASES = (*CASES, *REDTEAM)
