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
        complete.json         written last: iteration, the parallel layout and the embedding shape

Both .pt files hold tensors and plain Python values only and are read with
`torch.load(weights_only=True)`: loading them cannot run code. (The `.metadata` files of the
dist_checkpointing directories are pickles that torch reads with `pickle.load`; see the README's
"Running for real" section: such checkpoints must come from a trusted source.)

The save protocol (rank 0 publishes once every rank has written its part), each step durable
(fsync) before the next:

    1. every file into `iter_N.partial/`, then complete.json;
    2. an existing `iter_N` (re-saving an iteration) is renamed to `iter_N.old`;
    3. `iter_N.partial` is renamed to `iter_N`;
    4. `latest` is replaced through `latest.tmp` + os.replace;
    5. `iter_N.old` is removed.

A kill at any point leaves either `latest` naming a complete checkpoint, or (between 2 and 3)
`iter_N.old` to be renamed back; `recover()` at start-up finishes or undoes what a killed save
left, so what `latest` names is always complete.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import sys
import time
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
PARTIAL = ".partial"
ASIDE = ".old"

# Fault injection for the tests of the save protocol: the process SIGKILLs itself at the named step.
FAULT_ENV = "SSA_MEGATRON_FAULT_AT"
FAULT_POINTS = ("written", "synced", "old_aside", "new_in", "latest_tmp", "latest", "old_removed")

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
    # Tensors and plain values only, so that the file loads with weights_only=True.
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault(point: str) -> None:
    """SIGKILL this process at `point` of the save protocol when the fault-injection variable names it."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make every file and directory entry below `root` durable (a rename is only as safe as its inputs)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def embedding_shape(model: list[torch.nn.Module]) -> list[int] | None:
    """Global [vocab, hidden] of the word embedding, from the chunk that holds it (None: not on this rank).

    megatron loads the embedding with allow_shape_mismatch (vocab padding), which zero-pads a
    checkpoint of another vocabulary without a word; complete.json records the shape to refuse that.
    """
    for chunk in model:
        sd = _unwrap(chunk).sharded_state_dict()
        tensor = sd.get("embedding.word_embeddings.weight")
        if tensor is not None and hasattr(tensor, "global_shape"):
            return [int(x) for x in tensor.global_shape]
    return None


def publish(root: Path, tmp: Path, final: Path) -> None:
    """Steps 2-5 of the save protocol (module docstring), on one process; `tmp` holds a complete save."""
    _fsync_tree(tmp)
    _fault("synced")
    aside = root / (final.name + ASIDE)
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        _fsync_path(root)
        _fault("old_aside")
    os.replace(tmp, final)
    _fsync_path(root)
    _fault("new_in")
    pointer = root / (LATEST + ".tmp")
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fault("latest_tmp")
    os.replace(pointer, root / LATEST)
    _fsync_path(root)
    _fault("latest")
    if aside.exists():
        shutil.rmtree(aside)
    _fault("old_removed")


def recover(ckpt_dir: str | Path) -> list[str]:
    """Finish or undo what a killed save left in `ckpt_dir` (rank 0, before anyone reads it).

    Returns one line per action. `iter_N.partial` was never published and is removed; `iter_N.old`
    is removed when a complete `iter_N` replaced it, else renamed back (the kill came between steps
    2 and 3, and `latest` may name it); a stray `latest.tmp` is removed.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    actions = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith("iter_"):
            continue
        if path.name.endswith(PARTIAL):
            shutil.rmtree(path)
            actions.append(f"removed {path.name} (a save that was interrupted before it was published)")
        elif path.name.endswith(ASIDE):
            final = root / path.name[: -len(ASIDE)]
            if (final / COMPLETE).exists():
                shutil.rmtree(path)
                actions.append(f"removed {path.name} ({final.name} was re-saved completely)")
            else:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(path, final)
                actions.append(f"restored {final.name} from {path.name} (its re-save was interrupted)")
    stray = root / (LATEST + ".tmp")
    if stray.exists():
        stray.unlink()
        actions.append(f"removed {stray.name}")
    if actions:
        _fsync_path(root)
    return actions


