"""Dense causal attention on PyTorch's flash-attention ops, which return the LSE: any query offset,
packed documents included.

This covers every training step: whole sequences, a context-parallel rank's query chunks at their
global offset against the all-gathered keys, and document-causal rows. SDPA's flash kernel is
1.5-1.9x faster than FlexAttention (measured on an H100) and compiles
nothing per geometry. The flash kernel aligns a causal mask with Tq < Tk to the last key (query i
sees keys j <= i + Tk - Tq), so each document's queries ``[lo, hi)`` (global positions) run against
its keys ``[doc_start, hi)``: later keys are never attended and are not passed. Documents go to the
variable-length kernel as consecutive (query segment, key segment) pairs.

One autograd Function serves CUDA and CPU. CUDA: ``_scaled_dot_product_flash_attention`` for one
segment (any batch), ``_flash_attention_forward`` (varlen) for several. CPU:
``_scaled_dot_product_flash_attention_for_cpu`` with the same mask given explicitly (that op aligns
``is_causal`` to the first key and has no varlen form), so the CPU tests run the layout, GQA,
segment bookkeeping and gradient logic the GPU runs. Only arguments present in both torch 2.11
and 2.14 are passed (dropout 0, causal, keyword scale).

The aten flash backward takes no gradient for the LSE, so here the LSE is a statistic only: a
gradient that reaches it raises instead of being dropped; FlexAttention (fp32) and the naive path
differentiate it. The CUDA backward accumulates dQ with atomics, so it is not bitwise reproducible
unless ``torch.use_deterministic_algorithms(True)`` is set (PyTorch then runs its deterministic
variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.ssa._common import doc_bounds, doc_spans
from kernels.ssa._plan import to_device

__all__ = ["flash_applies", "flash_dense_attention"]

# The CUDA flash kernel's limits (as in SDPA's own dispatch checks): half types, head_dim a
# multiple of 8 up to 256, sm80 or newer.
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

LSE_GRAD_ERROR = (
    "dense_attention's fast path (bf16/fp16 on CUDA) returns the LSE without gradient, but a "
    "gradient reached it; detach the LSE, or take a path that differentiates it: backend='naive', "
    "or fp32 inputs (FlexAttention)"
)


@dataclass(frozen=True)
class _Segments:
    """Which keys each query attends: the keys ``[key_start, key_end)`` are passed, cut into one
    segment per document that has queries here; query segment i (``q_lens[i]`` consecutive rows)
    attends key segment i (``k_lens[i]`` keys) causally, aligned to the segment's last key."""

    key_start: int
    key_end: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]

    def cumulative(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """FlashAttention's ``cu_seqlens_q``, ``cu_seqlens_k`` (int32, leading 0)."""
        cu = [torch.tensor((0, *lens), dtype=torch.int32).cumsum(0, dtype=torch.int32) for lens in
              (self.q_lens, self.k_lens)]  # fmt: skip
        return to_device(cu[0], device), to_device(cu[1], device)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The same visibility as an additive ``[Tq, Tk]`` mask (for the CPU op)."""
        seg_q = torch.repeat_interleave(torch.arange(len(self.q_lens)), torch.tensor(self.q_lens))
        seg_k = torch.repeat_interleave(torch.arange(len(self.k_lens)), torch.tensor(self.k_lens))
        q_pos = self.key_end - sum(self.q_lens) + torch.arange(seg_q.numel())
        k_pos = self.key_start + torch.arange(seg_k.numel())
        visible = (seg_q[:, None] == seg_k[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


def _segments(cu_seqlens: torch.Tensor | None, q_offset: int, q_len: int, k_len: int) -> _Segments:
    q_end = q_offset + q_len
    if cu_seqlens is None:
        return _Segments(0, q_end, (q_len,), (q_end,))
    # The same document/query intersection the sparse kernels plan with (block rows unused here).
    spans = doc_spans(doc_bounds(cu_seqlens, 1, k_len), 1, q_offset, q_len)
    docs = [s for s in spans if s.q_hi > s.q_lo]
    return _Segments(
        key_start=docs[0].start,
        key_end=q_end,
        q_lens=tuple(s.q_hi - s.q_lo for s in docs),
        k_lens=tuple(q_offset + s.q_hi - s.start for s in docs),
    )


# ------------------------------------------------------------------------------------------------
# the op pairs: [B, T, H, D] tensors with equal head counts (K/V already expanded over the group);
# forward -> (o [B, Tq, H, D], lse [B, H, Tq] fp32, saved lse, extra), backward -> (dq, dk, dv)
# ------------------------------------------------------------------------------------------------
def _cuda_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seg: _Segments) -> tuple:
    if len(seg.q_lens) == 1:
        # A transposed view of [B, T, H, D] memory is the layout the kernel reads natively.
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, False, scale=scale
        )
        o, lse, *extra = out[:8]
        return o.transpose(1, 2), lse[..., : q.shape[1]], lse, tuple(extra)
    cu_q, cu_k = seg.cumulative(q.device)
    max_q, max_k = max(seg.q_lens), max(seg.k_lens)
    o, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )
    return o.unsqueeze(0), lse.unsqueeze(0), lse, (cu_q, cu_k, max_q, max_k, seed, offset)


def _cuda_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, extra: tuple, scale: float, seg: _Segments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    cu_q, cu_k, max_q, max_k, seed, offset = extra
    if len(seg.q_lens) == 1:
        t = (x.transpose(1, 2) for x in (do, q, k, v, o))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *t, lse, cu_q, cu_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
        return tuple(g.transpose(1, 2) for g in grads)
    grads = torch.ops.aten._flash_attention_backward(
        do[0], q[0], k[0], v[0], o[0], lse, cu_q, cu_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
    )
    return tuple(g.unsqueeze(0) for g in grads)


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seg: _Segments) -> tuple:
    mask = seg.mask(q.dtype)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale
    )
    return o.transpose(1, 2), lse, lse, (mask,)


def _cpu_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, extra: tuple, scale: float, seg: _Segments,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    (mask,) = extra
    t = (x.transpose(1, 2) for x in (do, q, k, v, o))
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *t, lse, 0.0, False, attn_mask=mask, scale=scale
    )
    return tuple(g.transpose(1, 2) for g in grads)


_OPS = {True: (_cuda_forward, _cuda_backward), False: (_cpu_forward, _cpu_backward)}


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, T, H*group, D]`` with KV head h repeated for query heads
    ``h*group .. h*group + group - 1`` (the ``hq // G`` mapping), unit stride in D."""
    if group > 1:
        b, t, h, d = x.shape
        return x.unsqueeze(3).expand(b, t, h, group, d).reshape(b, t, h * group, d)
    return x if x.stride(-1) == 1 else x.contiguous()


def _group_sum(dx: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, T, H*group, D]`` gradient of the expanded K/V -> ``[B, T, H, D]``."""
    if group == 1:
        return dx
    return dx.unflatten(2, (dx.shape[2] // group, group)).sum(dim=3)


class _FlashDenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seg: _Segments
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group = q.shape[2] // k.shape[2]
        forward, _ = _OPS[q.is_cuda]
        q = _expand_heads(q, 1)
        o, lse, saved_lse, extra = forward(q, _expand_heads(k, group), _expand_heads(v, group), scale, seg)
        # K/V are saved unexpanded and re-expanded in backward: G x less activation memory.
        ctx.save_for_backward(q, k, v, o, saved_lse)
        ctx.extra, ctx.scale, ctx.seg, ctx.group = extra, scale, seg, group
        ctx.set_materialize_grads(False)
        return o, lse.float().transpose(1, 2)

    @staticmethod
    def backward(
        ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if dlse is not None:
            raise RuntimeError(LSE_GRAD_ERROR)
        if do is None:
            return None, None, None, None, None
        q, k, v, o, lse = ctx.saved_tensors
        group = ctx.group
        _, backward = _OPS[q.is_cuda]
        dq, dk, dv = backward(
            do.contiguous(), q, _expand_heads(k, group), _expand_heads(v, group), o, lse, ctx.extra,
            ctx.scale, ctx.seg,
        )  # fmt: skip
        return dq, _group_sum(dk, group), _group_sum(dv, group), None, None


def flash_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CUDA flash path can run this call: one half dtype, a head_dim the kernel
    takes, an sm80+ card (geometry is never a reason: every offset and document layout runs)."""
    if not all(x.is_cuda for x in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) != 1:
        return False
    d = q.shape[-1]
    if q.dtype not in _CUDA_DTYPES or d % 8 or d > _MAX_HEAD_DIM:
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 8


def flash_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Causal attention of ``q [B, Tq, HQ, D]`` at global positions ``[q_offset, q_offset + Tq)`` over
    ``k, v [B, Tk, H, D]`` (HQ a multiple of H), within each document of ``cu_seqlens`` (batch 1):
    ``(o [B, Tq, HQ, D], lse [B, Tq, HQ] fp32)``. Differentiable in q, k, v (keys no query attends
    get zero gradient); the LSE carries no gradient (one reaching it raises RuntimeError). CUDA
    tensors use the CUDA flash ops, CPU tensors the CPU ones."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim] with v shaped like k; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q_offset < 0 or q_offset + q.shape[1] > k.shape[1] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"the flash path needs the queries [q_offset, q_offset + Tq) inside the keys and query heads a "
            f"multiple of KV heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, q_offset {q_offset} "
            "(use kernels.ssa.dense_attention, which checks and routes every geometry)"
        )
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"the flash path needs one dtype for q, k, v; got {[q.dtype, k.dtype, v.dtype]}")
    if q.is_cuda and q.dtype not in _CUDA_DTYPES:
        raise ValueError(
            f"the CUDA flash kernel takes fp16 or bf16; got {q.dtype} "
            "(kernels.ssa.dense_attention sends fp32 to FlexAttention)"
        )
    seg = _segments(cu_seqlens, q_offset, q.shape[1], k.shape[1])
    keys = slice(seg.key_start, seg.key_end)
    return _FlashDenseAttention.apply(q, k[:, keys], v[:, keys], float(scale), seg)
