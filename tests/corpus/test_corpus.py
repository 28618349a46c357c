"""The corpus in CI: every case of `corpus_cases.py` under each of its setups, predicted
against `ninlab.measure` on this machine. A case fails when a figure is off what it is labelled
(a live peak labelled exact that is not equal, an allocator peak labelled exact off by more than
1%, a lower bound above the measurement), on a traceback, and when the user's model is left
changed;
"flagged" and "refused" (one line) pass.

Cases of torchvision, timm and transformers skip, with the reason, where the package is not
installed (CI runs them in a torch 2.14.1 environment that has them). A case wrong today is
marked `xfail(strict=True)` with its cause (`KNOWN_WRONG`): the fix that makes it right makes
it XPASS, which fails, and the marker is then removed.
"""

from __future__ import annotations

import pytest
from corpus_cases import CASES, Case, available, check

# (case, setup) -> the cause, for the engineer who owns it (benchmarks/corpus_tally-cpu.md).
KNOWN_WRONG: dict[tuple[str, str], str] = {}


def _param(case: Case, setup: str) -> object:
    marks = [pytest.mark.slow]
    if not available(case):
        marks.append(pytest.mark.skip(reason=f"{case.needs} is not installed"))
    cause = KNOWN_WRONG.get((case.name, setup))
    if cause is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=cause))
    return pytest.param(case, setup, marks=marks, id=f"{case.family}-{case.name}-{setup}")


@pytest.mark.parametrize(
    ("case", "setup"), [_param(case, setup) for case in CASES for setup in case.setups]
)
def test_the_corpus_is_exact_or_says_what_it_is(case: Case, setup: str) -> None:
    outcome = check(case, setup)
    assert outcome.kind != "wrong", outcome.detail
