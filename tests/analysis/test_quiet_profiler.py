"""Kineto's C++ start and stop lines never reach the user from a profile ninlab starts (a
measurement, a kernel probe), even after a profile has already run in the process (when Kineto's
environment variable can no longer silence it)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity

from ninlab import build_nin, measure
from ninlab.analysis.quiet_profiler import quiet_profile

_NOISE = ("USDT", "profiler_start", "profiler_stop", "SyncActivityProfilerHandler")


def test_no_profiler_line_reaches_stdout_or_stderr(capfd):
    with quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.zeros(3).add_(1)
        print("the profiled code's own output still shows")
    measure(build_nin(), input_size=(1, 67, 67), batch_size=2)
    out, err = capfd.readouterr()
    assert out == "the profiled code's own output still shows\n"
    assert not [line for line in err.splitlines() if any(word in line for word in _NOISE)]
