"""Dense causal attention without documents (any q_offset) on PyTorch's flash-attention ops, which
return the LSE.

This is the geometry of every training step without packed documents: whole sequences, and a
context-parallel rank's query chunks at their global offset against the all-gathered keys. There
SDPA's flash kernel is 1.5-1.9x faster than FlexAttention (benchmarks/results/
kernels_h100_20261128.md), and it needs no compilation per offset. The flash kernel aligns a
causal mask with Tq < Tk to the last key (query i sees keys j <= i + Tk - Tq), so queries at
``[q_offset, q_offset + Tq)`` run against the keys ``[0, q_offset + Tq)``: later keys are never
attended and are not passed. The aten flash backward takes no gradient for the LSE, so on this path
the LSE is a statistic only: a gradient that reaches it raises instead of being dropped; the
FlexAttention / naive paths remain for callers that differentiate through the LSE.

One autograd Function serves CUDA (``_scaled_dot_product_flash_attention``) and CPU
(``_scaled_dot_product_flash_attention_for_cpu``): the two op pairs have the same semantics (the CPU
op aligns causality to the first key, so for Tq < Tk it gets the last-key-aligned mask explicitly),
so the CPU tests run exactly the layout, GQA and gradient logic the GPU runs. Only arguments present in
both torch 2.11 and 2.14 are passed (dropout 0, causal, keyword scale).

The CUDA backward accumulates dQ with atomics, so it is not bitwise reproducible unless
``torch.use_deterministic_algorithms(True)`` is set (PyTorch then runs its deterministic variant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["flash_applies", "flash_dense_attention"]

# The CUDA flash kernel's limits (as in SDPA's own dispatch checks): half types, head_dim a
# multiple of 8 up to 256, sm80 or newer.
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

LSE_GRAD_ERROR = (
    "dense_attention's fast path (bf16/fp16 on CUDA, no cu_seqlens) returns the LSE without "
    "gradient, but a gradient reached it; detach the LSE, or take a path that differentiates it: "
    "backend='naive', or the FlexAttention path (fp32 inputs or cu_seqlens)"
)


@dataclass(frozen=True)
class _FlashOps:
    """A forward/backward op pair on ``[B, H, T, D]`` tensors with equal head counts, causal with the
    mask aligned to the last key (Tq <= Tk).

    ``forward(q, k, v, scale) -> (o, lse [B, H, T] fp32, extra)``; ``extra`` is whatever the
    backward needs besides the tensors (RNG state, sequence bookkeeping).
    ``backward(do, q, k, v, o, lse, extra, scale) -> (dq, dk, dv)``.
    """

    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[Any, ...]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _cuda_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[Any, ...]:
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    o, lse, cum_q, cum_k, max_q, max_k, rng_state, rng_unused = out[:8]
    return o, lse, (cum_q, cum_k, max_q, max_k, rng_state, rng_unused)


def _cuda_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, extra: tuple[Any, ...], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    cum_q, cum_k, max_q, max_k, rng_state, rng_unused = extra
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng_state, rng_unused, scale=scale
    )


def _last_key_aligned_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Additive mask for the CPU op, whose ``is_causal`` aligns to the first key; None when Tq == Tk."""
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return None
    visible = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return torch.zeros(tq, tk, dtype=q.dtype).masked_fill(~visible, float("-inf"))


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[Any, ...]:
    mask = _last_key_aligned_mask(q, k)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
    )
    return o, lse, (mask,)


def _cpu_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, extra: tuple[Any, ...], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    (mask,) = extra
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, mask is None, attn_mask=mask, scale=scale
    )


CUDA_OPS = _FlashOps(_cuda_forward, _cuda_backward)
CPU_OPS = _FlashOps(_cpu_forward, _cpu_backward)


def _heads_first(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H*group, T, D]`` with KV head h repeated for query heads
    ``h*group .. h*group + group - 1`` (the ``hq // G`` mapping)."""
    if group > 1:
        b, t, h, d = x.shape
        x = x.unsqueeze(3).expand(b, t, h, group, d).reshape(b, t, h * group, d)
    elif x.stride(-1) != 1:
        x = x.contiguous()
    # A transposed view of [B, T, H, D] memory is the layout both flash kernels read natively.
    return x.transpose(1, 2)


def _group_sum(dx: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, H*group, T, D]`` gradient of the expanded K/V -> ``[B, T, H, D]``."""
    dx = dx.transpose(1, 2)
    if group == 1:
        return dx
    return dx.unflatten(2, (dx.shape[2] // group, group)).sum(dim=3)


class _FlashDenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ops: _FlashOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group = q.shape[2] // k.shape[2]
        qh = _heads_first(q, 1)
        o, lse, extra = ops.forward(qh, _heads_first(k, group), _heads_first(v, group), scale)
        # K/V are saved unexpanded and re-expanded in backward: G x less activation memory.
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.extra, ctx.scale, ctx.ops, ctx.group = extra, scale, ops, group
        ctx.set_materialize_grads(False)
        return o.transpose(1, 2), lse[..., : q.shape[1]].float().transpose(1, 2)

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
        dq, dk, dv = ctx.ops.backward(
            do.contiguous().transpose(1, 2),
            _heads_first(q, 1),
            _heads_first(k, group),
            _heads_first(v, group),
            o,
            lse,
            ctx.extra,
            ctx.scale,
        )
        return dq.transpose(1, 2), _group_sum(dk, group), _group_sum(dv, group), None, None


def flash_applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, cu_seqlens: torch.Tensor | None
) -> bool:
    """Whether the CUDA flash path can run this call: no documents, one half dtype, a head_dim the
    kernel takes, an sm80+ card."""
    if cu_seqlens is not None or q_offset < 0 or q_offset + q.shape[1] > k.shape[1]:
        return False
    if not all(x.is_cuda for x in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) != 1:
        return False
    d = q.shape[-1]
    if q.dtype not in _CUDA_DTYPES or d % 8 or d > _MAX_HEAD_DIM:
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 8


def flash_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [B, Tq, HQ, D]`` at global positions ``[q_offset, q_offset + Tq)`` over
    ``k, v [B, Tk, H, D]`` (HQ a multiple of H): ``(o [B, Tq, HQ, D], lse [B, Tq, HQ] fp32)``.
    Differentiable in q, k, v (keys after the last query get zero gradient); the LSE carries no
    gradient (one reaching it raises RuntimeError). CUDA tensors use the CUDA flash ops, CPU
    tensors the CPU ones."""
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
    ops = CUDA_OPS if q.is_cuda else CPU_OPS
    end = q_offset + q.shape[1]
    return _FlashDenseAttention.apply(q, k[:, :end], v[:, :end], float(scale), ops)
