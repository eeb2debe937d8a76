"""Measurement probes for the kernels (benchmarks only): never imported by training or inference, and not
copied into exported model directories (only ``kernels.ssa`` is shipped)."""
