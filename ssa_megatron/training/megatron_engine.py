"""The megatron engine: forward/backward through megatron's schedules (no pipelining, 1F1B or
interleaved, chosen by megatron from the parallel state), update through megatron's optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.model.alignment import alignment_loss_scale, set_alignment_loss_scale
from ssa_megatron.model.mode import set_microbatch
from ssa_megatron.training.config import TrainConfig
from ssa_megatron.training.engine import Batch, loss_func, shard_batch


def forward_step(
    device: torch.device, data_iterator: Iterator[Batch], model: Any
) -> tuple[torch.Tensor, Callable]:
    # The mode draw needs no call here: megatron's schedule tells each layer its micro-batch index
    # (TransformerLayer.current_microbatch), which also holds when recomputation replays the forward.
    batch = shard_batch(next(data_iterator))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    # The loss mask lets the fused LM loss skip masked tokens (model/gpt.py); the loss is masked below.
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    output = model(tokens, positions, None, labels=labels, loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


def _data_iterators(batches: list[Batch], num_chunks: int) -> Any:
    # Every virtual-pipeline chunk walks the same micro-batches in order; megatron wants one
    # iterator per chunk then, and a bare iterator without interleaving.
    its = [iter(batches) for _ in range(num_chunks)]
    return its if num_chunks > 1 else its[0]


def optimizer_step(optimizer: Any) -> tuple[bool, float | None]:
    """megatron's optimizer step split open so a non-finite grad norm is seen *before* the update.

    Returns (finite, grad_norm). With fp16 the dynamic loss scaler's overflow skip is kept.
    """
    found_inf = optimizer.prepare_grads()
    scaler = getattr(optimizer, "grad_scaler", None)
    if scaler is not None:
        scaler.update(found_inf)
    if found_inf:
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if grad_norm is not None and not math.isfinite(grad_norm):
        return False, grad_norm
    if optimizer.config.clip_grad > 0.0:
        optimizer.clip_grad_norm(optimizer.config.clip_grad)
    optimizer.step_with_ready_grads()
    return True, grad_norm


class MegatronEngine:
    """`engine.Engine` on megatron's DDP-wrapped chunks, optimizer and LR schedule."""

    def __init__(
        self, cfg: TrainConfig, model: list[Any], optimizer: Any, scheduler: Any, device: torch.device
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.device = device
        self.ckpt_optimizer = optimizer
        config = model[0].config
        self.model_config = config
        config.grad_scale_func = optimizer.scale_loss
        # Grad reduction and the final embedding all-reduce happen inside the schedule.
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
        if len(model) > 1:
            config.no_sync_func = [c.no_sync for c in model]
        else:
            config.no_sync_func = model[0].no_sync

    def forward_backward(self, iteration: int, batches: list[Batch], forward_only: bool) -> list[dict]:
        cfg = self.cfg
        if not forward_only:
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            # Like megatron's MoE aux loss: the alignment gradient is injected by an autograd hook, so it
            # must carry the loss scale, CP factor and 1/num_microbatches of the CE loss by hand.
            grad_scale = float(self.optimizer.get_loss_scale()) if cfg.train.precision == "fp16" else 1.0
            set_alignment_loss_scale(
                alignment_loss_scale(
                    len(batches), parallel_state.get_context_parallel_world_size(), grad_scale
                )
            )
        set_microbatch(iteration)
        return get_forward_backward_func()(
            forward_step_func=partial(forward_step, self.device),
            data_iterator=_data_iterators(batches, len(self.model)),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def step(self) -> tuple[bool, float | None]:
        return optimizer_step(self.optimizer)

    def discard_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def eval_mode(self, on: bool) -> None:
        for chunk in self.model:
            chunk.train(not on)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
