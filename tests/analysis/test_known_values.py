"""`KnownValues`: a check on values ninlab knows is answered as the real run answers it."""

from __future__ import annotations

import torch
from torch import nn

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory


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
