"""The fused two-way alignment kernel (kernels/alignment) against its PyTorch reference.

CPU runs the Triton kernel under TRITON_INTERPRET; the reference itself is checked against the
paper's formula written by hand in tests/test_model_alignment.py. Differences straddle SmoothL1's
|d| = 1 knee, sizes are not multiples of the kernel's block, and outputs are poisoned so that an
unwritten gradient element fails.
"""

from __future__ import annotations

import pytest
import torch

from kernels.alignment import two_way_alignment_sum
from kernels.ssa._alloc import poisoned_outputs
from tests.test_kernels_triton import TOL, rel


def _branches(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    full = torch.randn(shape, generator=gen, device=device)
    # Spread 0.1 .. 3 so that |full - sparse| falls on both sides of 1.
    spread = torch.rand(shape, generator=gen, device=device) * 2.9 + 0.1
    sparse = full + spread * torch.randn(shape, generator=gen, device=device)
    return full.to(dtype), sparse.to(dtype)


def _value_and_grads(backend: str, full: torch.Tensor, sparse: torch.Tensor, kind: str) -> list[torch.Tensor]:
    f, s = (x.detach().clone().requires_grad_(True) for x in (full, sparse))
    value = two_way_alignment_sum(f, s, kind, backend=backend)
    (value * 0.37).backward()
    return [value, f.grad, s.grad]


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 37, 3, 16), (2, 1500, 4, 8)], ids=["small", "over-a-block"])
def test_fused_matches_reference(kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    full, sparse = _branches(shape, dtype, seed=sum(shape))
    with poisoned_outputs():
        got = _value_and_grads("triton", full, sparse, kind)
    want = _value_and_grads("naive", full, sparse, kind)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, a, b in zip(["value", "d_full", "d_sparse"], got, want):
        # Values sum in a different order; each gradient element is the same fp32 formula.
        err = rel(a, b)
        assert err < (1e-5 if name == "value" else TOL[dtype]), f"{kind} {name}: relative error {err:.2e}"


def test_gradients_are_opposite_and_clamped() -> None:
    full, sparse = _branches((4, 999), torch.float32, seed=5)
    _, d_full, d_sparse = _value_and_grads("triton", full, sparse, "smooth_l1")
    torch.testing.assert_close(d_sparse, -d_full)
    torch.testing.assert_close(d_full, 0.37 * (full - sparse).clamp(-1, 1))


def test_bad_arguments_name_the_fix() -> None:
    full, sparse = _branches((2, 8), torch.float32, seed=1)
    with pytest.raises(ValueError, match="alignment_loss='l1' is not one of smooth_l1, mse"):
        two_way_alignment_sum(full, sparse, "l1")
    with pytest.raises(ValueError, match=r"one shape; got full \(2, 8\), sparse \(2, 7\)"):
        two_way_alignment_sum(full, sparse[:, :7])


@pytest.mark.gpu
def test_gpu_1b_layer_output_matches_reference() -> None:
    full, sparse = _branches((1, 8192, 32, 64), torch.bfloat16, seed=8, device="cuda")
    got = _value_and_grads("auto", full, sparse, "smooth_l1")
    want = _value_and_grads("naive", full, sparse, "smooth_l1")
    for name, a, b in zip(["value", "d_full", "d_sparse"], got, want):
        assert rel(a, b) < (1e-5 if name == "value" else TOL[torch.bfloat16]), name
