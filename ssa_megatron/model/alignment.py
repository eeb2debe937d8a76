"""SSA alignment loss: value, gradient hook, loss scale and a per-layer metrics tracker.

The loss of one layer is the paper's two-way term with stop-gradients,
``L = f(h_full, sg(h_sparse)) + f(sg(h_full), h_sparse)`` with f = SmoothL1 (beta 1) or MSE, as a mean
over every element of the *global* per-head attention output (before the gate, so the gate cannot
shrink the outputs to shrink the loss). With tensor parallelism a rank holds a slice of heads and with
context parallelism a slice of the sequence. Every rank of the TP x CP group holds an equal share (megatron
splits heads and sequence chunks evenly), so the global element count is the local one times the group
size, and each rank's part is its local sum divided by that global count: the parts add up to the global
mean, summing the gradients of the CP ranks (as DP x CP gradient reduction does) gives the single-GPU
gradient, and TP ranks' partial gradients meet in the column-parallel input all-reduce. No collective
runs per layer (an all-reduce per layer made the ranks wait for each other in every layer: ~25 ms of a
CP=2 32k step on two H200s); the metrics tracker adds the parts over TP x CP once per report.

The model objective is ``CE + alignment_weight * mean_over_layers(L)``. Each layer attaches
``alignment_weight / num_layers * L_local`` to its main attention output with ``AlignmentLossAutoScaler``
(megatron's MoE/DSA aux-loss pattern): the forward returns the activation unchanged and the backward
feeds ``loss_scale`` as the aux loss's gradient. megatron-core 0.16.1's schedules set such scales only for
MoE and MTP, so the training loop calls ``set_alignment_loss_scale(alignment_loss_scale(...))`` once per
step, before ``forward_backward_func``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.alignment import two_way_alignment_sum


def alignment_loss_sum(
    h_full: torch.Tensor, h_sparse: torch.Tensor, kind: str = "smooth_l1", backend: str = "auto"
) -> torch.Tensor:
    """Local sum of the two-way alignment term (fp32): each direction pulls one branch to the other's
    detached output. Divide by the global element count for the mean. CUDA tensors take the fused
    kernel (kernels/alignment), others the PyTorch reference; ``backend`` forces one."""
    return two_way_alignment_sum(h_full, h_sparse, kind, backend=backend)


def _tp_cp_group() -> dist.ProcessGroup | None:
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_and_context_parallel_group()


def global_alignment_loss(
    h_full: torch.Tensor,
    h_sparse: torch.Tensor,
    kind: str = "smooth_l1",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """This rank's differentiable part of the global mean over the TP x CP group (``group``, default
    megatron's): local sum / (local element count x group size). The parts of the group's ranks add up
    to the global mean; the ranks must hold equal shares, as megatron's TP and CP splits do."""
    local_sum = alignment_loss_sum(h_full, h_sparse, kind, backend)
    group = group if group is not None else _tp_cp_group()
    ranks = dist.get_world_size(group) if group is not None else 1
    return local_sum / (h_full.numel() * ranks)


class AlignmentLossAutoScaler(torch.autograd.Function):
    """Attach an aux loss to an activation: identity forward; backward gives the loss ``loss_scale``."""

    # A host number: the backward fills it in on the device, where copying a host tensor over would
    # make the host wait for the device at every layer.
    main_loss_backward_scale: float | None = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_loss,) = ctx.saved_tensors
        scale = AlignmentLossAutoScaler.main_loss_backward_scale
        return grad_output, torch.full_like(aux_loss, 1.0 if scale is None else scale)

    @staticmethod
    def set_loss_scale(scale: float) -> None:
        AlignmentLossAutoScaler.main_loss_backward_scale = float(scale)


def set_alignment_loss_scale(scale: torch.Tensor | float) -> None:
    """The gradient the alignment loss gets in backward (what the CE loss's scaling is to CE). Set once
    per step; a tensor is read on the host here (one sync), never per layer."""
    AlignmentLossAutoScaler.set_loss_scale(float(scale))


