"""Checkpoints: sharded save/load round trip, atomic `latest`, clear errors for broken checkpoints.

A real SSA model with megatron's DDP and optimizer, one gloo rank, fed fresh random tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed


def _cfg(seed: int):
    from ssa_megatron.training.config import load_config, parse_override_args

    return load_config(
        None,
        parse_override_args(
            [
                "--data.path",
                "unused",
                "--data.tokenizer",
                "unused",
                "--data.seq_length",
                "64",
                "--model.num_layers",
                "2",
                "--model.hidden_size",
                "64",
                "--model.block_count",
                "2",
                "--model.vocab_size",
                "128",
                "--train.precision",
                "fp32",
                "--parallel.distributed_optimizer",
                "false",
                "--train.micro_batch_size",
                "2",
                "--train.global_batch_size",
                "2",
                "--train.seed",
                str(seed),
                "--optim.warmup_iters",
                "1",
                "--train.train_iters",
                "10",
            ]
        ),
    )


def _random_batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 128, (2, 65), generator=gen)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, 64),
        "position_ids": torch.arange(64).expand(2, 64).contiguous(),
    }


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model[0].named_parameters()}


def _roundtrip(rank: int, world: int, root: str) -> dict:
    from ssa_megatron.parallel.state import destroy_parallel
    from ssa_megatron.training import checkpoint as ckpt
    from ssa_megatron.training.loop import train_step
    from ssa_megatron.training.runner import build_engine

    torch.set_num_threads(1)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(7)
    cfg = _cfg(seed=1)
    engine = build_engine(cfg, 128, device)
    for it in (1, 2):
        train_step(engine, it, [_random_batch(gen)])
        engine.scheduler.step(1)
    saved_params = _params(engine)
    saved_opt = engine.optimizer.state_dict()
    torch.manual_seed(1234)
    rng_draw_after_save = None
    path = ckpt.save_checkpoint(
        root, 2, engine.model, engine.optimizer, engine.scheduler, {"pos": 5}, cfg.to_dict(), cfg.to_yaml()
    )
    rng_draw_after_save = torch.rand(3)
    destroy_parallel()

    # A different seed gives different initial weights; loading must replace all of them.
    fresh = build_engine(_cfg(seed=99), 128, device)
    before = _params(fresh)
    loaded = ckpt.load_checkpoint(
        ckpt.resolve_checkpoint("auto", root), fresh.model, fresh.optimizer, fresh.scheduler
    )
    after = _params(fresh)
    opt = fresh.optimizer.state_dict()
    result = {
        "path": str(path),
        "differed_before": any(not torch.equal(before[k], saved_params[k]) for k in before),
        "weights_equal": all(torch.equal(after[k], saved_params[k]) for k in after),
        "exp_avg_equal": all(
            torch.equal(opt["state"][i]["exp_avg"], saved_opt["state"][i]["exp_avg"])
            for i in saved_opt["state"]
        ),
        "iteration": loaded.iteration,
        "data_state": loaded.data_state,
        "scheduler_steps": fresh.scheduler.num_steps,
        "rng_equal": torch.equal(torch.rand(3), rng_draw_after_save),
    }
    destroy_parallel()
    return result


def _load_errors(rank: int, world: int, cases: list[tuple[str, str]]) -> list[str]:
    """Try to resume from each (checkpoint.load, checkpoint.dir); return each CheckpointError message."""
    from ssa_megatron.parallel.state import destroy_parallel
    from ssa_megatron.training import checkpoint as ckpt
    from ssa_megatron.training.runner import build_engine

    torch.set_num_threads(1)
    engine = build_engine(_cfg(seed=1), 128, torch.device("cpu"))
    messages = []
    for load, ckpt_dir in cases:
        try:
            path = ckpt.resolve_checkpoint(load, ckpt_dir)
            ckpt.load_checkpoint(path, engine.model, engine.optimizer, engine.scheduler)
            messages.append("no error")
        except ckpt.CheckpointError as err:
            messages.append(str(err))
    destroy_parallel()
    return messages


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ckpt")
    (result,) = run_distributed(_roundtrip, world_size=1, args=(str(root),))
    return root, result


def test_roundtrip_restores_everything(saved: tuple[Path, dict]) -> None:
    root, r = saved
    assert r["differed_before"], "the fresh model must start from other weights for the test to mean anything"
    assert r["weights_equal"] and r["exp_avg_equal"]
    assert r["iteration"] == 2 and r["data_state"] == {"pos": 5}
    # Built with one step (iteration 1 uses schedule step 1) plus two trained steps.
    assert r["scheduler_steps"] == 3
    assert r["rng_equal"]
    assert (root / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in (root / "iter_0000002").iterdir()) == [
        "complete.json",
        "config.yaml",
        "model",
        "optim",
        "rank_00000.pt",
        "train_state.pt",
    ]
    assert "attention_mode: ssa" in (root / "iter_0000002" / "config.yaml").read_text()


def _damage(root: Path, dst: Path, damage: str) -> tuple[str, str, str]:
    """Copy the good checkpoint dir to `dst`, break it one way; return (load, dir, expected message)."""
    shutil.copytree(root, dst)
    it = dst / "iter_0000002"
    if damage == "partial_save":
        # A save killed midway leaves only the .partial directory; `latest` still names the good one.
        shutil.copytree(it, dst / "iter_0000004.partial")
        (dst / "iter_0000004.partial" / "complete.json").unlink()
        return "auto", str(dst), "no error"
    if damage == "no_complete_marker":
        (it / "complete.json").unlink()
        return "auto", str(dst), "is incomplete (no complete.json)"
    if damage == "truncated_shard":
        shard = max((p for p in (it / "model").rglob("*.distcp")), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:100])
        return "auto", str(dst), "could not read the model weights"
    if damage == "missing_rank_state":
        (it / "rank_00000.pt").unlink()
        return "auto", str(dst), "per-rank state file rank_00000.pt is missing"
    if damage == "dangling_latest":
        (dst / "latest").write_text("iter_0000009\n")
        return "auto", str(dst), "points at 'iter_0000009', which does not exist"
    assert damage == "not_a_checkpoint"
    return str(dst.parent), str(dst), "neither a checkpoint"


def test_broken_checkpoints_give_clear_errors(saved: tuple[Path, dict], tmp_path: Path) -> None:
    damages = [
        "partial_save",
        "no_complete_marker",
        "truncated_shard",
        "missing_rank_state",
        "dangling_latest",
        "not_a_checkpoint",
    ]
    cases = [_damage(saved[0], tmp_path / d, d) for d in damages]
    messages = run_distributed(_load_errors, world_size=1, args=([(c[0], c[1]) for c in cases],))[0]
    for damage, (_, _, expect), message in zip(damages, cases, messages):
        assert expect in message, f"{damage}: {message}"
