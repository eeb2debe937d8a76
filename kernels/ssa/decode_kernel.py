"""Triton sparse decode: one new query per sequence against a KV cache, reading only what it needs.

A decode step reads, per (sequence, KV head), the cached block keys of its complete blocks (the
selection) and the keys/values of its ``block_count`` selected blocks (the attention); the rest of
the cache is never touched. Full decoding reads every cached key and value, so at long context
the step is bound by exactly the bytes this path skips.

Three launches, each program owning one (sequence, KV head) with the G query heads of the group
as rows (GP = G padded to 16 for the tensor-core product):
- `_decode_lse_kernel`, grid (B*H, block tiles): each tile's per-head max and sum of exponentials
  over the blocks complete at the query (a split reduction: long contexts fill the GPU even at
  batch 1).
- `_decode_score_kernel`, same grid: merges the tiles' partial sums into each head's LSE,
  recomputes the tile's logits, sums the probabilities over the group and writes one int64 key per
  candidate block, ``(score bits << 32) | (2^31 - 1 - j)``: integer order is score order with the
  lower block index first on equal scores, the tie rule of the training selection. Non-candidates
  get -1. ``torch.topk`` over these keys then picks the ``block_count - 1`` best.
- `_decode_attn_kernel`, grid (B*H,): softmax attention of the group's queries over the selected
  blocks, gathered a chunk of blocks at a time (all loads of a chunk in flight together: at batch
  1 the step is latency-bound, not bandwidth-bound), causal inside the own, possibly partial block.

Sequences in a batch may have different lengths (``seq_lens``, on the device: no host read), and
the cache tensors may be strided views (a preallocated cache sliced to its used length).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ssa import _alloc
from kernels.ssa._plan import next_pow2
from kernels.ssa.selected_attention_kernel import online_softmax_step
from kernels.ssa.selection_kernel import _dot, exact_dots

LOG2E = tl.constexpr(1.4426950408889634)
# Blocks scored per program of the two selection kernels.
_SELECT_TILE = 256
# Keys gathered per attention chunk (the selected blocks' tokens, all loads of a chunk in flight).
_ATTN_CHUNK_TOKENS = 256


@triton.jit
def _load_group_queries(Q, b, h, sq_b, sq_h, G, GP: tl.constexpr, D: tl.constexpr):
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    ptr = Q + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :]
    return tl.load(ptr, mask=(g < G)[:, None], other=0.0)


@triton.jit
def _tile_logits(
    q, KB, b, h, n, n_valid, skb_b, skb_n, skb_h, IEEE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, D)
    ptr = KB + b * skb_b + n[:, None] * skb_n + h * skb_h + d[None, :]
    kb = tl.load(ptr, mask=(n < n_valid)[:, None], other=0.0)
    return _dot(q, tl.trans(kb), IEEE)  # [GP, BN], unscaled


@triton.jit
def _decode_lse_kernel(
    Q, KB, LENS, M_OUT, L_OUT,
    sq_b, sq_h, skb_b, skb_n, skb_h,
    H, G, NT, scale,
    BS: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    n_complete = tl.load(LENS + b) // BS
    n = tile * BN + tl.arange(0, BN)
    rows = tl.arange(0, GP)
    out = (bh * NT + tile) * GP + rows
    if tile * BN >= n_complete:
        tl.store(M_OUT + out, tl.full([GP], float("-inf"), tl.float32))
        tl.store(L_OUT + out, tl.zeros([GP], tl.float32))
        return
    q = _load_group_queries(Q, b, h, sq_b, sq_h, G, GP, D)
    s = _tile_logits(q, KB, b, h, n, n_complete, skb_b, skb_n, skb_h, IEEE, D) * (scale * LOG2E)
    s = tl.where(n[None, :] < n_complete, s, float("-inf"))
    m = tl.max(s, 1)  # finite: the tile holds at least one complete block
    tl.store(M_OUT + out, m)
    tl.store(L_OUT + out, tl.sum(tl.exp2(s - m[:, None]), 1))


@triton.jit
def _decode_score_kernel(
    Q, KB, LENS, M_IN, L_IN, KEYS,
    sq_b, sq_h, skb_b, skb_n, skb_h,
    H, G, NT, NB, scale,
    BS: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, NTP: tl.constexpr, D: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    length = tl.load(LENS + b)
    n_complete = length // BS
    own = (length - 1) // BS
    n = tile * BN + tl.arange(0, BN)
    key_ptr = KEYS + bh.to(tl.int64) * NB + n
    if tile * BN >= own:
        # No candidate in this tile: blocks at or after the own block are never candidates.
        tl.store(key_ptr, tl.full([BN], -1, tl.int64), mask=n < NB)
        return
    # Merge the tiles' partial sums into each head's log2-sum-exp (log2 units, scale folded in).
    t = tl.arange(0, NTP)
    rows = tl.arange(0, GP)
    part = (bh * NT + t)[:, None] * GP + rows[None, :]
    m_part = tl.load(M_IN + part, mask=(t < NT)[:, None], other=float("-inf"))
    l_part = tl.load(L_IN + part, mask=(t < NT)[:, None], other=0.0)
    m_all = tl.max(m_part, 0)  # finite: this tile has a complete block
    lse2 = m_all + tl.log2(tl.sum(l_part * tl.exp2(m_part - m_all[None, :]), 0))
    q = _load_group_queries(Q, b, h, sq_b, sq_h, G, GP, D)
    s = _tile_logits(q, KB, b, h, n, n_complete, skb_b, skb_n, skb_h, IEEE, D) * (scale * LOG2E)
    p = tl.exp2(s - lse2[:, None])
    p = tl.where((rows < G)[:, None], p, 0.0)
    score = tl.sum(p, 0)  # [BN], >= 0
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = (bits << 32) | (2147483647 - n).to(tl.int64)
    key = tl.where(n < own, key, -1)
    tl.store(key_ptr, key, mask=n < NB)


@triton.jit
def _decode_attn_kernel(
    Q, K, V, IDX, LENS, OUT, LSE,
    sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_h, so_b, so_h,
    H, G, NBC, scale,
    BS: tl.constexpr, BSP: tl.constexpr, CB: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t_q = tl.load(LENS + b) - 1  # the query's position
    q = _load_group_queries(Q, b, h, sq_b, sq_h, G, GP, D)
    rows = tl.arange(0, GP)
    d = tl.arange(0, D)
    # Chunk columns: CB blocks x BSP token slots (slots >= BS are padding of small blocks).
    col = tl.arange(0, CB * BSP)
    slot_blk = col // BSP
    slot_tok = col % BSP
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    c = scale * LOG2E
    for c0 in range(0, NBC, CB):
        sel = c0 + slot_blk
        blk = tl.load(IDX + b * si_b + h * si_h + sel, mask=sel < NBC, other=-1)
        pos = blk.to(tl.int64) * BS + slot_tok
        ok = (blk >= 0) & (slot_tok < BS) & (pos <= t_q)
        pos = tl.where(ok, pos, 0)
        kk = tl.load(K + b * sk_b + pos[:, None] * sk_t + h * sk_h + d[None, :], mask=ok[:, None], other=0.0)
        vv = tl.load(V + b * sv_b + pos[:, None] * sv_t + h * sv_h + d[None, :], mask=ok[:, None], other=0.0)
        m_new, alpha, p, l_sum = online_softmax_step(q, kk, ok, c, m, l_sum, IEEE)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, IEEE)
        m = m_new
    # The own block's first token is always selected and visible, so l_sum > 0.
    o = acc / l_sum[:, None]
    hq = h * G + rows
    o_ptr = OUT + b * so_b + hq[:, None] * so_h + d[None, :]
    tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=(rows < G)[:, None])
    tl.store(LSE + b * H * G + hq, (m + tl.log2(l_sum)) / LOG2E, mask=rows < G)


@triton.jit
def _dense_decode_kernel(
    Q, K, V, LENS, ACC, M_OUT, L_OUT,
    sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    H, G, S, SPAN, scale,
    CT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Full attention of the group's queries over keys [split * SPAN, (split + 1) * SPAN) of the
    sequence (split-K, as flash decoding): unnormalised output, running max and sum per row."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    length = tl.load(LENS + b)
    q = _load_group_queries(Q, b, h, sq_b, sq_h, G, GP, D)
    rows = tl.arange(0, GP)
    d = tl.arange(0, D)
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    c = scale * LOG2E
    lo = split * SPAN
    hi = tl.minimum(lo + SPAN, length)
    for t0 in range(lo, hi, CT):
        pos = t0 + tl.arange(0, CT)
        ok = pos < hi
        pos64 = pos.to(tl.int64)
        k_ptr = K + b * sk_b + pos64[:, None] * sk_t + h * sk_h + d[None, :]
        v_ptr = V + b * sv_b + pos64[:, None] * sv_t + h * sv_h + d[None, :]
        kk = tl.load(k_ptr, mask=ok[:, None], other=0.0)
        vv = tl.load(v_ptr, mask=ok[:, None], other=0.0)
        m_new, alpha, p, l_sum = online_softmax_step(q, kk, ok, c, m, l_sum, IEEE)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, IEEE)
        m = m_new
    part = bh.to(tl.int64) * S + split
    tl.store(ACC + (part * GP + rows)[:, None] * D + d[None, :], acc)
    tl.store(M_OUT + part * GP + rows, m)
    tl.store(L_OUT + part * GP + rows, l_sum)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_select(
    q: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor, block_size: int, block_count: int,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """int32 ``[B, H, block_count]``: the own block plus the top candidates, ascending, -1 padded."""
    b, hq, d = q.shape
    nb, h = kblock.shape[1], kblock.shape[2]
    g = hq // h
    gp = max(16, next_pow2(g))
    bn = min(_SELECT_TILE, max(16, next_pow2(nb)))
    nt = triton.cdiv(nb, bn)
    ieee = exact_dots(q.dtype)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    m_part = _alloc.empty(b * h * nt * gp, device=q.device, dtype=torch.float32)
    l_part = _alloc.empty(b * h * nt * gp, device=q.device, dtype=torch.float32)
    keys = _alloc.empty(b * h, nb, device=q.device, dtype=torch.int64)
    strides = (q.stride(0), q.stride(1), kblock.stride(0), kblock.stride(1), kblock.stride(2))
    _decode_lse_kernel[(b * h, nt)](
        q, kblock, lens, m_part, l_part, *strides, h, g, nt, scale,
        BS=block_size, GP=gp, BN=bn, D=d, IEEE=ieee, num_warps=8 if bn >= 256 else 4,
    )  # fmt: skip
    _decode_score_kernel[(b * h, nt)](
        q, kblock, lens, m_part, l_part, keys, *strides, h, g, nt, nb, scale,
        BS=block_size, GP=gp, BN=bn, NTP=max(2, next_pow2(nt)), D=d, IEEE=ieee,
        num_warps=8 if bn >= 256 else 4,
    )  # fmt: skip
    n_top = min(block_count - 1, nb)
    top = torch.topk(keys, n_top, dim=1).values if n_top > 0 else keys[:, :0]
    # Low 32 bits hold 2^31 - 1 - j; a key of -1 (no candidate) becomes the sentinel nb + 1.
    picked = torch.where(top >= 0, 2147483647 - (top & 0xFFFFFFFF), torch.full_like(top, nb + 1))
    own = ((lens.long() - 1) // block_size).repeat_interleave(h).view(b * h, 1)
    idx = torch.cat([picked, own], dim=1)
    idx = torch.sort(idx, dim=1).values
    idx = torch.where(idx > nb, torch.full_like(idx, -1), idx).to(torch.int32)
    if idx.shape[1] < block_count:
        idx = torch.cat([idx, idx.new_full((b * h, block_count - idx.shape[1]), -1)], dim=1)
    return idx.view(b, h, block_count)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention of each sequence's query over its selected blocks: ``(o [B, HQ, D], lse [B, HQ])``."""
    b, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    idx = block_idx.to(torch.int32)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    bsp = max(1, next_pow2(block_size))
    # fp32 chunks of 256 keys need more shared memory than Hopper has (276 KiB): half as many.
    cb = max(1, (_ATTN_CHUNK_TOKENS if q.element_size() <= 2 else _ATTN_CHUNK_TOKENS // 2) // bsp)
    # tl.dot needs at least 16 columns per chunk.
    cb = max(cb, triton.cdiv(16, bsp))
    cb = min(cb, max(triton.cdiv(16, bsp), next_pow2(idx.shape[-1])))
    o = _alloc.empty(b, hq, d, device=q.device, dtype=q.dtype)
    lse = _alloc.empty(b, hq, device=q.device, dtype=torch.float32)
    _decode_attn_kernel[(b * h,)](
        q, k, v, idx, lens, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), o.stride(0), o.stride(1),
        h, g, idx.shape[-1], scale,
        BS=block_size, BSP=bsp, CB=cb, GP=max(16, next_pow2(g)), D=d, IEEE=exact_dots(q.dtype), num_warps=4,
    )  # fmt: skip
    return o, lse


def sparse_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int, block_count: int, *, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    q, kblock = _last_dim_contiguous(q), _last_dim_contiguous(kblock)
    idx = decode_select(q, kblock, seq_lens, block_size, block_count, scale)
    o, lse = decode_attention(q, k, v, idx, seq_lens, block_size, scale)
    return o, lse, idx


def decode_read_bytes(
    batch: int, context: int, heads: int, group: int, head_dim: int, block_size: int, block_count: int,
    elem_bytes: int,
) -> dict[str, int]:  # fmt: skip
    """Bytes one layer's decoding step reads at ``context`` tokens (the new query's key included).

    ``full``: every cached key and value. ``minimum`` (sparse): the complete blocks' keys once plus
    the selected blocks' keys and values. ``kernels``: what the three sparse launches request, with
    the block keys read twice (the LSE pass, then the scoring pass up to the own block), each
    scoring program's merge of the partial sums, the int64 ranking keys written and read back by the
    top-k, and the selected blocks. Reads that hit L2 (the second block-key pass, the partial sums)
    count here like DRAM reads.
    """
    rows = -(-context // block_size)  # block-key rows of the cache
    complete = context // block_size
    own = (context - 1) // block_size
    bn = min(_SELECT_TILE, max(16, next_pow2(rows)))
    tiles = -(-rows // bn)
    gp = max(16, next_pow2(group))
    block_keys = complete * head_dim * elem_bytes
    selected = 2 * min(block_count, own + 1) * block_size * head_dim * elem_bytes
    partial_sums = -(-own // bn) * tiles * gp * 8
    second_pass = own * head_dim * elem_bytes
    kernels = block_keys + second_pass + partial_sums + 2 * 8 * rows + selected + 4 * block_count
    units = batch * heads
    full = 2 * context * head_dim * elem_bytes
    return {"full": units * full, "minimum": units * (block_keys + selected), "kernels": units * kernels}


# Programs the split-K dense decode aims for: a few waves of the GPU's SMs at any batch size.
_DENSE_DECODE_PROGRAMS = 1024
_DENSE_DECODE_TILE = 128


def dense_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention of one query per sequence over its ``seq_lens[b]`` cached keys, split over the
    keys so that batch 1 fills the GPU too; ``(o [B, HQ, D], lse [B, HQ] fp32)``."""
    b, hq, d = q.shape
    t, h = k.shape[1], k.shape[2]
    g = hq // h
    gp = max(16, next_pow2(g))
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    ct = _DENSE_DECODE_TILE if q.element_size() <= 2 else _DENSE_DECODE_TILE // 2
    splits = max(1, min(triton.cdiv(t, ct), _DENSE_DECODE_PROGRAMS // (b * h)))
    span = triton.cdiv(triton.cdiv(t, splits), ct) * ct
    splits = triton.cdiv(t, span)
    acc = _alloc.empty(b * h * splits * gp * d, device=q.device, dtype=torch.float32)
    m_part = _alloc.empty(b * h * splits * gp, device=q.device, dtype=torch.float32)
    l_part = _alloc.empty(b * h * splits * gp, device=q.device, dtype=torch.float32)
    _dense_decode_kernel[(b * h, splits)](
        q, k, v, lens, acc, m_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, g, splits, span, scale,
        CT=ct, GP=gp, D=d, IEEE=exact_dots(q.dtype), num_warps=4,
    )  # fmt: skip
    # Merge the splits (splits past a sequence's end hold m = -inf, sum 0; split 0 is never empty).
    m_part = m_part.view(b, h, splits, gp)[..., :g]
    l_part = l_part.view(b, h, splits, gp)[..., :g]
    acc = acc.view(b, h, splits, gp, d)[..., :g, :]
    m_all = m_part.amax(dim=2, keepdim=True)
    w = torch.exp2(m_part - m_all)
    total = (w * l_part).sum(dim=2)
    o = (w.unsqueeze(-1) * acc).sum(dim=2) / total.unsqueeze(-1)
    lse = (m_all.squeeze(2) + torch.log2(total)) / LOG2E.value
    return o.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq)
