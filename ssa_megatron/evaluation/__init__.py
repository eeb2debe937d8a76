"""Evaluation of SSA models (HF SSAForCausalLM): perplexity per mode, budget sweep, attention
sparsity/entropy/KL, long-context extrapolation, passkey retrieval, and JSON/Markdown/PNG reports."""
