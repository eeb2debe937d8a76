"""The plain-PyTorch reference (kernels/ssa/naive.py) against a brute-force per-query loop.

The brute force is written straight from docs/method.md (sections 1-3), loop-based and float64, so it
shares no code or vectorisation trick with the reference it checks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import ssa
from kernels.ssa import naive


def _doc_of(pos: int, bounds: list[int]) -> tuple[int, int]:
    for a, b in itertools.pairwise(bounds):
        if a <= pos < b:
            return a, b
    raise AssertionError(f"position {pos} outside {bounds}")


def _bounds(cu_seqlens: torch.Tensor | None, seq_len: int) -> list[int]:
    return [0, seq_len] if cu_seqlens is None else [int(x) for x in cu_seqlens]


def brute_block_keys(
    k: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    bounds = _bounds(cu_seqlens, k.shape[1])
    rows = []
    for a, b in itertools.pairwise(bounds):
        start = a
        while start < b:
            rows.append(k[:, start : min(start + block_size, b)].double().mean(dim=1))
            start += block_size
    return torch.stack(rows, dim=1)


def brute_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    block_count: int,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    bsz, tq, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    scale = d**-0.5 if scale is None else scale
    bounds = _bounds(cu_seqlens, k.shape[1])
    out = torch.full((bsz, tq, h, block_count), -1, dtype=torch.int32)
    for b in range(bsz):
        for i in range(tq):
            pos = q_offset + i
            start, _ = _doc_of(pos, bounds)
            t = pos - start
            own = t // block_size
            # Complete blocks: every one of their block_size tokens is at or before t.
            complete = [j for j in range(own + 1) if (j + 1) * block_size - 1 <= t]
            for kv in range(h):
                kblocks = {
                    j: k[b, start + j * block_size : start + (j + 1) * block_size, kv].double().mean(0)
                    for j in complete
                }
                score = {j: 0.0 for j in range(own)}
                for head in range(kv * g, (kv + 1) * g):
                    logits = {j: float(q[b, i, head].double() @ kblocks[j]) * scale for j in complete}
                    top = max(logits.values(), default=0.0)
                    denom = sum(
                        torch.exp(torch.tensor(x - top, dtype=torch.float64)) for x in logits.values()
                    )
                    for j in range(own):
                        score[j] += float(
                            torch.exp(torch.tensor(logits[j] - top, dtype=torch.float64)) / denom
                        )
                ranked = sorted(range(own), key=lambda j, s=score: (-s[j], j))
                chosen = sorted([*ranked[: block_count - 1], own])
                out[b, i, kv, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def brute_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor | None,
    block_size: int,
    q_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-block attention (dense causal when block_idx is None); differentiable, float64."""
    bsz, tq, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    scale = d**-0.5 if scale is None else scale
    bounds = _bounds(cu_seqlens, k.shape[1])
    outs, lses = [], []
    for b in range(bsz):
        orow, lrow = [], []
        for i in range(tq):
            pos = q_offset + i
            start, end = _doc_of(pos, bounds)
            oh, lh = [], []
            for head in range(hq):
                kv = head // g
                if block_idx is None:
                    keys = list(range(start, pos + 1))
                else:
                    keys = []
                    for j in block_idx[b, i, kv].tolist():
                        if j >= 0:
                            first = start + j * block_size
                            keys += [p for p in range(first, first + block_size) if p <= pos and p < end]
                kk = k[b, keys, kv].double()
                vv = v[b, keys, kv].double()
                logits = (kk @ q[b, i, head].double()) * scale
                lse = torch.logsumexp(logits, 0)
                oh.append(torch.softmax(logits, 0) @ vv)
                lh.append(lse)
            orow.append(torch.stack(oh))
            lrow.append(torch.stack(lh))
        outs.append(torch.stack(orow))
        lses.append(torch.stack(lrow))
    return torch.stack(outs), torch.stack(lses)


