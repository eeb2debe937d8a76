"""Sparsity-budget sweep: sparse perplexity and attention sparsity as block_count grows (block_size fixed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .perplexity import evaluate_windows

DEFAULT_BLOCK_COUNTS = (8, 16, 32, 64, 128, 256)


def budget_sweep(
    model: Any,
    windows: torch.Tensor,
    block_counts: Sequence[int] = DEFAULT_BLOCK_COUNTS,
    *,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """One row per block_count (``receptive_field = block_count * block_size`` tokens) with sparse perplexity
    and the paper's attention sparsity, plus the full-attention perplexity as the reference."""
    if not block_counts or min(block_counts) < 1:
        raise ValueError(f"block counts must be positive integers, got {list(block_counts)}")
    block_size = int(model.config.block_size)
    rows = []
    for count in block_counts:
        res = evaluate_windows(
            model,
            windows,
            mode="sparse",
            block_count=count,
            batch_size=batch_size,
            attention_stats=True,
            desc=f"sweep block_count={count}",
            progress=progress,
        )
        rows.append(
            {
                "block_count": count,
                "receptive_field": count * block_size,
                "ppl_sparse": res["ppl"],
                "sparsity": res["attention"]["mean"]["sparsity"],
                "kl_sparse_full": res["attention"]["mean"]["kl_sparse_full"],
            }
        )
    full = evaluate_windows(
        model, windows, mode="full", batch_size=batch_size, desc="sweep full", progress=progress
    )
    return {"block_size": block_size, "length": int(windows.shape[1]), "rows": rows, "ppl_full": full["ppl"]}
