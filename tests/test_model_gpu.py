"""GPU (NCCL) versions of the N-rank vs 1-rank equivalence tests: ``pytest -m gpu tests/test_model_gpu.py``.

Same bodies as tests/test_model_equivalence.py, on 2 and 4 GPUs with the Triton kernels
(``kernel_backend="auto"``). Each worker swaps the harness's gloo group for an NCCL one on its own GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import free_port, run_distributed
from tests.test_model_equivalence import _equivalence_body

# Looser than on CPU: Triton may use TF32 for fp32 dots, so layouts differ by more than reduction order.
GPU_TOL = {"rtol": 5e-3, "atol": 5e-4}


def _nccl_body(rank: int, world_size: int, port: int, tp: int, pp: int, cp: int) -> None:
    dist.destroy_process_group()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    _equivalence_body(rank, world_size, tp, pp, cp, "auto", GPU_TOL)


def _run(tp: int, pp: int, cp: int) -> None:
    world = tp * pp * cp
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    run_distributed(_nccl_body, world_size=world, args=(free_port(), tp, pp, cp))


@pytest.mark.gpu
@pytest.mark.parametrize(("tp", "pp", "cp"), [(2, 1, 1), (1, 1, 2), (1, 2, 1)], ids=["tp2", "cp2", "pp2"])
def test_two_gpus_match_single_gpu(tp: int, pp: int, cp: int) -> None:
    _run(tp, pp, cp)


@pytest.mark.gpu
@pytest.mark.parametrize(("tp", "pp", "cp"), [(2, 1, 2), (2, 2, 1)], ids=["tp2xcp2", "tp2xpp2"])
def test_four_gpus_match_single_gpu(tp: int, pp: int, cp: int) -> None:
    _run(tp, pp, cp)
