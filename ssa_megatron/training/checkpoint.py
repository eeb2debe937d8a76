"""Sharded checkpoints with megatron.core.dist_checkpointing, published atomically.

Layout of `checkpoint.dir`:

    latest                    one line, the name of the last complete checkpoint ("iter_0000020")
    iter_0000020/
        model/                dist_checkpointing directory: model weights only, the bare GPTModel's
                              `sharded_state_dict()` keys (no DDP/Float16/DeepSpeed prefix), e.g.
                              "embedding.word_embeddings.weight" [vocab, hidden],
                              "decoder.layers.self_attention.linear_qkv.weight" [num_layers, ...]
                              (megatron stacks the layers along a leading axis, so any TP/PP
                              layout can load them), "decoder.final_layernorm.weight";
                              "output_layer.weight" only without tied embeddings
        optim/                dist_checkpointing directory: optimizer state (same layout rules)
        train_state.pt        iteration, LR scheduler, resolved config (rank 0)
        rank_00003.pt         per-rank RNG states and data-loader state
        config.yaml           the resolved config, human readable
        complete.json         written last: iteration and the parallel layout that saved it

Everything is written into `iter_<7-digit iteration>.partial/`, which rank 0 renames once every rank is
done; only then is `latest` replaced (write-to-temp + os.replace). A save interrupted at
any point therefore leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from ssa_megatron.training.optim import restore_adam_steps

LATEST = "latest"
COMPLETE = "complete.json"

# megatron 0.16.1's default layout for the distributed optimizer ("fully_sharded_model_space") builds
# ShardedTensors with flattened_range, which its own dist_checkpointing then refuses (seen on the GPU);
# "dp_reshardable" is Megatron-LM's default and suffices: an exact resume needs the same layout anyway.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or unreadable; the message says which and what to do."""


@dataclass
class LoadedState:
    iteration: int
    scheduler: dict[str, Any] | None
    data_state: Any
    config: dict[str, Any]


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    # megatron's DDP, Float16Module and the DeepSpeed engine keep the model in `.module`; saving the bare
    # GPTModel's keys makes checkpoints independent of the wrappers (and of the engine) used to train.
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    return {_model_key(i, len(model)): _unwrap(c).sharded_state_dict() for i, c in enumerate(model)}


def _layout() -> dict[str, int]:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
        "world_size": dist.get_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    ckpt_dir: str | Path,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    data_state: Any,
    config: dict[str, Any],
    config_yaml: str,
) -> Path:
    """Save on every rank (collective); returns the published directory."""
    root = Path(ckpt_dir)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            # Left over from a save that died; it was never published, so it is safe to drop.
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
        (tmp / "optim").mkdir()
    dist.barrier()

    dist_checkpointing.save(model_sharded_state_dict(model), str(tmp / "model"))
    if isinstance(optimizer, MegatronOptimizer):
        # A fresh model state dict: dist_checkpointing.save consumes the one it is given.
        optim_sd = optimizer.sharded_state_dict(model_sharded_state_dict(model), metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(optim_sd, str(tmp / "optim"))
    elif optimizer is not None:
        # DeepSpeed: its engine writes its own (ZeRO-partitioned) optimizer files.
        optimizer.save_checkpoint(str(tmp / "optim"), tag="ds", client_state={}, save_latest=False)
    torch.save({"rng": _rng_state(), "data": data_state}, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(
            {
                "iteration": iteration,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "config": config,
            },
            tmp / "train_state.pt",
        )
        (tmp / "config.yaml").write_text(config_yaml)
    dist.barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"iteration": iteration, **_layout()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
    dist.barrier()
    return final


def resolve_checkpoint(load: str, ckpt_dir: str | None) -> Path | None:
    """Which checkpoint to load: None to start fresh. Raises CheckpointError for a broken pointer."""
    if load == "none":
        return None
    if load == "auto":
        if ckpt_dir is None or not (Path(ckpt_dir) / LATEST).exists():
            return None
        root = Path(ckpt_dir)
    else:
        root = Path(load)
        if (root / COMPLETE).exists() or (root / "model").exists():
            return root
        if not (root / LATEST).exists():
            raise CheckpointError(
                f"checkpoint.load={load!r}: neither a checkpoint (no {COMPLETE}) nor a checkpoint directory "
                f"(no {LATEST} file); point it at checkpoint.dir or one of its iter_* directories"
            )
    name = (root / LATEST).read_text().strip()
    target = root / name
    if not name or not target.is_dir():
        raise CheckpointError(
            f"{root / LATEST} points at {name!r}, which does not exist; the directory was edited or "
            f"partly deleted. Write the name of an existing iter_* directory into {root / LATEST}"
        )
    return target


def _check_complete(path: Path) -> dict[str, Any]:
    marker = path / COMPLETE
    if not marker.exists():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {COMPLETE}): its save was interrupted. Load an earlier "
            f"checkpoint (checkpoint.load=<dir>/iter_...) or delete {path}"
        )
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint {path}: {COMPLETE} is corrupt ({err}); the checkpoint is damaged"
        ) from err


