"""Model wrapping, optimizer and LR schedule for the megatron engine.

Megatron's DistributedDataParallel + `get_megatron_optimizer` (distributed optimizer, i.e.
ZeRO-1 sharded optimizer state, by default); bf16 keeps fp32 master weights inside the
megatron optimizer. The schedule is megatron's OptimizerParamScheduler stepped once per
iteration: linear warmup, then cosine (or linear) decay to `optim.min_lr`.

Without Transformer Engine or Apex, megatron falls back to `torch.optim.AdamW` without choosing
an implementation, so torch runs its multi-kernel foreach path (~50 ms of a 1B-model step on an
H100). `build_optimizer` switches that optimizer to torch's single-kernel fused AdamW (CUDA and
CPU) and keeps it fused across checkpoint loads. The same fallback computes the gradient norm with
one host sync per parameter tensor; `build_optimizer` replaces it with a sync-free one.
"""

from __future__ import annotations

import torch
from megatron.core import utils as megatron_utils
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, clip_grads, get_megatron_optimizer
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
    use_sync_free_grad_norm()
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model)
    for inner in torch_adam_optimizers(optimizer):
        use_fused_adam(inner)
        create_adam_state(inner)
    return optimizer


def grad_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                 per_tensor: bool, *args: object) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The L2 norm of all tensors in `tensor_lists`, as a float32 [1] tensor on their device, and
    with `per_tensor` each tensor's norm (float32 [n], in order), as Apex's kernel returns them.

    Same contract as megatron's `local_multi_tensor_l2_norm` (the fallback without Transformer
    Engine or Apex), which stacks the per-tensor norms with `torch.tensor(list)`: one host sync per
    parameter tensor, ~240 per 1B-model step, each draining the GPU's queue. Here the norms stay on
    the device (one foreach norm kernel per dtype, in fp32) and only megatron's final `.item()` waits.
    """
    tensors = [t for group in tensor_lists for t in group]
    # fp32 norms of half tensors too (torch.norm would round a bf16 tensor's norm to bf16).
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(norms).reshape(1), norms if per_tensor else None


def use_sync_free_grad_norm() -> None:
    """Route megatron's gradient-norm fallback to `grad_l2_norm`; TE's or Apex's kernel is kept."""
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = grad_l2_norm


def torch_adam_optimizers(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a megatron optimizer (TE/Apex optimizers are left out)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    # A rank without parameters of its own holds `optimizer=None`.
    inner = [getattr(part, "optimizer", None) for part in parts]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def use_fused_adam(optimizer: torch.optim.Adam) -> None:
    """Make `optimizer` run torch's fused kernel from its next step on, also after load_state_dict.

    torch reads `fused`/`foreach` from each param group at step time, so setting them after
    construction is enough. What the constructor would also do, `_step_supports_amp_scaling`, only
    matters for torch.amp's GradScaler; megatron unscales, checks for inf/NaN and clips itself
    before it calls step(). Loading replaces the param groups with the saved ones, so the hook
    below sets the flags again (a checkpoint written by the foreach optimizer stays loadable).
    """
    _set_fused_flags(optimizer)
    optimizer.register_load_state_dict_post_hook(_after_load)


def create_adam_state(optimizer: torch.optim.Adam) -> None:
    """Create the state torch would create at the first step (zero moments, a float32 step 0 on the
    param's device, as the fused kernel keeps it).

    Without TE/Apex, megatron's DistributedOptimizer.state_dict() reads the iteration from the torch
    state and asserts there is exactly one value, so loading a checkpoint into a fresh optimizer,
    which has no state yet, would fail; with the state in place it loads into it.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer: MegatronOptimizer, loaded: dict) -> None:
    """Set the Adam step of every param to the one saved in the checkpoint's param groups.

    Without TE/Apex, megatron's DistributedOptimizer keeps the step in its saved param groups and
    puts it into the torch state on load, but then its parameter-state load copies every state
    entry, `step` included, from tensors whose step is the fresh optimizer's (a non-persistent
    entry, 0), so the bias correction would restart. Other optimizers save no step in their param
    groups (torch keeps it in the state, which loads correctly) and are left alone.
    """
    steps = {g["step"] for g in _saved_param_groups(loaded) if g.get("step") is not None}
    if not steps:
        return
    if len(steps) != 1:
        raise RuntimeError(f"the checkpoint's optimizer param groups disagree on the Adam step: {steps}")
    (step,) = steps
    for inner in torch_adam_optimizers(optimizer):
        for state_of_param in inner.state.values():
            if "step" in state_of_param:
                state_of_param["step"] = torch.tensor(
                    float(step), dtype=torch.float32, device=state_of_param["step"].device
                )


def _saved_param_groups(tree: object) -> list[dict]:
    """Every param group in a loaded optimizer state dict (chained optimizers nest one per part)."""
    if not isinstance(tree, dict):
        return []
    groups = [g for g in tree.get("param_groups", []) if isinstance(g, dict)]
    return groups + [g for v in tree.values() for g in _saved_param_groups(v)]


def _set_fused_flags(optimizer: torch.optim.Optimizer) -> None:
    for group in [optimizer.defaults, *optimizer.param_groups]:
        group["fused"] = True
        group["foreach"] = False


def _after_load(optimizer: torch.optim.Optimizer) -> None:
    _set_fused_flags(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                # The fused kernel wants a float32 step beside its param, one tensor per param: it
                # increments all steps in one foreach call. Megatron's distributed optimizer loads
                # one shared CPU step tensor for every param, and foreach-era checkpoints keep
                # the step on the CPU.
                state["step"] = state["step"].detach().to(device=p.device, dtype=torch.float32, copy=True)


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
