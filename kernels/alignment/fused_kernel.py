"""Triton two-way alignment sum: one pass over both branch outputs forward, one backward.

In PyTorch the term costs two fp32 copies of each output, two loss kernels with their reductions
and, backward, two loss-gradient kernels and the casts back: ~6 ms of a 1B ssa step at 8k tokens on
an H200 (16 layers). Both directions have the same value, ``sum f(full - sparse)``, and opposite
gradients, ``f'(full - sparse)`` for ``full`` and its negation for ``sparse``, so one kernel reads
the two bf16 outputs once and writes per-program partial sums (summed by torch, in a fixed order:
deterministic), and one kernel writes both gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc

BLOCK = 4096


@triton.jit
def _difference(FULL, SPARSE, N, BLOCK: tl.constexpr):
    """This program's elements: offsets, mask and ``full - sparse`` in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    full = tl.load(FULL + offs, mask=ok, other=0.0).to(tl.float32)
    return offs, ok, full - tl.load(SPARSE + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _forward_kernel(FULL, SPARSE, PARTIAL, N, MSE: tl.constexpr, BLOCK: tl.constexpr):
    _, _, d = _difference(FULL, SPARSE, N, BLOCK)  # masked elements load as 0: no loss
    if MSE:
        loss = d * d
    else:
        ad = tl.abs(d)
        loss = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(loss, 0))


@triton.jit
def _backward_kernel(FULL, SPARSE, GRAD_SUM, D_FULL, D_SPARSE, N, MSE: tl.constexpr, BLOCK: tl.constexpr):
    offs, ok, d = _difference(FULL, SPARSE, N, BLOCK)
    if MSE:
        g = 2.0 * d
    else:
        g = tl.minimum(tl.maximum(d, -1.0), 1.0)
    g = g * tl.load(GRAD_SUM)
    tl.store(D_FULL + offs, g.to(D_FULL.dtype.element_ty), mask=ok)
    tl.store(D_SPARSE + offs, (-g).to(D_SPARSE.dtype.element_ty), mask=ok)


class _TwoWayAlignmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, sparse: torch.Tensor, kind: str) -> torch.Tensor:
        full, sparse = full.contiguous(), sparse.contiguous()
        n = full.numel()
        grid = (triton.cdiv(n, BLOCK),)
        partial = _alloc.empty(grid[0], device=full.device, dtype=torch.float32)
        _forward_kernel[grid](full, sparse, partial, n, MSE=kind == "mse", BLOCK=BLOCK, num_warps=8)
        ctx.save_for_backward(full, sparse)
        ctx.kind = kind
        return 2.0 * partial.sum()

    @staticmethod
    def backward(ctx: Any, grad_sum: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        full, sparse = ctx.saved_tensors
        n = full.numel()
        d_full, d_sparse = _alloc.empty_like(full), _alloc.empty_like(sparse)
        _backward_kernel[(triton.cdiv(n, BLOCK),)](
            full, sparse, grad_sum.float().contiguous(), d_full, d_sparse, n,
            MSE=ctx.kind == "mse", BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
        return d_full, d_sparse, None


def two_way_alignment_sum(full: torch.Tensor, sparse: torch.Tensor, kind: str) -> torch.Tensor:
    return _TwoWayAlignmentSum.apply(full, sparse, kind)
