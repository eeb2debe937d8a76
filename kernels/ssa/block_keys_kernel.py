"""Triton block keys: the mean of each block of keys, per KV head (fp32 accumulation)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc
from kernels.ssa._plan import Plan, make_plan, next_pow2


@triton.jit
def _block_keys_kernel(
    K, KB, BLK_START, BLK_LEN,
    sk_b, sk_t, sk_h, skb_b, skb_n, skb_h,
    H,
    BS: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start = tl.load(BLK_START + row).to(tl.int64)
    length = tl.load(BLK_LEN + row)
    r = tl.arange(0, BS)
    d = tl.arange(0, D)
    ptr = K + b * sk_b + (start + r)[:, None] * sk_t + h * sk_h + d[None, :]
    keys = tl.load(ptr, mask=(r < length)[:, None], other=0.0).to(tl.float32)
    mean = tl.sum(keys, 0) / length.to(tl.float32)
    tl.store(KB + b * skb_b + row * skb_n + h * skb_h + d, mean.to(KB.dtype.element_ty))


def block_keys_planned(k: torch.Tensor, block_size: int, plan: Plan) -> torch.Tensor:
    b, _, h, d = k.shape
    out = _alloc.empty(b, plan.n_blocks, h, d, device=k.device, dtype=k.dtype)
    _block_keys_kernel[(plan.n_blocks, b * h)](
        k, out, plan.blk_start, plan.blk_len,
        k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h,
        BS=next_pow2(block_size), D=d,
    )  # fmt: skip
    return out


def block_keys(k: torch.Tensor, block_size: int, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    plan = make_plan(cu_seqlens, k.shape[0], k.shape[1], 0, 0, block_size, k.device)
    return block_keys_planned(k, block_size, plan)
