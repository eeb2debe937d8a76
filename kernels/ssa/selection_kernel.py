"""Triton block selection in two kernels: per-head LSE over complete blocks, then group sum and top-k.

Each program owns a tile of consecutive queries of one document and one KV head, with all G query
heads of the group stacked as rows (GP = G padded to a power of two), so each block-key tile is
loaded once per group and scored with one tensor-core product.
- `_select_lse_kernel` (pass 1) computes each row's log-sum-exp over the blocks complete at its
  position and stores it (fp32, [B, T, HQ]: 4 bytes per query head).
- `_select_topk_kernel` (pass 2) recomputes the logits, turns them into probabilities, sums them
  over the group and keeps a running top-(BC-1) per query.
Nothing of size T x NB ever reaches memory. Two kernels rather than one because the passes want
different launches: pass 1 is a plain pipelined reduction (one warpgroup, 64 rows), pass 2 is
latency-bound on its insertion rounds (one warp, 32 rows, every reduction a shuffle). Pass 2 works
block-major ([blocks, queries]): in the product's register layout a query's group heads then lie
in one thread and its three neighbours, and each thread holds half as many int64 keys, which cut
its instructions per tile by 30%. At 64k tokens on an H200 the fused kernel took 8.86 ms, the
split 8.41, with a block-major pass 2 7.26, with 32-block pass-2 steps 6.72, and with 64-block
pass-1 steps and the first tile sorted into the lists (below) 6.35 (docs/performance.md,
"Selection kernel").

Exact, deterministic ranking: a candidate's score (a non-negative fp32) and its block index are
packed into one int64 key, (score bits << 32) | (2^31 - 1 - j), so integer order is score order
with the lower block index first on equal scores, and keys are unique.

The running top-(BC-1) is kept unsorted, its minimum is a threshold: a tile's keys at or below a
query's threshold can never enter (the threshold only rises), and the survivors are inserted
largest first, each replacing the query's minimum. Streaming "insert if larger than the minimum,
evict the minimum" ends at the exact top-(BC-1) set in any insertion order. Once the lists fill
up, most tiles have no survivor and cost only the scoring; sorting every tile instead (a bitonic
sort of BT x BN keys plus a merge) was 2.1-2.2x slower at 64k tokens on an H200. The first tile is
the exception: while the lists fill, nearly every key enters, so its keys are sorted once and
the best BC-1 become the lists (2.5% faster at 64k, 2.5% at 32k, 5.5% at 8k).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
def _tile_keys(
    q, kb_base, n0, lse, own_t, t_ok, own_max, skb_n, c,
    BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """The keys [BN, BT] of blocks [n0, n0 + BN) for the tile's queries (_NOT_A_KEY: no candidate).

    Everything is block-major ([BN, ...], and the list `run` is [KP, BT]): in the product's
    register layout the group heads then sit in one thread and its neighbours, so the group sum is
    a short reduction and each thread holds fewer keys than in the query-major orientation.
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
    s = _dot(kb, tl.trans(q), IEEE)
    p = tl.exp2(s * c - lse[None, :])
    score = tl.sum(tl.reshape(p, [BN, BT, GP]), 2)
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - n).to(tl.int64)[:, None]
    candidate = t_ok[None, :]
    if MASKED:
        candidate = candidate & (n[:, None] < own_t[None, :])
    return tl.where(candidate, key, _NOT_A_KEY)


