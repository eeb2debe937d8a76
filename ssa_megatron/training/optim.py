"""Model wrapping, optimizer and LR schedule for the megatron engine.

Megatron's DistributedDataParallel + `get_megatron_optimizer` (distributed optimizer, i.e.
ZeRO-1 sharded optimizer state, by default); bf16 keeps fp32 master weights inside the
megatron optimizer. The schedule is megatron's OptimizerParamScheduler stepped once per
iteration: linear warmup, then cosine (or linear) decay to `optim.min_lr`.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from ssa_megatron.training.config import TrainConfig, warmup_iters


def wrap_model(cfg: TrainConfig, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Cast to the training precision and wrap every pipeline chunk in megatron's DDP."""
    config = chunks[0].config
    if cfg.train.precision in ("bf16", "fp16"):
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # The loss is already a per-micro-batch mean; DDP averages over data-parallel replicas.
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk starts in its own bucket to keep the per-chunk buckets aligned.
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        bf16=cfg.train.precision == "bf16",
        fp16=cfg.train.precision == "fp16",
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32),
        clip_grad=cfg.train.grad_clip,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        decoupled_weight_decay=True,
    )


def build_optimizer(cfg: TrainConfig, model: list[DistributedDataParallel]) -> MegatronOptimizer:
    return get_megatron_optimizer(optimizer_config(cfg), model)


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer | MegatronOptimizer
) -> OptimizerParamScheduler:
    o, iters = cfg.optim, cfg.train.train_iters
    warm = warmup_iters(cfg)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warm,
        # The decay phase spans the steps after warmup (megatron counts decay steps from step 0).
        lr_decay_steps=iters,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=iters,
        wd_incr_style="constant",
        # On resume the checkpoint's schedule must win so the LR curve continues exactly.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    # Iteration i trains with the LR of schedule step i (1-based), so the first update does not
    # waste itself on lr = 0 and the last one uses min_lr.
    scheduler.step(1)
    return scheduler
