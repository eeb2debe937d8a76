"""Context parallelism for SSA: megatron's load-balanced split and a K/V all-gather.

Megatron splits a sequence into ``2*CP`` equal chunks and gives rank r chunks r and ``2CP-1-r`` (in that
order), so every rank holds the same amount of causal work. Both SSA branches need every earlier key, so
K and V (small under GQA) are all-gathered into global order; in backward the global dK/dV are summed
over the group and each rank keeps its own chunks (a reduce-scatter; gloo has none, so it is an
all-reduce + slice there). Queries stay local: each local chunk is one kernel call at its global
offset, so selection and causality use global positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices rank ``cp_rank`` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_for_rank(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (``dim`` is the sequence dim)."""
    if cp_size == 1:
        return x
    if x.shape[dim] % (2 * cp_size):
        raise ValueError(
            f"sequence length {x.shape[dim]} is not divisible by 2*CP = {2 * cp_size}; pad the sequence"
        )
    chunks = x.chunk(2 * cp_size, dim=dim)
    a, b = chunk_ids(cp_rank, cp_size)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def _gather_global(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    pieces = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    ordered: list[torch.Tensor | None] = [None] * (2 * size)
    for rank, piece in enumerate(pieces):
        first, second = piece.chunk(2, dim=dim)
        a, b = chunk_ids(rank, size)
        ordered[a], ordered[b] = first, second
    return torch.cat(ordered, dim=dim)


def _scatter_sum(grad: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = grad.chunk(2 * size, dim=dim)
    if dist.get_backend(group) == "nccl":
        # Arrange each rank's two chunks contiguously, then a real reduce-scatter.
        order = [c for r in range(size) for c in chunk_ids(r, size)]
        stacked = torch.cat([chunks[c] for c in order], dim=dim).movedim(dim, 0).contiguous()
        out = stacked.new_empty((stacked.shape[0] // size, *stacked.shape[1:]))
        dist.reduce_scatter_tensor(out, stacked, group=group)
        return out.movedim(0, dim)
    total = grad.contiguous()
    dist.all_reduce(total, group=group)
    return split_for_rank(total, dim, rank, size)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _gather_global(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _scatter_sum(grad, ctx.dim, ctx.group), None, None


def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather this rank's load-balanced chunks into the global sequence order (differentiable:
    backward sums the global gradient over the group and returns this rank's chunks)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if x.requires_grad:
        return _GatherSequence.apply(x, dim, group)
    return _gather_global(x, dim, group)


def local_query_chunks(seq_local: int, cp_rank: int, cp_size: int) -> list[tuple[int, int, int]]:
    """``(local_start, length, global_offset)`` of each query chunk this rank holds."""
    if cp_size == 1:
        return [(0, seq_local, 0)]
    half = seq_local // 2
    return [(i * half, half, c * half) for i, c in enumerate(chunk_ids(cp_rank, cp_size))]
