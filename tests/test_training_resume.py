"""Exact resume: stop after N iterations (checkpoint), resume, and the loss curve and data order
equal those of an uninterrupted run; the resumed run also restores the LR schedule."""

from __future__ import annotations

from tests.distributed import run_distributed
from tests.test_training_loss import demo_dir, run_config, tiny_overrides  # noqa: F401 (fixture)

ITERS = 6


def _runs(rank: int, world: int, data_dir: str, ckpt_dir: str) -> dict[str, list[dict]]:
    common = ["--train.train_iters", str(ITERS), "--eval.at_end", "false", "--model.attention_mode", "ssa"]
    full = run_config(rank, world, tiny_overrides(data_dir, *common, "--checkpoint.save_on_exit", "false"))
    first = run_config(
        rank,
        world,
        tiny_overrides(data_dir, *common, "--train.stop_after", "3", "--checkpoint.dir", ckpt_dir),
    )
    resumed = run_config(
        rank,
        world,
        tiny_overrides(
            data_dir,
            *common,
            "--checkpoint.dir",
            ckpt_dir,
            "--checkpoint.load",
            "auto",
            "--checkpoint.save_on_exit",
            "false",
        ),
    )
    return {
        "full": full["history"],
        "first": first["history"],
        "resumed": resumed["history"],
        "resumed_log": resumed["log"],
    }


def test_resume_reproduces_uninterrupted_run(demo_dir: str, tmp_path) -> None:  # noqa: F811
    (r,) = run_distributed(_runs, world_size=1, args=(demo_dir, str(tmp_path / "ckpt")))
    assert [h["iteration"] for h in r["first"]] == [1, 2, 3]
    assert [h["iteration"] for h in r["resumed"]] == [4, 5, 6]
    assert "resumed from" in r["resumed_log"] and "iter_0000003" in r["resumed_log"]
    joined = r["first"] + r["resumed"]
    for key in ("ce_loss", "align_loss", "lr", "grad_norm", "mode"):
        # Bitwise: same weights, optimizer moments, schedule step, RNG and sample order.
        assert [h[key] for h in joined] == [h[key] for h in r["full"]], key
