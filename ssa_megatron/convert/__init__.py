"""Converters between training checkpoints, the shipped HF model (``ssa_megatron.hf``) and Llama checkpoints.

Nothing here is copied into an exported model directory: these modules may import training, parallel
state and data code (lazily where megatron is involved), which the shipped model must never do.
"""
