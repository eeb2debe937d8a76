"""Pure reductions shared by the evaluation stages (no model code here, so they are checked by hand)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

STAT_NAMES = ("sparsity", "entropy", "kl_sparse_full")


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp(mean NLL)``; refuses an empty evaluation instead of returning nan."""
    if tokens <= 0:
        raise ValueError("no tokens were scored; give longer or more validation windows")
    return math.exp(nll_sum / tokens)


def masked_nll_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[float, float]:
    """Sum of the NLL of ``labels`` under ``logits`` where ``loss_mask`` is 1, and how many such tokens."""
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).to(nll.dtype)
    return float((nll * mask).sum()), float(mask.sum())


class AttentionStatsAccumulator:
    """Running per-layer means of the per-(query, head) statistics over every position, head and window."""

    def __init__(self) -> None:
        self._sums: dict[int, dict[str, float]] = {}
        self._counts: dict[int, int] = {}

    def add(self, records: Iterable[Mapping[str, torch.Tensor | int]]) -> None:
        for rec in records:
            layer = int(rec["layer"])
            sums = self._sums.setdefault(layer, dict.fromkeys(STAT_NAMES, 0.0))
            for name in STAT_NAMES:
                sums[name] += float(torch.as_tensor(rec[name]).double().sum())
            self._counts[layer] = self._counts.get(layer, 0) + torch.as_tensor(rec["sparsity"]).numel()

    def summary(self) -> dict[str, object]:
        """``{"per_layer": [{"layer", stats...}], "mean": {stats...}}``; the mean weights layers equally."""
        if not self._counts:
            raise ValueError("no attention statistics were collected")
        per_layer = [
            {"layer": layer, **{n: self._sums[layer][n] / self._counts[layer] for n in STAT_NAMES}}
            for layer in sorted(self._counts)
        ]
        mean = {n: sum(row[n] for row in per_layer) / len(per_layer) for n in STAT_NAMES}
        return {"per_layer": per_layer, "mean": mean}