@triton.jit
def _first_list(key, BC, BT: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    """The list after the first tile: its best BC-1 keys, by one sort instead of a round per key.

    Filling empty slots takes an insertion round per key, and early on most keys enter: with
    random scores a query's first BN blocks cost BC-1 rounds plus (BC-1) * ln(BN / (BC-1)) more.
    """
    top = tl.sort(tl.trans(key), dim=1, descending=True)
    # Sorted descending, so the elementwise max over the BN / KP chunks is the first chunk.
    top = tl.trans(tl.max(tl.reshape(top, [BT, BN // KP, KP]), 1))
    slot = tl.arange(0, KP)[:, None]
    run = tl.where(top >= 0, top, -1 - slot.to(tl.int64))
    return tl.where(slot < BC - 1, run, _DEAD_SLOT)


@triton.jit
def _topk_tile(key, run, thr, BC):
    """One pass-2 tile: its keys [BN, BT] into the running top-(BC-1) lists `run` [KP, BT]."""
    # Only keys above the query's minimum can enter its list.
    enter = key > thr[None, :]
    key = tl.where(enter, key, _NOT_A_KEY)
    # Keys enter largest first, so a query takes at most BC-1 of one tile: that bounds the trip
    # count, decided once per tile (a per-insertion exit test would cost a reduction each time).
    trips = tl.max(tl.minimum(tl.sum(enter.to(tl.int32), 0), BC - 1), 0)
    for _ in range(trips):
        best = tl.max(key, 0)
        # Slot values are unique (empty slots hold -1 - slot), so one slot holds the query minimum.
        # Once the best remaining key is at or below it, so are all the others: nothing changes.
        take = (best > thr)[None, :]
        run = tl.where((run == thr[None, :]) & take, best[None, :], run)
        thr = tl.min(run, 0)
        # Drop the key just taken (keys are unique).
        key = tl.where(key == best[None, :], _NOT_A_KEY, key)
    return run, thr


@triton.jit
def _query_tile(
    Q, TILE_Q0, TILE_Q1, QDOC, QBASE, sq_b, sq_t, sq_h, q_offset, H, G,
    BT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """The program's query tile: its rows (BT queries x GP group heads), their q, and positions."""
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
    rows = tl.arange(0, BT * GP)
    t_row = rows // GP
    g_row = rows % GP
    row_ok = (q0 + t_row < q1) & (g_row < G)
    d = tl.arange(0, D)
    q_ptr = Q + b * sq_b + (q0 + t_row)[:, None] * sq_t + (h * G + g_row)[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    # Rows are in position order: the tile's first query has the fewest complete blocks.
    loc0 = q_offset + q0 - doc
    last = q_offset + q1 - 1 - doc
    return b, h, q0, q1, base, t_row, g_row, row_ok, q, loc0, last


@triton.jit
def _select_lse_kernel(
    Q, KB, LSE, TILE_Q0, TILE_Q1, QDOC, QBASE,
    sq_b, sq_t, sq_h, skb_b, skb_n, skb_h, sl_b, sl_t,
    q_offset, qk_scale, H, G,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Pass 1: each query head's log2-sum-exp over the blocks complete at its position (+inf if none)."""
    b, h, q0, _q1, base, t_row, g_row, row_ok, q, loc0, last = _query_tile(
        Q, TILE_Q0, TILE_Q1, QDOC, QBASE, sq_b, sq_t, sq_h, q_offset, H, G, BT, GP, D
    )
    complete_row = (loc0 + t_row + 1) // BS
    complete_max = ((last + 1) // BS).to(tl.int32)
    kb_base = KB + b * skb_b + h * skb_h + base * skb_n
    m = tl.full([BT * GP], float("-inf"), tl.float32)
    acc = tl.zeros([BT * GP], tl.float32)
    unmasked_end = ((loc0 + 1) // BS // BN * BN).to(tl.int32)
    for n0 in range(0, unmasked_end, BN):
        m, acc = _lse_tile(q, kb_base, n0, m, acc, complete_row, complete_max, skb_n, qk_scale,
                           BN, D, IEEE, False)  # fmt: skip
    for n0 in range(unmasked_end, complete_max, BN):
        m, acc = _lse_tile(q, kb_base, n0, m, acc, complete_row, complete_max, skb_n, qk_scale,
                           BN, D, IEEE, True)  # fmt: skip
    lse = tl.where(row_ok & (acc > 0), m * qk_scale + tl.log2(tl.maximum(acc, 1e-30)), float("inf"))
    tl.store(LSE + b * sl_b + (q0 + t_row) * sl_t + h * G + g_row, lse, mask=row_ok)


@triton.jit
def _select_topk_kernel(
    Q, KB, LSE, OUT, TILE_Q0, TILE_Q1, QDOC, QBASE,
    sq_b, sq_t, sq_h, skb_b, skb_n, skb_h, sl_b, sl_t, so_b, so_t, so_h,
    q_offset, qk_scale, H, G, BC,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Pass 2: the group-summed scores of each tile feed an unsorted running top-(BC-1) per query."""
    b, h, q0, q1, base, t_row, g_row, row_ok, q, loc0, last = _query_tile(
        Q, TILE_Q0, TILE_Q1, QDOC, QBASE, sq_b, sq_t, sq_h, q_offset, H, G, BT, GP, D
    )
    lse = tl.load(LSE + b * sl_b + (q0 + t_row) * sl_t + h * G + g_row, mask=row_ok, other=float("inf"))
    own_max = (last // BS).to(tl.int32)
    kb_base = KB + b * skb_b + h * skb_h + base * skb_n
    t_vec = tl.arange(0, BT)
    t_ok = q0 + t_vec < q1
    own_t = (loc0 + t_vec) // BS
    slot = tl.arange(0, KP)
    if KP <= BN:
        key = _tile_keys(q, kb_base, 0, lse, own_t, t_ok, own_max, skb_n, qk_scale, BT, GP, BN, D, IEEE, True)
        run = _first_list(key, BC, BT, BN, KP)
        start = BN
    else:
        # Empty live slots hold -1 - slot (every real key is >= 0); dead slots never hold the minimum.
        empty = tl.broadcast_to(-1 - slot[:, None].to(tl.int64), [KP, BT])
        run = tl.where(slot[:, None] < BC - 1, empty, tl.full([KP, BT], _DEAD_SLOT, tl.int64))
        start = 0
    thr = tl.min(run, 0)
    unmasked_end = (loc0 // BS // BN * BN).to(tl.int32)
    for n0 in range(start, unmasked_end, BN):
        key = _tile_keys(q, kb_base, n0, lse, own_t, t_ok, own_max, skb_n, qk_scale,
                         BT, GP, BN, D, IEEE, False)  # fmt: skip
        run, thr = _topk_tile(key, run, thr, BC)
    for n0 in range(tl.maximum(unmasked_end, start), own_max, BN):
        key = _tile_keys(q, kb_base, n0, lse, own_t, t_ok, own_max, skb_n, qk_scale,
                         BT, GP, BN, D, IEEE, True)  # fmt: skip
        run, thr = _topk_tile(key, run, thr, BC)

    # The valid keys, ascending by block index, then the own block, then -1.
    run = tl.trans(run)
    valid = (run >= 0) & (slot[None, :] < BC - 1)
    idx = tl.where(valid, 0x7FFFFFFF - (run & 0xFFFFFFFF), 0x7FFFFFFF)
    idx = tl.sort(idx, dim=1)
    n_valid = tl.sum(valid.to(tl.int32), 1)
    own_or_pad = tl.where(slot[None, :] == n_valid[:, None], own_t[:, None].to(tl.int64), -1)
    res = tl.where(slot[None, :] < n_valid[:, None], idx, own_or_pad)
    out_ptr = OUT + b * so_b + (q0 + t_vec)[:, None] * so_t + h * so_h + slot[None, :]
    tl.store(out_ptr, res.to(tl.int32), mask=t_ok[:, None] & (slot[None, :] < BC))


@dataclass(frozen=True)
class SelectLaunch:
    """Launch parameters of the two selection kernels (``tools/sweep_selected_attention.py`` times others).

    Rows are queries x group heads (padded to a power of two). Pass 1 is a pipelined reduction, fastest
    on a warpgroup; pass 2's running top-k is latency-bound on its insertion rounds, fastest on one warp
    (every reduction a shuffle). The defaults are the fastest launches timed on an H200 at 8k, 32k and
    64k tokens (1B layout, bf16; pass 1: 64-128 rows, 32-128 blocks, 4-8 warps; pass 2: 16-128 rows,
    8-64 blocks, 1-4 warps; docs/performance.md has the sweeps).

    ``*_maxnreg`` caps the registers per thread (None: the compiler's choice), as in ``Launch``
    (``default_select_launch`` sets the caps that were timed).
    """

    lse_rows: int = 64
    lse_blocks: int = 64
    lse_warps: int = 4
    lse_maxnreg: int | None = None
    topk_rows: int = 32
    topk_blocks: int = 32
    topk_warps: int = 1
    # Lists of more than 64 slots (block_count > 64, raised at inference) spread over more warps.
    topk_warps_long_lists: int = 4
    topk_maxnreg: int | None = None


def default_select_launch(head_dim: int, group_size: int) -> SelectLaunch:
    """The shipped selection launch for a layout of ``head_dim`` and GQA group size."""
    if head_dim == 64 and next_pow2(group_size) == 16:
        # Pass 2 needs 136 registers here (sm90): a cap of 120 fits 17 warps per SM instead of 15
        # without spilling (its 12 KB of shared memory allow no more), 1.17x / 1.05x / 1.07x faster at
        # 8k / 32k / 64k on an H200 (1B layout; caps on pass 1 gained nothing). Other layouts
        # need other counts (head_dim 128: 218, 4 group heads: 168), where this cap would spill.
        return SelectLaunch(topk_maxnreg=120)
    return SelectLaunch()


def _selection_lse(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, q_offset: int, scale: float, plan: Plan,
    launch: SelectLaunch,
) -> torch.Tensor:  # fmt: skip
    """Pass 1: fp32 [B, Tq, HQ], each query head's log2-sum-exp over its complete blocks (+inf if none)."""
    b, tq, hq, d = q.shape
    h = kblock.shape[2]
    gp = next_pow2(hq // h)
    bt = max(1, launch.lse_rows // gp)
    lse = _alloc.empty(b, tq, hq, device=q.device, dtype=torch.float32)
    tile_q0, tile_q1 = query_tiles(plan.spans, bt, q.device)
    _select_lse_kernel[(tile_q0.numel(), b * h)](
        q, kblock, lse, tile_q0, tile_q1, plan.q_doc, plan.q_base,
        q.stride(0), q.stride(1), q.stride(2), kblock.stride(0), kblock.stride(1), kblock.stride(2),
        lse.stride(0), lse.stride(1), q_offset, scale * LOG2E, h, hq // h,
        BS=block_size, BT=bt, GP=gp, BN=launch.lse_blocks, D=d, IEEE=exact_dots(q.dtype),
        num_warps=launch.lse_warps, maxnreg=launch.lse_maxnreg,
    )  # fmt: skip
    return lse


def _selection_topk(
    q: torch.Tensor, kblock: torch.Tensor, lse: torch.Tensor, block_size: int, block_count: int,
    q_offset: int, scale: float, plan: Plan, launch: SelectLaunch,
) -> torch.Tensor:  # fmt: skip
    """Pass 2: the selected block indices, int32 [B, Tq, H, block_count]."""
    b, tq, hq, d = q.shape
    h = kblock.shape[2]
    gp = next_pow2(hq // h)
    kp = next_pow2(block_count)
    bt = max(1, launch.topk_rows // gp)
    out = _alloc.empty(b, tq, h, block_count, device=q.device, dtype=torch.int32)
    tile_q0, tile_q1 = query_tiles(plan.spans, bt, q.device)
    _select_topk_kernel[(tile_q0.numel(), b * h)](
        q, kblock, lse, out, tile_q0, tile_q1, plan.q_doc, plan.q_base,
        q.stride(0), q.stride(1), q.stride(2), kblock.stride(0), kblock.stride(1), kblock.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), out.stride(2),
        q_offset, scale * LOG2E, h, hq // h, block_count,
        BS=block_size, BT=bt, GP=gp, BN=launch.topk_blocks, KP=kp, D=d, IEEE=exact_dots(q.dtype),
        num_warps=launch.topk_warps if kp <= 64 else launch.topk_warps_long_lists,
        maxnreg=launch.topk_maxnreg,
    )  # fmt: skip
    return out


def select_blocks_planned(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, block_count: int, q_offset: int, scale: float,
    plan: Plan, launch: SelectLaunch | None = None,
) -> torch.Tensor:  # fmt: skip
    if block_count == 1:
        # No candidate slot: only the own block, which needs no scoring.
        b, tq, h = q.shape[0], q.shape[1], kblock.shape[2]
        pos = q_offset + torch.arange(tq, device=q.device, dtype=torch.int32)
        own = ((pos - plan.q_doc) // block_size).view(1, tq, 1, 1)
        return own.expand(b, tq, h, 1).to(torch.int32).contiguous()
    launch = launch or default_select_launch(q.shape[-1], q.shape[2] // kblock.shape[2])
    lse = _selection_lse(q, kblock, block_size, q_offset, scale, plan, launch)
    return _selection_topk(q, kblock, lse, block_size, block_count, q_offset, scale, plan, launch)
