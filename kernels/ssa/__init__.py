"""SSA sparse-attention ops (see docs/architecture.md, "Contract: kernels.ssa").

Layout ``[batch, seq, heads, head_dim]``; ``HQ = G * H`` and query head ``hq`` uses KV head
``hq // G``. ``scale`` defaults to ``head_dim ** -0.5``. ``backend="auto"`` runs Triton on CUDA
tensors and the plain-PyTorch reference (``kernels.ssa.naive``) on CPU tensors. ``cu_seqlens`` may
live on the host or the device; the ops read it on the host, so a host tensor spares a sync per call.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from kernels.ssa import naive
from kernels.ssa._backend import use_triton
from kernels.ssa._common import (
    check_block_args,
    check_qkv,
    check_query_blocks,
    doc_bounds,
    resolve_scale,
    total_blocks,
)

__all__ = [
    "block_keys",
    "decode_block_keys",
    "dense_attention",
    "dense_decode",
    "select_blocks",
    "selected_attention",
    "sparse_attention",
    "sparse_decode",
]


def _triton_ops() -> ModuleType:
    # Imported lazily so CPU-only users never load Triton.
    from kernels.ssa import triton_ops

    return triton_ops


def _dispatch(op: str, backend: str, tensors: tuple[torch.Tensor, ...], *args: Any, **kwargs: Any) -> Any:
    """Call ``op`` of the Triton backend where ``backend`` picks it for ``tensors``, else of the reference."""
    impl = _triton_ops() if use_triton(backend, *tensors) else naive
    return getattr(impl, op)(*args, **kwargs)


def block_keys(
    k: torch.Tensor, block_size: int, *, cu_seqlens: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Mean of each block of ``block_size`` keys, per KV head: ``[B, NB, H, D]`` in k's dtype.

    With ``cu_seqlens`` blocks restart at each document start and the documents' blocks are
    concatenated in order (document i contributes ceil(len_i / block_size) rows); a trailing
    partial block is the mean of its tokens.
    """
    check_block_args(block_size)
    if k.dim() != 4:
        raise ValueError(f"k must be [batch, seq, heads, head_dim]; got {tuple(k.shape)}")
    doc_bounds(cu_seqlens, k.shape[0], k.shape[1])
    return _dispatch("block_keys", backend, (k,), k, block_size, cu_seqlens=cu_seqlens)


