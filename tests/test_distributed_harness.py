"""The gloo harness itself: ranks really communicate, and a failing rank fails the test."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def test_ranks_all_reduce() -> None:
    assert run_distributed(_all_reduce_rank, world_size=3) == [6.0, 6.0, 6.0]


def test_failing_rank_fails_the_test() -> None:
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_distributed(_fail_on_rank_one, world_size=2, timeout=20)
