"""Plain-PyTorch reference of the two-way alignment sum (the definition the fused kernel must match)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

KINDS = ("smooth_l1", "mse")


def _elementwise(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "smooth_l1":
        return lambda a, b: F.smooth_l1_loss(a, b, reduction="sum", beta=1.0)
    if kind == "mse":
        return lambda a, b: F.mse_loss(a, b, reduction="sum")
    raise ValueError(f"alignment_loss={kind!r} is not one of {', '.join(KINDS)}")


def two_way_alignment_sum(full: torch.Tensor, sparse: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """``f(full, sg(sparse)) + f(sg(full), sparse)`` summed over all elements, in fp32: each direction
    pulls one branch toward the other's detached output."""
    f = _elementwise(kind)
    full, sparse = full.float(), sparse.float()
    return f(full, sparse.detach()) + f(full.detach(), sparse)
