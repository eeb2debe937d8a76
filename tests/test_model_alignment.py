"""Alignment loss: value and gradients vs a hand computation, the test bites on a missing detach,
the TP/CP global mean equals the single-rank one, the aux-loss scaler, its scale and the tracker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssa_megatron.model.alignment import (
    AlignmentLossAutoScaler,
    SSAMetricsTracker,
    alignment_loss_scale,
    alignment_loss_sum,
    attach_alignment_loss,
    global_alignment_loss,
    set_alignment_loss_scale,
)
from tests.distributed import run_distributed


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Spread over (-3, 3) so SmoothL1 sees both its quadratic and its linear part.
    full = (torch.rand(2, 8, 4, 6, generator=gen) * 6 - 3).requires_grad_()
    sparse = (torch.rand(2, 8, 4, 6, generator=gen) * 6 - 3).requires_grad_()
    return full, sparse


def _hand(full: torch.Tensor, sparse: torch.Tensor, kind: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Value and gradients written out: each direction only moves its own branch toward the other."""
    d = (full - sparse).detach().double()
    n = d.numel()
    if kind == "smooth_l1":
        per = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5)
        g = d.clamp(-1, 1)
    else:
        per = d * d
        g = 2 * d
    value = 2 * per.sum() / n  # both directions have the same value
    return float(value), (g / n).float(), (-g / n).float()


def _check_against_hand(loss_fn, kind: str) -> None:
    full, sparse = _inputs()
    loss = loss_fn(full, sparse, kind) / full.numel()
    loss.backward()
    value, g_full, g_sparse = _hand(full, sparse, kind)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    torch.testing.assert_close(full.grad, g_full)
    torch.testing.assert_close(sparse.grad, g_sparse)


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
def test_alignment_loss_matches_hand_computation(kind: str) -> None:
    _check_against_hand(alignment_loss_sum, kind)


def _one_detach_removed(full: torch.Tensor, sparse: torch.Tensor, kind: str) -> torch.Tensor:
    f = (lambda a, b: F.smooth_l1_loss(a, b, reduction="sum")) if kind == "smooth_l1" else (
        lambda a, b: F.mse_loss(a, b, reduction="sum"))
    return f(full, sparse) + f(full.detach(), sparse)  # first direction lost its stop-gradient


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
def test_hand_check_fails_without_one_detach(kind: str) -> None:
    """The value is unchanged, only the gradients differ: the hand check must catch it."""
    full, sparse = _inputs()
    assert torch.allclose(_one_detach_removed(full, sparse, kind), alignment_loss_sum(full, sparse, kind))
    with pytest.raises(AssertionError):
        _check_against_hand(_one_detach_removed, kind)


def test_rejects_unknown_loss_kind() -> None:
    full, sparse = _inputs()
    with pytest.raises(ValueError, match="alignment_loss='l2'"):
        alignment_loss_sum(full, sparse, "l2")


def test_auto_scaler_injects_scaled_gradient() -> None:
    full, sparse = _inputs()
    main = torch.randn(3, requires_grad=True)
    local = global_alignment_loss(full, sparse, "smooth_l1", group=None)
    try:
        set_alignment_loss_scale(0.25)
        out = attach_alignment_loss(main, local * 10.0)
        torch.testing.assert_close(out, main)
        out.sum().backward()
    finally:
        AlignmentLossAutoScaler.main_loss_backward_scale = None
    torch.testing.assert_close(main.grad, torch.ones(3))
    _, g_full, _ = _hand(full, sparse, "smooth_l1")
    torch.testing.assert_close(full.grad, g_full * 10.0 * 0.25)


def test_loss_scale_follows_megatron_conventions() -> None:
    assert alignment_loss_scale(4) == pytest.approx(0.25)
    assert alignment_loss_scale(4, context_parallel_size=2, grad_scale=8.0) == pytest.approx(4.0)
    per_token = alignment_loss_scale(
        2, calculate_per_token_loss=True, tokens_per_step=1000, data_parallel_size=2
    )
    assert per_token == pytest.approx(250.0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        alignment_loss_scale(2, calculate_per_token_loss=True)
    with pytest.raises(ValueError, match="num_microbatches"):
        alignment_loss_scale(0)


def test_tracker_single_process_means() -> None:
    t = SSAMetricsTracker()
    t.record_alignment(2, 3, torch.tensor(0.5))
    t.record_alignment(2, 3, torch.tensor(1.5))
    lse_full = torch.zeros(2, 4)
    lse_sparse = torch.log(torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]]))
    t.record_sparsity(1, 3, lse_sparse, lse_full)
    out = t.reduce(3)
    torch.testing.assert_close(out["alignment_loss"][1], torch.tensor(1.0))
    torch.testing.assert_close(out["attention_sparsity"][0], torch.tensor(0.625))
    assert torch.isnan(out["alignment_loss"][0]) and torch.isnan(out["attention_sparsity"][2])
    assert t.sums is None  # cleared


def _global_body(rank: int, world_size: int, split_dim: int) -> None:
    """Each rank holds half of the global tensor (heads: TP-like; sequence: CP-like)."""
    import torch.distributed as dist

    full_g, sparse_g = _inputs(seed=3)
    value_ref = alignment_loss_sum(full_g, sparse_g) / full_g.numel()
    value_ref.backward()
    full = full_g.detach().chunk(world_size, dim=split_dim)[rank].clone().requires_grad_()
    sparse = sparse_g.detach().chunk(world_size, dim=split_dim)[rank].clone().requires_grad_()
    local = global_alignment_loss(full, sparse, "smooth_l1", group=dist.group.WORLD)
    local.backward()
    torch.testing.assert_close(full.grad, full_g.grad.chunk(world_size, dim=split_dim)[rank])
    torch.testing.assert_close(sparse.grad, sparse_g.grad.chunk(world_size, dim=split_dim)[rank])
    # The local parts add up to the global loss.
    total = local.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, value_ref.detach())


@pytest.mark.parametrize("split_dim", [2, 1], ids=["heads", "sequence"])
def test_global_mean_across_ranks_equals_single_rank(split_dim: int) -> None:
    run_distributed(_global_body, world_size=2, args=(split_dim,))
