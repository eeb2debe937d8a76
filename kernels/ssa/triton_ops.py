"""The Triton backend of kernels.ssa: argument preparation and composition of the kernels."""

from __future__ import annotations

import torch

from kernels.ssa._plan import make_plan
from kernels.ssa.block_keys_kernel import block_keys_planned
from kernels.ssa.dense_attention_cudnn import cudnn_applies, cudnn_dense_attention
from kernels.ssa.dense_attention_flash import flash_applies, flash_dense_attention
from kernels.ssa.dense_attention_kernel import flex_dense_attention
from kernels.ssa.selected_attention_kernel import selected_attention_planned
from kernels.ssa.selection_kernel import select_blocks_planned

__all__ = ["block_keys", "dense_attention", "select_blocks", "selected_attention", "sparse_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, block_size: int) -> torch.Tensor:
    d = x.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"the Triton SSA kernels need a power-of-two head_dim >= 16; got {d} (use backend='naive')"
        )
    if block_size & (block_size - 1):
        raise ValueError(
            f"the Triton SSA kernels need a power-of-two block_size; got {block_size} (use backend='naive')"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"the Triton SSA kernels take fp16, bf16 or fp32; got {x.dtype}")
    # The kernels take every input's batch, token and head strides, so the views megatron hands over
    # (v a slice of the fused QKV projection, q and k transposed) are read in place: a copy per
    # input was a launch each in every layer's forward. Only the head dimension must be dense.
    return x if x.stride(-1) == 1 else x.contiguous()


def block_keys(k: torch.Tensor, block_size: int, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    k = _check(k, block_size)
    plan = make_plan(cu_seqlens, k.shape[0], k.shape[1], 0, 0, block_size, k.device)
    return block_keys_planned(k, block_size, plan)


def select_blocks(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, block_count: int, *, q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None, scale: float, seq_len: int,
) -> torch.Tensor:  # fmt: skip
    q, kblock = _check(q, block_size), _check(kblock, block_size)
    plan = make_plan(cu_seqlens, q.shape[0], seq_len, q_offset, q.shape[1], block_size, q.device)
    with torch.no_grad():
        return select_blocks_planned(q, kblock, block_size, block_count, q_offset, scale, plan)


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, block_size: int, *,
    q_offset: int = 0, cu_seqlens: torch.Tensor | None = None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    q, k, v = (_check(x, block_size) for x in (q, k, v))
    plan = make_plan(cu_seqlens, q.shape[0], k.shape[1], q_offset, q.shape[1], block_size, q.device)
    return selected_attention_planned(q, k, v, block_idx, block_size, q_offset, scale, plan)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    # Half types take the fused kernels, whose LSE has no gradient: cuDNN for whole sequences (1.5x
    # faster than flash on Hopper), flash for query offsets and documents (1.5-1.9x faster than
    # FlexAttention); fp32 goes to Flex.
    if cudnn_applies(q, k, v, q_offset, cu_seqlens):
        return cudnn_dense_attention(q, k, v, scale=scale)
    if flash_applies(q, k, v):
        return flash_dense_attention(q, k, v, scale=scale, q_offset=q_offset, cu_seqlens=cu_seqlens)
    return flex_dense_attention(q, k, v, q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, block_count: int, *,
    q_offset: int = 0, cu_seqlens: torch.Tensor | None = None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    q, k, v = (_check(x, block_size) for x in (q, k, v))
    # One plan serves all three kernels (it is where the host syncs on cu_seqlens).
    plan = make_plan(cu_seqlens, q.shape[0], k.shape[1], q_offset, q.shape[1], block_size, q.device)
    with torch.no_grad():
        kblock = block_keys_planned(k.detach(), block_size, plan)
        idx = select_blocks_planned(q.detach(), kblock, block_size, block_count, q_offset, scale, plan)
    o, lse = selected_attention_planned(q, k, v, idx, block_size, q_offset, scale, plan)
    return o, lse, idx
