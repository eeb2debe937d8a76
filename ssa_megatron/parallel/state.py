"""Set up megatron-core's parallel state and RNG on gloo+CPU or NCCL+GPU with one call."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

from ssa_megatron.parallel.cpu_compat import enable_cpu_compat


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors for collectives on ``group`` (default: the world) must live: the current GPU for
    NCCL, the CPU for gloo. Small bookkeeping tensors (loss totals, flags, metrics) are built here so
    the same code reduces them on a GPU cluster and in the CPU tests."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_local_rank_env(rank: int, world_size: int, port: int) -> None:
    """Set the variables torchrun would give rank ``rank`` of ``world_size`` processes on this host that
    meet at 127.0.0.1:``port``, for process groups that a program spawns itself (conversion, CPU tests)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )


def initialize_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    seed: int = 1234,
    backend: str | None = None,
) -> None:
    """Initialise megatron's TP/PP/CP/DP groups (data parallel = world / (TP*PP*CP)) and its RNG.

    Works on gloo+CPU (enables ``cpu_compat``) and NCCL+GPU. Idempotent only through
    ``destroy_parallel``: calling it twice without destroying raises, like megatron itself.
    """
    enable_cpu_compat()
    if not dist.is_initialized():
        # One way to join the job's process group: the launcher-aware one the trainer uses.
        from ssa_megatron.training.launch import detect_launch, init_distributed

        cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
        init_distributed(detect_launch(), torch.device("cuda" if cuda else "cpu"))
    world = dist.get_world_size()
    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {tensor_parallel}*{pipeline_parallel}*"
            f"{context_parallel} = {model_parallel}; choose sizes whose product divides the process count"
        )
    if virtual_pipeline_parallel is not None and pipeline_parallel < 2:
        raise ValueError(
            f"virtual_pipeline_parallel={virtual_pipeline_parallel} needs pipeline_parallel >= 2, got "
            f"{pipeline_parallel}; drop virtual_pipeline_parallel or raise pipeline_parallel"
        )
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
    )
    seed_parallel_rng(seed)


def seed_parallel_rng(seed: int) -> None:
    """Seed Python, the CPU generator and megatron's tracked streams (``model_parallel_cuda_manual_seed``).

    On CPU the tracked streams live on the CPU generator (``cpu_compat``), so the same call works there.
    Every rank of a replica gets the same default stream; the tensor-parallel stream differs per TP
    rank, as in megatron.
    """
    from megatron.core import tensor_parallel

    enable_cpu_compat()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default process group is left to its owner)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


# --- Full (single-rank) <-> local (TP/PP-sharded) parameter mapping -------------------------------------
# Used to load one set of weights into any parallel layout and to gather parameters or gradients back into
# the single-rank layout (equivalence tests, export). Names are the single-rank GPTModel's names.

_LAYER_PREFIX = "decoder.layers."


def _global_name(name: str, model: torch.nn.Module) -> str:
    """Rename ``decoder.layers.<local i>.`` to the layer's global index (pipeline stages number from 0)."""
    if not name.startswith(_LAYER_PREFIX):
        return name
    local, rest = name[len(_LAYER_PREFIX) :].split(".", 1)
    layer = model.decoder.layers[int(local)]
    return f"{_LAYER_PREFIX}{layer.layer_number - 1}.{rest}"


def _is_glu_fc1(name: str, model: torch.nn.Module) -> bool:
    # The SwiGLU fc1 of a TP rank holds [gate_r; up_r], not a contiguous slice of [gate; up].
    return name.endswith("mlp.linear_fc1.weight") and bool(getattr(model.config, "gated_linear_unit", False))


def _tp_split(full: torch.Tensor, dim: int, glu: bool, rank: int, size: int) -> torch.Tensor:
    parts = full.chunk(2, dim=dim) if glu else (full,)
    return torch.cat([p.chunk(size, dim=dim)[rank] for p in parts], dim=dim)


def _tp_gather(local: torch.Tensor, dim: int, glu: bool, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    if not glu:
        return torch.cat(pieces, dim=dim)
    halves = [p.chunk(2, dim=dim) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)


def _full_key(name: str, full: dict[str, torch.Tensor]) -> str:
    # A last pipeline stage with tied embeddings holds its own copy of the word embedding as output_layer.
    if name == "output_layer.weight" and name not in full:
        return "embedding.word_embeddings.weight"
    return name


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy single-rank parameters ``full`` into this rank's (TP/PP-sharded) ``model`` chunk."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        key = _full_key(_global_name(name, model), full)
        if key not in full:
            raise KeyError(f"parameter {key!r} (local {name!r}) missing from the full state dict")
        value = full[key]
        if getattr(param, "tensor_model_parallel", False):
            value = _tp_split(value, param.partition_dim, _is_glu_fc1(name, model), rank, size)
        if value.shape != param.shape:
            raise ValueError(f"{key}: full slice {tuple(value.shape)} != local {tuple(param.shape)}")
        param.copy_(value)


def gather_full_tensors(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their ``.grad``) of every TP and PP rank in the single-rank layout, on every rank.

    The caller sums gradients over context/data-parallel ranks first if it wants those reduced. A tied
    output layer of the last stage is returned under ``output_layer.weight``; add it to the embedding
    gradient to get the single-rank tied gradient.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    local: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        value = param.grad if grads else param.detach()
        if value is None:
            value = torch.zeros_like(param)
        if getattr(param, "tensor_model_parallel", False):
            value = _tp_gather(value, param.partition_dim, _is_glu_fc1(name, model), tp_group)
        local[_global_name(name, model)] = value.detach().cpu()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    stages: list[dict[str, torch.Tensor]] = [{} for _ in range(pp_size)]
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)  # each name lives on exactly one stage
    return merged
