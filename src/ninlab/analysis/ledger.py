"""Which tensor storages a recorded step makes, when each dies, and which autograd keeps.

A `StorageLedger` keeps the storages (which exist, their bytes, when each is created and freed):
each is counted once however many views share it, and its death is read from the storage's own
lifetime (a weak reference), so it follows autograd's real decisions about what to keep.
`harvest_saved_tensors` reads, from the autograd graph, which of them autograd keeps for backward.
The recorder (`ninlab.analysis.recorder`) hands both what the ops make.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any

import torch

from ninlab.analysis.recording import SavedTensor, StorageRecord
from ninlab.analysis.torch_internals import SAVED_FIELD_PREFIX

__all__ = ["StorageLedger", "harvest_saved_tensors"]


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class StorageLedger:
    """Which tensor storages exist, their bytes, and when each was created and freed.

    It owns the `storages` and `events` a `Recording` shows. Each storage is counted once, however
    many views share it, under a serial key. Its death is read from the storage's own lifetime (a
    weak reference), so it follows autograd's real decisions about what to keep; `clock` gives the
    index of the last op recorded when that happens.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self.storages: dict[int, StorageRecord] = {}
        self.events: list[tuple[str, int, int]] = []
        self._clock = clock
        self._alive: dict[int, tuple[int, weakref.ref]] = {}  # id(storage) -> (key, weak ref)
        self._next_key = 0
        # A sum of two gradients the engine would have made in place if its first term dies
        # right after: (op index, first term's key, id of the sum's storage, what to call then).
        self._accumulation: tuple[int, int, int, Callable[[int], None]] | None = None

    def note(
        self, tensor: torch.Tensor, *, created_at: int, phase: str, module: str
    ) -> StorageRecord | None:
        """The record of `tensor`'s storage, opened now if the storage is new; None for a tensor
        without a storage."""
        storage = _storage_of(tensor)
        if storage is None:
            return None
        alive = self._alive.get(id(storage))
        if alive is not None:
            return self.storages[alive[0]]
        # Storages get serial keys: a Python id can be reused once its storage has died.
        key = self._next_key
        self._next_key += 1
        record = StorageRecord(
            key=key,
            nbytes=storage.nbytes(),
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            created_at=created_at,
            phase=phase,
            module=module,
        )
        self.storages[key] = record
        self.events.append(("alloc", key, created_at))
        self._alive[id(storage)] = (key, weakref.ref(storage, self._on_free(id(storage), record)))
        return record

    def track(self, tensor: torch.Tensor, role: str, *, phase: str) -> None:
        """Register a tensor made before or outside recording (a parameter, the input batch, a
        gradient of the unrecorded first step); `role` "" leaves it to the phase to tell."""
        record = self.note(tensor, created_at=-1, phase=phase, module="")
        if record is not None and not record.role:
            record.role = role

    def let_go(self, tensor: torch.Tensor) -> None:
        """`tensor`'s storage is dead to the step from now, though something outside it still
        holds it (see `trace._let_go_of_replaced`)."""
        storage = _storage_of(tensor)
        alive = self._alive.get(id(storage)) if storage is not None else None
        if alive is not None:
            self._freed(id(storage), self.storages[alive[0]])

    def key(self, tensor: torch.Tensor) -> int:
        """The serial key of a live tensor's storage (-1 if it was never seen)."""
        storage = _storage_of(tensor)
        alive = self._alive.get(id(storage)) if storage is not None else None
        return alive[0] if alive is not None else -1

    def accumulating(
        self, index: int, first: torch.Tensor, total: torch.Tensor, done: Callable[[int], None]
    ) -> None:
        """Op `index` was an add that a plain run makes in place into `first` and a run under a
        dispatch mode (fake tensors are one) makes out of place, into the new `total`: the
        autograd engine summing two gradients of one tensor, when it holds `first`'s last
        reference (torch/csrc/autograd/input_buffer.cpp, `accumulate`), or `at::linear` adding its
        bias (the recorder tells which). Either shows here as `first` dying right after the op. If
        it does, `total` continues `first`'s storage instead of being a new one, and
        `done(key of first)` is called."""
        storage = _storage_of(total)
        if storage is not None and id(storage) in self._alive:
            self._accumulation = (index, self.key(first), id(storage), done)

    def _continue_in_place(self, record: StorageRecord) -> bool:
        """`record`'s storage died: if it was the first term of the sum just made, the sum's
        storage becomes it (see `accumulating`); True if so."""
        assert self._accumulation is not None
        index, first_key, total_id, done = self._accumulation
        if index != self._clock():
            self._accumulation = None
            return False
        if first_key != record.key:
            return False
        self._accumulation = None
        total_key, total_ref = self._alive[total_id]
        storage = total_ref()
        if storage is None:
            return False
        del self.storages[total_key]
        self._drop_latest(("alloc", total_key, index))
        # The sum's own weak reference is dropped with its entry, so only this one fires.
        self._alive[total_id] = (record.key, weakref.ref(storage, self._on_free(total_id, record)))
        done(record.key)
        return True

    def _drop_latest(self, event: tuple[str, int, int]) -> None:
        """Remove `event`, made by one of the last ops: searched from the end, where it is
        (`list.remove` from the start, hundreds of times a step over tens of thousands of events,
        was 5% of DenseNet's prediction)."""
        for position in range(len(self.events) - 1, -1, -1):
            if self.events[position] == event:
                del self.events[position]
                return

    def _on_free(self, storage_id: int, record: StorageRecord) -> Callable[[weakref.ref], None]:
        # The ledger weakly: held strongly, every storage's callback would tie the ledger and its
        # recording into a cycle that only the cyclic collector frees, a full pass per prediction.
        ledger = weakref.ref(self)

        def freed(_ref: weakref.ref) -> None:
            listening = ledger()
            if listening is not None:
                listening._freed(storage_id, record)

        return freed

    def _freed(self, storage_id: int, record: StorageRecord) -> None:
        alive = self._alive.get(storage_id)
        if alive is None or alive[0] != record.key:
            return  # let go of before (`let_go`): its weak reference fires later
        del self._alive[storage_id]
        if self._accumulation is not None and self._continue_in_place(record):
            return
        record.freed_after = self._clock()
        self.events.append(("free", record.key, record.freed_after))


