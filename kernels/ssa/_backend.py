"""Which implementation an op runs: the Triton kernel or the plain-PyTorch reference.

Shared by every kernel package, so that ``backend="auto" | "triton" | "naive"`` means the same
everywhere: ``auto`` runs Triton on CUDA tensors and the reference on CPU tensors; ``triton`` on CPU
needs the interpreter (tests set ``TRITON_INTERPRET=1`` before triton is imported). It lives in
kernels.ssa because the HF export ships that package as a self-contained copy, which may import
nothing outside itself; kernels.alignment imports it from here.
"""

from __future__ import annotations

import os

import torch


def check_backend(backend: str) -> None:
    if backend not in ("auto", "triton", "naive"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive'; got {backend!r}")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernel on ``tensors`` (raises where it cannot)."""
    check_backend(backend)
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
                "for tests); use backend='naive' or 'auto' on CPU"
            )
        if len({t.dtype for t in tensors}) > 1:
            raise ValueError(
                f"backend='triton' needs one dtype for all inputs; got {[t.dtype for t in tensors]}"
            )
        return True
    return False
