"""Sparse decode (kernels.ssa.sparse_decode / decode_block_keys) against the naive reference and the
training ops it must agree with.

On CPU the Triton kernels run in the interpreter (tests/conftest.py) with small shapes; the
@pytest.mark.gpu cases repeat the checks at the 1B layout (32 query heads, 2 KV heads, head_dim 64,
blocks of 16) on the GPU. Every input is fresh random data, and every batch mixes context lengths
(a partial own block, a block that has just filled, a context shorter than one block).
"""

from __future__ import annotations

import pytest
import torch

from kernels import ssa
from kernels.ssa._alloc import poisoned_outputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values (an unwritten, poisoned element?)"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def make_cache(
    lens: list[int], h: int, g: int, d: int, bs: int, dtype: torch.dtype, seed: int, spare: int = 5
) -> tuple[torch.Tensor, ...]:
    """q [B, HQ, D]; k, v as strided views of a larger cache; block keys of each sequence's complete
    blocks (rows past them hold garbage, which the ops must never read); seq_lens."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    b, t = len(lens), max(lens)
    cap = t + spare
    q = torch.randn(b, h * g, d, generator=gen, device=DEV).to(dtype)
    # [B, H, cap, D] storage, as caches keep it, viewed as [B, T, H, D]: the ops take strided views.
    k = torch.randn(b, h, cap, d, generator=gen, device=DEV).to(dtype).transpose(1, 2)[:, :t]
    v = torch.randn(b, h, cap, d, generator=gen, device=DEV).to(dtype).transpose(1, 2)[:, :t]
    kblock = torch.full((b, -(-cap // bs), h, d), 1e4, device=DEV, dtype=dtype)
    for i, n in enumerate(lens):
        full = (n // bs) * bs
        if full:
            kblock[i, : n // bs] = ssa.block_keys(k[i : i + 1, :full].contiguous(), bs, backend="naive")[0]
    return q, k, v, kblock, torch.tensor(lens, dtype=torch.int32, device=DEV)


def check_against_naive(
    lens: list[int], h: int, g: int, d: int, bs: int, bc: int, dtype: torch.dtype, seed: int
) -> None:
    q, k, v, kblock, seq_lens = make_cache(lens, h, g, d, bs, dtype, seed)
    with poisoned_outputs():
        o, lse, idx = ssa.sparse_decode(q, k, v, kblock, seq_lens, bs, bc, backend="triton")
    o_ref, lse_ref, idx_ref = ssa.sparse_decode(q, k, v, kblock, seq_lens, bs, bc, backend="naive")
    assert idx.dtype == torch.int32 and idx.shape == (len(lens), h, bc)
    assert torch.equal(idx, idx_ref), (idx != idx_ref).nonzero()[:5]
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel(o, o_ref) < TOL[dtype]
    assert torch.allclose(lse, lse_ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    ("lens", "h", "g", "bs", "bc", "dtype"),
    [
        ([37, 64, 5, 100], 2, 3, 16, 4, torch.float32),  # partial, just filled, one partial block, long
        ([130, 48, 17], 1, 16, 16, 3, torch.float32),  # a 16-head group
        ([90, 33], 2, 2, 8, 20, torch.float32),  # more slots than candidate blocks; 8-token blocks
        ([71, 96], 2, 4, 16, 1, torch.float32),  # own block only
        ([77, 120, 3], 2, 4, 16, 5, torch.bfloat16),
    ],
)
def test_sparse_decode_matches_naive(
    lens: list[int], h: int, g: int, bs: int, bc: int, dtype: torch.dtype
) -> None:
    check_against_naive(lens, h, g, 64, bs, bc, dtype, seed=sum(lens) + g)


def test_sparse_decode_across_many_tiles() -> None:
    # ~330 complete blocks: three tiles of the selection's split LSE and scores.
    check_against_naive([5300, 2000], 1, 2, 32, 16, 16, torch.float32, seed=3)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_decode_equals_the_training_ops_on_the_last_query(backend: str) -> None:
    # The decode step must select and attend exactly as sparse_attention does for the same query.
    lens, h, g, bs, bc = [61, 80], 2, 3, 16, 3
    q, k, v, kblock, seq_lens = make_cache(lens, h, g, 32, bs, torch.float32, seed=11)
    o, lse, idx = ssa.sparse_decode(q, k, v, kblock, seq_lens, bs, bc, backend=backend)
    for i, n in enumerate(lens):
        qi = torch.randn(1, n, h * g, 32, device=DEV)
        qi[0, -1] = q[i]
        ki, vi = k[i : i + 1, :n].contiguous(), v[i : i + 1, :n].contiguous()
        o_full, lse_full, idx_full = ssa.sparse_attention(qi, ki, vi, bs, bc, backend="naive")
        assert torch.equal(idx[i], idx_full[0, -1])
        assert rel(o[i], o_full[0, -1]) < 1e-4
        assert torch.allclose(lse[i], lse_full[0, -1], atol=1e-4)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_decode_block_keys_tracks_block_keys_token_by_token(backend: str) -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    b, t, h, d, bs = 3, 53, 2, 16, 8
    k = torch.randn(b, t, h, d, generator=gen, device=DEV)
    kblock = torch.full((b, -(-t // bs), h, d), float("nan"), device=DEV)
    lag = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEV)  # sequences at different lengths
    for step in range(1, t + 8):
        ssa.decode_block_keys(k, kblock, (step - lag).clamp(0, t), bs, backend=backend)
    want = ssa.block_keys(k, bs, backend="naive")
    full = t // bs
    assert torch.allclose(kblock[:, :full], want[:, :full], atol=1e-6)
    assert torch.isnan(kblock[:, full:]).all(), "a partial block must get no key"


def test_bad_inputs_are_refused_with_the_value() -> None:
    q, k, v, kblock, seq_lens = make_cache([40, 20], 2, 2, 16, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"one query per sequence"):
        ssa.sparse_decode(q[:, None], k, v, kblock, seq_lens, 16, 4)
    with pytest.raises(ValueError, match=r"kblock .* must be \[2, >= 3, 2, 16\]"):
        ssa.sparse_decode(q, k, v, kblock[:, :2], seq_lens, 16, 4)
    with pytest.raises(ValueError, match=r"seq_lens must be"):
        ssa.sparse_decode(q, k, v, kblock, seq_lens.float(), 16, 4)
    with pytest.raises(ValueError, match=r"block_count"):
        ssa.sparse_decode(q, k, v, kblock, seq_lens, 16, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sparse_decode_1b_layout_on_gpu(dtype: torch.dtype) -> None:
    # The 1B layout at mixed context lengths up to 20k tokens (1250 blocks, ten selection tiles).
    check_against_naive([20000, 4097, 16, 9000], 2, 16, 64, 16, 16, dtype, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_decode_1b_layout_on_gpu(dtype: torch.dtype) -> None:
    q, k, v, _, seq_lens = make_cache([20000, 4097, 16, 9000], 2, 16, 64, 16, dtype, seed=2)
    with poisoned_outputs():
        o, lse = ssa.dense_decode(q, k, v, seq_lens)
    o_ref, lse_ref = ssa.dense_decode(q, k, v, seq_lens, backend="naive")
    assert rel(o, o_ref) < TOL[dtype]
    assert torch.allclose(lse, lse_ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.gpu
def test_sparse_decode_captures_in_a_cuda_graph() -> None:
    # No host reads inside the step: it must replay from a CUDA graph with the same result.
    q, k, v, kblock, seq_lens = make_cache([3000, 1500], 2, 16, 64, 16, torch.bfloat16, seed=4)
    eager = ssa.sparse_decode(q, k, v, kblock, seq_lens, 16, 16)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ssa.sparse_decode(q, k, v, kblock, seq_lens, 16, 16)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = ssa.sparse_decode(q, k, v, kblock, seq_lens, 16, 16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[2], eager[2]) and torch.equal(captured[0], eager[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode_matches_naive(dtype: torch.dtype) -> None:
    # Mixed lengths: splits past a short sequence's end are empty and must drop out of the merge.
    q, k, v, _, seq_lens = make_cache([300, 7, 129], 2, 3, 32, 16, dtype, seed=9)
    with poisoned_outputs():
        o, lse = ssa.dense_decode(q, k, v, seq_lens, backend="triton")
    o_ref, lse_ref = ssa.dense_decode(q, k, v, seq_lens, backend="naive")
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel(o, o_ref) < TOL[dtype]
    assert torch.allclose(lse, lse_ref, atol=TOL[dtype], rtol=TOL[dtype])
    # The same as dense_attention for the last query over the whole sequence.
    qi = torch.randn(1, 300, 6, 32, device=DEV).to(dtype)
    qi[0, -1] = q[0]
    o_full, _ = ssa.dense_attention(qi, k[:1, :300].contiguous(), v[:1, :300].contiguous(), backend="naive")
    assert rel(o[0], o_full[0, -1]) < TOL[dtype]
