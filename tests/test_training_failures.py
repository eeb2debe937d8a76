"""Failure handling: bad CLI input, missing data/tokenizer before any model work, NaN/Inf policy.
(Signals, checkpoint faults and checkpoint inputs: test_reliability_checkpoint.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.test_training_loss import demo_dir, run_config, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    return subprocess.run(
        [sys.executable, "pretrain_ssa.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_flag_and_bad_values_exit_2() -> None:
    proc = _cli("--config", "examples/tiny_cpu.yaml", "--definitely-not-a-flag")
    assert proc.returncode == 2 and "unrecognized arguments: --definitely-not-a-flag" in proc.stderr
    proc = _cli("--config", "examples/tiny_cpu.yaml", "--train.global_batch_size", "6")
    assert proc.returncode == 2
    assert "train.global_batch_size=6 is not divisible by train.micro_batch_size" in proc.stderr
    proc = _cli("--model.num_layers", "2")
    assert proc.returncode == 2 and "--config is required" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            [
                "--data.path",
                "/nonexistent/shards",
                "--data.build_demo",
                "false",
                "--data.tokenizer",
                "/x.model",
            ],
            "data.path='/nonexistent/shards' has no train/index.json",
            id="data",
        ),
        pytest.param(
            ["--data.tokenizer", "/nonexistent/tok.model"],
            "data.tokenizer='/nonexistent/tok.model' does not exist",
            marks=pytest.mark.slow,  # the same early check as the missing data; -m slow
            id="tokenizer",
        ),
    ],
)
def test_missing_inputs_fail_before_the_model_is_built(
    demo_dir: str,  # noqa: F811
    overrides: list[str],
    message: str,
) -> None:
    proc = _cli("--config", "examples/tiny_cpu.yaml", *tiny_overrides(demo_dir, *overrides))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    # Nothing after data checking ran: no parameters were built, no step was taken.
    assert "iter " not in proc.stdout


def _diverge(rank: int, world: int, data_dir: str) -> dict[str, str]:
    from ssa_megatron.training.loop import NonFiniteError

    out = {}
    for policy in ("stop", "skip"):
        # An absurd learning rate overflows the weights after the first update.
        args = tiny_overrides(
            data_dir,
            "--optim.lr",
            "1e30",
            "--optim.min_lr",
            "0",
            "--train.train_iters",
            "8",
            "--train.nan_policy",
            policy,
            "--train.max_skipped_steps",
            "2",
            "--train.grad_clip",
            "0",
        )
        try:
            run_config(rank, world, args)
            out[policy] = "finished"
        except NonFiniteError as err:
            out[policy] = str(err)
    return out


def test_nan_policy_stop_and_skip(demo_dir: str) -> None:  # noqa: F811
    (out,) = run_distributed(_diverge, world_size=1, args=(demo_dir,))
    assert "non-finite" in out["stop"] and "train.nan_policy=stop" in out["stop"], out
    assert out["stop"].startswith("iteration 2:") or out["stop"].startswith("iteration 3:"), out
    assert "3 updates skipped for non-finite loss/grad (train.max_skipped_steps=2)" in out["skip"], out
