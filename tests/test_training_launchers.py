"""The entry point under real launchers: the DeepSpeed launcher with the DeepSpeed engine (ZeRO-1,
CPU accelerator, gloo) and two torchrun agents joined by a c10d rendezvous (a 2-"node" job)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

from tests.distributed import free_port
from tests.test_training_loss import demo_dir, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    # A launcher started from inside a torchrun/DeepSpeed job would inherit its rank variables.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_args(data_dir: str, *extra: str) -> list[str]:
    return [
        "pretrain_ssa.py",
        "--config",
        "examples/tiny_cpu.yaml",
        *tiny_overrides(data_dir, "--train.train_iters", "4", "--optim.warmup_iters", "1", *extra),
    ]


def _ce_values(log: str) -> list[float]:
    from ssa_megatron.training.metrics import parse_rows

    return [float(row["ce"]) for row in parse_rows(log)]


def test_deepspeed_launcher_trains_with_zero1(demo_dir: str, tmp_path: Path) -> None:  # noqa: F811
    ckpt = tmp_path / "ckpt"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        *_train_args(
            demo_dir, "--checkpoint.dir", str(ckpt), "--logging.tensorboard_dir", str(tmp_path / "tb")
        ),
        "--deepspeed",
        "--deepspeed_config",
        "examples/deepspeed/zero1_bf16.json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "engine: deepspeed" in log
    ce = _ce_values(log)
    assert len(ce) == 4 and ce[-1] < ce[0], log[-3000:]
    assert "final (4 iterations): sparse-mode validation perplexity" in log
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "rank 0 writes TensorBoard events"
    it = ckpt / "iter_0000004"
    assert (ckpt / "latest").read_text().strip() == it.name
    # Sharded model weights (engine independent) plus DeepSpeed's own ZeRO optimizer partitions.
    assert (it / "model" / "metadata.json").exists()
    assert any("optim_states" in p.name for p in (it / "optim").rglob("*")), sorted((it / "optim").rglob("*"))


def wait_agents(agents: list[tuple[subprocess.Popen, IO[str]]], timeout: float) -> list[str]:
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


def _node_tmp(tmp_path: Path, node: int) -> Path:
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import _get_path

    node_tmp = tmp_path / f"node{node}-tmp"
    node_tmp.mkdir()
    for prefix in range(1 - node, 4096, 2):
        for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (node_tmp / _get_path(prefix, name)).touch()
    return node_tmp


def test_two_torchrun_agents_with_c10d_rendezvous(demo_dir: str, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()
    agents = []
    for node in range(2):
        # Real nodes have their own /dev/shm. On one host both "nodes" would register the same
        # streaming shared-memory prefix, so each gets its own copy of the shards and its own temp dir
        # (streaming's prefix lock files) pre-seeded with the other node's prefixes.
        node_data = tmp_path / f"data{node}"
        shutil.copytree(demo_dir, node_data)
        env = _env()
        env["TMPDIR"] = str(_node_tmp(tmp_path, node))
        cmd = [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            f"ssa-test-{port}",
            "--max-restarts",
            "0",
            *_train_args(str(node_data)),
        ]
        out = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        agents.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    both = "\n".join(wait_agents(agents, timeout=600))
    # Global rank 0 (on whichever agent got node rank 0) logs; data parallel over the two "nodes".
    ce = _ce_values(both)
    assert len(ce) == 4 and ce[-1] < ce[0], both[-3000:]
    assert "final (4 iterations): sparse-mode validation perplexity" in both


_LONE_PROCESS = """
import os, torch, torch.distributed as dist
from ssa_megatron.training.launch import detect_launch, init_distributed
env = detect_launch()
init_distributed(env, torch.device("cpu"))
t = torch.ones(3)
dist.all_reduce(t)
sub = dist.new_group([0], backend="gloo")
port_set = "MASTER_PORT" in os.environ
print(env.launcher, dist.get_world_size(), int(t.sum()), dist.get_world_size(sub), port_set)
dist.destroy_process_group()
"""


def test_a_lone_process_joins_its_group_without_a_port() -> None:
    # No launcher: an in-process store, so two single-process jobs on one host cannot race for a port.
    runs = [
        subprocess.Popen([sys.executable, "-c", _LONE_PROCESS], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    for proc in runs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out.split() == ["single", "1", "3", "1", "False"]
