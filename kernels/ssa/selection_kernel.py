"""Triton block selection: fused scoring, per-head LSE over complete blocks, group sum, top-k.

One program owns a tile of BT consecutive queries of one document and one KV head, with all
G query heads of the group stacked as rows (BT * GP rows, GP = G padded to a power of two), so
each block-key tile is loaded once per group and scored with one tensor-core product.
Pass 1 computes each row's log-sum-exp over the blocks complete at its position; pass 2
recomputes the logits, turns them into probabilities, sums them over the group and keeps a
running top-(BC-1) per query. Nothing of size T x NB ever reaches memory.

Exact, deterministic ranking: a candidate's score (a non-negative fp32) and its block index are
packed into one int64 key, (score bits << 32) | (2^31 - 1 - j), so integer order is score order
with the lower block index first on equal scores, and keys are unique.

The running top-(BC-1) is kept unsorted, its minimum is a threshold: a tile's keys at or below a
row's threshold can never enter (the threshold only rises), and the survivors are inserted largest
first, each replacing the row's minimum. Streaming "insert if larger than the minimum, evict the
minimum" ends at the exact top-(BC-1) set in any insertion order. Once the lists fill up, most
tiles have no survivor in any row and cost only the scoring; sorting every tile instead (a
bitonic sort of BT x BN keys plus a merge) was 2.1-2.2x slower at 64k tokens on an H200
(benchmarks/results/README.md).

Where the time goes (H200, 1B layout, 64k tokens): the insertions were 42% of the kernel. That is
why each insertion round has no block-wide exit test and no search for the minimum's slot. Both
passes skip masks on the tiles that lie wholly before every query's own block. Together these
took the kernel from 12.1 to 8.7 ms.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc
from kernels.ssa._plan import Plan, next_pow2, query_tiles

LOG2E = 1.4426950408889634
# Slots at or beyond BC-1 hold this, so they are never a row's minimum.
_DEAD_SLOT = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# Below every key and every empty-slot marker: a filtered-out candidate.
_NOT_A_KEY = tl.constexpr(-(1 << 62))


def exact_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot must run as an fp32 IEEE product (passed to the kernels as IEEE).

    fp32 inputs need it (tl.dot would otherwise round them to tf32). The CPU interpreter
    multiplies bf16/fp16 operands wrongly (as their raw 16-bit patterns, seen with triton 3.8),
    so under TRITON_INTERPRET the operands are upcast too; on the GPU half inputs keep the
    tensor-core path and the GPU tests cover it.
    """
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _lse_tile(
    q, kb_base, n0, m, acc, complete_row, complete_max, skb_n, c,
    BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One pass-1 tile: fold the raw logits of blocks [n0, n0 + BN) into each row's running max/sum.

    The max is kept in raw logit units and the scale folded into the exponent (one FMA per
    logit). Unmasked tiles hold only blocks complete for every row, so they need no mask and
    their running max is finite.
    """
    n = n0 + tl.arange(0, BN)
    d = tl.arange(0, D)
    if MASKED:
        kb = tl.load(kb_base + n[:, None] * skb_n + d[None, :], mask=(n < complete_max)[:, None], other=0.0)
        s = _dot(q, tl.trans(kb), IEEE)
        s = tl.where(n[None, :] < complete_row[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        kb = tl.load(kb_base + n[:, None] * skb_n + d[None, :])
        s = _dot(q, tl.trans(kb), IEEE)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = m_new
    acc = acc * tl.exp2((m - m_safe) * c) + tl.sum(tl.exp2(s * c - (m_safe * c)[:, None]), 1)
    return m_new, acc


@triton.jit
def _topk_tile(
    q, kb_base, n0, lse, run, thr, own_t, t_ok, own_max, skb_n, c, BC,
    BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One pass-2 tile: group-summed probabilities of blocks [n0, n0 + BN) into the running top-k.

    Padded rows carry lse = +inf (probability 0), and a block at or after a query's own block is
    never its candidate, so the probabilities need no mask: blocks not complete at a query's
    position are all at or after its own block, and the key mask below drops them. Unmasked
    tiles lie before every query's own block.
    """
    n = n0 + tl.arange(0, BN)
    d = tl.arange(0, D)
    if MASKED:
        kb = tl.load(kb_base + n[:, None] * skb_n + d[None, :], mask=(n < own_max)[:, None], other=0.0)
    else:
        kb = tl.load(kb_base + n[:, None] * skb_n + d[None, :])
    s = _dot(q, tl.trans(kb), IEEE)
    p = tl.exp2(s * c - lse[:, None])
    score = tl.sum(tl.reshape(p, [BT, GP, BN]), 1)
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - n).to(tl.int64)[None, :]
    # Only keys above the row's minimum can enter its list.
    enter = t_ok[:, None] & (key > thr[:, None])
    if MASKED:
        enter = enter & (n[None, :] < own_t[:, None])
    key = tl.where(enter, key, _NOT_A_KEY)
    # Keys enter largest first, so a row takes at most BC-1 of one tile: that bounds the trip count,
    # decided once per tile (a per-insertion exit test would cost a block-wide reduction each time).
    trips = tl.max(tl.minimum(tl.sum(enter.to(tl.int32), 1), BC - 1), 0)
    for _ in range(trips):
        best = tl.max(key, 1)
        # Slot values are unique (empty slots hold -1 - slot), so one slot holds the row minimum.
        run = tl.where((run == thr[:, None]) & (best >= 0)[:, None], best[:, None], run)
        thr = tl.min(run, 1)
        # Drop the key just taken (keys are unique) and every key the raised threshold excludes.
        key = tl.where((key > thr[:, None]) & (key != best[:, None]), key, _NOT_A_KEY)
    return run, thr


