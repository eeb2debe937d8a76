"""Short real training runs on the demo corpus: the loss falls for ssa, full and sparse attention.

Also the shared helpers of the training tests: one demo data set per pytest run (built
once; `prepare_demo_dataset` is a no-op for an existing set with the same parameters) and a
tiny-model config (hidden 64, 2 layers, sequence 64).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.run_helpers import CPU_FP32, NO_OUTPUT_RUN, TINY_MODEL, TINY_SCHEDULE, flags

DEMO = {"seq_length": 64, "demo_vocab_size": 1024, "demo_bytes": 600_000}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ssa_megatron.data import prepare_demo_dataset

    root = tmp_path_factory.getbasetemp() / "training_demo"
    prepare_demo_dataset(
        root,
        seq_len=DEMO["seq_length"],
        vocab_size=DEMO["demo_vocab_size"],
        target_bytes=DEMO["demo_bytes"],
        seed=1234,
    )
    return str(root)


def tiny_overrides(data_dir: str, *extra: str) -> list[str]:
    """--section.key value list for a tiny fp32 CPU run on the demo set in `data_dir`."""
    args = flags(
        {
            "data.path": data_dir,
            "data.build_demo": "true",
            "data.seq_length": DEMO["seq_length"],
            "data.demo_vocab_size": DEMO["demo_vocab_size"],
            "data.demo_bytes": DEMO["demo_bytes"],
            **TINY_MODEL,
            **CPU_FP32,
            **TINY_SCHEDULE,
            "eval.iters": "1",
            **NO_OUTPUT_RUN,
        }
    )
    return args + list(extra)


def run_config(rank: int, world: int, overrides: list[str]) -> dict:
    """Body for run_distributed: train with `overrides` and return the loss curve and final evaluation."""
    import io

    import torch

    from ssa_megatron.parallel.state import destroy_parallel
    from ssa_megatron.training import load_config, parse_override_args, run

    torch.set_num_threads(1)
    cfg = load_config(None, parse_override_args(overrides))
    out = io.StringIO()
    try:
        result = run(cfg, stream=out)
    finally:
        destroy_parallel()
    return {
        "ce": [h["ce_loss"] for h in result.history],
        "history": result.history,
        "final_eval": result.final_eval,
        "iteration": result.iteration,
        "checkpoint": result.checkpoint,
        "log": out.getvalue(),
    }


def _three_modes(rank: int, world: int, data_dir: str) -> dict[str, dict]:
    return {
        mode: run_config(
            rank, world, tiny_overrides(data_dir, "--model.attention_mode", mode, "--train.train_iters", "16")
        )
        for mode in ("ssa", "full", "sparse")
    }


def test_loss_decreases_for_every_attention_mode(demo_dir: str) -> None:
    (results,) = run_distributed(_three_modes, world_size=1, args=(demo_dir,))
    for mode, r in results.items():
        ce = r["ce"]
        assert len(ce) == 16 and all(math.isfinite(x) for x in ce), (mode, ce)
        # From ~ln(1024)=6.9 at init; 16 steps of 256 tokens must clearly move it down.
        assert sum(ce[-4:]) / 4 < ce[0] - 0.5, (mode, ce)
        for eval_mode in ("sparse", "full"):
            ev = r["final_eval"][eval_mode]
            assert math.isfinite(ev["ppl"]) and ev["ppl"] < math.exp(ce[0]), (mode, eval_mode, ev)
            assert 0.0 < ev["sparsity"] <= 1.0 + 1e-6
        modes_drawn = "".join(h["mode"] for h in r["history"])
        if mode == "ssa":
            assert set(modes_drawn) == {"F", "S"}, modes_drawn
            assert all(h["align_loss"] > 0 for h in r["history"])
        else:
            assert set(modes_drawn) == {mode[0].upper()}
            assert all("align_loss" not in h for h in r["history"])
        assert "final (16 iterations): sparse-mode validation perplexity" in r["log"]


def test_demo_set_is_shared(demo_dir: str) -> None:
    assert (Path(demo_dir) / "train" / "index.json").exists()
    assert (Path(demo_dir) / "tokenizer.model").exists()
