"""What the loop, evaluation and checkpointing need from a training engine, and the pieces both
engines share (the loss and the context-parallel split of a batch).

Two engines implement `Engine`: `megatron_engine.MegatronEngine` (megatron's schedules, DDP and
optimizer) and `deepspeed_engine.DeepSpeedEngine` (ZeRO 1/2 over the same model).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ssa_megatron.parallel.context import split_for_rank

Batch = dict[str, torch.Tensor]


class Engine(Protocol):
    # The model chunks (one per virtual-pipeline stage), wrapped as the engine trains them.
    model: list[torch.nn.Module]
    # megatron's TransformerConfig of the model (attention mode, p_full, mode seed, layers).
    model_config: Any
    # The LR schedule (megatron's OptimizerParamScheduler); None where the engine has none.
    scheduler: Any | None
    # What checkpoint.save_checkpoint / load_checkpoint take as the optimizer.
    ckpt_optimizer: Any

    def forward_backward(self, iteration: int, batches: list[Batch], forward_only: bool) -> list[dict]:
        """Run every micro-batch; return per-micro-batch {"ce": tensor([loss sum, token count])}."""
        ...

    def step(self) -> tuple[bool, float | None]:
        """Apply the update from the accumulated gradients: (applied, grad norm)."""
        ...

    def discard_grads(self) -> None:
        """Drop the accumulated gradients (a non-finite loss skips the update)."""
        ...

    def eval_mode(self, on: bool) -> None: ...

    def learning_rate(self) -> float:
        """The LR the next step applies (the first parameter group's)."""
        ...


def shard_batch(batch: Batch) -> Batch:
    """This context-parallel rank's part of every sequence (megatron's load-balanced 2*CP split)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    rank = parallel_state.get_context_parallel_rank()
    return {k: split_for_rank(v, 1, rank, cp) for k, v in batch.items()}


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE over the micro-batch's target tokens (all context-parallel parts together).

    Returns megatron's legacy 2-tuple: the schedule multiplies by the CP size and divides by the
    number of micro-batches, and DDP averages over data x context parallel ranks, so each CP rank
    contributes its local sum divided by the micro-batch's *total* token count.
    """
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    local_sum = (losses * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
    loss = local_sum / totals[1].clamp(min=1.0)
    return loss, {"ce": totals}
