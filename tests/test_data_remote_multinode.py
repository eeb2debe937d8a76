"""Two torchrun agents x 2 processes (c10d rendezvous on localhost), each "node" with its own cache
directory, training pretrain_ssa.py from s3:// end to end; then the same job stopped half-way and
resumed: its loss curve equals the uninterrupted one bitwise (CPU, fp32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data_remote import (  # noqa: F401 (fixtures)
    ROOT,
    corpus,
    s3_dataset,
    s3_endpoint,
    s3_env,
    tiny_train_args,
)
from tests.test_training_launchers import _node_tmp, wait_agents

BIN = Path(sys.executable).parent


def _torchrun_job(tmp_path: Path, name: str, s3_endpoint: str, data: str, tok: Path,  # noqa: F811
                  *extra: str) -> list[str]:
    from tests.distributed import free_port

    port = free_port()
    run_dir = tmp_path / "job"  # shared by both "nodes", like a checkpoint directory on shared storage
    agents = []
    for node in range(2):
        env = s3_env(s3_endpoint, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # One host plays two nodes: each gets its own streaming shared-memory prefixes (a real node
        # has its own /dev/shm) and its own node-local cache directory.
        env["TMPDIR"] = str(_node_tmp(tmp_path, node) if not (tmp_path / f"node{node}-tmp").exists()
                            else tmp_path / f"node{node}-tmp")
        args = tiny_train_args(["--data.path", data], tok, run_dir, 6, "--parallel.tensor", "2",
                               "--model.num_query_groups", "2", "--train.global_batch_size", "4",
                               "--data.cache_dir", str(tmp_path / f"node{node}-cache"),
                               "--logging.tensorboard_dir", str(tmp_path / f"tb-{name}"), *extra)
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"ssa-s3-{port}", "--max-restarts", "0",
               *args]
        log = open(tmp_path / f"{name}-node{node}.log", "w")  # noqa: SIM115 (closed below)
        agents.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return wait_agents(agents, timeout=900)


def _ce_curve(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve: dict[int, float] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for event in acc.Scalars("train/ce_loss"):
            curve[event.step] = event.value
    return curve


# Three jobs of 4 processes: with -m slow. Each part is in the default run on its own: two torchrun agents
# (test_training_launchers.py), two nodes resuming exactly (test_data_distributed.py), training from s3://
# equal to training from a local copy (test_data_remote.py).
@pytest.mark.slow
def test_two_nodes_train_from_s3_and_resume_exactly(s3_endpoint: str, s3_dataset: str, corpus,  # noqa: F811
                                                     tmp_path: Path) -> None:
    tok = corpus[1]
    whole = tmp_path / "whole"
    whole.mkdir()
    _torchrun_job(whole, "whole", s3_endpoint, s3_dataset, tok)
    for node in range(2):
        cache = whole / f"node{node}-cache"
        # Each node filled its own cache (index from the preflight, shards its ranks read).
        assert list(cache.rglob("index.json")) and list(cache.rglob("shard.*")), node
    parts = tmp_path / "parts"
    parts.mkdir()
    _torchrun_job(parts, "first", s3_endpoint, s3_dataset, tok, "--train.stop_after", "3")
    logs = _torchrun_job(parts, "second", s3_endpoint, s3_dataset, tok, "--checkpoint.load", "auto")
    assert any("resumed from" in log and "at iteration 3" in log for log in logs), logs[0][-3000:]
    expected = _ce_curve(whole / "tb-whole")
    resumed = {**_ce_curve(parts / "tb-first"), **_ce_curve(parts / "tb-second")}
    assert sorted(expected) == list(range(1, 7)), expected
    assert resumed == expected  # bitwise: the same samples in the same order, the same arithmetic
