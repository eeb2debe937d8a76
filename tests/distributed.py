"""Run a function on N local processes joined by a gloo process group (CPU tests of distributed code).

Usage from a test:

    def _body(rank: int, world_size: int, x: int) -> float:   # module-level, picklable
        ...
        return value

    results = run_distributed(_body, world_size=2, args=(3,))   # list indexed by rank

Each worker's return value comes back to the parent; an exception in any worker fails the
test with that worker's traceback.

:func:`torchrun_two_nodes` runs a real two-"node" job instead: two torchrun agents on this host
joined by a c10d rendezvous.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssa_megatron.parallel.state import set_local_rank_env

ROOT = Path(__file__).resolve().parents[1]


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


# --- two torchrun agents on one host ---------------------------------------------------------------


def node_tmp(root: Path, node: int, prefixes: int = 4096) -> Path:
    """``<root>/node<node>-tmp``: the temp directory of one simulated node of a job on this host.

    Real nodes have their own /dev/shm and temp dir; on one host both would register the same
    streaming shared-memory prefixes, so each node's temp dir is seeded with the lock files of the
    other node's first ``prefixes`` prefixes (node 0 takes the even ones, node 1 the odd ones).
    Safe to call again, and from several ranks of a node at once.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import _get_path

    path = root / f"node{node}-tmp"
    path.mkdir(parents=True, exist_ok=True)
    for prefix in range(1 - node, prefixes, 2):
        for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (path / _get_path(prefix, name)).touch()
    return path


def _wait_agents(agents: list[tuple[subprocess.Popen, IO[str]]], timeout: float) -> list[str]:
    """Wait for each launched agent (killing one still running after `timeout`) and close its log file;
    returns the logs' text, in order, after asserting that every agent exited 0."""
    logs = []
    for proc, log in agents:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        logs.append(Path(log.name).read_text())
        assert proc.returncode == 0, logs[-1][-4000:]
    return logs


def torchrun_two_nodes(
    tmp_path: Path, name: str, nproc_per_node: int, args_of_node: Callable[[int], list[str]],
    env: dict[str, str], timeout: float = 600.0,
) -> list[str]:
    """Run ``torchrun <args_of_node(node)>`` as a 2-node job on this host; returns each node's log.

    Both agents meet at a c10d rendezvous on localhost; each runs with its own :func:`node_tmp` and
    logs to ``<tmp_path>/<name>-node<node>.log``. Fails the test unless both exit 0.
    """
    port = free_port()
    agents = []
    for node in range(2):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc-per-node",
               str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"ssa-{name}-{port}", "--max-restarts", "0", *args_of_node(node)]
        log = open(tmp_path / f"{name}-node{node}.log", "w")  # noqa: SIM115 (closed by _wait_agents)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, TMPDIR=str(node_tmp(tmp_path, node))),
                                stdout=log, stderr=subprocess.STDOUT)
        agents.append((proc, log))
    return _wait_agents(agents, timeout)