# -- what autograd saved for backward -------------------------------------------------------------


def harvest_saved_tensors(
    node_owners: Mapping[Any, str],
    storage_key: Callable[[torch.Tensor], int],
    *,
    skip: Container[Any] = (),
    outside_model: Container[Any] = (),
    unseen: Callable[[Any, torch.Tensor], int] | None = None,
) -> list[SavedTensor]:
    """What each autograd node in `node_owners` (node -> module) keeps for backward, read from its
    `_saved_<field>` attributes: one `SavedTensor` per saved tensor whose storage has a key. Nodes
    in `outside_model` were made while no module of the model ran (the loss).

    Unpacking a saved variable dispatches a detach, so a recorder pauses while this runs. Nodes in
    `skip` saved through saved-tensor hooks (activation checkpointing): unpacking theirs would run
    the recomputation now, so they are not read; they keep no activation anyway. A saved tensor
    whose storage has no key is handed to `unseen(node, tensor)`, which may give it one.
    """
    saved: list[SavedTensor] = []
    for node, module in node_owners.items():
        if node in skip:
            continue
        for field_name, tensor in _saved_by(node):
            key = storage_key(tensor)
            if key < 0 and unseen is not None:
                key = unseen(node, tensor)
            if key >= 0:
                saved.append(
                    SavedTensor(key, type(node).__name__, field_name, module, node in outside_model)
                )
    return saved


def _saved_by(node: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(field, tensor) for each tensor an autograd node saved."""
    for attribute in _saved_fields(node):
        try:
            value = getattr(node, attribute)
        except RuntimeError:  # already freed by an earlier backward
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, torch.Tensor):
                yield attribute.removeprefix(SAVED_FIELD_PREFIX), item


def _saved_fields(node: Any) -> list[str]:
    """The `_saved_<field>` attributes of a node: those of its class for a C++ node (asked once per
    class: `dir` is slow), read afresh from a Python function's node, which may have its own."""
    if hasattr(node, "__dict__"):
        return [attribute for attribute in dir(node) if attribute.startswith(SAVED_FIELD_PREFIX)]
    fields = _SAVED_FIELDS.get(type(node))
    if fields is None:
        fields = _SAVED_FIELDS[type(node)] = [
            attribute for attribute in dir(node) if attribute.startswith(SAVED_FIELD_PREFIX)
        ]
    return fields


_SAVED_FIELDS: dict[type, list[str]] = {}