def _dist_load(sharded_sd: dict[str, Any], path: Path, what: str) -> dict[str, Any]:
    if not (path / "metadata.json").exists():
        raise CheckpointError(f"checkpoint {path.parent}: {what} is missing ({path}/metadata.json not found)")
    try:
        return dist_checkpointing.load(sharded_sd, str(path))
    # torch.distributed.checkpoint wraps reader errors in CheckpointException, a BaseException.
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: could not read the {what} ({type(err).__name__}: {err}). "
            "The files are damaged or truncated, or the model shape differs from the config that saved it "
            f"(see {path.parent}/config.yaml)"
        ) from err


def _torch_load(path: Path, what: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path.parent}: {what} file {path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} is unreadable ({err}); it is damaged"
        ) from err


def load_model_weights(path: Path, model: list[torch.nn.Module]) -> dict[str, Any]:
    """Load only the weights (any TP/PP layout); returns the checkpoint's complete.json."""
    meta = _check_complete(path)
    sharded = model_sharded_state_dict(model)
    loaded = _dist_load(sharded, path / "model", "model weights")
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model))])
    return meta


def load_checkpoint(path: Path, model: list[torch.nn.Module], optimizer: Any, scheduler: Any) -> LoadedState:
    """Full resume: weights, optimizer, scheduler, RNG and data state. Needs the same parallel layout."""
    meta = _check_complete(path)
    layout = _layout()
    if {k: meta.get(k) for k in layout} != layout:
        raise CheckpointError(
            f"checkpoint {path} was saved with layout { ({k: meta.get(k) for k in layout}) }, this run has "
            f"{layout}; an exact resume needs the same layout. To continue on a new layout set "
            "checkpoint.load_weights_only=true (weights load on any layout; optimizer and data order restart)"
        )
    load_model_weights(path, model)
    if isinstance(optimizer, MegatronOptimizer):
        model_sd = model_sharded_state_dict(model)
        optim_sd = _dist_load(
            optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA),
            path / "optim",
            "optimizer state",
        )
        optimizer.load_state_dict(optim_sd)
        restore_adam_steps(optimizer, optim_sd)
    elif optimizer is not None:
        optimizer.load_checkpoint(
            str(path / "optim"),
            tag="ds",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_only=False,
        )
        # The engine reloads module weights from its own files; the sharded copy above is the source of truth.
        load_model_weights(path, model)
    train_state = _torch_load(path / "train_state.pt", "training state")
    if scheduler is not None and train_state["scheduler"] is not None:
        # megatron's load_state_dict *adds* the saved step count to the current one.
        scheduler.num_steps = 0
        scheduler.load_state_dict(train_state["scheduler"])
    per_rank = _torch_load(path / f"rank_{dist.get_rank():05d}.pt", "per-rank state")
    _set_rng_state(per_rank["rng"])
    return LoadedState(
        train_state["iteration"], train_state["scheduler"], per_rank["data"], train_state["config"]
    )
