"""The one place that tells mosaicml-streaming who this process is.

streaming reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` from the
environment by itself (to find node-local leaders and size its shared-memory barriers).
torchrun sets all four; the DeepSpeed launcher sets ``LOCAL_SIZE`` instead of
``LOCAL_WORLD_SIZE``, and then streaming would silently treat every rank as its own node.
The launch code (``ssa_megatron.training.launch``) works out the four numbers whichever
launcher ran; :func:`set_streaming_env` writes them where streaming looks, so no module in
``data/`` reads the environment.
"""

from __future__ import annotations

import os
from typing import Protocol


class LaunchLike(Protocol):
    """Anything with the four launch numbers, e.g. ``ssa_megatron.training.launch.LaunchEnv``."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def set_streaming_env(rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    """Export the launch numbers under the names streaming reads; reject layouts it cannot use."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank={local_rank} is outside local_world_size={local_world_size}")
    if world_size % local_world_size:
        raise ValueError(
            f"world_size={world_size} is not a multiple of local_world_size={local_world_size}: streaming "
            "needs the same number of processes on every node (launch equal process counts per node)"
        )
    if rank % local_world_size != local_rank:
        raise ValueError(
            f"rank={rank} with local_world_size={local_world_size} should have local_rank="
            f"{rank % local_world_size}, not {local_rank}: streaming assumes ranks are numbered node by node"
        )
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
    )


def apply_launch(launch: LaunchLike) -> None:
    set_streaming_env(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size)
