"""The paper's three-way comparison as parallel jobs on one node: full, sparse and ssa trainings from
the same shards, started at the same instant (a file barrier after every import), each with its own
checkpoint directory. Every loss curve must be bitwise equal to that job's solo run (fp32, CPU), for
single-process jobs and for torchrun jobs of 2 processes each.

The jobs run this module (``python -m tests.test_data_isolation_training`` or ``torchrun -m ...``)
through the same ``run(cfg)`` that ``pretrain_ssa.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "sparse", "ssa")
ITERS = 3


def _overrides(data: Path, tokenizer: Path, mode: str, ckpt: Path) -> list[str]:
    pairs = {
        "data.path": str(data), "data.tokenizer": str(tokenizer), "data.seq_length": "32",
        "model.num_layers": "1", "model.hidden_size": "32", "model.ffn_hidden_size": "64",
        "model.num_attention_heads": "2", "model.num_query_groups": "1", "model.block_size": "8",
        "model.block_count": "2", "model.attention_mode": mode, "train.precision": "fp32",
        "train.device": "cpu", "parallel.distributed_optimizer": "false", "train.micro_batch_size": "2",
        "train.global_batch_size": "4", "train.train_iters": str(ITERS), "optim.warmup_iters": "1",
        "eval.at_end": "false", "eval.interval": "0", "logging.progress": "lines", "logging.interval": "1",
        "logging.tensorboard_dir": "null", "checkpoint.dir": str(ckpt), "checkpoint.save_on_exit": "false",
    }
    return [x for k, v in pairs.items() for x in ("--" + k, v)]


def main(argv: list[str] | None = None) -> int:
    """One job: wait for the go file, train, write this rank's curve (float.hex) as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--barrier", required=True)
    p.add_argument("--out", required=True)
    args, rest = p.parse_known_args(argv)
    import io

    import megatron.core  # noqa: F401  (imported before the barrier: the jobs start training together)
    import torch

    from ssa_megatron.training import load_config, parse_override_args, run

    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    barrier = Path(args.barrier)
    (barrier / f"ready_{os.getpid()}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.01)
    overrides = parse_override_args(["--data.build_demo", "false", *rest])
    result = run(load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), overrides), stream=io.StringIO())
    curve = [(float.hex(h["loss"]), float.hex(h["ce_loss"])) for h in result.history]
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(curve))
    return 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.test_data_common import build_shards

    root, tok, _ = build_shards(tmp_path_factory.mktemp("three_way"), n_docs=200, seq_len=32)
    return root, tok


def _launch(jobs: list[str], procs: int, shards: tuple[Path, Path], base: Path) -> dict[str, list]:
    """Start one job per mode at the same instant; return each job's curves by rank."""
    barrier = base / "barrier"
    barrier.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    running = {}
    for mode in jobs:
        job_args = ["-m", "tests.test_data_isolation_training", "--barrier", str(barrier),
                    "--out", str(base / mode), *_overrides(*shards, mode, base / f"ckpt_{mode}")]
        if procs > 1:
            from tests.distributed import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                   "--master-port", str(free_port()), *job_args]
        else:
            cmd = [sys.executable, *job_args]
        running[mode] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(list(barrier.glob("ready_*"))) < len(jobs) * procs:
        assert time.monotonic() < deadline, "jobs did not start"
        assert all(p.poll() is None for p in running.values()), {m: p.communicate()[0][-3000:]
                                                                 for m, p in running.items()}
        time.sleep(0.05)
    (barrier / "go").touch()
    curves = {}
    for mode, proc in running.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode} job failed:\n{output[-4000:]}"
        curves[mode] = [json.loads((base / f"{mode}.rank{r}.json").read_text()) for r in range(procs)]
    return curves


# Single-process jobs in the default run; jobs of 2 torchrun ranks with -m slow (jobs of 2 ranks racing
# for a node's streaming state are also what test_data_isolation.py checks, at the loaders).
@pytest.mark.parametrize(
    "procs", [pytest.param(1, id="single"), pytest.param(2, id="torchrun2", marks=pytest.mark.slow)]
)
def test_three_way_comparison_in_parallel_matches_solo_runs(procs: int, shards: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    solo = {}
    for mode in MODES:
        solo.update(_launch([mode], procs, shards, tmp_path / f"solo_{mode}"))
    together = _launch(list(MODES), procs, shards, tmp_path / "together")
    for mode in MODES:
        assert len(solo[mode][0]) == ITERS
        assert together[mode] == solo[mode], f"{mode}: {together[mode]} != {solo[mode]}"
    assert len({json.dumps(solo[m][0]) for m in MODES}) == len(MODES)


if __name__ == "__main__":
    sys.exit(main())