def _qkv(b: int, t: int, h: int, g: int, d: int, tk: int | None = None, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    tk = t if tk is None else tk
    q = torch.randn(b, t, h * g, d, generator=gen)
    k = torch.randn(b, tk, h, d, generator=gen)
    v = torch.randn(b, tk, h, d, generator=gen)
    return q, k, v


CU = torch.tensor([0, 7, 7, 20, 37], dtype=torch.int32)  # includes an empty document


@pytest.mark.parametrize("block_size", [4, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_block_keys_match_brute_force(block_size: int, packed: bool) -> None:
    _, k, _ = _qkv(1 if packed else 2, 37, 2, 1, 8, seed=block_size)
    cu = CU if packed else None
    got = ssa.block_keys(k, block_size, cu_seqlens=cu, backend="naive")
    want = brute_block_keys(k, block_size, cu)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


SELECT_CASES = [
    # (batch, T, H, G, block_size, block_count, q range, packed)
    (2, 37, 2, 3, 4, 3, (0, 37), False),
    (1, 37, 1, 1, 4, 1, (0, 37), False),
    (2, 29, 2, 4, 3, 20, (0, 29), False),  # more slots than blocks: every earlier block is used
    (1, 37, 2, 2, 4, 4, (13, 30), False),  # context-parallel chunk via q_offset
    (1, 37, 2, 3, 3, 3, (0, 37), True),
    (1, 37, 2, 3, 3, 2, (5, 33), True),  # packed documents and a query offset together
]


@pytest.mark.parametrize(("b", "t", "h", "g", "bs", "bc", "qr", "packed"), SELECT_CASES)
def test_select_blocks_match_brute_force(
    b: int, t: int, h: int, g: int, bs: int, bc: int, qr: tuple[int, int], packed: bool
) -> None:
    q, k, _ = _qkv(b, t, h, g, 8, seed=t + bc)
    q = q[:, qr[0] : qr[1]]
    cu = CU if packed else None
    kblock = ssa.block_keys(k, bs, cu_seqlens=cu, backend="naive")
    got = ssa.select_blocks(q, kblock, bs, bc, q_offset=qr[0], cu_seqlens=cu, backend="naive")
    want = brute_select(q, k, bs, bc, q_offset=qr[0], cu_seqlens=cu)
    assert got.dtype == torch.int32
    assert torch.equal(got, want)
    # Current-block forcing, stated directly: every query's own block is among its selections.
    bounds = [0, t] if cu is None else CU.tolist()
    for i in range(q.shape[1]):
        pos = qr[0] + i
        start, _ = _doc_of(pos, bounds)
        assert ((got[:, i] == (pos - start) // bs).sum(-1) == 1).all()


def _onehot_keys(t: int, bs: int, d: int) -> torch.Tensor:
    k = torch.zeros(1, t, 1, d)
    for pos in range(t):
        k[0, pos, 0, pos // bs] = 1.0
    return k


def test_selection_sums_probabilities_over_the_group_and_normalises_over_complete_blocks() -> None:
    # Blocks of 2 tokens whose block keys are unit vectors, so q's entries are the logits.
    k = _onehot_keys(8, 2, 4)
    q = torch.randn(1, 8, 2, 4)
    q[0, 6:, 0] = torch.tensor([10.0, 0.0, 0.0, 30.0])
    q[0, 6:, 1] = torch.tensor([-20.0, 9.0, 9.0, 0.0])
    kblock = ssa.block_keys(k, 2, backend="naive")
    idx = ssa.select_blocks(q, kblock, 2, 2, scale=1.0, backend="naive")
    # t=6: blocks 0..2 are complete; head 0 puts ~all mass on block 0, head 1 splits 1/2: the
    # group sum picks block 0 (a sum of logits would pick block 1).
    assert idx[0, 6, 0].tolist() == [0, 3]
    # t=7 ends block 3, so it joins the normaliser and takes head 0's mass: blocks 1 and 2 tie
    # exactly on head 1's probabilities and the lower index wins.
    assert idx[0, 7, 0].tolist() == [1, 3]
    assert torch.equal(idx, brute_select(q, k, 2, 2, scale=1.0))


def test_selection_ties_go_to_the_lower_block_index() -> None:
    q, k, _ = _qkv(1, 24, 2, 2, 8, seed=3)
    k[:, 8:12] = k[:, 0:4]  # blocks 0 and 2 identical
    k[:, 12:16] = k[:, 4:8]  # blocks 1 and 3 identical
    kblock = ssa.block_keys(k, 4, backend="naive")
    idx = ssa.select_blocks(q, kblock, 4, 2, backend="naive")
    for i in range(16, 24):
        for h in range(2):
            assert idx[0, i, h, 0] in (0, 1, 4), idx[0, i, h]
    assert torch.equal(idx, brute_select(q, k, 4, 2))


ATTN_CASES = [
    # (batch, T, H, G, block_size, block_count, q range, packed)
    (2, 23, 2, 3, 4, 3, (0, 23), False),
    (1, 23, 1, 1, 5, 2, (0, 23), False),
    (1, 37, 2, 2, 4, 2, (11, 26), False),
    (1, 37, 1, 3, 3, 3, (4, 35), True),
]


@pytest.mark.parametrize(("b", "t", "h", "g", "bs", "bc", "qr", "packed"), ATTN_CASES)
def test_sparse_and_dense_attention_match_brute_force_with_gradients(
    b: int, t: int, h: int, g: int, bs: int, bc: int, qr: tuple[int, int], packed: bool
) -> None:
    q, k, v = _qkv(b, t, h, g, 8, seed=2 * t + bs)
    q = q[:, qr[0] : qr[1]].clone()
    cu = CU if packed else None
    dout = torch.randn(b, q.shape[1], h * g, 8)
    for sparse in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        ref_leaves = [x.clone().double().requires_grad_(True) for x in (q, k, v)]
        if sparse:
            o, lse, idx = ssa.sparse_attention(
                *leaves, bs, bc, q_offset=qr[0], cu_seqlens=cu, backend="naive"
            )
            assert torch.equal(idx, brute_select(q, k, bs, bc, q_offset=qr[0], cu_seqlens=cu))
            ro, rlse = brute_attention(*ref_leaves, idx, bs, q_offset=qr[0], cu_seqlens=cu)
        else:
            o, lse = ssa.dense_attention(*leaves, q_offset=qr[0], cu_seqlens=cu, backend="naive")
            ro, rlse = brute_attention(*ref_leaves, None, bs, q_offset=qr[0], cu_seqlens=cu)
        assert lse.dtype == torch.float32 and o.dtype == q.dtype
        torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), rlse, rtol=1e-5, atol=1e-5)
        (o * dout).sum().backward()
        (ro * dout.double()).sum().backward()
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_sparse_lse_never_exceeds_dense_lse() -> None:
    # Selected keys are a subset of the causal keys, so exp(lse_sparse - lse_full) is a share.
    q, k, v = _qkv(1, 40, 2, 2, 8, seed=7)
    _, lse_s, _ = ssa.sparse_attention(q, k, v, 4, 3, backend="naive")
    _, lse_d = ssa.dense_attention(q, k, v, backend="naive")
    assert (lse_s <= lse_d + 1e-5).all()
    assert (lse_s[:, 12:] < lse_d[:, 12:] - 1e-6).any()


def test_query_chunks_reproduce_the_full_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(1, 45, 2, 3, 8, seed=11)
    full = ssa.sparse_attention(q, k, v, 4, 3, backend="naive")
    # Small chunks exercise the chunk loop; a context-parallel split must give the same rows.
    monkeypatch.setattr(naive, "_CHUNK_ELEMS", 7 * 6 * 45)
    for lo, hi in [(0, 17), (17, 45)]:
        part = ssa.sparse_attention(q[:, lo:hi], k, v, 4, 3, q_offset=lo, backend="naive")
        for a, b in zip(part, full):
            torch.testing.assert_close(a, b[:, lo:hi], rtol=1e-6, atol=1e-6)


def test_packed_documents_are_independent() -> None:
    q, k, v = _qkv(1, 37, 2, 2, 8, seed=5)
    o, lse, idx = ssa.sparse_attention(q, k, v, 4, 3, cu_seqlens=CU, backend="naive")
    bounds = CU.tolist()
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        od, lsed, idxd = ssa.sparse_attention(q[:, a:b], k[:, a:b], v[:, a:b], 4, 3, backend="naive")
        torch.testing.assert_close(o[:, a:b], od, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[:, a:b], lsed, rtol=1e-6, atol=1e-6)
        assert torch.equal(idx[:, a:b], idxd)


def test_bad_arguments_name_the_value_and_the_fix() -> None:
    q, k, v = _qkv(1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="'cuda'"):
        ssa.dense_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"\[10, 26\).*global offset"):
        ssa.dense_attention(q, k, v, q_offset=10)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ssa.dense_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="batch == 1"):
        ssa.dense_attention(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            cu_seqlens=torch.tensor([0, 16], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="end at the key length 16"):
        ssa.dense_attention(q, k, v, cu_seqlens=torch.tensor([0, 8, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_count must be >= 1; got 0"):
        ssa.sparse_attention(q, k, v, 4, 0)


def test_auto_backend_on_cpu_is_the_reference() -> None:
    q, k, v = _qkv(1, 21, 2, 2, 8, seed=9)
    for a, b in zip(
        ssa.sparse_attention(q, k, v, 4, 2), naive.sparse_attention(q, k, v, 4, 2, scale=8**-0.5)
    ):
        assert torch.equal(a, b)


def test_triton_on_cpu_without_the_interpreter_points_to_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(1, 16, 1, 2, 16)
    with pytest.raises(ValueError, match="backend='naive'"):
        ssa.sparse_attention(q, k, v, 4, 2, backend="triton")
