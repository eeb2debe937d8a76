"""Dense causal attention of whole sequences on cuDNN's fused attention (Hopper and newer).

This is SDPA's default kernel on sm90, and the fastest dense path measured here: ``dense_attention``
fwd+bwd at the 1B layout on an H200 went from 4.05 ms on aten's FlashAttention-2 to 2.69 ms at 8k
tokens, and from 54.2 to 36.6 ms at 32k (tools/bench_kernels.py, ``ours_dense_fwdbwd_ms``). It takes
GQA natively (K/V with fewer heads; their gradients come back per KV head), so K/V are neither
expanded nor group-summed.

Its causal mask is aligned to the first key (query i sees keys j <= i, measured for Tq < Tk too),
so it serves only queries and keys of one span, ``Tq == Tk`` at offset 0 with no packed documents:
every training step without context parallelism or document masking. Query chunks at an offset and
packed documents stay on the flash kernels (dense_attention_flash.py), whose mask aligns to the
last key. cuDNN's variable-length form (``_cudnn_attention_forward`` with ``cu_seqlens``) was tried
for documents on an H200 (torch 2.11, cuDNN 9.19) and is unusable there: non-finite outputs and
wrong dQ against the fp32 reference, and 176 ms fwd+bwd at 8k tokens against 2.3 ms for flash's
varlen kernel.

aten's cuDNN backward op cannot be called with its bias argument left out from Python, so the
forward records the op on detached leaves and the backward differentiates that record with
``torch.autograd.grad``: torch's own derivative. Like the flash path, the LSE is a statistic
without gradient, and a gradient that reaches it raises.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.ssa.dense_attention_flash import LSE_GRAD_ERROR, flash_applies

__all__ = ["cudnn_applies", "cudnn_dense_attention"]

# Head dims measured on the GPU tests (64, 128); cuDNN's limits differ by version beyond that.
_MAX_HEAD_DIM = 128


def _op_available() -> bool:
    return (
        hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and torch.backends.cudnn.is_available()
        and torch.backends.cudnn.enabled
    )


def cudnn_applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, cu_seqlens: torch.Tensor | None
) -> bool:
    """Whether the cuDNN path serves this call: whole sequences (``Tq == Tk``, offset 0, no
    documents) of one half dtype on an sm90+ card, head_dim a multiple of 8 up to 128."""
    if q_offset != 0 or cu_seqlens is not None or q.shape[1] != k.shape[1]:
        return False
    # The flash path's device, dtype and head_dim checks, then cuDNN's narrower head_dim and card.
    if not flash_applies(q, k, v) or q.shape[-1] > _MAX_HEAD_DIM or q.shape[2] % k.shape[2]:
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9 and _op_available()


def _dense_heads(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each token's ``[heads, head_dim]`` packed (a view of a fused projection is not)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


class _CudnnDenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        leaves = tuple(_dense_heads(x).detach().requires_grad_(True) for x in (q, k, v))
        with torch.enable_grad():
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                *(x.transpose(1, 2) for x in leaves), None, True, 0.0, True, False, scale=scale
            )
        o, lse = out[0], out[1]  # [B, HQ, T, D], [B, HQ, T, 1]
        ctx.record = (o, leaves)
        ctx.set_materialize_grads(False)
        return o.detach().transpose(1, 2), lse.detach()[..., 0].transpose(1, 2)

    @staticmethod
    def backward(
        ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if dlse is not None:
            raise RuntimeError(LSE_GRAD_ERROR)
        o, leaves = ctx.record
        ctx.record = None
        if do is None:
            return None, None, None, None
        do = do.transpose(1, 2)
        if do.stride() != o.stride():
            # cuDNN's backward reads the output gradient with the output's strides.
            do = torch.empty_like(o).copy_(do)
        dq, dk, dv = torch.autograd.grad(o, leaves, do)
        return dq, dk, dv, None


def cudnn_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [B, T, HQ, D]`` over ``k, v [B, T, H, D]`` (HQ a multiple of H):
    ``(o [B, T, HQ, D], lse [B, T, HQ] fp32)``. Differentiable in q, k, v; the LSE carries no
    gradient (one reaching it raises RuntimeError). Call only where ``cudnn_applies`` holds."""
    if not cudnn_applies(q, k, v, 0, None):
        raise ValueError(
            f"the cuDNN path takes CUDA fp16/bf16 q, k, v of one length on an sm90+ card with head_dim a "
            f"multiple of 8 up to 128; got q {tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)} "
            "(use kernels.ssa.dense_attention, which routes every geometry)"
        )
    return _CudnnDenseAttention.apply(q, k, v, float(scale))
