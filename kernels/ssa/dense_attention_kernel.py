"""Dense causal attention with a query offset and packed documents, returning the LSE.

PyTorch's FlexAttention generates a fused Triton flash-attention kernel for any mask, with GQA,
an LSE that carries gradient, and backward; the mask here is "same document and key position
<= the query's global position". Compiled on CUDA, eager elsewhere (no CPU backward there).
Measured on an H100 it is 1.5-1.9x slower than SDPA's
causal flash kernel, so kernels.ssa.triton_ops sends every half-precision call to the fused
kernels (cuDNN, dense_attention_cudnn.py, for whole sequences; flash, dense_attention_flash.py,
otherwise), whose LSE has no gradient; this path serves fp32 (and other head dims the flash kernel
refuses), and differentiates the LSE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from kernels.ssa._common import doc_bounds


@functools.cache
def _compiled_flex() -> Callable[..., object]:
    return torch.compile(flex_attention)


def _block_mask(
    bounds: tuple[int, ...], q_len: int, k_len: int, q_offset: int, device: torch.device
) -> BlockMask:
    doc_id = torch.zeros(k_len, dtype=torch.int32, device=device)
    for start in bounds[1:-1]:
        doc_id[start:] += 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        qpos = qi + q_offset
        return (ki <= qpos) & (doc_id[qpos] == doc_id[ki])

    # _compile builds the block mask blockwise instead of materialising a Tq x Tk boolean mask
    # (128 GiB at 128k tokens).
    return create_block_mask(
        mask_mod, None, None, q_len, k_len, device=device, _compile=device.type == "cuda"
    )


_MASKS: dict[tuple, BlockMask] = {}


def flex_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    bounds = tuple(doc_bounds(cu_seqlens, q.shape[0], k.shape[1]))
    key = (bounds, q.shape[1], k.shape[1], q_offset, str(q.device))
    if key not in _MASKS:
        # Masks depend only on the geometry; training repeats a handful of geometries.
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[key] = _block_mask(bounds, q.shape[1], k.shape[1], q_offset, q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o, aux = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=_MASKS[key],
        scale=scale,
        enable_gqa=True,
        return_aux=AuxRequest(lse=True),
    )
    return o.transpose(1, 2), aux.lse.transpose(1, 2).float()
