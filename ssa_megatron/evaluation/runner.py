"""One evaluation run over an SSA HF model: every stage, then the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import check_vocab, make_windows
from .extrapolation import extrapolation
from .passkey import passkey_retrieval
from .perplexity import Batch, evaluate_batches, windows_to_batches
from .report import write_report
from .sweep import DEFAULT_BLOCK_COUNTS, budget_sweep


@dataclass
class EvalOptions:
    """What to run. ``seq_len`` defaults to the model's training length; empty sequences skip a stage."""

    seq_len: int | None = None
    max_windows: int | None = 16
    batch_size: int = 1
    block_counts: Sequence[int] = DEFAULT_BLOCK_COUNTS
    extrapolation_factors: Sequence[float] = (1, 2, 4)
    rope_scaling: str = "none"
    passkey_lengths: Sequence[int] = ()
    passkey_depths: Sequence[float] = (0.1, 0.5, 0.9)
    passkey_trials: int = 5
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def run_evaluation(
    model: Any,
    stream: torch.Tensor,
    options: EvalOptions,
    out_dir: str | Path,
    *,
    encode: Callable[[str], list[int]] | None = None,
    batches: Sequence[Batch] | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Perplexity + attention statistics (sparse and full), budget sweep, extrapolation and (given a
    tokenizer ``encode`` and passkey lengths) passkey retrieval; writes results.json, report.md and PNGs.

    ``batches`` (e.g. the packed validation rows, whose RoPE positions restart at document starts as in
    training validation) replace the windows cut from ``stream`` for perplexity, attention statistics and
    the budget sweep; extrapolation always cuts its longer windows from ``stream``. ``checkpoint`` (see
    ``compare.describe_checkpoint``: run name, path, iteration) labels the report, its plots and
    tools/compare_runs.py's tables."""
    config = model.config
    check_vocab(stream, config.vocab_size, "validation data")
    seq_len = options.seq_len or int(config.train_seq_length)
    if batches is None:
        batches = windows_to_batches(make_windows(stream, seq_len, options.max_windows), options.batch_size)
    else:
        seq_len = int(batches[0]["tokens"].shape[1])
    settings = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(options).items()}
    settings.update(seq_len=seq_len, block_size=config.block_size, default_block_count=config.block_count)
    results: dict[str, Any] = {"settings": settings, "perplexity": {}}
    if checkpoint is not None:
        results = {"checkpoint": checkpoint, **results}
    for mode in ("sparse", "full"):
        results["perplexity"][mode] = evaluate_batches(
            model,
            batches,
            mode=mode,
            attention_stats=True,
            progress=options.progress,
        )
    if options.block_counts:
        results["budget_sweep"] = budget_sweep(
            model, batches, options.block_counts, progress=options.progress
        )
    if options.extrapolation_factors:
        results["extrapolation"] = extrapolation(
            model,
            stream,
            train_length=int(config.train_seq_length),
            factors=options.extrapolation_factors,
            rope_scaling=options.rope_scaling,
            max_windows=options.max_windows,
            progress=options.progress,
        )
    if options.passkey_lengths:
        if encode is None:
            raise ValueError(
                "passkey retrieval needs a tokenizer; pass --tokenizer or drop --passkey-lengths"
            )
        results["passkey"] = passkey_retrieval(
            model,
            encode,
            lengths=options.passkey_lengths,
            depths=options.passkey_depths,
            trials=options.passkey_trials,
            seed=options.seed,
            progress=options.progress,
        )
    results["files"] = write_report(results, out_dir)
    return results
