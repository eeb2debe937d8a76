"""SSATransformerConfig: megatron's TransformerConfig plus the SSA fields, validated at construction.

Built from a ``ModelConfig`` by ``ssa_megatron.model.config.transformer_config``; the SSA fields are
checked by the same function as the ``model:`` section (``check_ssa_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer import TransformerConfig

from ssa_megatron.model.config import ModelConfig, check_ssa_fields


@dataclass
class SSATransformerConfig(TransformerConfig):
    """TransformerConfig + SSA (see docs/method.md).

    ``attention_mode``: ``ssa`` trains both branches with a per-micro-batch mode draw and the alignment
    loss; ``full`` and ``sparse`` are the paper's single-branch baselines (no alignment loss).
    ``inference_mode``/``inference_block_count`` apply whenever the model is in eval mode, whatever it
    was trained with (the paper evaluates every model under sparse and full inference); a caller picks
    another mode for a scope with ``ssa_megatron.model.mode.override_mode``, never by editing this config.
    ``document_causal``: restrict both branches to the current document (boundaries where
    ``position_ids == 0``); the paper's recipe attends across documents (False).
    """

    # The SSA defaults are the model section's, defined once in ModelConfig.
    attention_mode: str = ModelConfig.attention_mode
    block_size: int = ModelConfig.block_size
    block_count: int = ModelConfig.block_count
    p_full: float = ModelConfig.p_full
    alignment_weight: float = ModelConfig.alignment_weight
    alignment_loss: str = ModelConfig.alignment_loss
    inference_mode: str = ModelConfig.inference_mode
    inference_block_count: int | None = ModelConfig.inference_block_count
    document_causal: bool = ModelConfig.document_causal
    mode_seed: int = 0
    rotary_base: float = ModelConfig.rotary_base
    kernel_backend: str = ModelConfig.kernel_backend
    fused_ops: str = ModelConfig.fused_ops

    def __post_init__(self) -> None:
        groups = self.num_query_groups or self.num_attention_heads
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}; choose a TP size that divides the number of query heads"
            )
        if groups % tp:
            raise ValueError(
                f"num_query_groups (KV heads)={groups} is not divisible by tensor_model_parallel_size={tp}: "
                "SSA selects blocks per KV head group, so each TP rank must own whole groups; lower TP"
            )
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={groups}"
            )
        super().__post_init__()
        if self.recompute_granularity == "selective" and "core_attn" in (self.recompute_modules or []):
            # SSASelfAttention runs its core attention itself (both branches, the alignment hook and
            # the metrics), so megatron's core-attention checkpointing would silently not apply.
            raise ValueError(
                "selective recompute of the SSA core attention is not supported; recompute whole layers "
                "(recompute_granularity='full', train.recompute=full) or none"
            )
        check_ssa_fields(self)

    @property
    def effective_inference_block_count(self) -> int:
        """The block budget of eval-mode sparse attention."""
        return self.inference_block_count if self.inference_block_count is not None else self.block_count


def check_sequence_length(config: SSATransformerConfig, seq_length: int) -> None:
    """Fail early for sequence lengths the context-parallel split cannot handle."""
    chunks = 2 * config.context_parallel_size
    if config.context_parallel_size > 1 and seq_length % chunks:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2*context_parallel_size = {chunks} "
            "(megatron's load-balanced split); pad the sequence or change CP"
        )


def llama_block_config(**fields: object) -> SSATransformerConfig:
    """An ``SSATransformerConfig`` with the paper's Llama-style blocks (RMSNorm, SwiGLU, no biases, no
    dropout); ``fields`` give the shape, parallel layout and SSA settings. The one place the block
    architecture is fixed, so the trained model and the conversion tools cannot drift apart."""
    import torch.nn.functional as F

    return SSATransformerConfig(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        **fields,
    )