def holds_checkpoints(ckpt_dir: str | Path) -> bool:
    """Whether `ckpt_dir` holds a run's checkpoints (a `latest` pointer or a published iter_* directory)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return False
    if (root / LATEST).exists():
        return True
    return any(
        p.is_dir() and p.name.startswith("iter_") and not p.name.endswith((PARTIAL, ASIDE))
        for p in root.iterdir()
    )


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
    """Save on every rank (collective); returns the published directory. See the module docstring."""
    root = Path(ckpt_dir)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + PARTIAL)
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
        _fault("written")
        meta = {"iteration": iteration, **_layout(), "embedding_shape": embedding_shape(model)}
        (tmp / COMPLETE).write_text(json.dumps(meta))
        publish(root, tmp, final)
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
        # CheckpointException's text carries each rank's whole traceback; its last line is the cause.
        lines = [line for line in str(err).splitlines() if line.strip()]
        cause = lines[-1].strip() if lines else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path.parent}: could not read the {what} ({cause}). "
            "The files are damaged or truncated, or the model shape differs from the config that saved it "
            f"(see {path.parent}/config.yaml)"
        ) from err


def _torch_load(path: Path, what: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path.parent}: {what} file {path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} holds objects other than tensors and plain values; it "
            "was not written by this trainer and is refused (loading it could run code). Use a checkpoint "
            "from a trusted source"
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} is unreadable ({err}); it is damaged"
        ) from err


def _check_embedding(path: Path, meta: dict[str, Any], model: list[torch.nn.Module]) -> None:
    """Refuse a checkpoint whose embedding has another shape (decided on every rank together)."""
    saved, mine = meta.get("embedding_shape"), embedding_shape(model)
    bad = saved is not None and mine is not None and list(saved) != mine
    flag = torch.tensor([1.0 if bad else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        from ssa_megatron.parallel.state import collective_device

        flag = flag.to(collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        detail = (
            f"[vocab, hidden] {saved}, this run's model has {mine}"
            if bad
            else "another embedding shape than this run's model (found on another rank)"
        )
        raise CheckpointError(
            f"checkpoint {path} has {detail}; resuming would pad or cut the embedding. Set "
            f"model.vocab_size and model.hidden_size to the checkpoint's (see {path}/config.yaml) or use "
            "the tokenizer it was trained with"
        )


def load_model_weights(path: Path, model: list[torch.nn.Module]) -> dict[str, Any]:
    """Load only the weights (any TP/PP layout); returns the checkpoint's complete.json."""
    meta = _check_complete(path)
    _check_embedding(path, meta, model)
    sharded = model_sharded_state_dict(model)
    loaded = _dist_load(sharded, path / "model", "model weights")
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model))])
    return meta


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of checkpoint ``path`` (an iter_* directory), unsharded, by its saved key, without
    building a model (any TP/PP layout): what the converters and evaluation read. One process; it joins a
    one-rank group for the read when no process group exists."""
    _check_complete(path)
    model_dir = path / "model"
    for name in ("metadata.json", ".metadata"):
        if not (model_dir / name).is_file():
            raise CheckpointError(
                f"checkpoint {path}: model weights are missing ({model_dir / name} not found)"
            )
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(model_dir)).read_metadata().storage_data or {}
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path}: {model_dir / '.metadata'} is unreadable ({type(err).__name__}); it is "
            "damaged"
        ) from err
    needed = sorted({info.relative_path for info in storage.values()})
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: shard file(s) {missing} missing ({len(needed)} expected); copy the full "
            "checkpoint"
        )
    own_group = not dist.is_initialized()
    if own_group:
        from ssa_megatron.training.launch import LaunchEnv, init_distributed

        init_distributed(LaunchEnv(0, 1, 0, 1, "single"), torch.device("cpu"))
    try:
        tensors = dist_checkpointing.load_plain_tensors(str(model_dir))
    except (Exception, CheckpointException) as err:
        # Name the shard that fails to read (a truncated file), not only the reader's own exception.
        short = [name for name in needed if _truncated(model_dir, name, storage)]
        where = f"shard file(s) {short} are truncated" if short else "a shard file is damaged"
        raise CheckpointError(
            f"checkpoint {path}: cannot read the model weights in {model_dir}: {where} "
            f"({type(err).__name__}); copy the checkpoint again"
        ) from err
    finally:
        if own_group:
            dist.destroy_process_group()
    return {
        k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _truncated(model_dir: Path, name: str, storage: dict[Any, Any]) -> bool:
    ends = [info.offset + info.length for info in storage.values() if info.relative_path == name]
    end = max(ends, default=0)
    return (model_dir / name).stat().st_size < end


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


# ---------------------------------------------------------------------------------------------
# Start-up: checks before any process group or data work, recovery, writer processes.


def check_checkpoint_dir(ckpt_dir: str | None, load: str, overwrite: bool) -> None:
    """Refuse, before anything is built, a checkpoint.dir that cannot be written or a fresh start over
    another run's checkpoints. Reads only; raises ConfigError naming the value and the fix."""
    from ssa_megatron.training.config import ConfigError

    if ckpt_dir is None:
        return
    root = Path(ckpt_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == root else f"lies below {str(existing)!r}, which is a file"
        raise ConfigError(f"checkpoint.dir={ckpt_dir!r} {what}; set checkpoint.dir to a directory path")
    if not os.access(existing, os.W_OK | os.X_OK) or not _can_create_in(existing):
        raise ConfigError(
            f"checkpoint.dir={ckpt_dir!r} cannot be written ({str(existing)!r} is read-only for this user); "
            "choose a writable checkpoint.dir"
        )
    if load == "none" and not overwrite and holds_checkpoints(root):
        latest = root / LATEST
        found = f"latest = {latest.read_text().strip()}" if latest.exists() else "iter_* directories"
        raise ConfigError(
            f"checkpoint.dir={ckpt_dir!r} holds checkpoints of an earlier run ({found}) and "
            "checkpoint.load=none starts afresh: resume it with checkpoint.load=auto, write to a new "
            "checkpoint.dir, or set checkpoint.overwrite=true to replace it"
        )


def _can_create_in(directory: Path) -> bool:
    # os.access says yes to root on a read-only mount; creating a file is the real test.
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".write_test_", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def prepare_checkpoint_dir(ckpt_dir: str | None, load: str, overwrite: bool) -> list[str]:
    """Rank 0, after the checks and before anyone reads the directory: recover killed saves and, for an
    explicit overwrite, remove the earlier run's checkpoints. Returns one line per action."""
    if ckpt_dir is None or not Path(ckpt_dir).is_dir():
        return []
    root = Path(ckpt_dir)
    actions = recover(root)
    if load == "none" and overwrite and holds_checkpoints(root):
        for path in sorted(root.iterdir()):
            if path.name.startswith("iter_") and path.is_dir():
                shutil.rmtree(path)
        (root / LATEST).unlink(missing_ok=True)
        # Its TensorBoard events too (logging.tensorboard_dir auto), or both runs' curves would mix.
        if (root / "tensorboard").is_dir():
            shutil.rmtree(root / "tensorboard")
        actions.append(f"removed the earlier run's checkpoints from {root} (checkpoint.overwrite=true)")
    return actions


_guards = {"installed": False, "saving": False, "parent": 0}


def _writer_after_fork() -> None:
    """In every child forked by the trainer (megatron's checkpoint writers among them): die with it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _guards["parent"]:
            os._exit(1)  # the trainer died between fork and prctl
    if _guards["saving"] and os.environ.get(FAULT_ENV) == "writer":
        # Fault injection: a writer that outlives a kill -9 of the trainer in the middle of a save.
        with open(os.environ[FAULT_ENV + "_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)


def install_writer_guards() -> None:
    """No checkpoint-writer process outlives the trainer.

    megatron's dist_checkpointing forks one writer per file bucket (a copy of the trainer's memory)
    and, for its results queue, starts a multiprocessing Manager server; a kill -9 of the trainer
    left both running. Forked children now get PR_SET_PDEATHSIG=SIGKILL, and the synchronous save
    path, which collects the results in this process, uses a plain in-process queue instead.
    """
    if _guards["installed"]:
        return
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _guards["installed"] = True
    os.register_at_fork(
        before=lambda: _guards.__setitem__("parent", os.getpid()), after_in_child=_writer_after_fork
    )
    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results


class Checkpointer:
    """Saves and resumes one run: the engine's model/optimizer/schedule and the train loader's position."""

    def __init__(self, cfg: Any, engine: Any, train_loader: Any, log: Any) -> None:
        self.cfg, self.engine, self.loader, self.log = cfg, engine, train_loader, log
        self.last_saved: str | None = None

    def save(self, iteration: int) -> None:
        if self.cfg.checkpoint.dir is None:
            return
        _guards["saving"] = True
        try:
            path = save_checkpoint(
                self.cfg.checkpoint.dir,
                iteration,
                self.engine.model,
                self.engine.ckpt_optimizer,
                self.engine.scheduler,
                self.loader.state_dict(),
                self.cfg.to_dict(),
                self.cfg.to_yaml(),
            )
        finally:
            _guards["saving"] = False
        if dist.get_rank() == 0:  # the tokenizer these weights go with, for resume and export checks
            from ssa_megatron.data.tokenizer import record_checkpoint_tokenizer

            record_checkpoint_tokenizer(self.cfg.checkpoint.dir, self.cfg.data)
        self.last_saved = str(path)
        self.log(f"saved checkpoint {path}")

    def resume(self) -> int:
        """Load what checkpoint.load names (auto: checkpoint.dir/latest); returns the iteration to go on
        from (0: a fresh start)."""
        c = self.cfg.checkpoint
        path = resolve_checkpoint(c.load, c.dir)
        if path is None:
            return 0
        if c.load_weights_only:
            load_model_weights(path, self.engine.model)
            self.log(f"loaded model weights from {path} (optimizer, schedule and data order start fresh)")
            return 0
        e = self.engine
        loaded = load_checkpoint(path, e.model, e.ckpt_optimizer, e.scheduler)
        self.loader.load_state_dict(loaded.data_state)
        self.log(f"resumed from {path} at iteration {loaded.iteration}")
        return loaded.iteration
