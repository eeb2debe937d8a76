"""Launch environment: who am I in the job, whichever launcher started us.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; the DeepSpeed launcher sets
RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE and passes `--local_rank=N`; SLURM `srun` without a
launcher sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. This is the only module that reads
these variables (docs/architecture.md, Conventions).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun" | "deepspeed" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from err
    return None


def detect_launch(local_rank_arg: int | None = None) -> LaunchEnv:
    """Read rank/world size from the launcher's environment (`local_rank_arg` is DeepSpeed's --local_rank)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        launcher = "torchrun"
    elif local_rank_arg is not None or "LOCAL_SIZE" in os.environ or "CROSS_RANK" in os.environ:
        launcher = "deepspeed"
    elif "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        launcher = "slurm"
    elif "RANK" in os.environ:
        launcher = "torchrun"
    else:
        launcher = "single"
    if launcher == "slurm":
        rank = _int_env("SLURM_PROCID") or 0
        world = _int_env("SLURM_NTASKS") or 1
        local_rank = _int_env("SLURM_LOCALID") or 0
        local_world = _int_env("SLURM_NTASKS_PER_NODE") or world
    else:
        rank = _int_env("RANK") or 0
        world = _int_env("WORLD_SIZE") or 1
        local_rank = _int_env("LOCAL_RANK")
        if local_rank is None:
            local_rank = local_rank_arg if local_rank_arg is not None else 0
        local_world = _int_env("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
    if local_rank_arg is not None and local_rank_arg != local_rank:
        raise RuntimeError(
            f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local_rank} from the launcher"
        )
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside the world size {world} set by the launcher")
    return LaunchEnv(rank, world, local_rank, local_world, launcher)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(requested)


def init_distributed(env: LaunchEnv, device: torch.device, timeout_minutes: int = 30) -> None:
    """Join the default process group (NCCL on GPUs, gloo on CPU); a single process also gets a group
    so megatron's parallel_state works the same way for one and many ranks."""
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if env.world_size == 1:
        # A world of one rendezvous with itself through an in-process store: no port at all. A
        # "free" port picked and then bound by the TCP store raced with other sockets on the host
        # (EADDRINUSE on back-to-back benchmark runs), and a lone process that inherited RANK and
        # WORLD_SIZE=1 (e.g. from a parent that built streaming loaders) has no MASTER_ADDR to meet at.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if env.launcher == "slurm" and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise RuntimeError(
            "under srun without torchrun set MASTER_ADDR and MASTER_PORT (see "
            "examples/slurm/train_ssa.sbatch)"
        )
    dist.init_process_group(
        backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
    )
