"""The selected-attention forward's loads without its math: a measured floor under its time.

Each program reads exactly what ``_fwd_kernel`` reads (the same grid, key step, launch, and the
same ``_row_and_head``/``_walk``/``_selected_keys``/``_key_rows`` addressing) and only sums the
K and V rows, so its time is what the memory system needs to deliver the gathered tiles.
``tools/bench_kernels.py`` times it next to the forward: where the two are close, the forward is
bound by the gather (L2 bandwidth for random selections), not by its arithmetic, and no tuning of
the math can reach a FLOP rate above ``flops / gather time``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ssa._plan import Plan
from kernels.ssa.selected_attention_kernel import Launch, _key_rows, _row_and_head, _selected_keys, _walk


@triton.jit
def _gather_kernel(
    K, V, IDX, OUT, QDOC,
    sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, si_h, so_t, so_bh,
    q_offset, H, BC,
    BS: tl.constexpr, KN: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    i, b, h = _row_and_head(H)
    d = tl.arange(0, D)
    doc, loc, c_in, r, k_base, v_base, idx_row = _walk(
        QDOC, IDX, K, V, i, b, h, q_offset, sk_b, sk_h, sv_b, sv_h, si_b, si_t, si_h, BS, KN
    )
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, BC, KN // BS):
        kpos, ok = _selected_keys(idx_row, c0, c_in, r, doc, loc, BC, BS)
        kt = _key_rows(k_base, kpos, ok, sk_t, d)
        vt = _key_rows(v_base, kpos, ok, sv_t, d)
        acc += tl.sum(kt.to(tl.float32) + vt.to(tl.float32), 0)
    tl.store(OUT + i * so_t + (b * H + h) * so_bh + d, acc)


def gathered_sums(
    k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, q_offset: int, plan: Plan,
    launch: Launch,
) -> torch.Tensor:  # fmt: skip
    """fp32 ``[Tq, B * H, D]``: per query and KV head, the sum of the K and V rows the forward reads
    (its selected blocks, causal inside them). ``idx`` contiguous; ``k`` and ``v`` with a dense head dim."""
    b, _, h, d = k.shape
    tq = idx.shape[1]
    out = torch.empty(tq, b * h, d, device=k.device, dtype=torch.float32)
    _gather_kernel[(tq, b * h)](
        k, v, idx, out, plan.q_doc,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2), out.stride(0), out.stride(1),
        q_offset, h, idx.shape[3],
        BS=block_size, KN=max(block_size, launch.fwd_keys), D=d,
        num_warps=launch.fwd_warps, num_stages=launch.fwd_stages, maxnreg=launch.fwd_maxnreg,
    )  # fmt: skip
    return out
