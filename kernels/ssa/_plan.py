"""Host-side index tables that let the Triton kernels handle packed documents and query offsets.

The kernels never search for document boundaries: every query row carries the global key
position where its document starts and the row of that document's block 0 in the block-key
tensor; every block-key row carries its first token and length.

A plan depends only on the document boundaries and the call's geometry, so plans are cached:
the layers of a model (and both SSA branches) share one, and the tables go to the GPU once. The
first copy goes through pinned memory without waiting: a copy from pageable memory makes the host
wait for the whole stream, which cost every layer ~0.6 ms of idle GPU at 8k tokens (H200 profile).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels.ssa._common import DocSpan, doc_bounds, doc_spans, num_blocks

_CACHED_PLANS = 64


@dataclass(frozen=True)
class Plan:
    spans: tuple[DocSpan, ...]
    n_blocks: int
    blk_start: torch.Tensor  # int32 [NB]: first token (global key position) of each block row
    blk_len: torch.Tensor  # int32 [NB]: tokens in the block (< block_size only for a trailing block)
    q_doc: torch.Tensor  # int32 [Tq]: global key position of the query's document start
    q_base: torch.Tensor  # int32 [Tq]: block row of the query's document block 0


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait for the device's queued work."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def make_plan(
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq_len: int,
    q_offset: int,
    q_len: int,
    block_size: int,
    device: torch.device,
) -> Plan:
    """The tables for one call. ``cu_seqlens`` is read on the host (a device-to-host copy when it lives
    on the GPU; pass it on the CPU to avoid that)."""
    bounds = tuple(doc_bounds(cu_seqlens, batch, seq_len))
    return _cached_plan(bounds, q_offset, q_len, block_size, torch.device(device))


@functools.lru_cache(maxsize=_CACHED_PLANS)
def _cached_plan(
    bounds: tuple[int, ...], q_offset: int, q_len: int, block_size: int, device: torch.device
) -> Plan:
    spans = tuple(doc_spans(list(bounds), block_size, q_offset, q_len))
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
        blk_start=to_device(blk_start, device),
        blk_len=to_device(torch.cat(lens), device),
        q_doc=to_device(torch.cat(q_doc), device),
        q_base=to_device(torch.cat(q_base), device),
    )


@functools.lru_cache(maxsize=_CACHED_PLANS)
def query_tiles(
    spans: tuple[DocSpan, ...], tile: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-row ranges [q0, q1) of at most `tile` rows that never cross a document boundary."""
    lo, hi = [], []
    for s in spans:
        if s.q_hi == s.q_lo:
            continue
        first = torch.arange(s.q_lo, s.q_hi, tile, dtype=torch.int32)
        lo.append(first)
        hi.append(torch.clamp(first + tile, max=s.q_hi))
    return to_device(torch.cat(lo), device), to_device(torch.cat(hi), device)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
