"""Output allocation for the Triton kernels, with an opt-in poison mode for tests.

Kernels allocate their outputs with torch.empty, so an element a kernel forgets to write holds
whatever was in memory, often a plausible value. Under poisoned_outputs() every allocation is
filled with NaN (floats) or a large negative sentinel (integers) first, so a test comparing
against the reference catches any unwritten element.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_POISON = False
INT_POISON = -123456


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _POISON:
        t.fill_(float("nan") if t.is_floating_point() else max(INT_POISON, torch.iinfo(t.dtype).min))
    return t


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _fill(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return _fill(torch.empty_like(x))


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous
