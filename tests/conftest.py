"""Test-wide setup: GPU tests skip without CUDA; Triton kernels run in the interpreter on CPU."""

import os
from collections.abc import Iterator

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


# Variables a launcher sets: code under test writes them in-process (the data loaders tell
# mosaicml-streaming who this process is through RANK/WORLD_SIZE/LOCAL_*), and a later test's
# subprocess must not inherit them, or a lone pretrain_ssa.py believes torchrun started it.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_launch_environment() -> Iterator[None]:
    before = {name: os.environ.get(name) for name in _LAUNCH_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def single_rank() -> Iterator[None]:
    """A one-rank gloo process group for the module's tests (megatron's parallel state included)."""
    from ssa_megatron.parallel.state import destroy_parallel, initialize_parallel
    from tests.distributed import free_port

    # Restored afterwards: later tests start subprocesses that must not inherit a rank and a port
    # that this process group holds.
    with pytest.MonkeyPatch.context() as env:
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("WORLD_SIZE", "1")):  # fmt: skip
            env.setenv(key, value)
        initialize_parallel(seed=7, backend="gloo")
        yield
        destroy_parallel()
        torch.distributed.destroy_process_group()