def select_blocks(
    q: torch.Tensor,
    kblock: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Blocks each query attends to: int32 ``[B, Tq, H, block_count]``, ascending, -1 padded.

    The own block ``t // block_size`` always, plus the top ``block_count - 1`` earlier blocks by
    the group-summed softmax probability over the blocks complete at t (lower index wins ties).
    Queries must lie inside the keys the blocks were built from. No gradient.
    """
    check_block_args(block_size, block_count)
    # Only whole blocks are ever candidates, so without documents the exact key length does
    # not matter; with documents cu_seqlens[-1] is the key length.
    seq_len = int(cu_seqlens[-1]) if cu_seqlens is not None else kblock.shape[1] * block_size
    scale = resolve_scale(scale, q.shape[-1])
    check_query_blocks(q, kblock, q_offset, seq_len)
    bounds = doc_bounds(cu_seqlens, q.shape[0], seq_len)
    expect = total_blocks(bounds, block_size)
    if cu_seqlens is not None and kblock.shape[1] != expect:
        raise ValueError(
            f"kblock has {kblock.shape[1]} blocks but cu_seqlens {bounds} with block_size {block_size} "
            f"needs {expect}; build it with block_keys(k, block_size, cu_seqlens=cu_seqlens)"
        )
    return _dispatch(
        "select_blocks", backend, (q, kblock), q, kblock, block_size, block_count,
        q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale, seq_len=seq_len,
    )  # fmt: skip


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_size: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over the keys of its selected blocks, causal inside
    them: ``(o [B, Tq, HQ, D], lse [B, Tq, HQ] fp32)``; differentiable in q, k, v."""
    check_block_args(block_size)
    check_qkv(q, k, v, q_offset)
    doc_bounds(cu_seqlens, q.shape[0], k.shape[1])
    want = (q.shape[0], q.shape[1], k.shape[2])
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != want:
        raise ValueError(
            f"block_idx must be [B, Tq, H, block_count] with (B, Tq, H) = {want}; "
            f"got {tuple(block_idx.shape)}"
        )
    scale = resolve_scale(scale, q.shape[-1])
    return _dispatch(
        "selected_attention", backend, (q, k, v), q, k, v, block_idx, block_size,
        q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale,
    )  # fmt: skip


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries at global positions ``[q_offset, q_offset + Tq)`` over keys
    ``[0, Tk)`` (within each document): ``(o, lse fp32)``; differentiable in q, k, v.

    The LSE is differentiable except on the CUDA fast paths: fp16/bf16 run cuDNN attention (whole
    sequences on sm90+) or PyTorch's flash kernel (any ``q_offset``, packed documents included),
    whose LSEs have no gradient, and a gradient that reaches that LSE raises RuntimeError (detach
    it, as the sparsity statistic does). fp32 (FlexAttention) and ``backend="naive"`` give the LSE
    its full gradient."""
    check_qkv(q, k, v, q_offset)
    doc_bounds(cu_seqlens, q.shape[0], k.shape[1])
    scale = resolve_scale(scale, q.shape[-1])
    return _dispatch(
        "dense_attention", backend, (q, k, v), q, k, v, q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale
    )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    block_count: int,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SSA sparse branch: block keys + selection + selected attention.

    Returns ``(o, lse, block_idx)``; gradients flow to q, k, v through the attention only.
    """
    check_block_args(block_size, block_count)
    check_qkv(q, k, v, q_offset)
    doc_bounds(cu_seqlens, q.shape[0], k.shape[1])
    scale = resolve_scale(scale, q.shape[-1])
    return _dispatch(
        "sparse_attention", backend, (q, k, v), q, k, v, block_size, block_count,
        q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale,
    )  # fmt: skip


def _check_decode_cache(
    k: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> None:
    if k.dim() != 4 or kblock.dim() != 4:
        raise ValueError(
            f"k and kblock must be [batch, seq, heads, head_dim] and [batch, blocks, heads, head_dim]; "
            f"got {tuple(k.shape)} and {tuple(kblock.shape)}"
        )
    b, t, h, d = k.shape
    need = -(-t // block_size)
    if kblock.shape[0] != b or kblock.shape[2:] != (h, d) or kblock.shape[1] < need:
        raise ValueError(
            f"kblock {tuple(kblock.shape)} must be [{b}, >= {need}, {h}, {d}] for a cache of {t} tokens "
            f"in blocks of {block_size}"
        )
    _check_seq_lens(seq_lens, b)


def _check_seq_lens(seq_lens: torch.Tensor, batch: int) -> None:
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"seq_lens must be an int32/int64 tensor of shape ({batch},); "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )


def _check_decode_query(q: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(
            f"q must be [batch, query_heads, head_dim] (one query per sequence); got {tuple(q.shape)}"
        )


def _check_query_fits_cache(q: torch.Tensor, k: torch.Tensor) -> None:
    """``q [B, HQ, D]`` for a cache ``k [B, T, H, D]`` (both already checked to have those ranks)."""
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[3] or q.shape[1] % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} must be [B, G * H, D] for a cache {tuple(k.shape)} ([B, T, H, D])"
        )


def decode_block_keys(
    k: torch.Tensor, kblock: torch.Tensor, seq_lens: torch.Tensor, block_size: int, *, backend: str = "auto"
) -> torch.Tensor:
    """Keep a KV cache's block keys current after appending one token per sequence; returns ``kblock``.

    ``k [B, T, H, D]`` holds sequence b's keys at ``[0, seq_lens[b])`` (post-RoPE; any strides), and
    ``kblock [B, >= ceil(T / block_size), H, D]`` their block keys. Where ``seq_lens[b]`` is a multiple
    of ``block_size`` the sequence's last block has just filled and its mean (fp32, as in
    ``block_keys``) is written in place; a block's key is final once written, and a partial block has
    none (it is never scored). Runs on the device without reading ``seq_lens`` on the host, with the
    same few PyTorch ops on every backend (it moves ``block_size`` keys per sequence).
    """
    check_block_args(block_size)
    _check_decode_cache(k, kblock, seq_lens, block_size)
    use_triton(backend, k)  # validates the backend name
    return naive.decode_block_keys(k, kblock, seq_lens, block_size)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse branch for one new query per sequence against a KV cache.

    ``q [B, HQ, D]``: sequence b's query at position ``seq_lens[b] - 1`` (its key and value already in
    the cache). ``k``/``v [B, T, H, D]``: the cache, sequence b's tokens at ``[0, seq_lens[b])`` with
    ``1 <= seq_lens[b] <= T`` (lengths may differ; strided views of a larger cache are fine).
    ``kblock``: the cache's block keys (``decode_block_keys``); only complete blocks are read.
    Returns ``(o [B, HQ, D], lse [B, HQ] fp32, block_idx int32 [B, H, block_count])``, the selection
    and attention that ``sparse_attention`` computes for that query over the whole sequence. The Triton
    path reads the complete blocks' keys and the selected blocks' keys and values, nothing else.
    """
    check_block_args(block_size, block_count)
    _check_decode_query(q)
    _check_decode_cache(k, kblock, seq_lens, block_size)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}; got {tuple(v.shape)}")
    _check_query_fits_cache(q, k)
    scale = resolve_scale(scale, q.shape[-1])
    if use_triton(backend, q, k, v, kblock):
        from kernels.ssa import decode_kernel

        _triton_ops()._check(q, block_size)
        return decode_kernel.sparse_decode(q, k, v, kblock, seq_lens, block_size, block_count, scale=scale)
    return naive.sparse_decode(q, k, v, kblock, seq_lens, block_size, block_count, scale=scale)


def dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention for one new query per sequence against a KV cache (the full-mode decoding step).

    Shapes as ``sparse_decode`` (``q [B, HQ, D]`` at position ``seq_lens[b] - 1``; ``k``/``v [B, T, H, D]``,
    strided views allowed). Returns ``(o [B, HQ, D], lse [B, HQ] fp32)``. The Triton path splits each
    sequence's keys over programs (flash decoding), so a single sequence still fills the GPU.
    """
    _check_decode_query(q)
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [batch, seq, heads, head_dim] alike; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_query_fits_cache(q, k)
    _check_seq_lens(seq_lens, k.shape[0])
    scale = resolve_scale(scale, q.shape[-1])
    if use_triton(backend, q, k, v):
        from kernels.ssa import decode_kernel

        _triton_ops()._check(q, 16)
        return decode_kernel.dense_decode(q, k, v, seq_lens, scale=scale)
    return naive.dense_decode(q, k, v, seq_lens, scale=scale)
