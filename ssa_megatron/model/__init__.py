"""The SSA model: its megatron config, the attention module and spec, the alignment loss, the mode draw.

``config`` (SSATransformerConfig) -> ``layer_spec`` (a TransformerLayer spec whose self-attention is
``attention.SSASelfAttention``) -> ``gpt`` (megatron's GPTModel built from that spec). ``alignment``
holds the two-way alignment loss and its aux-loss plumbing; ``mode`` the per-micro-batch draw of the
branch that drives the residual stream.
"""
