"""Megatron side of the HF conversion: read training checkpoints, build/convert Megatron SSA models.

Not shipped in exported directories. Checkpoints are read through the training stack's reader
(``ssa_megatron.training.checkpoint``: one reader, one error type, ``CheckpointError``); the name/layout
mapping itself is ``weight_mapping``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ssa_megatron.hf.configuration_ssa import SSAConfig
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from ssa_megatron.training.checkpoint import CheckpointError, read_model_tensors, resolve_checkpoint

from .weight_mapping import (
    MappingError,
    hf_to_megatron_state,
    megatron_to_hf_state,
    ssa_config_from_training,
    training_model_section,
)

# Training pads the vocabulary to a multiple of this x TP (see ssa_megatron.training.runner).
VOCAB_PADDING = 128
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


class CheckpointFormatError(CheckpointError):
    """A checkpoint that reads but cannot be converted (wrong architecture, config, tokenizer); the message
    names the file and the reason."""


class TokenizerMismatchError(CheckpointFormatError):
    """The tokenizer given for an export is not the checkpoint's (its vocabulary does not match)."""


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
    """``path`` itself when it is one checkpoint, else the one its ``latest`` names (the trainer's rules)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass checkpoint.dir or one of its iter_* directories"
        )
    target = resolve_checkpoint(str(p), None)
    assert target is not None  # only load="none"/"auto" resolve to None
    return target


def read_training_config(ckpt: Path) -> dict[str, Any]:
    """The resolved training config saved with the checkpoint (``config.yaml``)."""
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise CheckpointFormatError(f"{path} is missing; it holds the model shape needed to convert {ckpt}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CheckpointFormatError(
            f"{path} is not valid YAML ({type(err).__name__}); it is damaged"
        ) from err
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{path} is not a training config (a mapping of sections)")
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


def read_megatron_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint, unsharded (any TP/PP layout), by single-rank name."""
    return _unstack_layers(read_model_tensors(ckpt))


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
    from ssa_megatron.parallel.state import (
        destroy_parallel,
        initialize_parallel,
        load_full_state_dict,
        set_local_rank_env,
    )

    set_local_rank_env(rank, world, port)
    torch.set_num_threads(1)
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
    tokenizer: str | Path | None = None,
    iteration: int = 0,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as a Megatron SSA training checkpoint laid out for ``tp`` x ``pp`` ranks (written by
    that many local gloo processes through the training stack's ``save_checkpoint``).

    The checkpoint holds model weights, a copy of the tokenizer file, and a training config that trains
    as-is once ``data.path`` is given (``--config <ckpt>/iter_*/config.yaml --data.path ...``): the model
    shape, layout and data length, the tokenizer copy, and ``checkpoint.load`` of these weights with
    ``load_weights_only`` (no optimizer state is saved). ``out_dir`` must be absent or empty unless
    ``overwrite``; it is replaced only once the new checkpoint is complete.
    """
    import shutil
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from ssa_megatron.training.config import config_from_dict

    from .export import check_output_dir, publish_dir

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
    out = check_output_dir(out_dir, overwrite=overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        data: dict[str, Any] = {"seq_length": int(seq_length or config.train_seq_length)}
        if tokenizer:
            # A copy beside the weights, so the config does not depend on where the HF model was.
            name = Path(tokenizer).name
            shutil.copyfile(tokenizer, tmp / name)
            data["tokenizer"] = str(out / name)
        sections = {
            "model": training_model_section(config),
            "data": data,
            "parallel": {"tensor": tp, "pipeline": pp},
            "train": {"precision": "fp32"},
            "checkpoint": {"load": str(out), "load_weights_only": True},
        }
        train_config = config_from_dict(sections).to_dict()
        job = {
            "tp": tp,
            "pp": pp,
            "out": str(tmp),
            "iteration": iteration,
            "train_config": train_config,
            "config": {k: v for k, v in config.to_dict().items() if k in _SSA_INIT_KEYS},
            "state": {k: v.detach().float().cpu() for k, v in megatron_state_from_hf(model).items()},
        }
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(
            _save_worker, args=(tp * pp, port, job), nprocs=tp * pp, join=True, start_method="spawn"
        )
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return resolve_checkpoint_dir(out)


def check_tokenizer(tokenizer_path: str | Path, vocab_size: int, *, tensor_parallel: int = 1) -> None:
    """Refuse a tokenizer that is not the checkpoint's: its ids must fit the embedding, and the embedding
    may exceed it only by the padding training adds (``VOCAB_PADDING`` x TP rows at most)."""
    from .tokenizer_files import tokenizer_vocab_size

    size = tokenizer_vocab_size(tokenizer_path)
    padding = VOCAB_PADDING * max(1, int(tensor_parallel))
    if size > vocab_size or vocab_size - size >= padding:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_path} has {size} tokens but the checkpoint's embedding has {vocab_size} "
            "rows; it is not the tokenizer this model was trained with (pass the right --tokenizer, or "
            "--allow-vocab-mismatch to export anyway)"
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
    overwrite: bool = False,
    allow_vocab_mismatch: bool = False,
    **config_overrides: Any,
) -> Path:
    """Megatron SSA checkpoint (any TP/PP layout) -> self-contained HF directory (see ``export``).

    ``tokenizer`` defaults to the one the checkpoint's config names (see ``saved_tokenizer``); one whose
    vocabulary does not match the embedding is refused unless ``allow_vocab_mismatch`` (ids beyond the
    embedding are refused always). The output directory is checked before anything is read.
    """
    from .export import check_output_dir, save_hf_directory
    from .tokenizer_files import tokenizer_vocab_size

    check_output_dir(out_dir, overwrite=overwrite)
    ckpt = resolve_checkpoint_dir(checkpoint)
    train_cfg = read_training_config(ckpt)
    if tokenizer is None:
        tokenizer = saved_tokenizer(train_cfg)
    model = load_megatron_as_hf(ckpt, **config_overrides)
    if tokenizer is not None:
        if not allow_vocab_mismatch:
            tp = int((train_cfg.get("parallel") or {}).get("tensor") or 1)
            check_tokenizer(tokenizer, model.config.vocab_size, tensor_parallel=tp)
        elif tokenizer_vocab_size(tokenizer) > model.config.vocab_size:
            raise TokenizerMismatchError(
                f"tokenizer {tokenizer} produces ids beyond the checkpoint's {model.config.vocab_size} "
                "embedding rows; no flag can make that work"
            )
    return save_hf_directory(
        model.to(dtype),
        out_dir,
        tokenizer_path=tokenizer,
        include_kernels=include_kernels,
        overwrite=overwrite,
    )
