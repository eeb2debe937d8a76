"""Training: config schema, launch env, loop, engines (megatron / DeepSpeed), checkpoints, metrics.

`run(cfg)` trains and returns a `RunResult`; `main_run` wraps it for the command line (exit
codes, clear messages for user errors, process-group teardown).
"""

from __future__ import annotations

import sys
from typing import Any

from ssa_megatron.training.config import ConfigError, TrainConfig, load_config, parse_override_args

__all__ = ["ConfigError", "RunResult", "TrainConfig", "load_config", "main_run", "parse_override_args", "run"]


def __getattr__(name: str) -> Any:
    # megatron is imported only when training actually starts (the CLI parses and validates first).
    if name in ("run", "RunResult"):
        from ssa_megatron.training import runner

        return getattr(runner, name)
    raise AttributeError(name)


def main_run(cfg: TrainConfig, local_rank: int | None = None) -> int:
    """Run from the CLI: config errors exit 2, other user errors (data, checkpoint, divergence) exit 1,
    each with one clear line; a run stopped by SIGTERM or Ctrl-C saves and exits 0."""
    import torch.distributed as dist

    from ssa_megatron.data.loader import DataError
    from ssa_megatron.training.checkpoint import CheckpointError
    from ssa_megatron.training.launch import detect_launch
    from ssa_megatron.training.loop import NonFiniteError
    from ssa_megatron.training.runner import run

    try:
        run(cfg, detect_launch(local_rank))
    except ConfigError as err:
        # Also layout errors only knowable with the world size: a usage error, like argparse's.
        print(f"pretrain_ssa.py: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        # A damaged or unreadable shard: the message names the file (and row); fix the data, rerun.
        print(f"pretrain_ssa.py: data error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:
        print(f"pretrain_ssa.py: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (start-up, data preparation, the final evaluation): the loop
        # itself turns the first Ctrl-C into a save and a clean stop.
        print("pretrain_ssa.py: interrupted (Ctrl-C) outside the training loop; no checkpoint was written "
              "then", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        if dist.is_initialized():
            from ssa_megatron.parallel.state import destroy_parallel

            destroy_parallel()
            dist.destroy_process_group()
    return 0
