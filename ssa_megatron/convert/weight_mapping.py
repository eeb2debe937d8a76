"""The one place that knows how Megatron SSA parameter names and layouts map to the HF SSA model's.

Megatron names are those of the single-rank ``GPTModel`` built by ``ssa_megatron.model.build_model``
(``ssa_megatron.parallel.gather_full_tensors`` and dist checkpoints use them, layers numbered
globally). Layout differences:

- ``linear_qkv`` is interleaved per query group: for each of the ``H`` KV heads, its ``G`` query heads,
  then its key head, then its value head (``head_dim`` rows each). HF keeps ``q_proj``/``k_proj``/
  ``v_proj`` separate, query head ``hq`` belonging to KV head ``hq // G`` in both.
- ``mlp.linear_fc1`` is ``[gate; up]`` (SwiGLU: ``silu(first half) * second half``).
- With tied embeddings there is no ``output_layer.weight``; HF ties ``lm_head`` to ``embed_tokens``.

Pure tensor code, no megatron import, so both conversion directions and the tests share it.
"""

from __future__ import annotations

from typing import Any

import torch

from ssa_megatron.hf.configuration_ssa import SSAConfig

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."
# Per-layer names that map one to one (megatron suffix -> HF suffix).
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_gate.weight": "self_attn.head_gate.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}


class MappingError(ValueError):
    """Parameter names or shapes do not match the SSA architecture; the message names them."""


def _expected_megatron_keys(config: SSAConfig) -> set[str]:
    keys = set(_GLOBAL)
    for i in range(config.num_hidden_layers):
        keys |= {_LAYER.format(i=i) + s for s in (*_DIRECT, _QKV, _FC1)}
    if not config.tie_word_embeddings:
        keys.add("output_layer.weight")
    return keys


def _few(names: list[str]) -> str:
    return str(names[:8]) + ("..." if len(names) > 8 else "")


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise MappingError(
            f"{what} does not match the SSA architecture: missing {_few(missing)}, unexpected {_few(extra)}"
        )


def megatron_to_hf_state(
    full: dict[str, torch.Tensor], config: SSAConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Single-rank megatron parameters -> ``SSAForCausalLM`` state dict (``lm_head`` present even if tied)."""
    params = {k: v for k, v in full.items() if not k.endswith("._extra_state")}
    _check_keys(set(params), _expected_megatron_keys(config), source)
    d, hq, h = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    g = hq // h
    out = {hf: params[mg] for mg, hf in _GLOBAL.items()}
    for i in range(config.num_hidden_layers):
        mg, hf = _LAYER.format(i=i), _HF_LAYER.format(i=i)
        for m_suffix, h_suffix in _DIRECT.items():
            out[hf + h_suffix] = params[mg + m_suffix]
        qkv = params[mg + _QKV]
        if qkv.shape[0] != h * (g + 2) * d:
            raise MappingError(
                f"{source}: {mg + _QKV} has {qkv.shape[0]} rows, expected {h * (g + 2) * d} for {hq} query "
                f"heads, "
                f"{h} KV heads of dim {d}"
            )
        grouped = qkv.view(h, g + 2, d, -1)
        out[hf + "self_attn.q_proj.weight"] = grouped[:, :g].reshape(hq * d, -1)
        out[hf + "self_attn.k_proj.weight"] = grouped[:, g].reshape(h * d, -1)
        out[hf + "self_attn.v_proj.weight"] = grouped[:, g + 1].reshape(h * d, -1)
        gate, up = params[mg + _FC1].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
    out["lm_head.weight"] = params.get("output_layer.weight", params["embedding.word_embeddings.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_megatron_state(
    state: dict[str, torch.Tensor], config: SSAConfig, source: str = "HF model"
) -> dict[str, torch.Tensor]:
    """``SSAForCausalLM`` state dict -> single-rank megatron parameters (inverse of megatron_to_hf_state)."""
    d, hq, h = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    g = hq // h
    expected = set(_GLOBAL.values()) | {"lm_head.weight"}
    for i in range(config.num_hidden_layers):
        hf = _HF_LAYER.format(i=i)
        expected |= {hf + s for s in _DIRECT.values()}
        expected |= {hf + f"self_attn.{p}_proj.weight" for p in "qkv"} | {
            hf + "mlp.gate_proj.weight",
            hf + "mlp.up_proj.weight",
        }
    found = set(state)
    if config.tie_word_embeddings:
        found.add("lm_head.weight")  # tied checkpoints may omit it
    _check_keys(found, expected, source)
    out = {mg: state[hf] for mg, hf in _GLOBAL.items()}
    for i in range(config.num_hidden_layers):
        mg, hf = _LAYER.format(i=i), _HF_LAYER.format(i=i)
        for m_suffix, h_suffix in _DIRECT.items():
            out[mg + m_suffix] = state[hf + h_suffix]
        q = state[hf + "self_attn.q_proj.weight"].view(h, g, d, -1)
        k = state[hf + "self_attn.k_proj.weight"].view(h, 1, d, -1)
        v = state[hf + "self_attn.v_proj.weight"].view(h, 1, d, -1)
        out[mg + _QKV] = torch.cat([q, k, v], dim=1).reshape(h * (g + 2) * d, -1)
        out[mg + _FC1] = torch.cat(
            [state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]], dim=0
        )
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def ssa_config_from_training(model: dict[str, Any], *, vocab_size: int, seq_length: int) -> SSAConfig:
    """``SSAConfig`` of a model trained with the ``model:`` section ``model`` (training config schema).

    Inference defaults follow the training config: ``inference_mode`` with ``inference_block_count`` (or
    ``block_count``); see ``ssa_megatron.model.config.hf_config_kwargs``.
    """
    from ssa_megatron.model.config import hf_config_kwargs, model_config_from_dict

    kwargs = hf_config_kwargs(model_config_from_dict(model), vocab_size=vocab_size, seq_length=seq_length)
    return SSAConfig(**kwargs)


def training_model_section(config: SSAConfig) -> dict[str, Any]:
    """The training config's ``model:`` section for an ``SSAConfig`` (inverse of ssa_config_from_training)."""
    import dataclasses

    from ssa_megatron.model.config import model_config_from_hf

    return dataclasses.asdict(model_config_from_hf(config))
