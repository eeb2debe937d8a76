"""Megatron side of the HF conversion: read training checkpoints, build/convert Megatron SSA models.

Not shipped in exported directories; it imports megatron lazily, inside functions, so importing
``ssa_megatron.convert`` stays megatron-free. The name/layout mapping itself is ``weight_mapping``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ssa_megatron.hf.configuration_ssa import SSAConfig
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM

from .weight_mapping import (
    MappingError,
    hf_to_megatron_state,
    megatron_to_hf_state,
    ssa_config_from_training,
    training_model_section,
)

LATEST, COMPLETE = "latest", "complete.json"
_STACKED = "decoder.layers."
# SSAConfig fields that define the model (everything else in to_dict() is transformers bookkeeping).
_SSA_INIT_KEYS = frozenset(
    [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",  # what transformers 5's to_dict() calls rope_scaling
        "max_position_embeddings",
        "initializer_range",
        "tie_word_embeddings",
        "attention_mode",
        "block_size",
        "block_count",
        "train_seq_length",
    ]
)


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing a file or holds the wrong architecture; the message names both."""


def megatron_config(
    config: SSAConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    inference_mode: str = "sparse",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """``SSATransformerConfig`` of the Megatron model equal to ``config`` (Llama-style blocks, no dropout),
    for conversion and parity checks (CPU initialisation, eval-time mode/budget from ``config``)."""
    import dataclasses

    from ssa_megatron.model.config import model_config_from_hf, transformer_config

    model = dataclasses.replace(model_config_from_hf(config), inference_mode=inference_mode)
    return transformer_config(model, tensor=tp, pipeline=pp, params_dtype=dtype, cpu_initialization=True)


def build_megatron_model(config: SSAConfig, **kwargs: Any) -> Any:
    """This rank's Megatron SSA GPTModel for ``config`` (parallel state must be initialised)."""
    from ssa_megatron.model.gpt import build_model

    if config.rope_scaling is not None:
        raise ValueError(
            f"the Megatron SSA model has plain RoPE; rope_scaling={config.rope_scaling!r} cannot be "
            "represented"
        )
    return build_model(
        megatron_config(config, **kwargs),
        config.vocab_size,
        config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(config.tie_word_embeddings),
    )


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` itself when it is one checkpoint (has complete.json), else what its ``latest`` names."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    pointer = p / LATEST
    if pointer.is_file():
        target = p / pointer.read_text().strip()
        if not (target / COMPLETE).is_file():
            raise CheckpointFormatError(
                f"{pointer} names {target.name!r}, which is missing or incomplete (no {COMPLETE}); point "
                "--checkpoint at a complete iter_* directory"
            )
        return target
    raise CheckpointFormatError(
        f"{p} is not a Megatron SSA checkpoint: neither {p / COMPLETE} nor {pointer} exists"
    )


def read_training_config(ckpt: Path) -> dict[str, Any]:
    """The resolved training config saved with the checkpoint (``config.yaml``)."""
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise CheckpointFormatError(f"{path} is missing; it holds the model shape needed to convert {ckpt}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    model = cfg.get("model")
    required = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "block_size",
        "block_count",
    )
    if not isinstance(model, dict) or any(k not in model for k in required):
        present = model if isinstance(model, dict) else {}
        raise CheckpointFormatError(
            f"{path}: the model section lacks {[k for k in required if k not in present]}; "
            "this is not an SSA training config"
        )
    return cfg


def _unstack_layers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron saves homogeneous layers stacked: ``decoder.layers.<name>`` ``[num_layers, ...]``; split them
    into the single-rank names ``decoder.layers.<i>.<name>``."""
    out = {}
    for key, value in tensors.items():
        rest = key[len(_STACKED) :] if key.startswith(_STACKED) else None
        if rest is None or rest.split(".", 1)[0].isdigit():
            out[key] = value
            continue
        for i, layer in enumerate(value.unbind(0)):
            out[f"{_STACKED}{i}.{rest}"] = layer.clone()
    return out


def _load_plain(model_dir: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.is_initialized():
        return dist_checkpointing.load_plain_tensors(str(model_dir))
    # Reading needs a process group even for one process; an in-memory store needs no network or port.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return dist_checkpointing.load_plain_tensors(str(model_dir))
    finally:
        dist.destroy_process_group()


def _check_shard_files(model_dir: Path) -> None:
    """Name a missing shard up front (torch's own error only says a read failed)."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", ".metadata"):
        if not (model_dir / name).is_file():
            raise CheckpointFormatError(
                f"{model_dir / name} is missing; {model_dir.parent} has no readable weights"
            )
    storage = FileSystemReader(str(model_dir)).read_metadata().storage_data or {}
    needed = sorted({info.relative_path for info in storage.values()})
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise CheckpointFormatError(
            f"{model_dir}: shard file(s) {missing} missing ({len(needed)} expected); copy the full checkpoint"
        )


def read_megatron_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint, unsharded (any TP/PP layout), by single-rank name."""
    model_dir = ckpt / "model"
    _check_shard_files(model_dir)
    try:
        tensors = _load_plain(model_dir)
    except Exception as err:
        raise CheckpointFormatError(
            f"{model_dir}: cannot read the weights ({type(err).__name__}: {err}); a shard file (*.distcp) is "
            "missing or damaged"
        ) from err
    plain = {
        k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }
    return _unstack_layers(plain)


def load_megatron_as_hf(path: str | Path, **config_overrides: Any) -> SSAForCausalLM:
    """An ``SSAForCausalLM`` holding the weights of a Megatron training checkpoint (fp32, CPU)."""
    ckpt = resolve_checkpoint_dir(path)
    train_cfg = read_training_config(ckpt)
    weights = read_megatron_weights(ckpt)
    emb = weights.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointFormatError(
            f"{ckpt / 'model'} has no embedding.word_embeddings.weight; not a GPT model"
        )
    seq = int((train_cfg.get("data") or {}).get("seq_length") or 4096)
    config = ssa_config_from_training(train_cfg["model"], vocab_size=emb.shape[0], seq_length=seq)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.validate_ssa()
    try:
        state = megatron_to_hf_state(weights, config, source=str(ckpt / "model"))
    except MappingError as err:
        raise CheckpointFormatError(str(err)) from err
    model = SSAForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def megatron_state_from_hf(model: SSAForCausalLM) -> dict[str, torch.Tensor]:
    return hf_to_megatron_state(model.state_dict(), model.config)


def _save_worker(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from ssa_megatron.parallel.state import destroy_parallel, initialize_parallel, load_full_state_dict
    from ssa_megatron.training.checkpoint import save_checkpoint
    from ssa_megatron.training.cpu_training import enable_cpu_training

    initialize_parallel(job["tp"], job["pp"], 1, backend="gloo")
    enable_cpu_training()  # the checkpoint savers' CUDA-only calls, redirected on CPU (inert with CUDA)
    config = SSAConfig(**job["config"])
    model = build_megatron_model(config, tp=job["tp"], pp=job["pp"])
    load_full_state_dict(model, job["state"])
    save_checkpoint(
        job["out"],
        job["iteration"],
        [model],
        None,
        None,
        None,
        job["train_config"],
        yaml.safe_dump(job["train_config"], sort_keys=False),
    )
    destroy_parallel()


def write_megatron_checkpoint(
    model: SSAForCausalLM,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    seq_length: int | None = None,
    tokenizer: str | None = None,
    iteration: int = 0,
) -> Path:
    """Save ``model`` as a Megatron SSA training checkpoint laid out for ``tp`` x ``pp`` ranks (written by
    that many local gloo processes through the training stack's ``save_checkpoint``).

    The checkpoint holds model weights and a complete training config (defaults for everything but
    the model shape, the layout and the data length/tokenizer); no optimizer state, so continue from it
    with ``checkpoint.load=<out_dir> checkpoint.load_weights_only=true``.
    """
    import torch.multiprocessing as mp

    from ssa_megatron.training.config import config_from_dict

    config = model.config
    if config.num_hidden_layers % pp:
        raise ValueError(f"--pp {pp} does not divide the {config.num_hidden_layers} layers")
    for what, n in (
        ("vocab_size", config.vocab_size),
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads),
    ):
        if n % tp:
            raise ValueError(f"--tp {tp} does not divide {what}={n}")
    seq = int(seq_length or config.train_seq_length)
    data = {"seq_length": seq, **({"tokenizer": str(tokenizer)} if tokenizer else {})}
    sections = {
        "model": training_model_section(config),
        "data": data,
        "parallel": {"tensor": tp, "pipeline": pp},
        "train": {"precision": "fp32"},
    }
    train_config = config_from_dict(sections).to_dict()
    job = {
        "tp": tp,
        "pp": pp,
        "out": str(out_dir),
        "iteration": iteration,
        "train_config": train_config,
        "config": {k: v for k, v in config.to_dict().items() if k in _SSA_INIT_KEYS},
        "state": {k: v.detach().float().cpu() for k, v in megatron_state_from_hf(model).items()},
    }
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _save_worker, args=(tp * pp, port, job), nprocs=tp * pp, join=True, start_method="spawn"
    )
    return resolve_checkpoint_dir(out_dir)


def check_tokenizer(tokenizer_path: str | Path, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (it is not the model's tokenizer)."""
    from ssa_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if tok.vocab_size > vocab_size:
        raise CheckpointFormatError(
            f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens but the checkpoint's embedding has "
            f"{vocab_size} rows; it is not the tokenizer this model was trained with"
        )


def saved_tokenizer(train_config: dict[str, Any]) -> str | None:
    """The tokenizer training used, as the training runner finds it (``data.tokenizer``, else
    ``<data.path>/tokenizer.model``), when that file exists here."""
    data = train_config.get("data") or {}
    candidates = [
        data.get("tokenizer"),
        str(Path(data["path"]) / "tokenizer.model") if data.get("path") else None,
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def export_checkpoint_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    include_kernels: bool = True,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """Megatron SSA checkpoint (any TP/PP layout) -> self-contained HF directory (see ``export``).

    ``tokenizer`` defaults to the one the checkpoint's config names (see ``saved_tokenizer``).
    """
    from .export import save_hf_directory

    ckpt = resolve_checkpoint_dir(checkpoint)
    model = load_megatron_as_hf(ckpt, **config_overrides)
    if tokenizer is None:
        tokenizer = saved_tokenizer(read_training_config(ckpt))
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.vocab_size)
    return save_hf_directory(
        model.to(dtype), out_dir, tokenizer_path=tokenizer, include_kernels=include_kernels
    )
