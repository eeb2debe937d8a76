"""Megatron side of the HF conversion: read training checkpoints, build/convert Megatron SSA models.

Not shipped in exported directories (it imports megatron lazily, inside functions, so importing
``ssa_megatron.hf`` stays megatron-free). The name/layout mapping itself is ``weight_mapping``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from .configuration_ssa import SSAConfig
from .modeling_ssa import SSAForCausalLM
from .weight_mapping import MappingError, hf_to_megatron_state, megatron_to_hf_state, ssa_config_from_training

LATEST, COMPLETE = "latest", "complete.json"


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
    from ssa_megatron.config import SSATransformerConfig

    return SSATransformerConfig(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        layernorm_epsilon=config.rms_norm_eps,
        init_method_std=config.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        attention_mode="ssa",
        block_size=config.block_size,
        block_count=config.block_count,
        inference_mode=inference_mode,
        rotary_base=config.rope_theta,
        kernel_backend="auto",
    )


def build_megatron_model(config: SSAConfig, **kwargs: Any) -> Any:
    """This rank's Megatron SSA GPTModel for ``config`` (parallel state must be initialised)."""
    from ssa_megatron.model import build_model

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


def read_megatron_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint, unsharded (any TP/PP layout), by single-rank name."""
    from megatron.core import dist_checkpointing

    model_dir = ckpt / "model"
    if not (model_dir / "metadata.json").is_file():
        raise CheckpointFormatError(f"{model_dir / 'metadata.json'} is missing; {ckpt} has no model weights")
    try:
        tensors = dist_checkpointing.load_plain_tensors(str(model_dir))
    except Exception as err:
        raise CheckpointFormatError(
            f"{model_dir}: cannot read the weights ({type(err).__name__}: {err}); a shard file (*.distcp) is "
            "missing or damaged"
        ) from err
    return {
        k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


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
