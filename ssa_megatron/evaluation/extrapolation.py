"""Long-context extrapolation: perplexity at multiples of the training length, optionally RoPE-scaled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import make_windows
from .perplexity import evaluate_windows

ROPE_CHOICES = ("none", "linear", "dynamic")


def rope_scaling_for(kind: str, factor: float, train_length: int) -> dict[str, Any] | None:
    """The ``rope_scaling`` dict that stretches RoPE by ``factor`` (None for ``"none"`` or factor <= 1)."""
    if kind not in ROPE_CHOICES:
        raise ValueError(f"rope scaling must be one of {ROPE_CHOICES}, got {kind!r}")
    if kind == "none" or factor <= 1:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = int(train_length)
    return scaling


def extrapolation(
    model: Any,
    stream: torch.Tensor,
    *,
    train_length: int,
    factors: Sequence[float] = (1, 2, 4),
    rope_scaling: str = "none",
    modes: Sequence[str] = ("sparse", "full"),
    max_windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rows ``{factor, length, mode, ppl}``; with ``rope_scaling`` the model's RoPE is stretched by each
    factor while it is evaluated and restored afterwards. Lengths the data cannot fill are listed as
    skipped."""
    original = model.config.rope_scaling
    rows, skipped = [], []
    try:
        for factor in factors:
            length = round(train_length * factor)
            try:
                windows = make_windows(stream, length, max_windows)
            except ValueError as exc:
                skipped.append({"factor": factor, "length": length, "reason": str(exc)})
                continue
            model.set_rope_scaling(rope_scaling_for(rope_scaling, factor, train_length))
            for mode in modes:
                res = evaluate_windows(
                    model, windows, mode=mode, desc=f"extrapolation {length} {mode}", progress=progress
                )
                rows.append(
                    {
                        "factor": factor,
                        "length": length,
                        "mode": mode,
                        "ppl": res["ppl"],
                        "windows": int(windows.shape[0]),
                    }
                )
    finally:
        model.set_rope_scaling(original)
    return {"train_length": train_length, "rope_scaling": rope_scaling, "rows": rows, "skipped": skipped}
