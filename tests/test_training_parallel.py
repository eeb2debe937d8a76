"""Tensor, pipeline and context parallel runs (2 gloo ranks) reproduce the 1-rank loss curve (fp32).

Megatron initialises a pipeline stage's layers from the stage's own RNG stream, so every run
starts from one shared checkpoint, loaded weights-only: that also checks that a TP=1
checkpoint loads onto TP=2, PP=2 and CP=2 layouts.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.test_training_loss import demo_dir, run_config, tiny_overrides  # noqa: F401 (fixture)

STEPS = 4


def _reference(rank: int, world: int, data_dir: str, ckpt_dir: str) -> list[float]:
    run_config(
        rank,
        world,
        tiny_overrides(
            data_dir,
            "--train.train_iters",
            "1",
            "--optim.warmup_iters",
            "0",
            "--checkpoint.dir",
            ckpt_dir,
            "--eval.at_end",
            "false",
        ),
    )
    return run_config(rank, world, _from_init(data_dir, ckpt_dir))["ce"]


def _from_init(data_dir: str, ckpt_dir: str, *extra: str) -> list[str]:
    return tiny_overrides(
        data_dir,
        "--train.train_iters",
        str(STEPS),
        "--checkpoint.load",
        ckpt_dir,
        "--checkpoint.load_weights_only",
        "true",
        "--checkpoint.save_on_exit",
        "false",
        "--eval.at_end",
        "false",
        "--model.num_layers",
        "2",
        *extra,
    )


def _layout(rank: int, world: int, data_dir: str, ckpt_dir: str, layout: list[str]) -> list[float]:
    return run_config(rank, world, _from_init(data_dir, ckpt_dir, *layout))["ce"]


@pytest.fixture(scope="module")
def reference(demo_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[float]]:  # noqa: F811
    ckpt_dir = str(tmp_path_factory.mktemp("init_ckpt"))
    (ce,) = run_distributed(_reference, world_size=1, args=(demo_dir, ckpt_dir))
    return ckpt_dir, ce


@pytest.mark.parametrize(
    "layout",
    [["--parallel.tensor", "2"], ["--parallel.pipeline", "2"], ["--parallel.context", "2"]],
    ids=["tp2", "pp2", "cp2"],
)
def test_parallel_layout_matches_single_rank(
    demo_dir: str,  # noqa: F811
    reference: tuple[str, list[float]],
    layout: list[str],
) -> None:
    # A fresh process pair per layout, as a real launch has.
    ckpt_dir, ref = reference
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for rank, ce in enumerate(run_distributed(_layout, world_size=2, args=(demo_dir, ckpt_dir, layout))):
        assert ce == pytest.approx(ref, rel=2e-5, abs=2e-5), (layout, rank, ce, ref)
