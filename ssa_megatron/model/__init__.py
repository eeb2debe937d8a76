"""The SSA model: its config, the attention module and spec, the alignment loss, the mode draw.

``config`` (``ModelConfig``, the one model config; megatron's and Hugging Face's are derived from it)
-> ``megatron_config`` (``SSATransformerConfig``) -> ``layer_spec`` (a TransformerLayer spec whose
self-attention is ``attention.SSASelfAttention``) -> ``gpt`` (megatron's GPTModel built from that
spec). ``alignment`` holds the two-way alignment loss and its aux-loss plumbing; ``mode`` decides what
each forward runs (the per-micro-batch draw of the branch that drives the residual stream, eval-time
modes, scoped overrides).
"""
