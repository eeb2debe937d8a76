"""Parallel plumbing: megatron's process groups (``state``), the context-parallel split of the
sequence (``context``), and the patches that let megatron-core run on CPU with gloo (``cpu_compat``)."""
