"""Run a function on N local processes joined by a gloo process group (CPU tests of distributed code).

Usage from a test:

    def _body(rank: int, world_size: int, x: int) -> float:   # module-level, picklable
        ...
        return value

    results = run_distributed(_body, world_size=2, args=(3,))   # list indexed by rank

Each worker's return value comes back to the parent; an exception in any worker fails the
test with that worker's traceback.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssa_megatron.parallel.state import set_local_rank_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    set_local_rank_env(rank, world_size, port)
    # Several workers share 2 cores; more intra-op threads only adds contention.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> tuple[list, list[str]]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    for _ in range(world_size):
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            failures.append(f"rank {rank} failed:\n{payload}")
            break
    for proc in procs:
        proc.join(timeout=5 if failures else timeout)
        if proc.is_alive():
            proc.kill()
    return [results.get(rank) for rank in range(world_size)], failures


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 600.0
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    The rendezvous port is picked free and then bound by rank 0 a moment later; if another process
    took it in between (EADDRINUSE), the run is repeated on a new port, at most twice more.
    """
    for _ in range(3):
        results, failures = _run_once(fn, world_size, args, timeout)
        if not any("EADDRINUSE" in failure for failure in failures):
            break
    if failures:
        raise AssertionError("\n".join(failures))
    return results
