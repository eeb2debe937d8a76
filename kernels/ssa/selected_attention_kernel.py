"""Triton selected-block attention: forward, dq, and deterministic dk/dv.

Forward and dq: one program per (query token, KV head) holds the G query heads of the group
as GP rows (padded to >= 16 for the tensor cores) and walks its selected blocks KN keys at a
time with an online softmax; the group shares its selections, so every K/V tile it loads serves
all G heads.

dk/dv without float atomics: the (query, block) pairs are grouped by key block in query order
and cut into segments of at most SEG queries (segment_table). One program per segment
accumulates that segment's dk/dv partial in fp32; a second kernel sums each block's segments in
order. Same inputs, same bits, every run, and a block that every query selects (an attention
sink) is spread over many programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc
from kernels.ssa._plan import Plan, next_pow2
from kernels.ssa.segment_table import SegmentTable, segment_table
from kernels.ssa.selection_kernel import LOG2E, _dot, exact_dots


@triton.jit
def _row_and_head(H):
    """The program's query row, batch and KV head in a (Tq, B * H) grid."""
    bh = tl.program_id(1)
    return tl.program_id(0).to(tl.int64), (bh // H).to(tl.int64), bh % H


@triton.jit
def _walk(
    QDOC, IDX, K, V, i, b, h, q_offset, sk_b, sk_h, sv_b, sv_h, si_b, si_t, si_h,
    BS: tl.constexpr, KN: tl.constexpr,
):  # fmt: skip
    """Where the program of query row ``i`` and KV head ``h`` walks its selections, KN keys per step:
    its document start and local position, each step's slot offsets and rows, its K/V and index rows."""
    doc = tl.load(QDOC + i).to(tl.int64)
    kk = tl.arange(0, KN)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    return doc, q_offset + i - doc, kk // BS, kk % BS, k_base, v_base, IDX + b * si_b + i * si_t + h * si_h


@triton.jit
def _selected_keys(idx_row, c0, c_in, r, doc, loc, BC, BS: tl.constexpr):
    """Global key positions of selection slots ``c0 + c_in`` (row ``r`` of each block) and which of them
    the query at document-local position ``loc`` attends: a used slot, causal inside its block."""
    c = c0 + c_in
    blk = tl.load(idx_row + c, mask=c < BC, other=-1)
    kloc = blk * BS + r
    return doc + kloc, (blk >= 0) & (kloc <= loc)


@triton.jit
def online_softmax_step(q, kt, ok, qk_scale, m, l_sum, IEEE: tl.constexpr):
    """One chunk of keys ``kt`` (rows ``ok`` visible) folded into the running softmax of queries ``q``.

    ``qk_scale`` carries the log2(e) factor, so ``m`` is the running max in log2 units and ``l_sum``
    the running sum of exponentials. Returns ``(m_new, alpha, p, l_new)``: ``alpha`` rescales the
    running output and ``p`` holds the chunk's unnormalised probabilities; the caller adds ``p @ v``
    itself, so each kernel keeps its own place for the value load.
    """
    s = _dot(q, tl.trans(kt), IEEE) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_sum * alpha + tl.sum(p, 1)


@triton.jit
def _key_rows(base, kpos, ok, sk_t, d):
    return tl.load(base + kpos[:, None] * sk_t + d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, OUT, LSE, QDOC,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, si_h, so_b, so_t, so_h,
    sl_b, sl_t, sl_h,
    q_offset, qk_scale, H, G, BC,
    BS: tl.constexpr, GP: tl.constexpr, KN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    i, b, h = _row_and_head(H)
    g = tl.arange(0, GP)
    g_ok = g < G
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * sq_b + i * sq_t + (h * G + g)[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0
    )
    doc, loc, c_in, r, k_base, v_base, idx_row = _walk(
        QDOC, IDX, K, V, i, b, h, q_offset, sk_b, sk_h, sv_b, sv_h, si_b, si_t, si_h, BS, KN
    )
    m = tl.full([GP], float("-inf"), tl.float32)
    acc_l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for c0 in range(0, BC, KN // BS):
        kpos, ok = _selected_keys(idx_row, c0, c_in, r, doc, loc, BC, BS)
        kt = _key_rows(k_base, kpos, ok, sk_t, d)
        m_new, alpha, p, acc_l = online_softmax_step(q, kt, ok, qk_scale, m, acc_l, IEEE)
        vt = _key_rows(v_base, kpos, ok, sv_t, d)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m = m_new
    o = acc / acc_l[:, None]
    lse = (m + tl.log2(acc_l)) / 1.4426950408889634
    tl.store(OUT + b * so_b + i * so_t + (h * G + g)[:, None] * so_h + d[None, :], o.to(OUT.dtype.element_ty),
             mask=g_ok[:, None])  # fmt: skip
    tl.store(LSE + b * sl_b + i * sl_t + (h * G + g) * sl_h, lse, mask=g_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, IDX, OUT, DO, LSE, DLSE, DELTA, DQ, QDOC,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, si_h, so_b, so_t, so_h,
    sl_b, sl_t, sl_h,
    q_offset, qk_scale, scale, H, G, BC,
    BS: tl.constexpr, GP: tl.constexpr, KN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):  # fmt: skip
    # OUT, DO and DQ share one set of strides, DLSE and DELTA the LSE's (the wrapper lays them out so).
    # Delta = rowsum(dO * O) is computed here and stored for the dK/dV kernel: as separate torch
    # ops (two fp32 casts, a product, a sum) it cost ~0.2 ms per layer at 8k tokens (H200 profile).
    i, b, h = _row_and_head(H)
    g = tl.arange(0, GP)
    g_ok = g < G
    d = tl.arange(0, D)
    q_off = b * sq_b + i * sq_t + (h * G + g)[:, None] * sq_h + d[None, :]
    q = tl.load(Q + q_off, mask=g_ok[:, None], other=0.0)
    qo_off = b * so_b + i * so_t + (h * G + g)[:, None] * so_h + d[None, :]
    do = tl.load(DO + qo_off, mask=g_ok[:, None], other=0.0)
    l_off = b * sl_b + i * sl_t + (h * G + g) * sl_h
    lse2 = tl.load(LSE + l_off, mask=g_ok, other=0.0) * 1.4426950408889634
    o = tl.load(OUT + qo_off, mask=g_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d s = p, so a gradient on lse enters exactly like -Delta in dS = P * (dP - Delta).
        delta -= tl.load(DLSE + l_off, mask=g_ok, other=0.0)
    tl.store(DELTA + l_off, delta, mask=g_ok)
    doc, loc, c_in, r, k_base, v_base, idx_row = _walk(
        QDOC, IDX, K, V, i, b, h, q_offset, sk_b, sk_h, sv_b, sv_h, si_b, si_t, si_h, BS, KN
    )
    dq = tl.zeros([GP, D], tl.float32)
    for c0 in range(0, BC, KN // BS):
        kpos, ok = _selected_keys(idx_row, c0, c_in, r, doc, loc, BC, BS)
        kt = _key_rows(k_base, kpos, ok, sk_t, d)
        vt = _key_rows(v_base, kpos, ok, sv_t, d)
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale
        p = tl.where(ok[None, :] & g_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), kt, IEEE)
    tl.store(DQ + qo_off, (dq * scale).to(DQ.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _dkdv_segment_kernel(
    Q, K, V, DO, LSE, DELTA, ORDER, SEG_KEY, SEG_LO, SEG_HI, BLK_START, BLK_LEN, PDK, PDV,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_t, sl_h,
    q_offset, qk_scale, scale, H, G, NB, TQ, HBC,
    BS: tl.constexpr, GP: tl.constexpr, QC: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0).to(tl.int64)
    # The grid is the host's bound on the segment count; the slots no key owns are empty segments
    # of block 0, whose (zero) partials are never summed.
    key = tl.load(SEG_KEY + seg)
    lo = tl.load(SEG_LO + seg)
    hi = tl.load(SEG_HI + seg)
    bh = key // NB
    row = key % NB
    b = (bh // H).to(tl.int64)
    h = bh % H
    kstart = tl.load(BLK_START + row).to(tl.int64)
    klen = tl.load(BLK_LEN + row)
    r = tl.arange(0, BS)
    d = tl.arange(0, D)
    k_ok = r < klen
    kpos = (kstart + r)[:, None]
    kt = tl.load(K + b * sk_b + kpos * sk_t + h * sk_h + d[None, :], mask=k_ok[:, None], other=0.0)
    vt = tl.load(V + b * sv_b + kpos * sv_t + h * sv_h + d[None, :], mask=k_ok[:, None], other=0.0)
    M: tl.constexpr = QC * GP
    rows = tl.arange(0, M)
    t_in = rows // GP
    g = rows % GP
    dk = tl.zeros([BS, D], tl.float32)
    dv = tl.zeros([BS, D], tl.float32)
    for j0 in range(lo, hi, QC):
        jj = j0 + t_in
        t_ok = jj < hi
        tok = tl.load(ORDER + jj, mask=t_ok, other=0) // HBC % TQ
        row_ok = t_ok & (g < G)
        q_off = b * sq_b + tok[:, None] * sq_t + (h * G + g)[:, None] * sq_h + d[None, :]
        q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
        do_off = b * so_b + tok[:, None] * so_t + (h * G + g)[:, None] * so_h + d[None, :]
        do = tl.load(DO + do_off, mask=row_ok[:, None], other=0.0)
        l_off = b * sl_b + tok * sl_t + (h * G + g) * sl_h
        lse2 = tl.load(LSE + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
        qpos = q_offset + tok
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale
        live = row_ok[:, None] & k_ok[None, :] & ((kstart + r)[None, :] <= qpos[:, None])
        p = tl.where(live, tl.exp2(s - lse2[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out_off = seg * BS * D + r[:, None] * D + d[None, :]
    tl.store(PDK + out_off, dk * scale)
    tl.store(PDV + out_off, dv)


@triton.jit
def _dkdv_reduce_kernel(
    PDK, PDV, SEG_END, NSEG, BLK_START, BLK_LEN, DK, DV,
    sd_b, sd_t, sd_h, H, NB,
    BS: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    key = tl.program_id(0).to(tl.int64)
    bh = key // NB
    row = key % NB
    b = (bh // H).to(tl.int64)
    h = bh % H
    count = tl.load(NSEG + key)
    first = tl.load(SEG_END + key) - count
    r = tl.arange(0, BS)
    d = tl.arange(0, D)
    dk = tl.zeros([BS, D], tl.float32)
    dv = tl.zeros([BS, D], tl.float32)
    for s in range(first, first + count):
        off = s * BS * D + r[:, None] * D + d[None, :]
        dk += tl.load(PDK + off)
        dv += tl.load(PDV + off)
    kstart = tl.load(BLK_START + row).to(tl.int64)
    klen = tl.load(BLK_LEN + row)
    out = b * sd_b + (kstart + r)[:, None] * sd_t + h * sd_h + d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=(r < klen)[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=(r < klen)[:, None])


@dataclass(frozen=True)
class Launch:
    """Launch parameters of the three kernels (``tools/sweep_selected_attention.py`` times others).

    The defaults are the fastest of 90 launches timed on an H200 at 8k and 64k tokens (1B layout,
    bf16; docs/performance.md has the sweep): against the previous ones the
    forward is 1.09x / 1.27x faster with 1 warp and 32 keys per step, dq 1.13x / 1.27x with 2 warps and
    2 stages, the dk/dv segments 1.31x / 1.07x with 128 rows (queries x group heads) per step and 3
    stages. The key step changes the forward's bf16 rounding; the others give the same bits.

    ``*_maxnreg`` caps the registers per thread (None: the compiler's choice). The kernels wait on
    gathered loads, so more resident warps pay (``default_launch`` sets the caps that were timed).
    """

    fwd_warps: int = 1
    fwd_stages: int = 2
    fwd_keys: int = 32
    fwd_maxnreg: int | None = None
    dq_warps: int = 2
    dq_stages: int = 2
    dq_keys: int = 64
    dq_maxnreg: int | None = None
    dkdv_rows: int = 128
    dkdv_stages: int = 3
    dkdv_warps: int = 4
    dkdv_maxnreg: int | None = None


def default_launch(head_dim: int, group_size: int) -> Launch:
    """The shipped launch for a layout of ``head_dim`` and GQA group size."""
    if head_dim > 64:
        # The 128-row, 3-stage dk/dv tile needs 242 KB of shared memory at head_dim 128 and block_size
        # 64, over Hopper's 227 KB (an H200 refused it), so larger heads keep a 64-row, 2-stage tile.
        return Launch(dkdv_rows=64, dkdv_stages=2)
    if head_dim == 64 and _group_rows(group_size) == 16:
        # dq needs 137 registers here (sm90): a cap of 128 fits 8 programs per SM instead of 7 without
        # spilling, 1.12x / 1.05x / 1.08x faster at 8k / 32k / 64k on an H200 (1B layout; caps on the
        # forward and dk/dv were slower or mixed). Other layouts need other counts (head_dim 128: 208),
        # where this cap would spill heavily.
        return Launch(dq_maxnreg=128)
    return Launch()


def _group_rows(g: int) -> int:
    # The tensor cores need >= 16 rows.
    return max(16, next_pow2(g))


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, q_offset: int,
    scale: float, plan: Plan, launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    b, tq, hq, d = q.shape
    h = k.shape[2]
    o = _alloc.empty(*q.shape, device=q.device, dtype=q.dtype)
    lse = _alloc.empty(b, tq, hq, device=q.device, dtype=torch.float32)
    _fwd_kernel[(tq, b * h)](
        q, k, v, idx, o, lse, plan.q_doc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        q_offset, scale * LOG2E, h, hq // h, idx.shape[3],
        BS=block_size, GP=_group_rows(hq // h), KN=max(block_size, launch.fwd_keys), D=d,
        IEEE=exact_dots(q.dtype), num_warps=launch.fwd_warps, num_stages=launch.fwd_stages,
        maxnreg=launch.fwd_maxnreg,
    )  # fmt: skip
    return o, lse


def _dq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, dlse: torch.Tensor | None, block_size: int, q_offset: int, scale: float, plan: Plan,
    launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, delta)``; ``do`` contiguous, ``dlse`` fp32 contiguous or None."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    delta = _alloc.empty_like(lse)
    dq = _alloc.empty_like(o)
    _dq_kernel[(tq, b * h)](
        q, k, v, idx, o, do, lse, lse if dlse is None else dlse, delta, dq, plan.q_doc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        q_offset, scale * LOG2E, scale, h, hq // h, idx.shape[3],
        BS=block_size, GP=_group_rows(hq // h), KN=max(block_size, launch.dq_keys), D=d,
        IEEE=exact_dots(q.dtype), HAS_DLSE=dlse is not None, num_warps=launch.dq_warps,
        num_stages=launch.dq_stages, maxnreg=launch.dq_maxnreg,
    )  # fmt: skip
    return dq, delta


def _dkdv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: SegmentTable, lse: torch.Tensor,
    delta: torch.Tensor, do: torch.Tensor, block_size: int, q_offset: int, scale: float, plan: Plan,
    launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dk, dv)`` from the segment table: per-segment partials, then each block's segments summed
    in order."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    gp = _group_rows(g)
    n_seg = table.seg_key.numel()
    n_keys = b * h * plan.n_blocks
    pairs_per_token = table.order.numel() // (b * tq)  # H * block_count
    pdk = _alloc.empty(n_seg, block_size, d, device=q.device, dtype=torch.float32)
    pdv = _alloc.empty_like(pdk)
    _dkdv_segment_kernel[(n_seg,)](
        q, k, v, do, lse, delta, table.order, table.seg_key, table.seg_lo, table.seg_hi,
        plan.blk_start, plan.blk_len, pdk, pdv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        q_offset, scale * LOG2E, scale, h, g, plan.n_blocks, tq, pairs_per_token,
        BS=block_size, GP=gp, QC=max(1, launch.dkdv_rows // gp), D=d, IEEE=exact_dots(q.dtype),
        num_warps=launch.dkdv_warps, num_stages=launch.dkdv_stages, maxnreg=launch.dkdv_maxnreg,
    )  # fmt: skip
    dk = _alloc.empty(*k.shape, device=k.device, dtype=k.dtype)
    dv = _alloc.empty_like(dk)
    _dkdv_reduce_kernel[(n_keys,)](
        pdk, pdv, table.seg_end, table.nseg, plan.blk_start, plan.blk_len, dk, dv,
        dk.stride(0), dk.stride(1), dk.stride(2), h, plan.n_blocks,
        BS=block_size, D=d,
    )  # fmt: skip
    return dk, dv


def _backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, dlse: torch.Tensor | None, block_size: int, q_offset: int, scale: float, plan: Plan,
    launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    do = do.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dq, delta = _dq(q, k, v, idx, o, lse, do, dlse, block_size, q_offset, scale, plan, launch)
    table = segment_table(idx, plan, k.shape[2])
    dk, dv = _dkdv(q, k, v, table, lse, delta, do, block_size, q_offset, scale, plan, launch)
    return dq, dk, dv


class SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        idx: torch.Tensor,
        block_size: int,
        q_offset: int,
        scale: float,
        plan: Plan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        launch = default_launch(q.shape[-1], q.shape[2] // k.shape[2])
        # Training uses the LSE only detached (the sparsity statistic): an absent gradient stays None
        # instead of a zero tensor, which cost a fill launch and a load per query head in dq.
        ctx.set_materialize_grads(False)
        o, lse = _forward(q, k, v, idx, block_size, q_offset, scale, plan, launch)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.args = (block_size, q_offset, scale, plan, launch)
        return o, lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, idx, o, lse = ctx.saved_tensors
        if do is None:
            # Only the LSE reached the loss.
            do = torch.zeros_like(o)
        dq, dk, dv = _backward(q, k, v, idx, o, lse, do, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def selected_attention_planned(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, q_offset: int,
    scale: float, plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return SelectedAttention.apply(q, k, v, idx.contiguous(), block_size, q_offset, scale, plan)
