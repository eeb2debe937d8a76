"""The entry point under real launchers: the DeepSpeed launcher with the DeepSpeed engine (ZeRO-1,
CPU accelerator, gloo) and two torchrun agents joined by a c10d rendezvous (a 2-"node" job)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port, torchrun_two_nodes
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


def test_two_torchrun_agents_with_c10d_rendezvous(demo_dir: str, tmp_path: Path) -> None:  # noqa: F811
    # Each "node" reads its own copy of the shards, as nodes with their own disks would.
    for node in range(2):
        shutil.copytree(demo_dir, tmp_path / f"data{node}")
    logs = torchrun_two_nodes(tmp_path, "train", 1, lambda node: _train_args(str(tmp_path / f"data{node}")),
                              _env())
    both = "\n".join(logs)
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
