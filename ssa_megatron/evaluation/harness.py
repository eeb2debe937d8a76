"""Standard benchmarks through lm-evaluation-harness (the ``lmeval`` extra) on an exported HF directory.

The harness loads the directory as any Hugging Face model (``--model hf``, ``trust_remote_code``); the
SSA attention mode is a ``from_pretrained`` override (``attention_mode=sparse|full``), so one exported
model is scored in both modes. Equivalent command line::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,attention_mode=full --tasks ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssa_megatron.hf.configuration_ssa import ATTENTION_MODES

# Per-task entries of the harness's results that are not metrics.
_BOOKKEEPING = frozenset({"alias", "sample_len", "samples"})


class HarnessError(ValueError):
    """A harness request that cannot run (not installed, unknown task, not an SSA export); names the value."""


def _task_manager(include: str | Path | None) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HarnessError(
            "lm-evaluation-harness is not installed; pip install 'ssa-megatron[lmeval]'"
        ) from err
    if include is not None and not Path(include).is_dir():
        raise HarnessError(f"--lm-eval-include {include} is not a directory of task YAML files")
    return TaskManager(include_path=str(include) if include is not None else None)


def check_request(
    model_dir: str | Path, tasks: Sequence[str], modes: Sequence[str], include: str | Path | None = None
) -> Any:
    """Refuse what cannot run before any model is loaded; returns the harness's task manager."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise HarnessError(
            f"--checkpoint {model_dir} is not an exported HF directory (no config.json); the harness runs "
            "on exports: write one with tools/convert_to_hf.py"
        )
    if json.loads(config.read_text(encoding="utf-8")).get("model_type") != "ssa":
        raise HarnessError(
            f"{config}: model_type is not 'ssa'; export the checkpoint with tools/convert_to_hf.py"
        )
    bad_modes = [m for m in modes if m not in ATTENTION_MODES]
    if bad_modes or not modes:
        raise HarnessError(f"--lm-eval-modes {','.join(modes)!r}: choose from {', '.join(ATTENTION_MODES)}")
    if not tasks:
        raise HarnessError("--lm-eval-tasks is empty; name at least one task")
    manager = _task_manager(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(
            f"--lm-eval-tasks: unknown task(s) {unknown}; list them with `lm_eval ls tasks`, or pass "
            "--lm-eval-include with the directory of their YAML files"
        )
    return manager


def run_harness(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    modes: Sequence[str] = ATTENTION_MODES,
    include: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {task: {metric: value}}}`` of ``tasks`` on the exported model in each attention mode.

    ``batch_size`` 1 by default: the SSA model refuses padded attention masks, which the harness builds
    for batched ``generate_until`` requests.
    """
    manager = check_request(model_dir, tasks, modes, include)
    from lm_eval import simple_evaluate

    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        out = simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(model_dir),
                "trust_remote_code": True,
                "attention_mode": mode,
                "dtype": dtype,
            },
            tasks=list(tasks),
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
        assert out is not None  # None only on non-zero ranks of a distributed harness run
        results[mode] = {
            task: {
                k: float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and k not in _BOOKKEEPING
            }
            for task, metrics in out["results"].items()
        }
    return results