def alignment_loss_scale(
    num_microbatches: int,
    context_parallel_size: int = 1,
    grad_scale: float = 1.0,
    calculate_per_token_loss: bool = False,
    tokens_per_step: float | None = None,
    data_parallel_size: int = 1,
) -> float:
    """The scale that weights the alignment term like megatron weights the CE loss.

    Default (``calculate_per_token_loss=False``): CE gradients are divided by the number of micro-batches
    and later averaged over the DP x CP group; each CP rank's aux gradient is only its share of the
    global-mean loss, so it is multiplied by the CP size (as schedules.py does for the MoE aux loss):
    ``grad_scale * cp / num_microbatches``. ``grad_scale`` is the mixed-precision loss scale
    (``config.grad_scale_func(1)``), 1 in fp32/bf16.

    Per-token mode: gradients are summed and finally divided by the global token count
    ``tokens_per_step`` (over DP x CP and micro-batches); to keep the alignment term a per-micro-batch
    mean averaged over DP, the scale is ``grad_scale * tokens_per_step / (dp * num_microbatches)``.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1; got {num_microbatches}")
    if not calculate_per_token_loss:
        return grad_scale * context_parallel_size / num_microbatches
    if tokens_per_step is None:
        raise ValueError("calculate_per_token_loss=True needs tokens_per_step (the grad divisor)")
    return grad_scale * tokens_per_step / (data_parallel_size * num_microbatches)


def attach_alignment_loss(main: torch.Tensor, weighted_local_loss: torch.Tensor) -> torch.Tensor:
    """Return ``main`` carrying ``weighted_local_loss`` into backward."""
    return AlignmentLossAutoScaler.apply(main, weighted_local_loss)


class SSAMetricsTracker:
    """Per-layer alignment loss and attention sparsity, accumulated over micro-batches between reports.

    ``alignment``: this rank's part of the global (TP x CP) mean per micro-batch, summed per layer and
    counted locally; the parts are added over TP x CP at report time (the count is not: every rank of
    the group counts the same micro-batches).
    ``sparsity``: ``exp(lse_sparse - lse_full)`` (the full-attention mass inside the selected blocks,
    the paper's Definition 1), summed and counted locally, reduced over TP x CP at report time.
    Layers of other pipeline stages are zero here and summed in over the PP group; the result is
    averaged over DP. The sums live on the device, the counts on the host: a count is known there, and
    counting on the device would cost a launch per layer and statistic.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [num_layers, 2] fp64: alignment parts, sparsity masses
        self.counts: list[list[int]] = []  # per layer: alignment records, sparsity elements

    def _ensure(self, num_layers: int, device: torch.device) -> torch.Tensor:
        if self.sums is None or self.sums.shape[0] != num_layers:
            self.sums = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
            self.counts = [[0, 0] for _ in range(num_layers)]
        return self.sums

    def record_alignment(self, layer_number: int, num_layers: int, local_part: torch.Tensor) -> None:
        self._ensure(num_layers, local_part.device)[layer_number - 1, 0] += local_part.detach()
        self.counts[layer_number - 1][0] += 1

    def record_sparsity(self, layer_number: int, num_layers: int, lse_sparse: torch.Tensor,
                        lse_full: torch.Tensor) -> None:
        # exp of a difference <= 0 (up to rounding) is exact enough in fp32; the sum runs in fp64.
        mass = torch.exp(lse_sparse.detach() - lse_full.detach()).sum(dtype=torch.float64)
        self._ensure(num_layers, lse_full.device)[layer_number - 1, 1] += mass
        self.counts[layer_number - 1][1] += lse_full.numel()

    def reduce(self, num_layers: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Collective over PP, TP x CP and DP; every rank must call it. Returns per-layer means
        (NaN for a layer with no samples) and clears the accumulators."""
        from megatron.core import parallel_state

        from ssa_megatron.parallel.state import collective_device

        # Where the collectives need it (NCCL reduces only CUDA tensors), even when nothing was recorded.
        sums = self._ensure(num_layers, device or collective_device())
        counts = torch.tensor(self.counts, dtype=torch.float64, device=sums.device)
        # Columns: align_sum, align_n, spars_sum, spars_n.
        stats = torch.stack([sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1]], dim=1)
        self.sums = None
        if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
            dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
            tp_cp = parallel_state.get_tensor_and_context_parallel_group()
            summed = stats[:, [0, 2, 3]]  # alignment parts, sparsity sums and counts
            dist.all_reduce(summed, group=tp_cp)
            stats[:, [0, 2, 3]] = summed
            dp = parallel_state.get_data_parallel_group(with_context_parallel=False)
            means = _ratios(stats)
            dist.all_reduce(means, group=dp)
            means /= dist.get_world_size(dp)
        else:
            means = _ratios(stats)
        return {"alignment_loss": means[:, 0].float(), "attention_sparsity": means[:, 1].float()}


def _ratios(stats: torch.Tensor) -> torch.Tensor:
    nan = torch.full_like(stats[:, 0], float("nan"))
    align = torch.where(stats[:, 1] > 0, stats[:, 0] / stats[:, 1].clamp(min=1), nan)
    spars = torch.where(stats[:, 3] > 0, stats[:, 2] / stats[:, 3].clamp(min=1), nan)
    return torch.stack([align, spars], dim=1)


tracker = SSAMetricsTracker()
