"""A run's checkpoint: the keys it holds (the format the docstring lists, unchanged across
versions), and restoring it: weights, optimizer, this rank's generators and where the run stood."""

import dataclasses

import pytest
import torch

from ninlab.errors import NinlabError
from ninlab.training.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    RunProgress,
    load_checkpoint,
    restore_run,
    save_run,
)
from ninlab.training.distributed import Context
from ninlab.training.presets import TrainConfig

CONFIG = TrainConfig(variant="nin-d2l-bn", image_size=67, batch_size=4, epochs=3, seed=7)
ROW = {"epoch": 1, "elapsed_seconds": 9.5, "test_accuracy": 0.5}


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers exist
    return model, optimizer


def _saved(tmp_path) -> tuple[torch.nn.Module, RunProgress, torch.Tensor]:
    model, optimizer = _model_and_optimizer(0)
    progress = RunProgress(
        epoch=1,
        batch=3,
        step=15,
        loss_sum=6.0,
        correct=5.0,
        examples=12.0,
        seconds=2.5,
        elapsed=9.5,
        history=[ROW],
    )
    torch.manual_seed(123)
    save_run(tmp_path, CONFIG, model, optimizer, progress, Context())
    next_draw = torch.rand(4)  # what the generator gives after the save
    return model, progress, next_draw


def test_a_run_checkpoint_holds_the_documented_keys(tmp_path):
    _saved(tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert list(state) == [
        "format",
        "config",
        "model",
        "optimizer",
        "epoch",
        "batch",
        "step",
        "rng",
        "running",
        "history",
        "checksum",
    ]
    assert state["format"] == FORMAT and state["config"] == dataclasses.asdict(CONFIG)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 3, 15)
    assert list(state["running"]) == ["loss_sum", "correct", "examples", "seconds", "elapsed"]
    assert len(state["rng"]) == 1 and list(state["rng"][0]) == ["cpu"]
    assert state["history"] == [ROW]


def test_restoring_gives_back_the_weights_the_generator_and_where_the_run_stood(tmp_path):
    saved_model, progress, next_draw = _saved(tmp_path)
    state = load_checkpoint(tmp_path)
    model, optimizer = _model_and_optimizer(1)
    torch.manual_seed(999)
    restored = restore_run(state, model, optimizer, Context())
    assert restored == progress
    assert torch.equal(torch.rand(4), next_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved_model.parameters()))
    assert optimizer.state_dict()["state"].keys() == {0, 1}


def test_on_another_rank_the_partial_sums_start_at_zero_and_its_own_generator_is_taken(tmp_path):
    _, progress, next_draw = _saved(tmp_path)
    state = load_checkpoint(tmp_path)
    torch.manual_seed(5)
    other = torch.get_rng_state()
    state["rng"] = [state["rng"][0], {"cpu": other}]
    model, optimizer = _model_and_optimizer(1)
    restored = restore_run(state, model, optimizer, Context(rank=1, world_size=2))
    # Rank 0 carries the sums reduced over all ranks; the times are every rank's.
    assert restored == dataclasses.replace(progress, loss_sum=0.0, correct=0.0, examples=0.0)
    drawn = torch.rand(4)
    torch.set_rng_state(other)
    assert torch.equal(drawn, torch.rand(4)) and not torch.equal(drawn, next_draw)


def test_a_checkpoint_of_another_number_of_processes_is_refused_naming_it(tmp_path):
    _saved(tmp_path)
    model, optimizer = _model_and_optimizer(1)
    with pytest.raises(NinlabError, match=r"written by 1 process\(es\).*--nproc_per_node=1"):
        restore_run(load_checkpoint(tmp_path), model, optimizer, Context(rank=0, world_size=2))
