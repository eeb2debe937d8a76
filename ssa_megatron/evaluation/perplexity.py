"""Perplexity (and, in the same forward passes, attention statistics) of a model over token windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .metrics import AttentionStatsAccumulator, masked_nll_sum, perplexity

Batch = dict[str, torch.Tensor]


def windows_to_batches(windows: torch.Tensor, batch_size: int = 1) -> list[Batch]:
    """Token windows ``[N, T]`` as batch dicts (the contract of docs/architecture.md): every next token of
    a window is a target, positions run 0..T-1."""
    batches = []
    for start in range(0, windows.shape[0], batch_size):
        tokens = windows[start : start + batch_size]
        labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
        loss_mask[:, -1] = 0.0
        batches.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
    return batches


@torch.no_grad()
def evaluate_batches(
    model: Any,
    batches: Sequence[Batch],
    *,
    mode: str,
    block_count: int | None = None,
    attention_stats: bool = False,
    desc: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score batch dicts (``tokens``, ``labels``, ``loss_mask``, optional ``position_ids`` that restart at
    document starts, as training validation does) with an SSA HF model in ``mode`` (``"sparse"``/``"full"``).

    Returns ``{"mode", "block_count", "length", "tokens", "nll", "ppl"}`` plus ``"attention"`` (per-layer and
    mean sparsity/entropy/KL over every query, see ``SSAForCausalLM.collect_attention_stats``) when
    ``attention_stats``.
    """
    device = next(model.parameters()).device
    block_count = int(model.config.block_count if block_count is None else block_count)
    nll_sum, tokens = 0.0, 0.0
    stats = AttentionStatsAccumulator()
    for batch in tqdm(batches, desc=desc or f"ppl {mode}", disable=not progress, leave=False):
        ids = batch["tokens"].to(device)
        pos = batch.get("position_ids")
        kwargs = {
            "use_cache": False,
            "attention_mode": mode,
            "block_count": block_count,
            "position_ids": None if pos is None else pos.to(device),
        }
        if attention_stats:
            with model.collect_attention_stats() as sink:
                logits = model(ids, **kwargs).logits
            stats.add(sink)
        else:
            logits = model(ids, **kwargs).logits
        batch_nll, batch_tokens = masked_nll_sum(
            logits, batch["labels"].to(device), batch["loss_mask"].to(device)
        )
        nll_sum += batch_nll
        tokens += batch_tokens
    result: dict[str, Any] = {
        "mode": mode,
        "block_count": block_count,
        "length": int(batches[0]["tokens"].shape[1]) if batches else 0,
        "tokens": int(tokens),
        "nll": nll_sum / max(tokens, 1.0),
        "ppl": perplexity(nll_sum, int(tokens)),
    }
    if attention_stats:
        result["attention"] = stats.summary()
    return result


def evaluate_windows(
    model: Any, windows: torch.Tensor, *, batch_size: int = 1, **kwargs: Any
) -> dict[str, Any]:
    """``evaluate_batches`` over token windows ``[N, T]`` (see ``windows_to_batches``)."""
    return evaluate_batches(model, windows_to_batches(windows, batch_size), **kwargs)
