"""PyTorch path of SSA attention for the Hugging Face model (shipped inside exported model directories).

This file must import nothing but torch: it is copied next to ``modeling_ssa.py`` into every
exported directory, which has to load with only transformers, torch and safetensors installed.
It follows the ``kernels.ssa`` contract (docs/architecture.md) for the ops the HF model calls,
so a shipped Triton copy of ``kernels.ssa`` can replace it on CUDA without changing the caller.

Unlike ``kernels/ssa/naive.py`` (a readable reference for training kernels) this is an
inference path: queries are processed in chunks so memory stays bounded at long context, and it
also returns per-query attention statistics (sparsity, entropy, KL) for the evaluation suite.

Layout: q ``[B, Tq, HQ, D]``, k/v ``[B, Tk, H, D]``, queries at global positions
``[q_offset, q_offset + Tq)``, keys at ``[0, Tk)``; ``HQ = G * H``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Upper bound on elements of one [B, HQ, chunk, Tk] fp32 score tensor (256 MiB); keeps long
# contexts (4x extrapolation) within memory on any device.
_MAX_SCORE_ELEMENTS = 1 << 26


def _query_chunks(batch: int, heads: int, tq: int, tk: int) -> Iterator[slice]:
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * max(tk, 1)))
    for start in range(0, tq, step):
        yield slice(start, min(tq, start + step))


def _check_shapes(q: torch.Tensor, k: torch.Tensor, q_offset: int) -> tuple[int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"expected q and k of shape [B, T, heads, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    hq, h = q.shape[2], k.shape[2]
    if hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({h})")
    if q_offset + q.shape[1] > k.shape[1]:
        raise ValueError(
            f"queries end at position {q_offset + q.shape[1]} but only {k.shape[1]} keys were given; "
            "q_offset + Tq must not exceed Tk"
        )
    return hq // h, h


def block_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block's post-RoPE keys ``[B, NB, H, D]``; a trailing partial block averages its tokens."""
    b, tk, h, d = k.shape
    nb = -(-tk // block_size)
    padded = torch.zeros(b, nb * block_size, h, d, dtype=torch.float32, device=k.device)
    padded[:, :tk] = k.float()
    sums = padded.view(b, nb, block_size, h, d).sum(dim=2)
    counts = torch.full((nb,), float(block_size), device=k.device)
    counts[-1] = tk - (nb - 1) * block_size
    return (sums / counts.view(1, nb, 1, 1)).to(k.dtype)


def _select_chunk(
    q: torch.Tensor, kblock: torch.Tensor, block_size: int, block_count: int, pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Selected block indices for queries ``q`` at global positions ``pos`` (see ``select_blocks``)."""
    b, tq, hq, _ = q.shape
    nb, h = kblock.shape[1], kblock.shape[2]
    g = hq // h
    blocks = torch.arange(nb, device=q.device)
    logits = torch.einsum("bthd,bnhd->bthn", q.float(), kblock.float().repeat_interleave(g, dim=2)) * scale
    complete = blocks.view(1, nb) < ((pos + 1) // block_size).view(tq, 1)  # [Tq, NB]
    logits = logits.masked_fill(~complete.view(1, tq, 1, nb), float("-inf"))
    # A query without any complete block has no candidates either; keep its probabilities at 0.
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    group_score = probs.view(b, tq, h, g, nb).sum(dim=3)
    current = (pos // block_size).view(tq, 1)
    score = group_score.masked_fill(~(blocks.view(1, nb) < current).view(1, tq, 1, nb), float("-inf"))
    score = score.masked_fill((blocks.view(1, nb) == current).view(1, tq, 1, nb), float("inf"))
    top = min(block_count, nb)
    values, idx = torch.topk(score, top, dim=-1)
    idx = idx.masked_fill(values == float("-inf"), nb)  # unused slots sort last, then become -1
    idx, _ = torch.sort(idx, dim=-1)
    idx = idx.masked_fill(idx == nb, -1)
    if top < block_count:
        pad = idx.new_full((b, tq, h, block_count - top), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def select_blocks(
    q: torch.Tensor,
    kblock: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Per query token and KV head: the current block plus the ``block_count - 1`` earlier blocks with the
    highest group-summed probability (softmax over the blocks complete at the query). Returns int64
    ``[B, Tq, H, block_count]``, ascending, padded with -1."""
    if block_count < 1:
        raise ValueError(f"block_count must be >= 1, got {block_count}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, tq = q.shape[:2]
    h = kblock.shape[2]
    out = torch.empty(b, tq, h, block_count, dtype=torch.int64, device=q.device)
    pos = torch.arange(q_offset, q_offset + tq, device=q.device)
    for sl in _query_chunks(b, q.shape[2], tq, kblock.shape[1]):
        out[:, sl] = _select_chunk(q[:, sl], kblock, block_size, block_count, pos[sl], scale)
    return out


def _allowed_tokens(
    idx: torch.Tensor | None, block_size: int, pos: torch.Tensor, tk: int, h: int
) -> torch.Tensor:
    """Boolean ``[B or 1, Tq, H, Tk]``: causal, and (when ``idx`` is given) inside the selected blocks."""
    keys = torch.arange(tk, device=pos.device)
    causal = (keys.view(1, tk) <= pos.view(-1, 1)).view(1, -1, 1, tk)
    if idx is None:
        return causal.expand(1, -1, h, tk)
    b, tq, _, _ = idx.shape
    nb = -(-tk // block_size)
    chosen = torch.zeros(b, tq, h, nb + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, idx.masked_fill(idx < 0, nb), True)
    return chosen[..., keys // block_size] & causal


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float().repeat_interleave(g, dim=2)) * scale
    mask = allowed.repeat_interleave(g, dim=2).permute(0, 2, 1, 3)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, HQ, Tq]
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.einsum("bhts,bshd->bthd", p, v.float().repeat_interleave(g, dim=2))
    return o.to(q.dtype), lse.permute(0, 2, 1).contiguous()


def _chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor | None, block_size: int,
    q_offset: int, scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Causal attention, restricted to the selected blocks when ``block_idx`` is given, in query chunks."""
    _check_shapes(q, k, q_offset)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, tq, hq, _ = q.shape
    tk, h = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
    pos = torch.arange(q_offset, q_offset + tq, device=q.device)
    for sl in _query_chunks(b, hq, tq, tk):
        idx = None if block_idx is None else block_idx[:, sl]
        allowed = _allowed_tokens(idx, block_size, pos[sl], tk, h)
        o[:, sl], lse[:, sl] = _attend(q[:, sl], k, v, allowed, scale)
    return o, lse


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    *,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the tokens of the selected blocks: ``(o, lse fp32 [B, Tq, HQ])``."""
    return _chunked_attention(q, k, v, block_idx, block_size, q_offset, scale)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int = 0, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal full attention. Returns ``(o, lse fp32 [B, Tq, HQ])``."""
    return _chunked_attention(q, k, v, None, 1, q_offset, scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block keys + selection + selected attention. Returns ``(o, lse, block_idx)``."""
    _check_shapes(q, k, q_offset)
    idx = select_blocks(q, block_keys(k, block_size), block_size, block_count, q_offset=q_offset, scale=scale)
    o, lse = selected_attention(q, k, v, idx, block_size, q_offset=q_offset, scale=scale)
    return o, lse, idx


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per query and query head (fp32 ``[B, Tq, HQ]``), from the full-attention distribution ``p``:

    - ``sparsity``: mass of ``p`` inside the selected blocks (the paper's Definition 1),
      ``= exp(lse_sparse - lse_full)``;
    - ``entropy``: ``-sum p log p = lse_full - E_p[score]`` (natural log);
    - ``kl_sparse_full``: ``KL(p_sparse || p)`` where ``p_sparse`` is ``p`` restricted to the selected
      blocks and renormalised; it equals ``-log(sparsity)`` (``KL(p || p_sparse)`` is infinite whenever
      mass is dropped, so only this direction is finite).
    """
    _check_shapes(q, k, q_offset)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, tq, hq, _ = q.shape
    tk, h = k.shape[1], k.shape[2]
    g = hq // h
    kblock = block_keys(k, block_size)
    pos = torch.arange(q_offset, q_offset + tq, device=q.device)
    out = {
        name: torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
        for name in ("sparsity", "entropy", "kl_sparse_full")
    }
    kf = k.float().repeat_interleave(g, dim=2)
    for sl in _query_chunks(b, hq, tq, tk):
        idx = _select_chunk(q[:, sl], kblock, block_size, block_count, pos[sl], scale)
        s = torch.einsum("bthd,bshd->bhts", q[:, sl].float(), kf) * scale
        causal = _allowed_tokens(None, 1, pos[sl], tk, h).repeat_interleave(g, dim=2).permute(0, 2, 1, 3)
        chosen = (
            _allowed_tokens(idx, block_size, pos[sl], tk, h).repeat_interleave(g, dim=2).permute(0, 2, 1, 3)
        )
        s_full = s.masked_fill(~causal, float("-inf"))
        lse_full = torch.logsumexp(s_full, dim=-1)
        lse_sparse = torch.logsumexp(s.masked_fill(~chosen, float("-inf")), dim=-1)
        p = torch.exp(s_full - lse_full.unsqueeze(-1))
        expected = (p * s_full.masked_fill(~causal, 0.0)).sum(dim=-1)
        log_share = (lse_sparse - lse_full).clamp(max=0.0)  # rounding can push it a hair above 0
        out["sparsity"][:, sl] = torch.exp(log_share).permute(0, 2, 1)
        out["entropy"][:, sl] = (lse_full - expected).permute(0, 2, 1)
        out["kl_sparse_full"][:, sl] = (-log_share).permute(0, 2, 1)
    return out


def decode_block_keys(
    k: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """After one token was appended per sequence: write the key of each block that has just filled
    (``seq_lens[b] % block_size == 0``) into ``kblock`` in place (``kernels.ssa.decode_block_keys``)."""
    b = k.shape[0]
    lens = seq_lens.to(device=k.device, dtype=torch.long)
    rows = torch.arange(b, device=k.device)
    pos = (lens - block_size).clamp(min=0)[:, None] + torch.arange(block_size, device=k.device)
    mean = (k[rows[:, None], pos.clamp(max=k.shape[1] - 1)].float().sum(dim=1) / block_size).to(kblock.dtype)
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
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new query per sequence (``q [B, HQ, D]`` at position ``seq_lens[b] - 1``) against the cache
    ``k``/``v [B, T, H, D]`` and its block keys ``kblock`` (``kernels.ssa.sparse_decode``): the selection
    and attention ``sparse_attention`` computes for that query, without rebuilding the block keys.
    Returns ``(o [B, HQ, D], lse [B, HQ], block_idx [B, H, block_count])``."""
    if block_count < 1:
        raise ValueError(f"block_count must be >= 1, got {block_count}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses, idxs = [], [], []
    for i, length in enumerate(seq_lens.tolist()):
        own = (length - 1) // block_size
        qi = q[i : i + 1, None]
        pos = torch.tensor([length - 1], device=q.device)
        idx = _select_chunk(qi, kblock[i : i + 1, : own + 1], block_size, block_count, pos, scale)
        o, lse = _chunked_attention(qi, k[i : i + 1, :length], v[i : i + 1, :length], idx, block_size,
                                    length - 1, scale)  # fmt: skip
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
        idxs.append(idx[:, 0])
    return torch.cat(outs), torch.cat(lses), torch.cat(idxs)
