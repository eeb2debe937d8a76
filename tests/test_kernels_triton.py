"""Triton SSA kernels against the plain-PyTorch reference (kernels/ssa/naive.py).

Without CUDA they run in the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET),
so the interpreted cases are tiny; the @pytest.mark.gpu cases repeat the checks at realistic
sizes on a CUDA GPU. Every output is allocated poisoned (NaN / sentinel), so an element a
kernel never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ssa
from kernels.ssa._alloc import INT_POISON, poisoned_outputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values (an unwritten, poisoned element?)"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def make(b: int, t: int, h: int, g: int, d: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, t, h * g, d, generator=gen, device=DEV).to(dtype)
    k = torch.randn(b, t, h, d, generator=gen, device=DEV).to(dtype)
    v = torch.randn(b, t, h, d, generator=gen, device=DEV).to(dtype)
    return [q, k, v]


def cu(bounds: list[int] | None) -> torch.Tensor | None:
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=DEV)


# ------------------------------------------------------------------------------------------------
# block keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("b", "t", "bs", "bounds", "dtype"),
    [(2, 37, 16, None, torch.float32), (1, 57, 32, [0, 20, 20, 57], torch.bfloat16)],
)
def test_block_keys(b: int, t: int, bs: int, bounds: list[int] | None, dtype: torch.dtype) -> None:
    _, k, _ = make(b, t, 2, 1, 64, dtype, seed=t)
    with poisoned_outputs():
        got = ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="triton")
    want = ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="naive")
    assert got.shape == want.shape and got.dtype == k.dtype
    assert rel(got, want) < TOL[dtype]


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
def check_selection(
    b: int, t: int, h: int, g: int, d: int, bs: int, bc: int, qr: tuple[int, int] | None,
    bounds: list[int] | None, dtype: torch.dtype, seed: int,
) -> None:  # fmt: skip
    q, k, _ = make(b, t, h, g, d, dtype, seed)
    lo, hi = qr or (0, t)
    q = q[:, lo:hi]
    kblock = ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="naive")
    with poisoned_outputs():
        got = ssa.select_blocks(q, kblock, bs, bc, q_offset=lo, cu_seqlens=cu(bounds), backend="triton")
    want = ssa.select_blocks(q, kblock, bs, bc, q_offset=lo, cu_seqlens=cu(bounds), backend="naive")
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want), (got != want).nonzero()[:5]


# The default run keeps the plain case, the one with a query range, documents and bf16, and the
# two edge lists; the others (GQA 16, block 32, a query range alone) are slow.
SELECT_CASES = [
    # (b, t, h, g, bs, bc, query range, documents, dtype)
    (2, 70, 1, 1, 16, 3, None, None, torch.float32),
    pytest.param(1, 90, 2, 3, 16, 4, (20, 90), None, torch.float32, marks=pytest.mark.slow),
    pytest.param(1, 130, 1, 16, 32, 2, None, None, torch.float32, marks=pytest.mark.slow),
    (1, 100, 2, 3, 16, 3, (10, 100), [0, 40, 40, 100], torch.bfloat16),
    (1, 60, 2, 2, 16, 8, None, None, torch.float32),  # more slots than blocks
    (1, 50, 2, 2, 16, 1, None, None, torch.float32),  # own block only
]


@pytest.mark.parametrize(("b", "t", "h", "g", "bs", "bc", "qr", "bounds", "dtype"), SELECT_CASES)
def test_select_blocks_exact(
    b: int, t: int, h: int, g: int, bs: int, bc: int, qr: tuple[int, int] | None,
    bounds: list[int] | None, dtype: torch.dtype,
) -> None:  # fmt: skip
    check_selection(b, t, h, g, 64, bs, bc, qr, bounds, dtype, seed=t + 7 * g + bc)


def test_select_blocks_long_lists() -> None:
    # block_count 100 (a 128-slot list, the 4-warp pass-2 launch), over ~130 candidate blocks.
    check_selection(1, 2100, 1, 2, 16, 16, 100, (2040, 2100), None, torch.float32, seed=5)


def _shaped_keys(k: torch.Tensor, q: torch.Tensor, kind: str, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (and queries) that stress the running top-k across many 32-block tiles."""
    t, d = k.shape[1], k.shape[3]
    if kind in ("all_equal", "few_values"):
        # Quarter-integer entries make every dot product exact in fp32, whatever order a matmul
        # (BLAS on the host, the interpreter's numpy) sums in, so equal blocks really tie.
        q, k = torch.round(q * 4) / 4, torch.round(k * 4) / 4
    if kind == "all_equal":  # every block key, hence every score, ties: the lowest indices win
        return q, k[:, :bs].repeat(1, -(-t // bs), 1, 1)[:, :t].contiguous()
    if kind == "few_values":  # block keys drawn from three blocks: many exact ties
        pos = torch.arange(t, device=k.device)
        return q, k[:, (pos // bs) % 3 * bs + pos % bs].contiguous()
    # Queries lean towards u and the keys' u-component ramps with position: each new tile displaces
    # the whole list ("rising", the most insertions) or none of it ("falling").
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    ramp = torch.arange(t) / t
    ramp = (ramp if kind == "rising" else 1 - ramp).view(1, t, 1, 1).to(k)
    return q + 3 * u.to(q), 0.2 * k + 4 * ramp * u.to(k)


@pytest.mark.parametrize(
    ("kind", "h", "g", "bc", "qr", "bounds", "dtype"),
    [  # by default one random, one all-tied and one trend case; all six with -m slow
        ("random", 1, 3, 16, (1000, 1100), None, torch.float32),
        pytest.param("random", 2, 16, 4, (1030, 1100), [0, 40, 1100], torch.bfloat16, marks=pytest.mark.slow),
        ("all_equal", 2, 3, 4, (1050, 1100), None, torch.float32),
        pytest.param("few_values", 1, 2, 9, (900, 1100), None, torch.float32, marks=pytest.mark.slow),
        pytest.param("rising", 1, 3, 16, (1000, 1100), None, torch.float32, marks=pytest.mark.slow),
        ("falling", 1, 1, 5, (1000, 1100), [0, 100, 1100], torch.float32),
    ],
)
def test_select_blocks_across_many_tiles(
    kind: str, h: int, g: int, bc: int, qr: tuple[int, int], bounds: list[int] | None, dtype: torch.dtype
) -> None:
    # ~65 candidate blocks: the running top-k carries over several tiles, through ties and trends.
    q, k, _ = make(1, 1100, h, g, 32, torch.float32, seed=len(kind) + bc)
    q, k = _shaped_keys(k, q, kind, 16)
    q, k = q[:, qr[0] : qr[1]].to(dtype), k.to(dtype)
    kblock = ssa.block_keys(k, 16, cu_seqlens=cu(bounds), backend="naive")
    kw = {"q_offset": qr[0], "cu_seqlens": cu(bounds)}
    with poisoned_outputs():
        got = ssa.select_blocks(q, kblock, 16, bc, backend="triton", **kw)
    want = ssa.select_blocks(q, kblock, 16, bc, backend="naive", **kw)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    if kind == "all_equal":
        assert torch.equal(got[0, :, :, : bc - 1].unique(), torch.arange(bc - 1, dtype=got.dtype))


def test_select_blocks_ties_go_to_the_lower_index() -> None:
    q, k, _ = make(1, 96, 1, 3, 64, torch.float32, seed=1)
    k[:, 32:48] = k[:, 0:16]  # blocks 0 and 2 identical: equal scores for every query
    kblock = ssa.block_keys(k, 16, backend="naive")
    got = ssa.select_blocks(q, kblock, 16, 2, backend="triton")
    assert torch.equal(got, ssa.select_blocks(q, kblock, 16, 2, backend="naive"))
    assert not (got[:, 48:, :, 0] == 2).any()


# ------------------------------------------------------------------------------------------------
# selected attention (forward, LSE and all gradients, including through the LSE)
# ------------------------------------------------------------------------------------------------
def check_attention(
    b: int, t: int, h: int, g: int, d: int, bs: int, bc: int, qr: tuple[int, int] | None,
    bounds: list[int] | None, dtype: torch.dtype, seed: int, sparse: bool = True, lse_grad: bool = True,
) -> None:  # fmt: skip
    q, k, v = make(b, t, h, g, d, dtype, seed)
    lo, hi = qr or (0, t)
    q = q[:, lo:hi].contiguous()
    kw = {"q_offset": lo, "cu_seqlens": cu(bounds)}
    idx = ssa.sparse_attention(q.float(), k.float(), v.float(), bs, bc, backend="naive", **kw)[2]
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=gen, device=DEV).to(dtype)
    # FlexAttention (the dense path) has no CPU backward; its gradients are checked on the GPU.
    grad = sparse or DEV == "cuda"
    dl = torch.randn(q.shape[:3], generator=gen, device=DEV)
    results = []
    for backend in ("triton", "naive"):
        leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
        with poisoned_outputs():
            if sparse:
                o, lse = ssa.selected_attention(*leaves, idx, bs, backend=backend, **kw)
            else:
                o, lse = ssa.dense_attention(*leaves, backend=backend, **kw)
            if grad:
                loss = (o.float() * do.float()).sum()
                (loss + (lse * dl).sum() if lse_grad else loss).backward()
        results.append([o, lse, *(x.grad for x in leaves if grad)])
    for name, got, want in zip(["o", "lse", "dq", "dk", "dv"], *results):
        assert got.shape == want.shape, name
        err = rel(got, want)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"


# By default the plain case and the one with a query range, documents and bf16; the others (block
# 32 and 64, GQA 16, batch 2) are slow.
ATTN_CASES = [
    # (b, t, h, g, bs, bc, query range, documents, dtype)
    (1, 45, 2, 1, 16, 2, None, None, torch.float32),
    pytest.param(1, 100, 2, 3, 32, 3, (30, 100), None, torch.float32, marks=pytest.mark.slow),
    pytest.param(1, 50, 1, 16, 16, 3, None, None, torch.bfloat16, marks=pytest.mark.slow),
    (1, 70, 2, 2, 16, 2, (5, 70), [0, 33, 33, 70], torch.bfloat16),
    pytest.param(2, 140, 1, 2, 64, 2, (60, 140), None, torch.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("b", "t", "h", "g", "bs", "bc", "qr", "bounds", "dtype"), ATTN_CASES)
def test_selected_attention_forward_and_backward(
    b: int, t: int, h: int, g: int, bs: int, bc: int, qr: tuple[int, int] | None,
    bounds: list[int] | None, dtype: torch.dtype,
) -> None:  # fmt: skip
    check_attention(b, t, h, g, 64, bs, bc, qr, bounds, dtype, seed=3 * t + g)


@pytest.mark.parametrize("through", [pytest.param("o", marks=pytest.mark.slow), "lse"])
def test_gradient_through_one_output_only(through: str) -> None:
    # The other output's gradient reaches the backward as None (not a materialised zero tensor).
    q, k, v = make(1, 70, 2, 3, 64, torch.float32, seed=17)
    kw = {"q_offset": 0, "cu_seqlens": cu([0, 33, 70])}
    idx = ssa.sparse_attention(q, k, v, 16, 3, backend="naive", **kw)[2]
    w = torch.randn(q.shape, generator=torch.Generator(device=DEV).manual_seed(18), device=DEV)
    grads = []
    for backend in ("triton", "naive"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        with poisoned_outputs():
            o, lse = ssa.selected_attention(*leaves, idx, 16, backend=backend, **kw)
            ((o * w).sum() if through == "o" else (lse * w[..., 0]).sum()).backward()
        grads.append([x.grad for x in leaves])
    if through == "lse":
        # The LSE does not depend on v: the reference leaves no gradient, the kernel a zero one.
        assert grads[1][2] is None and not grads[0][2].any()
        grads = [g[:2] for g in grads]
    for name, got, want in zip(["dq", "dk", "dv"], *grads):
        assert rel(got, want) < TOL[torch.float32], name


@pytest.mark.parametrize(
    ("qr", "bounds", "dtype"),
    [((9, 40), None, torch.float32), ((3, 40), [0, 17, 40], torch.bfloat16)],
)
def test_dense_attention_with_offset_and_documents(
    qr: tuple[int, int], bounds: list[int] | None, dtype: torch.dtype
) -> None:
    check_attention(1, 40, 2, 3, 64, 16, 1, qr, bounds, dtype, seed=5, sparse=False)


@pytest.mark.parametrize(("segment", "chunk"), [(3, 4), pytest.param(16, 1024, marks=pytest.mark.slow)])
def test_dk_dv_split_into_many_segments(monkeypatch: pytest.MonkeyPatch, segment: int, chunk: int) -> None:
    # Blocks selected by more queries than one segment holds (every own block, the early blocks)
    # are summed over several partials; the host-bounded segment table leaves some segments empty,
    # and with 4 keys per table program each program places its segments alone.
    from kernels.ssa import segment_table

    monkeypatch.setattr(segment_table, "SEG", segment)
    monkeypatch.setattr(segment_table, "_BLOCK", chunk)
    check_attention(1, 70, 2, 3, 32, 16, 3, (5, 70), [0, 33, 33, 70], torch.float32, seed=segment)


@pytest.mark.parametrize(
    ("b", "t", "h", "bs", "bc", "qr", "bounds", "segment", "short_keys", "chunk"),
    [(2, 90, 2, 16, 4, None, None, 5, True, 1024),
     (1, 70, 2, 16, 3, (5, 70), [0, 33, 33, 70], 256, True, 1024),
     (2, 90, 2, 16, 4, None, None, 5, False, 1024),
     (2, 90, 2, 16, 4, None, None, 5, True, 8),
     (1, 70, 2, 16, 3, (5, 70), [0, 33, 33, 70], 2, True, 4)],
)
def test_segment_table_lists_each_pair_once_in_query_order(
    monkeypatch: pytest.MonkeyPatch, b: int, t: int, h: int, bs: int, bc: int, qr: tuple[int, int] | None,
    bounds: list[int] | None, segment: int, short_keys: bool, chunk: int,
) -> None:  # fmt: skip
    from kernels.ssa import segment_table
    from kernels.ssa._plan import make_plan

    monkeypatch.setattr(segment_table, "SEG", segment)
    # int16 pair keys (every small case) or int32 (more keys than int16 holds, forced here).
    monkeypatch.setattr(segment_table, "SHORT_KEYS_BELOW", 2**15 if short_keys else 0)
    # Keys per table program: small chunks give several programs, each placing its segments alone.
    monkeypatch.setattr(segment_table, "_BLOCK", chunk)
    q, k, _ = make(b, t, h, 2, 16, torch.float32, seed=t + segment)
    lo, hi = qr or (0, t)
    kb = ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="naive")
    idx = ssa.select_blocks(q[:, lo:hi], kb, bs, bc, q_offset=lo, cu_seqlens=cu(bounds), backend="naive")
    plan = make_plan(cu(bounds), b, t, lo, hi - lo, bs, q.device)
    with poisoned_outputs():
        table = segment_table.segment_table(idx.int().contiguous(), plan, h)

    # Expected: each key's selecting query rows, ascending (the order its dk/dv sums run in).
    want: dict[int, list[int]] = {}
    for bi, ti, hi_, slot in torch.nonzero(idx >= 0).tolist():
        key = (bi * h + hi_) * plan.n_blocks + int(plan.q_base[ti]) + int(idx[bi, ti, hi_, slot])
        want.setdefault(key, []).append(ti)
    # Every slot is written (the outputs are poisoned); the ones no key owns are empty.
    owned = torch.zeros(table.seg_key.numel(), dtype=torch.bool)
    for key in range(b * h * plan.n_blocks):
        owned[int(table.seg_end[key] - table.nseg[key]) : int(table.seg_end[key])] = True
    assert not (table.seg_key == INT_POISON).any() and int(owned.sum()) == int(table.nseg.sum())
    assert (table.seg_lo[~owned] == table.seg_hi[~owned]).all()
    for key in range(b * h * plan.n_blocks):
        first, n = int(table.seg_end[key] - table.nseg[key]), int(table.nseg[key])
        got = []
        for s in range(first, first + n):
            assert int(table.seg_key[s]) == key
            span = range(int(table.seg_lo[s]), int(table.seg_hi[s]))
            assert 0 < len(span) <= segment
            got += [int(table.order[p]) // (h * bc) % (hi - lo) for p in span]
        assert got == want.get(key, []), f"key {key}"
    assert sum(len(v) for v in want.values()) == int((idx >= 0).sum())


def test_register_caps_only_for_the_layout_they_were_timed_on() -> None:
    from kernels.ssa.selected_attention_kernel import default_launch
    from kernels.ssa.selection_kernel import default_select_launch

    # head_dim 64 with 16 group rows (dq pads any G <= 16 to 16 rows; pass 2 pads G to a power of two).
    assert default_launch(64, 16).dq_maxnreg == 128 and default_launch(64, 4).dq_maxnreg == 128
    assert default_select_launch(64, 16).topk_maxnreg == default_select_launch(64, 9).topk_maxnreg == 120
    # Layouts that need other register counts keep the compiler's choice (a cap there would spill).
    for head_dim, group in ((128, 16), (64, 32), (32, 16)):
        assert default_launch(head_dim, group).dq_maxnreg is None
    for head_dim, group in ((128, 16), (64, 4), (64, 32)):
        assert default_select_launch(head_dim, group).topk_maxnreg is None


def test_gather_bound_sums_exactly_the_rows_the_forward_reads() -> None:
    from kernels.probes.gather_bound import gathered_sums
    from kernels.ssa._plan import make_plan
    from kernels.ssa.selected_attention_kernel import default_launch

    b, t, h, bs, bc, lo = 2, 70, 2, 16, 3, 5
    q, k, v = make(b, t, h, 2, 16, torch.float32, seed=4)
    kb = ssa.block_keys(k, bs, backend="naive")
    idx = ssa.select_blocks(q[:, lo:], kb, bs, bc, q_offset=lo, backend="naive").int().contiguous()
    plan = make_plan(None, b, t, lo, t - lo, bs, q.device)
    got = gathered_sums(k, v, idx, bs, lo, plan, default_launch(16, 2))
    want = torch.zeros_like(got)
    for bi, ti, hi, slot in torch.nonzero(idx >= 0).tolist():
        pos, first = lo + ti, int(idx[bi, ti, hi, slot]) * bs
        rows = slice(first, min(first + bs, pos + 1))
        want[ti, bi * h + hi] += (k[bi, rows, hi] + v[bi, rows, hi]).sum(0)
    assert rel(got, want) < 1e-5


def test_sparse_branch_end_to_end() -> None:
    q, k, v = make(1, 50, 1, 2, 64, torch.float32, seed=21)
    with poisoned_outputs():
        got = ssa.sparse_attention(q, k, v, 16, 3, q_offset=0, backend="triton")
    want = ssa.sparse_attention(q, k, v, 16, 3, backend="naive")
    assert torch.equal(got[2], want[2])
    assert rel(got[0], want[0]) < 1e-4 and rel(got[1], want[1]) < 1e-4


def test_backward_is_bitwise_deterministic() -> None:
    q, k, v = make(1, 64, 1, 4, 64, torch.bfloat16, seed=8)
    idx = ssa.sparse_attention(q.float(), k.float(), v.float(), 16, 3, backend="naive")[2]
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o, _ = ssa.selected_attention(*leaves, idx, 16, backend="triton")
        o.float().square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_unsupported_shapes_name_the_fix() -> None:
    q, k, v = make(1, 32, 1, 2, 24, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"power-of-two head_dim >= 16; got 24.*naive"):
        ssa.sparse_attention(q, k, v, 16, 2, backend="triton")


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale_is_refused(scale: float) -> None:
    q, k, v = make(1, 32, 1, 2, 16, torch.float32, seed=1)
    for backend in ("triton", "naive"):
        with pytest.raises(ValueError, match=r"scale must be a positive finite number; got"):
            ssa.sparse_attention(q, k, v, 16, 2, scale=scale, backend=backend)
        with pytest.raises(ValueError, match=r"scale must be a positive finite number; got"):
            ssa.dense_attention(q, k, v, scale=scale, backend=backend)


# ------------------------------------------------------------------------------------------------
# the same checks at realistic sizes (GPU machine: `pytest -m gpu`)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("h", "g", "d", "bs", "bc", "qr", "bounds"),
    [
        (2, 16, 64, 16, 16, None, None),  # the 1B layout
        (2, 16, 128, 64, 8, None, None),
        (2, 3, 64, 32, 16, (1000, 4096), None),
        (1, 32, 128, 16, 32, None, [0, 1000, 1001, 3000, 4096]),
        (2, 16, 64, 16, 128, (2048, 4096), None),  # inference budget: 128-slot lists, pass 2 on 4 warps
    ],
)
def test_gpu_realistic_sizes(
    h: int, g: int, d: int, bs: int, bc: int, qr: tuple[int, int] | None, bounds: list[int] | None
) -> None:
    check_attention(1, 4096, h, g, d, bs, bc, qr, bounds, torch.bfloat16, seed=bs + g)
    # Half precision takes the flash kernels, whose LSE has no gradient (tests/test_kernels_dense_flash.py
    # checks the refusal); fp32 takes FlexAttention, LSE gradient included.
    layout = (1, 4096, h, g, d, bs, bc, qr, bounds)
    check_attention(*layout, torch.bfloat16, seed=bs + g, sparse=False, lse_grad=False)
    check_attention(*layout, torch.float32, seed=bs + g, sparse=False)
    # Selection on fp32 inputs: exact apart from genuine near-ties (fp32 rounding of the sums).
    q, k, _ = make(1, 4096, h, g, d, torch.float32, seed=d)
    lo = qr[0] if qr else 0
    kb = ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="naive")
    kw = {"q_offset": lo, "cu_seqlens": cu(bounds)}
    with poisoned_outputs():
        got = ssa.select_blocks(q[:, lo:], kb, bs, bc, backend="triton", **kw)
    want = ssa.select_blocks(q[:, lo:], kb, bs, bc, backend="naive", **kw)
    same = (got == want).all(-1).float().mean().item()
    assert same > 0.999, same
    assert rel(ssa.block_keys(k, bs, cu_seqlens=cu(bounds), backend="triton"), kb) < 1e-6


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic() -> None:
    q, k, v = make(1, 8192, 2, 16, 64, torch.bfloat16, seed=4)
    idx = ssa.select_blocks(q, ssa.block_keys(k, 16), 16, 16)
    grads = []
    for _ in range(3):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o, _ = ssa.selected_attention(*leaves, idx, 16)
        o.float().square().sum().backward()
        grads.append([x.grad for x in leaves])
    for run in grads[1:]:
        for a, b in zip(run, grads[0]):
            assert torch.equal(a, b)


def test_triton_backend_refuses_mixed_dtypes() -> None:
    q, k, v = make(1, 32, 1, 2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="one dtype for all inputs"):
        idx = torch.zeros(1, 32, 1, 1, dtype=torch.int32, device=DEV)
        ssa.selected_attention(q, k.bfloat16(), v, idx, 16, backend="triton")


def test_views_with_different_strides_for_k_and_v() -> None:
    """What megatron hands over: q and k roped (transposed copies), v a view of the fused QKV output,
    so k and v have different strides; outputs and gradients must not depend on the layout."""
    b, t, h, g, d = 2, 48, 2, 2, 16
    gen = torch.Generator(device=DEV).manual_seed(31)
    fused = torch.randn(t, b, h, (g + 2) * d, generator=gen, device=DEV)
    do = torch.randn(b, t, h * g, d, generator=gen, device=DEV)
    results = []
    for backend in ("triton", "naive"):
        qkv = fused.clone().requires_grad_(True)
        q = qkv[..., : g * d].reshape(t, b, h * g, d).transpose(0, 1)
        k = qkv[..., g * d : (g + 1) * d].contiguous().transpose(0, 1)
        v = qkv[..., (g + 1) * d :].transpose(0, 1)
        assert k.stride() != v.stride()
        with poisoned_outputs():
            o, lse, idx = ssa.sparse_attention(q, k, v, 16, 2, backend=backend)
            (o * do).sum().backward()
        results.append([o, lse, idx, qkv.grad])
    for name, got, want in zip(["o", "lse", "idx", "d qkv"], *results):
        if name == "idx":
            assert torch.equal(got, want)
        else:
            assert rel(got, want) < TOL[torch.float32], f"{name}: relative error {rel(got, want):.2e}"
