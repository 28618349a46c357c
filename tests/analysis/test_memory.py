"""ninlab.analysis.memory: the trainer, the visuals and the CLI import the accountant's memory
names from here; each must be the very object its own module defines."""

from __future__ import annotations

from ninlab.analysis import batch, categories, memory, memory_report, predict


def test_every_public_name_is_its_owners() -> None:
    owners = (batch, categories, memory_report, predict)
    owned = {name: getattr(owner, name) for owner in owners for name in owner.__all__}
    assert set(memory.__all__) <= set(owned)
    for name in memory.__all__:
        assert getattr(memory, name) is owned[name], name
