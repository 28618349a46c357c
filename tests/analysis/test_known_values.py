"""`KnownValues`: a check on values ninlab knows is answered as the real run answers it."""

from __future__ import annotations

import torch
from odd_models import ActNorm
from torch import nn

from ninlab.analysis.known_values import KnownValues
from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.torch_internals import FakeTensorMode


class _Branches(nn.Module):
    """Takes a larger path when the position ids it makes are not a plain range, and when its
    mask input has a zero: on values, as transformers does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        if not (positions.diff(dim=-1) == 1).all():
            x = torch.cat([x] * 4, dim=1)
        if (mask == 0).any():
            x = torch.cat([x] * 8, dim=1)
        return self.linear(x)


def test_checks_on_known_values_take_the_real_branch():
    model = _Branches()
    peaks = []
    for value_range in ((1, 2), (0, 1)):
        spec = {
            "input_size": ((8, 16), (8,)),
            "input_dtype": (torch.float32, torch.int64),
            "input_range": ((0, 2), value_range),
        }
        report = predict_memory(model, batch_size=2, mode="infer", **spec)
        measured = measure(model, report.spec, batch_size=2)
        assert report.live_trust.exact
        assert report.live_peak_bytes == measured.live_peak_bytes
        peaks.append(report.live_peak_bytes)
    assert peaks[1] > peaks[0]  # the mask with zeros takes the larger path, for real and here


def test_a_write_forgets_the_values_on_its_storage_and_no_others():
    aten = torch.ops.aten
    with FakeTensorMode() as mode:
        base, other, moved = torch.zeros(4), torch.zeros(4), torch.zeros(3)
        view = base[:2]
    known = KnownValues()
    for fake in (base, view, other, moved):
        known.note(fake, torch.full(fake.shape, 7.0))
    with mode:
        written = aten.uniform_.default(base)  # random: its values are not followed
    known.follow(aten.uniform_.default, (base,), {}, written)
    assert known.value(base) is None and known.value(view) is None
    assert known.value(other).tolist() == [7.0] * 4
    with mode:
        moved_onto_other = aten.set_.source_Storage(moved, other.untyped_storage())
    known.follow(aten.set_.source_Storage, (moved, other.untyped_storage()), {}, moved_onto_other)
    # Moved onto `other`'s storage: `moved` and `other` are both forgotten.
    assert known.value(moved) is None and known.value(other) is None


def test_an_op_on_known_values_is_followed_and_one_on_unknown_ones_is_not():
    aten = torch.ops.aten
    with FakeTensorMode():
        known_input, unknown_input = torch.zeros(3, dtype=torch.int64), torch.zeros(3)
        total = known_input + 2
        scaled = unknown_input * known_input
    known = KnownValues()
    known.note(known_input, torch.arange(3))
    known.follow(aten.add.Tensor, (known_input, 2), {}, total)
    known.follow(aten.mul.Tensor, (unknown_input, known_input), {}, scaled)
    assert known.value(total).tolist() == [2, 3, 4]
    assert known.value(scaled) is None


def test_reads_of_the_models_buffers_take_the_real_branch():
    """A batch norm with momentum=None (a cumulative average) divides by
    `float(num_batches_tracked)`, and an ActNorm branches on its flag: both read a buffer's value,
    which ninlab once could not (a measured fallback); the values are the model's own, and what
    the step writes to them is followed, so the prediction is exact."""
    for norm in (nn.BatchNorm2d(8, momentum=None), ActNorm(8)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Flatten(), nn.Linear(8 * 36, 10))
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        report = predict_memory(model, input_size=(3, 8, 8), batch_size=4)
        measured = measure(model, report.spec, batch_size=4)
        assert report.live_trust.exact and report.allocator_trust.exact
        assert report.live_peak_bytes == measured.live_peak_bytes
        assert report.allocator_peak_bytes == measured.allocator_peak_bytes
        after = model.state_dict()
        assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