@triton.jit
def _select_kernel(
    Q, KB, OUT, TILE_Q0, TILE_Q1, QDOC, QBASE,
    sq_b, sq_t, sq_h, skb_b, skb_n, skb_h, so_b, so_t, so_h,
    q_offset, qk_scale, H, G, BC,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN1: tl.constexpr, BN: tl.constexpr,
    KP: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # Last tiles first: a tile's work grows with its position (causal), and the longest ones
    # started last would run alone at the end of the grid.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q0 = tl.load(TILE_Q0 + tile).to(tl.int64)
    q1 = tl.load(TILE_Q1 + tile)
    doc = tl.load(QDOC + q0)
    base = tl.load(QBASE + q0)

    M: tl.constexpr = BT * GP
    rows = tl.arange(0, M)
    t_row = rows // GP
    g_row = rows % GP
    row_ok = (q0 + t_row < q1) & (g_row < G)
    d = tl.arange(0, D)
    q_ptr = Q + b * sq_b + (q0 + t_row)[:, None] * sq_t + (h * G + g_row)[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    # Rows are in position order: the tile's first query has the fewest complete blocks.
    loc0 = q_offset + q0 - doc
    loc_row = loc0 + t_row
    complete_row = (loc_row + 1) // BS
    last = q_offset + q1 - 1 - doc
    complete_max = ((last + 1) // BS).to(tl.int32)
    own_max = (last // BS).to(tl.int32)
    kb_base = KB + b * skb_b + h * skb_h + base * skb_n

    # Pass 1: log2-sum-exp of each row over the blocks complete at its position.
    m = tl.full([M], float("-inf"), tl.float32)
    acc = tl.zeros([M], tl.float32)
    lse_unmasked_end = ((loc0 + 1) // BS // BN1 * BN1).to(tl.int32)
    for n0 in range(0, lse_unmasked_end, BN1):
        m, acc = _lse_tile(q, kb_base, n0, m, acc, complete_row, complete_max, skb_n, qk_scale,
                           BN1, D, IEEE, False)  # fmt: skip
    for n0 in range(lse_unmasked_end, complete_max, BN1):
        m, acc = _lse_tile(q, kb_base, n0, m, acc, complete_row, complete_max, skb_n, qk_scale,
                           BN1, D, IEEE, True)  # fmt: skip
    lse = tl.where(row_ok & (acc > 0), m * qk_scale + tl.log2(tl.maximum(acc, 1e-30)), float("inf"))

    # Pass 2: the group-summed scores of each tile feed an unsorted running top-(BC-1) per query.
    t_vec = tl.arange(0, BT)
    t_ok = q0 + t_vec < q1
    own_t = (loc0 + t_vec) // BS
    slot = tl.arange(0, KP)
    live_slot = slot[None, :] < BC - 1
    # Empty live slots hold -1 - slot (every real key is >= 0); dead slots never hold the minimum.
    empty = tl.broadcast_to(-1 - slot[None, :].to(tl.int64), [BT, KP])
    run = tl.where(live_slot, empty, tl.full([BT, KP], _DEAD_SLOT, tl.int64))
    thr = tl.min(run, 1)
    topk_unmasked_end = (loc0 // BS // BN * BN).to(tl.int32)
    for n0 in range(0, topk_unmasked_end, BN):
        run, thr = _topk_tile(q, kb_base, n0, lse, run, thr, own_t, t_ok, own_max, skb_n, qk_scale, BC,
                              BT, GP, BN, D, IEEE, False)  # fmt: skip
    for n0 in range(topk_unmasked_end, own_max, BN):
        run, thr = _topk_tile(q, kb_base, n0, lse, run, thr, own_t, t_ok, own_max, skb_n, qk_scale, BC,
                              BT, GP, BN, D, IEEE, True)  # fmt: skip

    # The valid keys, ascending by block index, then the own block, then -1.
    valid = (run >= 0) & live_slot
    idx = tl.where(valid, 0x7FFFFFFF - (run & 0xFFFFFFFF), 0x7FFFFFFF)
    idx = tl.sort(idx, dim=1)
    n_valid = tl.sum(valid.to(tl.int32), 1)
    own_or_pad = tl.where(slot[None, :] == n_valid[:, None], own_t[:, None].to(tl.int64), -1)
    res = tl.where(slot[None, :] < n_valid[:, None], idx, own_or_pad)
    out_ptr = OUT + b * so_b + (q0 + t_vec)[:, None] * so_t + h * so_h + slot[None, :]
    tl.store(out_ptr, res.to(tl.int32), mask=t_ok[:, None] & (slot[None, :] < BC))


def select_blocks_planned(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, block_count: int, q_offset: int, scale: float,
    plan: Plan,
) -> torch.Tensor:  # fmt: skip
    b, tq, hq, d = q.shape
    h = kblock.shape[2]
    g = hq // h
    out = _alloc.empty(b, tq, h, block_count, device=q.device, dtype=torch.int32)
    if block_count == 1:
        # No candidate slot: only the own block, which needs no scoring.
        pos = q_offset + torch.arange(tq, device=q.device, dtype=torch.int32)
        out.copy_(((pos - plan.q_doc) // block_size).view(1, tq, 1, 1).expand_as(out))
        return out
    gp = max(next_pow2(g), 1)
    kp = next_pow2(block_count)
    # 64 rows (queries x group heads); 32 blocks per pass-1 tile, 16 per pass-2 tile: the fastest
    # launches timed at 8k, 32k and 64k tokens on an H200 (bt 2-16, bn 16-128, 2-8 warps; smaller
    # pass-2 tiles mean fewer insertion rounds per tile).
    bt = max(1, 64 // gp)
    bn1 = 32
    bn = 16
    tile_q0, tile_q1 = query_tiles(plan.spans, bt, q.device)
    _select_kernel[(tile_q0.numel(), b * h)](
        q, kblock, out, tile_q0, tile_q1, plan.q_doc, plan.q_base,
        q.stride(0), q.stride(1), q.stride(2), kblock.stride(0), kblock.stride(1), kblock.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_offset, scale * LOG2E, h, g, block_count,
        BS=block_size, BT=bt, GP=gp, BN1=bn1, BN=bn, KP=kp, D=d, IEEE=exact_dots(q.dtype),
        num_warps=4 if kp <= 64 else 8,
    )  # fmt: skip
    return out
