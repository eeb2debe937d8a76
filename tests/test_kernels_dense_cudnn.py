"""The cuDNN dense-attention path (kernels/ssa/dense_attention_cudnn.py).

The op exists only on CUDA, so the kernel itself is checked by the @pytest.mark.gpu cases against
the fp32 naive reference (outputs, LSE, gradients); the CPU cases check the routing predicate and the
refusal, which decide whether a call may reach the op at all.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ssa
from kernels.ssa import naive
from kernels.ssa.dense_attention_cudnn import cudnn_applies, cudnn_dense_attention
from tests.test_kernels_dense_flash import compare, inputs, run
from tests.test_kernels_triton import TOL


def test_cpu_tensors_never_reach_the_cuda_op() -> None:
    q, k, v, _ = inputs(1, 24, 2, 4, 64, torch.bfloat16, seed=2)
    assert not cudnn_applies(q, k, v, 0, None)
    with pytest.raises(ValueError, match=r"kernels\.ssa\.dense_attention, which routes every geometry"):
        cudnn_dense_attention(q, k, v, scale=0.125)


def test_offsets_and_documents_are_not_its_geometry() -> None:
    # Decided before any device check: cuDNN's causal mask is aligned to the first key.
    q, k, v, _ = inputs(1, 24, 2, 4, 64, torch.bfloat16, seed=3)
    assert not cudnn_applies(q[:, 8:], k, v, 8, None)
    assert not cudnn_applies(q, k, v, 0, torch.tensor([0, 10, 24], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# the CUDA op (GPU machine: `pytest -m gpu`)
# ------------------------------------------------------------------------------------------------
def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, scale: float) -> list:
    return run(lambda *x: naive.dense_attention(*x, scale=scale), q.float(), k.float(), v.float(), do)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "t", "h", "g", "d", "dtype"),
    [
        (1, 4096, 2, 16, 64, torch.bfloat16),
        (2, 1000, 2, 4, 128, torch.float16),
        (1, 777, 3, 1, 64, torch.bfloat16),
    ],
)
def test_gpu_whole_sequences_route_here_and_match_fp32_reference(
    b: int, t: int, h: int, g: int, d: int, dtype: torch.dtype
) -> None:
    q, k, v, do = inputs(b, t, h, g, d, dtype, seed=t + g, device="cuda")
    assert cudnn_applies(q, k, v, 0, None)
    got = run(lambda *x: ssa.dense_attention(*x), q, k, v, do)  # backend "auto": the routing under test
    compare(got, _reference(q, k, v, do, d**-0.5), TOL[dtype])


@pytest.mark.gpu
def test_gpu_views_of_a_fused_projection_and_a_strided_gradient() -> None:
    b, t, h, g, d = 1, 2048, 2, 16, 64
    gen = torch.Generator(device="cuda").manual_seed(5)
    fused = torch.randn(b, t, h, g + 2, d, device="cuda", generator=gen).bfloat16()
    q = fused[:, :, :, :g].reshape(b, t, h * g, d)
    k, v = fused[:, :, :, g], fused[:, :, :, g + 1]
    do = torch.randn(t, b, h * g, d, device="cuda", generator=gen).bfloat16().transpose(0, 1)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = cudnn_dense_attention(*leaves, scale=0.1)
    o.backward(do)  # the upstream gradient's strides differ from the output's
    want = _reference(q, k, v, do, 0.1)
    compare([o, lse, *(x.grad for x in leaves)], want, TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_gradient_through_the_lse_raises() -> None:
    q, k, v, do = inputs(1, 512, 2, 4, 64, torch.bfloat16, seed=7, device="cuda")
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    o, lse = cudnn_dense_attention(*leaves, scale=0.125)
    with pytest.raises(RuntimeError, match="LSE without gradient"):
        ((o.float() * do.float()).sum() + lse.sum()).backward()
