"""Argument checks and document bookkeeping shared by the naive and Triton paths.

Both paths must reject the same bad inputs with the same messages and agree on how packed
documents map to block rows, so that logic lives here once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocSpan:
    """One document of a packed row: keys at ``[start, end)``, its blocks at ``[block_start, ...)``
    in the concatenated block-key tensor, and the local query rows ``[q_lo, q_hi)`` that fall in it."""

    start: int
    end: int
    block_start: int
    q_lo: int
    q_hi: int


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` by default. The selection kernel folds the scale into
    its exponents and relies on it being positive (a non-positive scale also inverts the ranking)."""
    if scale is None:
        return float(head_dim) ** -0.5
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number; got {scale} (None means head_dim ** -0.5)")
    return float(scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_offset: int) -> int:
    """Validate the [B, T, heads, D] layout and return the GQA group size G = HQ / H."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [batch, seq, heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}; got {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    hq, h = q.shape[2], k.shape[2]
    if h == 0 or hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({h})")
    if q_offset < 0 or q_offset + q.shape[1] > k.shape[1]:
        raise ValueError(
            f"queries at [q_offset, q_offset + Tq) = [{q_offset}, {q_offset + q.shape[1]}) must lie inside "
            f"the keys [0, {k.shape[1]}); pass the query chunk's global offset"
        )
    return hq // h


def check_query_blocks(q: torch.Tensor, kblock: torch.Tensor, q_offset: int, seq_len: int) -> None:
    if q.dim() != 4 or kblock.dim() != 4:
        raise ValueError(
            f"q and kblock must be [batch, seq|blocks, heads, head_dim]; got q {tuple(q.shape)}, "
            f"kblock {tuple(kblock.shape)}"
        )
    if q.shape[0] != kblock.shape[0] or q.shape[3] != kblock.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and kblock {tuple(kblock.shape)} must agree in batch and head_dim"
        )
    hq, h = q.shape[2], kblock.shape[2]
    if h == 0 or hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({h})")
    if q_offset < 0 or q_offset + q.shape[1] > seq_len:
        raise ValueError(
            f"queries at [q_offset, q_offset + Tq) = [{q_offset}, {q_offset + q.shape[1]}) must lie inside "
            f"the {seq_len} keys the blocks cover; pass the query chunk's global offset"
        )


def check_block_args(block_size: int, block_count: int | None = None) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    if block_count is not None and block_count < 1:
        raise ValueError(f"block_count must be >= 1; got {block_count}")


def doc_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Document boundaries [0, ..., seq_len] as Python ints (one document when cu_seqlens is None)."""
    if cu_seqlens is None:
        return [0, seq_len]
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents along one row and needs batch == 1; got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "cu_seqlens must be a 1-D int32 tensor [0, len0, len0+len1, ..., total] "
            f"(FlashAttention convention); got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at the key length {seq_len}; got {bounds}"
        )
    return bounds


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def doc_spans(bounds: list[int], block_size: int, q_offset: int, q_len: int) -> list[DocSpan]:
    """Non-empty documents with their block offsets and the local query rows inside each.

    Blocks restart at every document start, so the block-key tensor of a packed row is the
    concatenation of each document's ceil(len / block_size) blocks, in document order.
    """
    spans = []
    block_start = 0
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        q_lo = min(max(start - q_offset, 0), q_len)
        q_hi = min(max(end - q_offset, 0), q_len)
        spans.append(DocSpan(start, end, block_start, q_lo, q_hi))
        block_start += num_blocks(end - start, block_size)
    return spans


def total_blocks(bounds: list[int], block_size: int) -> int:
    return sum(num_blocks(b - a, block_size) for a, b in itertools.pairwise(bounds))
