"""The dk/dv work list: every (query, selected block) pair, grouped by key block in query order.

The deterministic dk/dv backward (selected_attention_kernel) gives each key block's queries to
programs in segments of at most SEG queries, sums each segment in fp32, then each block's
segments in order. This module builds that table on the GPU in two launches and a sort, without
waiting for the device. Built from torch ops (where, searchsorted, cumsum, gathers) the same table
took ~40 launches per layer, whose idle gaps cost ~1.2 ms per 1B training step at 8k tokens (an
H200 profile); a count kernel, a torch cumsum and a segment kernel after the sort took 3-4 more.

Segments need no global prefix sum over keys: the keys are cut into chunks of _BLOCK, and chunk c
owns the segment slots from ``c * _BLOCK + ceil(S_c / SEG)`` on, S_c being the sorted position of
its first pair. Chunk c has fewer than ``_BLOCK + (S_{c+1} - S_c) / SEG + 1`` segments (each key at
most one partial one), which that bound's step from c to c + 1 always covers, so every chunk
finds its slots from two binary searches of its own; the unused slots of its range are written
as empty segments. The host bounds the slot count by the same formula with all pairs.

A pair's key is ``(b * H + h) * NB + block row``; pairs sort stably by key, so each block's queries
stay in ascending order and its sums run in a fixed order: same inputs, same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc
from kernels.ssa._plan import Plan

SEG = 256  # queries per dk/dv program
# Pair keys are int16 below this many keys (the sentinel n_keys included): the radix sort then makes
# 2 passes over 16-bit keys instead of 4 over 32-bit ones.
SHORT_KEYS_BELOW = 2**15
_BLOCK = 1024  # elements per program of the table kernels


@dataclass(frozen=True)
class SegmentTable:
    """Pairs sorted by key (``order``: the flat ``[B, Tq, H, block_count]`` index of each pair), and
    the segments over them: segment s covers sorted pairs ``[seg_lo[s], seg_hi[s])`` of key
    ``seg_key[s]``; key k owns segments ``[seg_end[k] - nseg[k], seg_end[k])``. Every slot is written;
    the slots no key owns are empty (``seg_lo == seg_hi``) and are never summed."""

    order: torch.Tensor  # int64 [P]
    seg_key: torch.Tensor  # int32 [S]
    seg_lo: torch.Tensor  # int32 [S]
    seg_hi: torch.Tensor  # int32 [S]
    seg_end: torch.Tensor  # int32 [K]: one past key k's last segment
    nseg: torch.Tensor  # int32 [K]


@triton.jit
def _pair_keys_kernel(IDX, Q_BASE, KEYS, P, TQ, H, BC, NB, N_KEYS, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < P
    blk = tl.load(IDX + i, mask=ok, other=-1)
    head_row = i // BC
    h = head_row % H
    token_row = head_row // H
    base = tl.load(Q_BASE + token_row % TQ, mask=ok, other=0)
    key = ((token_row // TQ) * H + h) * NB + base + blk
    # Unused slots (-1) take the key N_KEYS and sort after every real pair.
    tl.store(KEYS + i, tl.where(blk >= 0, key, N_KEYS).to(KEYS.dtype.element_ty), mask=ok)


@triton.jit
def _lower_bound(SORTED, target, P, STEPS):
    # int64 positions: lo + hi would overflow int32 past 2^30 pairs.
    lo = tl.zeros(target.shape, tl.int64)
    hi = tl.full(target.shape, P, tl.int64)
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(SORTED + mid, mask=active, other=0) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _segments_kernel(
    KEYS_SORTED, NSEG, SEG_END, SEG_KEY, SEG_LO, SEG_HI, N_KEYS, P, STEPS, SEG_Q, BLOCK: tl.constexpr
):
    c = tl.program_id(0)
    k = c * BLOCK + tl.arange(0, BLOCK)
    ok = k < N_KEYS
    # The bounds of k and k + 1 in one search: its steps are dependent loads, so two searches in turn
    # would take twice as long.
    bounds = _lower_bound(KEYS_SORTED, k[:, None] + tl.arange(0, 2)[None, :], P, STEPS)
    start = tl.min(bounds, 1)
    end = tl.max(bounds, 1)
    nseg = tl.where(ok, (end - start + SEG_Q - 1) // SEG_Q, 0).to(tl.int32)
    # The chunk's slot range [first, last), from the sorted positions of its first pair and of the
    # next chunk's (all pairs, sentinels included, for the last chunk: the host's bound).
    chunk_lo = tl.min(start, 0)
    is_last = (c + 1) * BLOCK >= N_KEYS
    chunk_hi = tl.where(is_last, P, tl.max(tl.where(ok, end, 0), 0))
    first = c * BLOCK + (chunk_lo + SEG_Q - 1) // SEG_Q
    last = (c + 1) * BLOCK + (chunk_hi + SEG_Q - 1) // SEG_Q
    seg_end = first + tl.cumsum(nseg, 0)
    tl.store(NSEG + k, nseg, mask=ok)
    tl.store(SEG_END + k, seg_end.to(tl.int32), mask=ok)
    key_first = seg_end - nseg
    # Most keys have one or two segments; a block every query selects (a sink) has Tq / SEG.
    for i in range(tl.max(nseg, 0)):
        live = i < nseg
        lo = start + i * SEG_Q
        tl.store(SEG_KEY + key_first + i, k, mask=live)
        tl.store(SEG_LO + key_first + i, lo.to(tl.int32), mask=live)
        tl.store(SEG_HI + key_first + i, tl.minimum(lo + SEG_Q, end).to(tl.int32), mask=live)
    # The range's unused tail: empty segments (at most about BLOCK slots, more in the last chunk
    # when many selection slots are unused: the host's bound counts those pairs too).
    used_end = first + tl.sum(nseg, 0)
    for s0 in range(used_end, last, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        tail = s < last
        tl.store(SEG_KEY + s, tl.zeros([BLOCK], tl.int32), mask=tail)
        tl.store(SEG_LO + s, tl.zeros([BLOCK], tl.int32), mask=tail)
        tl.store(SEG_HI + s, tl.zeros([BLOCK], tl.int32), mask=tail)


def segment_table(idx: torch.Tensor, plan: Plan, kv_heads: int) -> SegmentTable:
    """The table for contiguous selections ``idx`` [B, Tq, H, block_count] (-1 = unused slot)."""
    b, tq, h, bc = idx.shape
    assert h == kv_heads and idx.is_contiguous() and idx.dtype == torch.int32
    dev = idx.device
    pairs = idx.numel()
    n_keys = b * h * plan.n_blocks
    keys = _alloc.empty(pairs, device=dev, dtype=torch.int16 if n_keys < SHORT_KEYS_BELOW else torch.int32)
    _pair_keys_kernel[(triton.cdiv(pairs, _BLOCK),)](
        idx, plan.q_base, keys, pairs, tq, h, bc, plan.n_blocks, n_keys, BLOCK=_BLOCK
    )
    keys_sorted, order = torch.sort(keys, stable=True)
    nseg, seg_end = (_alloc.empty(n_keys, device=dev, dtype=torch.int32) for _ in range(2))
    chunks = triton.cdiv(n_keys, _BLOCK)
    max_segments = chunks * _BLOCK + -(-pairs // SEG)
    seg_key, seg_lo, seg_hi = (_alloc.empty(max_segments, device=dev, dtype=torch.int32) for _ in range(3))
    _segments_kernel[(chunks,)](
        keys_sorted, nseg, seg_end, seg_key, seg_lo, seg_hi, n_keys, pairs, pairs.bit_length(), SEG,
        BLOCK=_BLOCK,
    )
    return SegmentTable(order, seg_key, seg_lo, seg_hi, seg_end, nseg)
