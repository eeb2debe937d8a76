"""SSA (Sparse Sparse Attention) pretraining on Megatron-core."""

__version__ = "0.1.0"
