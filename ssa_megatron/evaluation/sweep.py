"""Sparsity-budget sweep: sparse perplexity and attention sparsity as block_count grows (block_size fixed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .perplexity import Batch, evaluate_batches

DEFAULT_BLOCK_COUNTS = (8, 16, 32, 64, 128, 256)


def budget_sweep(
    model: Any,
    batches: Sequence[Batch],
    block_counts: Sequence[int] = DEFAULT_BLOCK_COUNTS,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """One row per block_count (``receptive_field = block_count * block_size`` tokens) with sparse perplexity
    and the paper's attention sparsity, plus the full-attention perplexity as the reference."""
    if not block_counts or min(block_counts) < 1:
        raise ValueError(f"block counts must be positive integers, got {list(block_counts)}")
    block_size = int(model.config.block_size)
    rows = []
    for count in block_counts:
        res = evaluate_batches(
            model,
            batches,
            mode="sparse",
            block_count=count,
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
    full = evaluate_batches(model, batches, mode="full", desc="sweep full", progress=progress)
    return {"block_size": block_size, "length": full["length"], "rows": rows, "ppl_full": full["ppl"]}
