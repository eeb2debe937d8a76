"""Perplexity (and, in the same forward passes, attention statistics) of a model over token windows."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .metrics import AttentionStatsAccumulator, perplexity, shifted_nll_sum


@torch.no_grad()
def evaluate_windows(
    model: Any,
    windows: torch.Tensor,
    *,
    mode: str,
    block_count: int | None = None,
    batch_size: int = 1,
    attention_stats: bool = False,
    desc: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every window of ``windows [N, T]`` with an SSA HF model in ``mode`` (``"sparse"``/``"full"``).

    Returns ``{"mode", "block_count", "length", "tokens", "nll", "ppl"}`` plus ``"attention"`` (per-layer and
    mean sparsity/entropy/KL, see ``SSAForCausalLM.collect_attention_stats``) when ``attention_stats``.
    """
    device = next(model.parameters()).device
    block_count = int(model.config.block_count if block_count is None else block_count)
    nll_sum, tokens = 0.0, 0
    stats = AttentionStatsAccumulator()
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc or f"ppl {mode}", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        if attention_stats:
            with model.collect_attention_stats() as sink:
                logits = model(ids, use_cache=False, attention_mode=mode, block_count=block_count).logits
            stats.add(sink)
        else:
            logits = model(ids, use_cache=False, attention_mode=mode, block_count=block_count).logits
        batch_nll, batch_tokens = shifted_nll_sum(logits, ids)
        nll_sum += batch_nll
        tokens += batch_tokens
    result: dict[str, Any] = {
        "mode": mode,
        "block_count": block_count,
        "length": int(windows.shape[1]),
        "tokens": tokens,
        "nll": nll_sum / tokens,
        "ppl": perplexity(nll_sum, tokens),
    }
    if attention_stats:
        result["attention"] = stats.summary()
    return result
