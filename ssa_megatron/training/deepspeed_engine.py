"""The DeepSpeed engine path: ZeRO stage 1/2 (bf16 or fp32) drives optimization of the same model.

Tensor (and context) parallelism still comes from megatron's parallel_state, handed to
DeepSpeed as its `mpu`, so ZeRO partitions and reduces over the data-parallel group only.
Batch sizes, clipping and precision are taken from the training config and written into
the DeepSpeed config, so the two never disagree; the optimizer (AdamW with the config's
betas/weight decay, no decay on biases and norms, as megatron does) and the LR schedule are
ours. Gradient accumulation is caller-owned (`managed_gradient_accumulation: false`): the
loop runs every micro-batch's backward, then decides from the finite-ness of the loss
whether `engine.step()` runs at all.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state

from ssa_megatron.model.alignment import alignment_loss_scale, set_alignment_loss_scale
from ssa_megatron.model.mode import set_microbatch
from ssa_megatron.training.config import ConfigError, TrainConfig
from ssa_megatron.training.engine import Batch, loss_func, shard_batch

_OWNED_KEYS = ("optimizer", "scheduler")


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict[str, Any]:
    path = cfg.train.deepspeed_config
    with open(path) as f:
        ds = json.load(f)
    for key in _OWNED_KEYS:
        if key in ds:
            raise ConfigError(
                f"{path}: remove the {key!r} section; the optimizer and LR schedule come from the optim.* "
                "section of the training config so both engines train the same way"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"{path}: zero_optimization.stage={stage}; this stack supports ZeRO stage 0, 1 or 2"
        )
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported with DeepSpeed here; use bf16 (or fp32 on CPU)")
    t = cfg.train
    num_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=num_micro,
        gradient_clipping=t.grad_clip,
        managed_gradient_accumulation=False,
        steps_per_print=ds.get("steps_per_print", 10**9),
    )
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    return ds


class MegatronMPU:
    """megatron's parallel_state in the shape DeepSpeed's `mpu` argument expects.

    DeepSpeed's "model parallel" is our tensor parallel (grad norms of TP-sharded parameters are
    summed over it); its "data parallel" is data x context parallel, the ranks whose gradients
    are averaged, as megatron's DDP does.
    """

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)

    @staticmethod
    def get_data_parallel_rank() -> int:
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_group() -> Any:
        return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class DeepSpeedEngine:
    """`engine.Engine` on a DeepSpeed engine wrapping the same model, with our AdamW and LR schedule."""

    def __init__(
        self, cfg: TrainConfig, chunks: list[torch.nn.Module], device: torch.device, dp_size: int
    ) -> None:
        import deepspeed

        from ssa_megatron.training.optim import build_scheduler

        if len(chunks) != 1:
            raise ConfigError("the DeepSpeed engine trains one model chunk (parallel.pipeline=1)")
        o = cfg.optim
        model = chunks[0]
        if cfg.train.precision == "bf16":
            model = model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(
            _param_groups(model, o.weight_decay), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps
        )
        self.scheduler = build_scheduler(cfg, optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(cfg, dp_size),
            mpu=MegatronMPU(),
            dist_init_required=False,
        )
        self.cfg, self.device = cfg, device
        self.model = [self.engine]
        # DeepSpeed writes its own (ZeRO-partitioned) optimizer files through the engine.
        self.ckpt_optimizer = self.engine
        self.model_config = chunks[0].config
        self._torch_optimizer = optimizer

    def forward_backward(self, iteration: int, batches: list[Batch], forward_only: bool) -> list[dict]:
        store = []
        n = len(batches)
        cp = parallel_state.get_context_parallel_world_size()
        if not forward_only:
            # The alignment hook bypasses engine.backward's scaling; same scale as under megatron.
            set_alignment_loss_scale(alignment_loss_scale(n, cp))
        for i, batch in enumerate(batches):
            # No megatron schedule here, so the micro-batch index is published explicitly.
            set_microbatch(iteration, i)
            batch = shard_batch(batch)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.set_grad_enabled(not forward_only):
                tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
                output = self.engine(tokens, positions, None, labels=labels, loss_mask=batch["loss_mask"])
                loss, reduced = partial(loss_func, batch["loss_mask"])(output)
            store.append(reduced)
            if not forward_only:
                # Same normalisation as megatron's schedule: x CP size, / number of micro-batches.
                self.engine.backward(loss * cp / n, scale_wrt_gas=False)
        return store

    def step(self) -> tuple[bool, float | None]:
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            from ssa_megatron.training.loop import NonFiniteError

            raise NonFiniteError(
                f"non-finite grad norm {grad_norm} under DeepSpeed: ZeRO applies the update before the norm "
                "is "
                "known, so this run stops; resume from the last checkpoint with a lower optim.lr"
            )
        return True, grad_norm

    def discard_grads(self) -> None:
        self.engine.optimizer.zero_grad()
        self.engine.zero_grad()

    def eval_mode(self, on: bool) -> None:
        self.engine.train(not on)

    def learning_rate(self) -> float:
        return float(self._torch_optimizer.param_groups[0]["lr"])
