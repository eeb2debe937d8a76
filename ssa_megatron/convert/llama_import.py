"""A Llama-architecture HF checkpoint as an SSA model whose full-attention mode is exactly the original.

The SSA layer has one thing Llama lacks: the per-head output gate ``sigmoid(W_g x)``. It is
initialised with ``W_g = 0``, so every head is scaled by ``sigmoid(0) = 0.5``, and ``o_proj`` is
multiplied by 2 to compensate. Hence, for every input,

    SSA(full mode)   == Llama                    (up to float rounding; x2 and x0.5 are exact in binary)
    SSA(sparse mode) == Llama with SSA block-sparse attention in every layer

and continued pretraining starts from the original model. ``llama_state_from_ssa`` inverts the
mapping exactly for a model whose gate is still zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ssa_megatron.hf.configuration_ssa import SSAConfig
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM

GATE_KEY = "model.layers.{i}.self_attn.head_gate.weight"
O_PROJ_KEY = "model.layers.{i}.self_attn.o_proj.weight"
# Gate logit 0 -> sigmoid 0.5 on every head; o_proj is scaled by the inverse.
O_PROJ_SCALE = 2.0


class LlamaImportError(ValueError):
    """The HF checkpoint is not a convertible Llama-architecture model; the message names file and field."""


class LlamaReadError(LlamaImportError):
    """A file of the HF checkpoint is damaged or truncated; the message names it."""


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises SafetensorError / OSError for damaged files
        raise LlamaReadError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "the file is truncated or damaged, download it again"
        ) from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlamaReadError(f"{path} is not readable JSON ({type(err).__name__}); it is damaged") from err
    if not isinstance(data, dict):
        raise LlamaImportError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def read_llama_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise LlamaImportError(f"{config_file} is missing; point --hf at a Hugging Face model directory")
    cfg = _read_json(config_file)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise LlamaImportError(
            f"{config_file}: model_type={cfg.get('model_type')!r}, architectures={archs}; only "
            "Llama-architecture checkpoints (model_type 'llama', LlamaForCausalLM) can be converted"
        )
    checks = {
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(cfg.get("attention_bias", False)), False),
        "mlp_bias": (bool(cfg.get("mlp_bias", False)), False),
    }
    for field, (found, wanted) in checks.items():
        if found != wanted:
            raise LlamaImportError(
                f"{config_file}: {field}={found!r}; the SSA model needs {field}={wanted!r}"
            )
    return cfg


def llama_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` of a Llama ``config.json`` in either layout: transformers 4
    writes ``rope_theta`` and ``rope_scaling`` (None when unscaled); transformers 5 writes one
    ``rope_parameters`` dict holding the base too, with ``rope_type: "default"`` when unscaled. Reading
    only the 4.x keys would take a 5.x Llama-3 (base 500000, llama3 scaling) as base 10000, unscaled."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    unscaled = params.get("rope_type", params.get("type", "default")) == "default"
    return theta, None if unscaled and set(params) <= {"rope_type", "type"} else params


def ssa_config_from_llama(
    cfg: dict[str, Any],
    *,
    block_size: int,
    block_count: int,
    seq_length: int | None = None,
    drop_rope_scaling: bool = False,
    source: str = "config.json",
) -> SSAConfig:
    """The SSA config with the Llama shape; refuses RoPE scaling (the Megatron model has plain RoPE) unless
    ``drop_rope_scaling``, which changes the model at long range and is then the user's explicit choice."""
    rope_theta, scaling = llama_rope(cfg)
    if scaling and not drop_rope_scaling:
        raise LlamaImportError(
            f"{source}: rope_scaling={scaling!r}; the SSA Megatron model uses plain RoPE, so the converted "
            "model would differ from the original. Pass --drop-rope-scaling to convert anyway (positional "
            "behaviour then changes for low RoPE frequencies)"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    absent = [key for key in required if not isinstance(cfg.get(key), int)]
    if absent:
        raise LlamaImportError(
            f"{source}: {absent} missing or not integers; this is not a complete Llama config"
        )
    heads = int(cfg["num_attention_heads"])
    max_pos = int(cfg.get("max_position_embeddings", 8192))
    return SSAConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        max_position_embeddings=int(seq_length or max_pos),
        train_seq_length=int(seq_length or max_pos),
        block_size=block_size,
        block_count=block_count,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    p = Path(path)
    single, index = p / "model.safetensors", p / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if not index.is_file():
        raise LlamaImportError(
            f"{p}: neither model.safetensors nor model.safetensors.index.json found (pytorch_model.bin "
            "is not read; re-save it with save_pretrained, which writes safetensors by default)"
        )
    weight_map = _read_json(index).get("weight_map", {})
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (p / s).is_file()]
    if missing:
        raise LlamaImportError(
            f"{index} lists shard(s) {missing} that are not in {p}; download the full model"
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_load_safetensors(p / shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise LlamaImportError(f"{index}: tensors {absent[:5]} are listed but not found in their shard files")
    return state


def ssa_state_from_llama(llama: dict[str, torch.Tensor], config: SSAConfig) -> dict[str, torch.Tensor]:
    """Llama parameters -> SSA parameters (gate zero, o_proj doubled; see module docstring)."""
    state = {k: v for k, v in llama.items() if not k.endswith("rotary_emb.inv_freq")}
    ref = state["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        key = O_PROJ_KEY.format(i=i)
        if key not in state:
            raise LlamaImportError(
                f"tensor {key} missing; the checkpoint does not have {config.num_hidden_layers} Llama layers"
            )
        state[key] = state[key] * O_PROJ_SCALE
        state[GATE_KEY.format(i=i)] = torch.zeros(
            config.num_attention_heads, config.hidden_size, dtype=ref.dtype
        )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def llama_state_from_ssa(model: SSAForCausalLM) -> dict[str, torch.Tensor]:
    """Inverse of ``ssa_state_from_llama`` for a model whose gates are still zero (refuses otherwise)."""
    state = dict(model.state_dict())
    for i in range(model.config.num_hidden_layers):
        gate = state.pop(GATE_KEY.format(i=i))
        if gate.abs().max() != 0:
            raise ValueError(
                f"layer {i}: the head gate is no longer zero (trained); the model is not a Llama"
            )
        state[O_PROJ_KEY.format(i=i)] = state[O_PROJ_KEY.format(i=i)] / O_PROJ_SCALE
    return state


def ssa_from_llama(
    path: str | Path,
    *,
    block_size: int = 16,
    block_count: int = 16,
    seq_length: int | None = None,
    drop_rope_scaling: bool = False,
) -> SSAForCausalLM:
    """Load a Llama-architecture HF directory as an ``SSAForCausalLM`` (see the module docstring)."""
    cfg = read_llama_config(path)
    config = ssa_config_from_llama(
        cfg,
        block_size=block_size,
        block_count=block_count,
        seq_length=seq_length,
        drop_rope_scaling=drop_rope_scaling,
        source=str(Path(path) / "config.json"),
    )
    state = ssa_state_from_llama(read_safetensors_dir(path), config)
    model = SSAForCausalLM(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise LlamaImportError(
            f"{path}: tensors do not match a Llama model of this config: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.eval()
