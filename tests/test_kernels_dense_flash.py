"""The flash dense-attention path (kernels/ssa/dense_attention_flash.py) against the naive reference.

On CPU the autograd Function runs PyTorch's ``_for_cpu`` flash ops, which share the CUDA ops'
semantics, so these tests cover the layout transposes, GQA expansion and group-summed dK/dV, scale,
dtypes and the LSE-gradient refusal that the GPU runs; the @pytest.mark.gpu case checks the CUDA
ops themselves at the 1B layout, reached through ``kernels.ssa.dense_attention``.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ssa
from kernels.ssa import naive
from kernels.ssa.dense_attention_flash import flash_applies, flash_dense_attention
from tests.test_kernels_triton import TOL, rel


def inputs(
    b: int, t: int, h: int, g: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(b, t, h * g, d), (b, t, h, d), (b, t, h, d), (b, t, h * g, d)]
    return tuple(torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes)  # q, k, v, do


def run(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> list[torch.Tensor]:
    """``[o, lse, dq, dk, dv]`` of ``fn`` under the loss ``sum(o * do)``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = fn(*leaves)
    (o.float() * do.float()).sum().backward()
    return [o, lse, *(x.grad for x in leaves)]


def compare(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], got, want):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        err = rel(a, b)
        assert err < tol, f"{name}: relative error {err:.2e}"


CASES = [
    # (b, t, h, g, d, scale)
    (2, 37, 2, 1, 16, None),
    (1, 53, 2, 3, 64, 0.3),
    (1, 29, 1, 16, 32, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "t", "h", "g", "d", "scale"), CASES)
def test_matches_naive(
    b: int, t: int, h: int, g: int, d: int, scale: float | None, dtype: torch.dtype
) -> None:
    q, k, v, do = inputs(b, t, h, g, d, dtype, seed=t * 31 + g)
    s = d**-0.5 if scale is None else scale
    got = run(lambda *x: flash_dense_attention(*x, scale=s), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, scale=s), q, k, v, do)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert all(gr.dtype == dtype for gr in got[2:])
    compare(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t_q", "q_offset", "t_k"), [(16, 21, 37), (9, 40, 49), (1, 30, 44), (37, 0, 37)])
def test_query_offset_matches_naive(t_q: int, q_offset: int, t_k: int, dtype: torch.dtype) -> None:
    # A context-parallel chunk: queries at [q_offset, q_offset + t_q) against all keys; keys after the
    # chunk (t_k > q_offset + t_q in the first and third cases) must get exactly zero gradient.
    q, k, v, do = inputs(2, t_k, 2, 3, 32, dtype, seed=t_q + q_offset)
    q, do = q[:, :t_q].contiguous(), do[:, :t_q].contiguous()
    got = run(lambda *x: flash_dense_attention(*x, scale=0.2, q_offset=q_offset), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, scale=0.2, q_offset=q_offset), q, k, v, do)
    compare(got, want, TOL[dtype])
    end = q_offset + t_q
    assert torch.equal(got[3][:, end:], torch.zeros_like(got[3][:, end:]))
    assert got[3][:, :end].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("t_q", "q_offset", "t_k", "bounds"),
    [
        (50, 0, 50, [0, 13, 13, 40, 50]),  # an empty document too
        (20, 25, 60, [0, 10, 30, 31, 44, 60]),  # a chunk that starts inside a document, keys beyond it
        (7, 33, 50, [0, 30, 50]),  # one document: the single-segment kernel at an offset into it
    ],
)
def test_documents_match_naive(
    t_q: int, q_offset: int, t_k: int, bounds: list[int], dtype: torch.dtype
) -> None:
    q, k, v, do = inputs(1, t_k, 2, 2, 16, dtype, seed=t_q + len(bounds))
    q, do = q[:, q_offset : q_offset + t_q].contiguous(), do[:, q_offset : q_offset + t_q].contiguous()
    kw = {"scale": 0.3, "q_offset": q_offset, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}
    got = run(lambda *x: flash_dense_attention(*x, **kw), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, **kw), q, k, v, do)
    compare(got, want, TOL[dtype])


def test_strided_inputs_from_a_fused_projection() -> None:
    # Megatron hands attention views of one fused QKV tensor: no stride is the contiguous one.
    b, t, h, g, d = 1, 41, 2, 3, 32
    fused = torch.randn(b, t, h, g + 2, d, generator=torch.Generator().manual_seed(3))
    q = fused[:, :, :, :g].reshape(b, t, h * g, d)
    k, v = fused[:, :, :, g], fused[:, :, :, g + 1]
    assert not k.is_contiguous() and not v.is_contiguous()
    do = torch.randn(b, t, h * g, d, generator=torch.Generator().manual_seed(4)).transpose(0, 1)
    do = do.contiguous().transpose(0, 1)  # a non-contiguous upstream gradient too
    got = run(lambda *x: flash_dense_attention(*x, scale=0.2), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, scale=0.2), q, k, v, do)
    compare(got, want, TOL[torch.float32])


