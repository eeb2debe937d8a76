"""Named SSA model shapes for the HF side (the tiny one backs the tests, the evaluation demo and the docs)."""

from __future__ import annotations

from typing import Any

from ssa_megatron.hf.configuration_ssa import SSAConfig


def tiny_config(**overrides: Any) -> SSAConfig:
    """A 2-layer GQA model (4 query / 2 KV heads, head dim 8, blocks of 4) that runs in ms on CPU."""
    fields: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "block_size": 4,
        "block_count": 3,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return SSAConfig(**fields)
