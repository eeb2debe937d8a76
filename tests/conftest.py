"""Test-wide setup: GPU tests skip without CUDA; Triton kernels run in the interpreter on CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported so @triton.jit kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a CUDA machine with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
