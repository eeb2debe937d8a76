"""The SSA alignment term between the two attention branches (see ssa_megatron/model/alignment.py).

One entry point, ``two_way_alignment_sum``: ``f(full, sg(sparse)) + f(sg(full), sparse)`` summed over
every element, fp32, with f = SmoothL1 (beta 1) or squared error. ``backend="auto"`` runs the fused
Triton kernel (fused_kernel.py) on CUDA tensors and the plain-PyTorch reference (naive.py) on CPU.
"""

from __future__ import annotations

import torch

from kernels.alignment import naive
from kernels.ssa._backend import use_triton

__all__ = ["KINDS", "two_way_alignment_sum"]

KINDS = naive.KINDS


def two_way_alignment_sum(
    full: torch.Tensor, sparse: torch.Tensor, kind: str = "smooth_l1", *, backend: str = "auto"
) -> torch.Tensor:
    """The summed two-way term (fp32 scalar), differentiable in both outputs: ``f'(full - sparse)``
    reaches ``full`` and its negation ``sparse``, each pulled toward the other's detached value."""
    if kind not in KINDS:
        raise ValueError(f"alignment_loss={kind!r} is not one of {', '.join(KINDS)}")
    if full.shape != sparse.shape:
        raise ValueError(
            f"the branch outputs must have one shape; got full {tuple(full.shape)}, "
            f"sparse {tuple(sparse.shape)}"
        )
    if use_triton(backend, full, sparse):
        from kernels.alignment.fused_kernel import two_way_alignment_sum as fused

        return fused(full, sparse, kind)
    return naive.two_way_alignment_sum(full, sparse, kind)
