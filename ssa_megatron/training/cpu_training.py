"""CPU support for the training side of megatron-core (DDP grad buffers, optimizer, clipping, checkpoints).

`ssa_megatron.parallel.cpu_compat` redirects the CUDA-only paths that the *model* and the pipeline
schedules reach. Training also goes through megatron's DistributedDataParallel (grad
buffers allocated on `torch.cuda.current_device()`) and its optimizers (`found_inf`,
`_scale`, grad-norm buffers created with `device='cuda'`); this module puts those megatron
modules behind the same CPU proxy, so one training loop serves both devices.

Megatron's mixed-precision and distributed optimizers check `param.type()` against the
`torch.cuda.*Tensor` names and cannot hold CPU parameters; `check_cpu_layout` turns that
into a config error with the fix instead of a TypeError deep in megatron.
"""

from __future__ import annotations

import importlib

import torch

from ssa_megatron.parallel import cpu_compat

_TRAINING_MODULES = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    # dist_checkpointing: synchronize() before reading tensors, verification flags allocated on 'cuda'.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


def enable_cpu_training() -> bool:
    """Enable model-side CPU compat plus the training modules above; returns whether CPU compat is on."""
    if not cpu_compat.enable_cpu_compat():
        return False
    modules = [importlib.import_module(name) for name in _TRAINING_MODULES]
    if all(isinstance(module.torch, cpu_compat._TorchAsCpu) for module in modules):
        return True
    proxy = cpu_compat._TorchAsCpu()
    for module in modules:
        # Registered through cpu_compat's own bookkeeping so disable_cpu_compat() undoes these too.
        cpu_compat._patch(module, "torch", proxy)
    cpu_compat._patch(
        importlib.import_module("megatron.core.optimizer.optimizer"),
        "clip_grad_by_total_norm_fp32",
        _clip_grad_by_total_norm,
    )
    return True


def _clip_grad_by_total_norm(
    parameters: list[torch.Tensor], max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's clip_grad_by_total_norm_fp32 without its `torch.cuda.FloatTensor` type assertion:
    scale every fp32 grad in place by max_norm / (total_norm + 1e-6) when that is below 1."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def check_cpu_layout(precision: str, distributed_optimizer: bool, device: torch.device) -> None:
    from ssa_megatron.training.config import ConfigError

    if device.type != "cpu":
        return
    if precision != "fp32":
        raise ConfigError(
            f"train.precision={precision!r} on CPU: megatron's mixed-precision optimizer only holds CUDA "
            "parameters; use train.precision=fp32 on CPU (bf16 is the GPU default)"
        )
    if distributed_optimizer:
        raise ConfigError(
            "parallel.distributed_optimizer=true on CPU: megatron's distributed optimizer only holds CUDA "
            "parameters; set parallel.distributed_optimizer=false for CPU runs"
        )
