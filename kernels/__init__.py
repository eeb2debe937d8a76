"""GPU kernels (Triton) with plain-PyTorch references; no megatron imports."""
