"""Scheduled garbage collection: automatic collection off while training, collections at fixed iterations."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest

from ssa_megatron.training.gc_schedule import ScheduledGC
from tests.distributed import run_distributed
from tests.test_training_loss import demo_dir, run_config, tiny_overrides  # noqa: F401


@contextlib.contextmanager
def recorded_collections() -> Iterator[list[tuple[tuple, bool]]]:
    """Every gc.collect call meanwhile: its arguments and whether automatic collection was on."""
    calls: list[tuple[tuple, bool]] = []
    real = gc.collect

    def collect(*args: int) -> int:
        calls.append((args, gc.isenabled()))
        return real(*args)

    gc.collect = collect
    try:
        yield calls
    finally:
        gc.collect = real


def test_collects_every_interval_with_automatic_collection_off() -> None:
    assert gc.isenabled()
    with recorded_collections() as calls, ScheduledGC(3) as collector:
        assert not gc.isenabled()
        for iteration in range(1, 8):
            collector.step(iteration)
    assert gc.isenabled()
    # A full collection on entry and at iterations 3 and 6, automatic collection off meanwhile.
    assert calls == [((), False), ((), False), ((), False)]


def test_interval_zero_keeps_automatic_collection() -> None:
    with recorded_collections() as calls, ScheduledGC(0) as collector:
        assert gc.isenabled()
        for iteration in range(1, 5):
            collector.step(iteration)
    assert calls == [] and gc.isenabled()


def test_negative_interval_names_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"gc interval must be >= 0 \(0: Python's automatic collection\); got -2"
    ):
        ScheduledGC(-2)


def _train_recording_gc(rank: int, world: int, data_dir: str) -> dict:
    overrides = tiny_overrides(data_dir, "--train.train_iters", "4", "--train.gc_interval", "2")
    with recorded_collections() as calls:
        result = run_config(rank, world, overrides)
    return {"calls": calls, "enabled_after": gc.isenabled(), "iterations": result["iteration"]}


def test_training_runs_with_automatic_collection_off(demo_dir: str) -> None:  # noqa: F811
    (got,) = run_distributed(_train_recording_gc, world_size=1, args=(demo_dir,))
    assert got["iterations"] == 4 and got["enabled_after"]
    # Inside the loop: a full collection at the start and after iterations 2 and 4.
    in_loop = [args for args, enabled in got["calls"] if not enabled]
    assert in_loop == [(), (), ()], got["calls"]
