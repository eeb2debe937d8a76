"""Host-side index tables that let the Triton kernels handle packed documents and query offsets.

The kernels never search for document boundaries: every query row carries the global key
position where its document starts and the row of that document's block 0 in the block-key
tensor; every block-key row carries its first token and length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.ssa._common import DocSpan, doc_bounds, doc_spans, num_blocks


@dataclass(frozen=True)
class Plan:
    spans: list[DocSpan]
    n_blocks: int
    blk_start: torch.Tensor  # int32 [NB]: first token (global key position) of each block row
    blk_len: torch.Tensor  # int32 [NB]: tokens in the block (< block_size only for a trailing block)
    q_doc: torch.Tensor  # int32 [Tq]: global key position of the query's document start
    q_base: torch.Tensor  # int32 [Tq]: block row of the query's document block 0


def make_plan(
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq_len: int,
    q_offset: int,
    q_len: int,
    block_size: int,
    device: torch.device,
) -> Plan:
    bounds = doc_bounds(cu_seqlens, batch, seq_len)
    spans = doc_spans(bounds, block_size, q_offset, q_len)
    starts, lens, q_doc, q_base = [], [], [], []
    for s in spans:
        nb = num_blocks(s.end - s.start, block_size)
        first = torch.arange(nb, dtype=torch.int32) * block_size
        starts.append(first + s.start)
        lens.append(torch.clamp(s.end - s.start - first, max=block_size))
        q_doc.append(torch.full((s.q_hi - s.q_lo,), s.start, dtype=torch.int32))
        q_base.append(torch.full((s.q_hi - s.q_lo,), s.block_start, dtype=torch.int32))
    blk_start = torch.cat(starts)
    return Plan(
        spans=spans,
        n_blocks=blk_start.numel(),
        blk_start=blk_start.to(device),
        blk_len=torch.cat(lens).to(device),
        q_doc=torch.cat(q_doc).to(device),
        q_base=torch.cat(q_base).to(device),
    )


def query_tiles(plan: Plan, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-row ranges [q0, q1) of at most `tile` rows that never cross a document boundary."""
    lo, hi = [], []
    for s in plan.spans:
        if s.q_hi == s.q_lo:
            continue
        first = torch.arange(s.q_lo, s.q_hi, tile, dtype=torch.int32)
        lo.append(first)
        hi.append(torch.clamp(first + tile, max=s.q_hi))
    return torch.cat(lo).to(device), torch.cat(hi).to(device)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
