"""Plain-PyTorch reference of every SSA op (readable, differentiable through autograd, slow).

Definitions (docs/method.md, sections 1-3), for a query at document-local position t:
- block j holds keys [j*bs, (j+1)*bs) of the document; its block key is their mean.
- block j is *complete* at t when all block_size of its tokens are <= t, i.e. j < (t+1)//bs.
  A trailing partial block (document shorter than a multiple of bs) is never complete, so a
  query's selection depends only on keys up to t, never on where the row was cut.
- score_h(j) = softmax over the complete blocks of q_h . kblock_j * scale; the group's score
  is the sum over its G query heads; candidates are j < t//bs (strictly before the own block).
- selected = own block t//bs plus the top (block_count - 1) candidates, lower index first on
  ties; ascending, padded with -1.
Query head hq belongs to KV head hq // G (the query heads of one group are contiguous).

Everything is computed in fp32 and chunked over queries; attention chunks are recomputed in
backward (activation checkpointing) so memory stays O(chunk * Tk) rather than O(Tq * Tk).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from kernels.ssa._common import doc_bounds, doc_spans, num_blocks

# Elements of one chunk's [B, chunk, HQ, Tk] score tensor; keeps CPU memory near 64 MiB per chunk.
_CHUNK_ELEMS = 1 << 24


def _query_chunk(batch: int, heads: int, width: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, batch * heads * width))


# ---------------------------------------------------------------------------------------------
# block keys
# ---------------------------------------------------------------------------------------------
def _block_keys_doc(k: torch.Tensor, block_size: int) -> torch.Tensor:
    b, t, h, d = k.shape
    nb = num_blocks(t, block_size)
    pad = nb * block_size - t
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad))
    sums = kf.view(b, nb, block_size, h, d).sum(dim=2)
    counts = torch.full((nb,), float(block_size), device=k.device)
    counts[-1] = t - (nb - 1) * block_size
    return (sums / counts.view(1, nb, 1, 1)).to(k.dtype)


def block_keys(k: torch.Tensor, block_size: int, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    bounds = doc_bounds(cu_seqlens, k.shape[0], k.shape[1])
    parts = [_block_keys_doc(k[:, a:b], block_size) for a, b in itertools.pairwise(bounds) if b > a]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def _select_doc(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, block_count: int, q_offset: int, scale: float
) -> torch.Tensor:
    b, tq, hq, d = q.shape
    nb, h = kblock.shape[1], kblock.shape[2]
    g = hq // h
    kbf = kblock.float()
    n_top = min(block_count - 1, nb)
    out = torch.full((b, tq, h, block_count), -1, dtype=torch.int32, device=q.device)
    blocks = torch.arange(nb, device=q.device)
    step = _query_chunk(b, hq, nb)
    for lo in range(0, tq, step):
        hi = min(tq, lo + step)
        pos = torch.arange(lo, hi, device=q.device) + q_offset
        own = pos // block_size
        n_complete = (pos + 1) // block_size
        qc = q[:, lo:hi].float().view(b, hi - lo, h, g, d)
        logits = torch.einsum("bthgd,bnhd->bthgn", qc, kbf) * scale
        complete = (blocks[None, :] < n_complete[:, None]).view(1, hi - lo, 1, 1, nb)
        logits = logits.masked_fill(~complete, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        # Rows with no complete block have lse = -inf; they have no candidates either.
        probs = torch.where(complete, torch.exp(logits - lse), torch.zeros((), device=q.device))
        score = probs.sum(dim=3)
        candidate = (blocks[None, :] < own[:, None]).view(1, hi - lo, 1, nb)
        score = score.masked_fill(~candidate, float("-inf"))
        # Stable descending sort: equal scores keep index order, so the lower index wins.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n_top]
        picked = torch.gather(score, -1, order) > float("-inf")
        # Non-candidates become the sentinel nb, which sorts after every real block.
        order = torch.sort(torch.where(picked, order, torch.full_like(order, nb)), dim=-1).values
        res = torch.cat([order, torch.full((*order.shape[:3], 1), nb, device=q.device)], dim=-1)
        # The own block is the largest selected index: it goes right after the valid candidates.
        res.scatter_(-1, picked.sum(-1, keepdim=True), own.view(1, -1, 1, 1).expand(b, -1, h, 1))
        res = torch.where(res == nb, torch.full_like(res, -1), res)
        out[:, lo:hi, :, : res.shape[-1]] = res.to(torch.int32)
    return out


def select_blocks(
    q: torch.Tensor,
    kblock: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float,
    seq_len: int,
) -> torch.Tensor:
    """``seq_len`` is the key length Tk (block keys alone do not tell where documents end)."""
    bounds = doc_bounds(cu_seqlens, q.shape[0], seq_len)
    parts = []
    with torch.no_grad():
        for span in doc_spans(bounds, block_size, q_offset, q.shape[1]):
            if span.q_hi == span.q_lo:
                continue
            nb = num_blocks(span.end - span.start, block_size)
            parts.append(
                _select_doc(
                    q[:, span.q_lo : span.q_hi],
                    kblock[:, span.block_start : span.block_start + nb],
                    block_size,
                    block_count,
                    q_offset + span.q_lo - span.start,
                    scale,
                )
            )
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# attention (dense causal and selected blocks share one masked, chunked implementation)
# ---------------------------------------------------------------------------------------------
MaskFn = Callable[[int, int], torch.Tensor]


def _attend_chunk(
    qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, hq, d = qc.shape
    h = k.shape[2]
    g = hq // h
    qg = qc.float().view(b, c, h, g, d)
    logits = torch.einsum("bthgd,bkhd->bthgk", qg, k.float()) * scale
    logits = logits.masked_fill(~mask.unsqueeze(3), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    o = torch.einsum("bthgk,bkhd->bthgd", probs, v.float())
    return o.reshape(b, c, hq, d), lse.reshape(b, c, hq)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: MaskFn, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """mask_fn(lo, hi) -> bool [B, hi-lo, H, Tk]: which keys query rows [lo, hi) may see."""
    b, tq, hq, _ = q.shape
    step = _query_chunk(b, hq, k.shape[1])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs, lses = [], []
    for lo in range(0, tq, step):
        hi = min(tq, lo + step)
        mask = mask_fn(lo, hi)
        if grad:
            o, lse = checkpoint(_attend_chunk, q[:, lo:hi], k, v, mask, scale, use_reentrant=False)
        else:
            o, lse = _attend_chunk(q[:, lo:hi], k, v, mask, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=1)


def _per_document(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    q_offset: int,
    block_size: int,
    run: Callable[[int, int, int, int, int], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split queries/keys by document and call run(q_lo, q_hi, k_start, k_end, local_q_offset)."""
    bounds = doc_bounds(cu_seqlens, q.shape[0], k.shape[1])
    outs, lses = [], []
    for span in doc_spans(bounds, block_size, q_offset, q.shape[1]):
        if span.q_hi == span.q_lo:
            continue
        o, lse = run(span.q_lo, span.q_hi, span.start, span.end, q_offset + span.q_lo - span.start)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h = k.shape[0], k.shape[1], k.shape[2]

    def run(q_lo: int, q_hi: int, ks: int, ke: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        kpos = torch.arange(ke - ks, device=q.device)

        def mask_fn(lo: int, hi: int) -> torch.Tensor:
            qpos = torch.arange(lo, hi, device=q.device) + off
            allowed = kpos[None, :] <= qpos[:, None]
            return allowed.view(1, hi - lo, 1, -1).expand(b, -1, h, -1)

        return _masked_attention(q[:, q_lo:q_hi], k[:, ks:ke], v[:, ks:ke], mask_fn, scale)

    return _per_document(q, k, cu_seqlens, q_offset, 1, run)


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    def run(q_lo: int, q_hi: int, ks: int, ke: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        kpos = torch.arange(ke - ks, device=q.device)
        nb = num_blocks(ke - ks, block_size)
        kblk = kpos // block_size
        idx = block_idx[:, q_lo:q_hi].long()

        def mask_fn(lo: int, hi: int) -> torch.Tensor:
            sel = idx[:, lo:hi]
            # -1 padding (and any out-of-range index) lands in a spare column nb that no key maps to.
            sel = torch.where((sel >= 0) & (sel < nb), sel, torch.full_like(sel, nb))
            chosen = torch.zeros(*sel.shape[:3], nb + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(-1, sel, True)
            qpos = torch.arange(lo, hi, device=q.device) + off
            causal = (kpos[None, :] <= qpos[:, None]).view(1, hi - lo, 1, -1)
            return chosen[..., kblk] & causal

        return _masked_attention(q[:, q_lo:q_hi], k[:, ks:ke], v[:, ks:ke], mask_fn, scale)

    return _per_document(q, k, cu_seqlens, q_offset, block_size, run)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kblock = block_keys(k.detach(), block_size, cu_seqlens=cu_seqlens)
    idx = select_blocks(
        q.detach(),
        kblock,
        block_size,
        block_count,
        q_offset=q_offset,
        cu_seqlens=cu_seqlens,
        scale=scale,
        seq_len=k.shape[1],
    )
    o, lse = selected_attention(
        q, k, v, idx, block_size, q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale
    )
    return o, lse, idx


# ---------------------------------------------------------------------------------------------
# decoding: one new query per sequence against a KV cache
# ---------------------------------------------------------------------------------------------
def decode_block_keys(
    k: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Write the block key of every sequence whose last block just filled (``seq_lens % bs == 0``).

    Device-side only (no host read of ``seq_lens``), so the Triton backend uses it as it is: it
    touches ``block_size`` keys per sequence. The mean is taken in fp32 like ``block_keys``.
    """
    b = k.shape[0]
    lens = seq_lens.to(device=k.device, dtype=torch.long)
    rows = torch.arange(b, device=k.device)
    pos = (lens - block_size).clamp(min=0)[:, None] + torch.arange(block_size, device=k.device)
    pos = pos.clamp(max=k.shape[1] - 1)
    mean = (k[rows[:, None], pos].float().sum(dim=1) / block_size).to(kblock.dtype)
    row = (lens // block_size - 1).clamp(min=0)
    filled = ((lens % block_size == 0) & (lens > 0)).view(b, 1, 1)
    kblock[rows, row] = torch.where(filled, mean, kblock[rows, row])
    return kblock


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kblock: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's query at position ``seq_lens[b] - 1``: the selection and selected attention of
    the training ops for that one query, over the cached block keys of its complete blocks."""
    outs, lses, idxs = [], [], []
    for i, length in enumerate(seq_lens.tolist()):
        own = (length - 1) // block_size
        qi = q[i : i + 1, None]
        # Rows up to the own block: _select_doc scores only the complete ones.
        idx = _select_doc(qi, kblock[i : i + 1, : own + 1], block_size, block_count, length - 1, scale)
        ki, vi = k[i : i + 1, :length], v[i : i + 1, :length]
        o, lse = selected_attention(qi, ki, vi, idx, block_size, q_offset=length - 1, scale=scale)
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
        idxs.append(idx[:, 0])
    return torch.cat(outs), torch.cat(lses), torch.cat(idxs)


def dense_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's query at position ``seq_lens[b] - 1`` attends to all its cached keys."""
    outs, lses = [], []
    for i, length in enumerate(seq_lens.tolist()):
        ki, vi = k[i : i + 1, :length], v[i : i + 1, :length]
        o, lse = dense_attention(q[i : i + 1, None], ki, vi, q_offset=length - 1, scale=scale)
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
    return torch.cat(outs), torch.cat(lses)