def test_gradient_through_the_lse_raises_and_names_the_fix() -> None:
    q, k, v, do = inputs(1, 23, 1, 2, 16, torch.float32, seed=9)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    o, lse = flash_dense_attention(*leaves, scale=0.25)
    with pytest.raises(
        RuntimeError, match=r"LSE without gradient.*backend='naive'.*fp32 inputs"
    ):
        ((o * do).sum() + lse.sum()).backward()
    _, lse = flash_dense_attention(*leaves, scale=0.25)
    with pytest.raises(RuntimeError, match="LSE without gradient"):
        lse.square().sum().backward()


def test_detached_lse_statistic_leaves_the_gradients_alone() -> None:
    # The model's use: o into the loss, exp(lse_sparse - lse_full) from the detached LSE.
    q, k, v, do = inputs(1, 31, 2, 2, 16, torch.float32, seed=12)

    def with_statistic(fn):
        def call(*x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            o, lse = fn(*x)
            return o + 0 * torch.exp(-lse.detach()).unsqueeze(-1), lse

        return call

    got = run(with_statistic(lambda *x: flash_dense_attention(*x, scale=0.25)), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, scale=0.25), q, k, v, do)
    compare(got, want, TOL[torch.float32])


def test_bad_geometry_names_the_fix() -> None:
    q, k, v, _ = inputs(1, 20, 1, 2, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"q_offset 6.*kernels.ssa.dense_attention"):
        flash_dense_attention(q[:, 5:], k, v, scale=0.25, q_offset=6)
    with pytest.raises(ValueError, match="one dtype"):
        flash_dense_attention(q, k.bfloat16(), v, scale=0.25)


def test_routing_keeps_cpu_off_the_cuda_flash_path() -> None:
    q, k, v, _ = inputs(1, 20, 1, 2, 16, torch.bfloat16, seed=1)
    assert not flash_applies(q, k, v)


# ------------------------------------------------------------------------------------------------
# the CUDA ops at the 1B layout (GPU machine: `pytest -m gpu`)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_1b_layout_against_fp32_reference() -> None:
    # Whole sequences route to cuDNN (test_kernels_dense_cudnn.py); the flash path is called directly.
    q, k, v, do = inputs(1, 4096, 2, 16, 64, torch.bfloat16, seed=17, device="cuda")
    assert flash_applies(q, k, v)
    got = run(lambda *x: flash_dense_attention(*x, scale=64**-0.5), q, k, v, do)
    want = run(lambda *x: naive.dense_attention(*x, scale=64**-0.5), q.float(), k.float(), v.float(), do)
    compare(got, want, TOL[torch.bfloat16])
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    o, lse = flash_dense_attention(*leaves, scale=64**-0.5)
    with pytest.raises(RuntimeError, match="LSE without gradient"):
        ((o.float() * do.float()).sum() + lse.sum()).backward()


@pytest.mark.gpu
@pytest.mark.parametrize(("q_lo", "q_hi"), [(1024, 2048), (3072, 4096), (2000, 2001)])
def test_gpu_query_offset_against_fp32_reference(q_lo: int, q_hi: int) -> None:
    # Context-parallel chunks: the flash kernel's causal mask must align to the last key.
    q, k, v, do = inputs(1, 4096, 2, 16, 64, torch.bfloat16, seed=q_lo, device="cuda")
    q, do = q[:, q_lo:q_hi].contiguous(), do[:, q_lo:q_hi].contiguous()
    assert flash_applies(q, k, v)
    got = run(lambda *x: ssa.dense_attention(*x, q_offset=q_lo), q, k, v, do)
    reference = lambda *x: naive.dense_attention(*x, q_offset=q_lo, scale=64**-0.5)
    want = run(reference, q.float(), k.float(), v.float(), do)
    compare(got, want, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize(("q_lo", "q_hi"), [(0, 4096), (1500, 3500)])
def test_gpu_documents_against_fp32_reference(q_lo: int, q_hi: int) -> None:
    # The varlen kernel: documents (one empty) seen from a whole row and from a context-parallel chunk.
    q, k, v, do = inputs(1, 4096, 2, 16, 64, torch.bfloat16, seed=q_hi, device="cuda")
    q, do = q[:, q_lo:q_hi].contiguous(), do[:, q_lo:q_hi].contiguous()
    kw = {"q_offset": q_lo, "cu_seqlens": torch.tensor([0, 700, 700, 2222, 2223, 4096], device="cuda").int()}
    got = run(lambda *x: ssa.dense_attention(*x, **kw), q, k, v, do)
    reference = lambda *x: naive.dense_attention(*x, **kw, scale=64**-0.5)
    want = run(reference, q.float(), k.float(), v.float(), do)
    compare(got, want, TOL[torch.bfloat16])
