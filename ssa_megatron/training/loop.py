"""The training loop: one readable iteration function and the loop around it.

Per iteration: fetch this rank's micro-batches, publish each micro-batch's (iteration,
index) so every SSA layer draws the same attention mode, run megatron's forward/backward
schedule (no pipelining, 1F1B or interleaved, chosen by megatron from the parallel state),
then check the loss and grad norm, step the optimizer and the LR schedule.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.model.alignment import alignment_loss_scale, set_alignment_loss_scale, tracker
from ssa_megatron.model.mode import draw_mode, set_microbatch
from ssa_megatron.parallel.context import split_for_rank
from ssa_megatron.parallel.state import collective_device
from ssa_megatron.training.config import TrainConfig
from ssa_megatron.training.gc_schedule import ScheduledGC
from ssa_megatron.training.metrics import MetricsLogger, memory_gib

Batch = dict[str, torch.Tensor]


class NonFiniteError(RuntimeError):
    """Raised under train.nan_policy=stop (or after too many skipped steps)."""


def shard_batch(batch: Batch) -> Batch:
    """This context-parallel rank's part of every sequence (megatron's load-balanced 2*CP split)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    rank = parallel_state.get_context_parallel_rank()
    return {k: split_for_rank(v, 1, rank, cp) for k, v in batch.items()}


def drawn_modes(model_config: Any, iteration: int, num_microbatches: int) -> list[str]:
    """The attention mode that drives each micro-batch of an iteration (what every SSA layer draws)."""
    if model_config.attention_mode != "ssa":
        return [model_config.attention_mode] * num_microbatches
    return [
        draw_mode(model_config.mode_seed, iteration, i, model_config.p_full) for i in range(num_microbatches)
    ]


def ssa_step_metrics(model_config: Any) -> dict[str, float]:
    """Alignment loss and attention sparsity averaged over layers for the micro-batches since the
    last call (collective: every rank calls it once per step). Absent for branches that did not run."""
    reduced = tracker.reduce(model_config.num_layers)
    # One read on the host for both (each read waits for the device); NaN: no layer recorded it.
    align, spars = torch.stack([torch.nanmean(reduced["alignment_loss"]),
                                torch.nanmean(reduced["attention_sparsity"])]).tolist()  # fmt: skip
    out = {}
    if not math.isnan(align):
        out["align_loss"] = align
    if not math.isnan(spars):
        out["sparsity"] = spars
    return out


@dataclass
class TrainState:
    iteration: int = 0
    skipped: int = 0
    consumed_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE over the micro-batch's target tokens (all context-parallel parts together).

    Returns megatron's legacy 2-tuple: the schedule multiplies by the CP size and divides by the
    number of micro-batches, and DDP averages over data x context parallel ranks, so each CP rank
    contributes its local sum divided by the micro-batch's *total* token count.
    """
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    local_sum = (losses * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
    loss = local_sum / totals[1].clamp(min=1.0)
    return loss, {"ce": totals}


def forward_step(
    device: torch.device, data_iterator: Iterator[Batch], model: Any
) -> tuple[torch.Tensor, Callable]:
    # The mode draw needs no call here: megatron's schedule tells each layer its micro-batch index
    # (TransformerLayer.current_microbatch), which also holds when recomputation replays the forward.
    batch = shard_batch(next(data_iterator))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _data_iterators(batches: list[Batch], num_chunks: int) -> Any:
    # Every virtual-pipeline chunk walks the same micro-batches in order; megatron wants one
    # iterator per chunk then, and a bare iterator without interleaving.
    its = [iter(batches) for _ in range(num_chunks)]
    return its if num_chunks > 1 else its[0]


def _reduce_ce(store: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(sum of token losses, token count) over this iteration, all data-parallel replicas.

    Only the last pipeline stage has losses; every rank takes part in the all-reduce so that all
    ranks see the same value (the NaN policy must be decided identically everywhere). Tensor- and
    context-parallel ranks of one replica hold identical totals, which cancels in the ratio.
    """
    device = collective_device()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for item in store:
        totals += item["ce"].detach().to(device, torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    # Every tensor- and context-parallel rank of a replica reported the same (CP-reduced) totals.
    totals /= (
        parallel_state.get_tensor_model_parallel_world_size()
        * parallel_state.get_context_parallel_world_size()
    )
    totals = totals.cpu()
    return float(totals[0]), float(totals[1])


@dataclass
class StepOutput:
    ce_loss: float
    grad_norm: float | None
    applied: bool
    aux: dict[str, float]
    tokens: int


def optimizer_step(optimizer: Any) -> tuple[bool, float | None]:
    """megatron's optimizer step split open so a non-finite grad norm is seen *before* the update.

    Returns (finite, grad_norm). With fp16 the dynamic loss scaler's overflow skip is kept.
    """
    found_inf = optimizer.prepare_grads()
    scaler = getattr(optimizer, "grad_scaler", None)
    if scaler is not None:
        scaler.update(found_inf)
    if found_inf:
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if grad_norm is not None and not math.isfinite(grad_norm):
        return False, grad_norm
    if optimizer.config.clip_grad > 0.0:
        optimizer.clip_grad_norm(optimizer.config.clip_grad)
    optimizer.step_with_ready_grads()
    return True, grad_norm


class MegatronEngine:
    """Forward/backward via megatron's schedules, update via the megatron optimizer."""

    def __init__(
        self, cfg: TrainConfig, model: list[Any], optimizer: Any, scheduler: Any, device: torch.device
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.device = device
        # What checkpoint.save_checkpoint stores optimizer state from.
        self.ckpt_optimizer = optimizer
        config = model[0].config
        self.model_config = config
        config.grad_scale_func = optimizer.scale_loss
        # Grad reduction and the final embedding all-reduce happen inside the schedule.
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
        if len(model) > 1:
            config.no_sync_func = [c.no_sync for c in model]
        else:
            config.no_sync_func = model[0].no_sync

    def forward_backward(self, iteration: int, batches: list[Batch], forward_only: bool) -> list[dict]:
        cfg = self.cfg
        if not forward_only:
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            # Like megatron's MoE aux loss: the alignment gradient is injected by an autograd hook, so it
            # must carry the loss scale, CP factor and 1/num_microbatches of the CE loss by hand.
            grad_scale = float(self.optimizer.get_loss_scale()) if cfg.train.precision == "fp16" else 1.0
            set_alignment_loss_scale(
                alignment_loss_scale(
                    len(batches), parallel_state.get_context_parallel_world_size(), grad_scale
                )
            )
        set_microbatch(iteration)
        return get_forward_backward_func()(
            forward_step_func=partial(forward_step, self.device),
            data_iterator=_data_iterators(batches, len(self.model)),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def step(self) -> tuple[bool, float | None]:
        return optimizer_step(self.optimizer)

    def discard_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def eval_mode(self, on: bool) -> None:
        for chunk in self.model:
            chunk.train(not on)


def train_step(engine: Any, iteration: int, batches: list[Batch]) -> StepOutput:
    store = engine.forward_backward(iteration, batches, forward_only=False)
    ce_sum, count = _reduce_ce(store)
    ce = ce_sum / max(count, 1.0)
    aux = ssa_step_metrics(engine.model_config)
    if not math.isfinite(ce):
        engine.discard_grads()
        return StepOutput(ce, None, False, aux, int(count))
    applied, grad_norm = engine.step()
    return StepOutput(ce, grad_norm, applied, aux, int(count))


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between iterations, saves and exits."""

    requested: bool = False
    signum: int | None = None

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            self.signum = signum

        signal.signal(signal.SIGTERM, handler)

    def agreed(self) -> bool:
        """All ranks stop together: any rank's signal stops everyone at the same iteration."""
        t = torch.tensor([1.0 if self.requested else 0.0], device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def _count_skipped_update(
    out: StepOutput, iteration: int, state: TrainState, t: Any, logger: MetricsLogger
) -> None:
    """Account an update dropped for a non-finite loss or grad norm; raise where the policy says stop."""
    what = f"loss {out.ce_loss}" if not math.isfinite(out.ce_loss) else f"grad norm {out.grad_norm}"
    if out.grad_norm is None and math.isfinite(out.ce_loss):
        what = "gradient overflow (fp16 loss scale)"
    if t.nan_policy == "stop" and "overflow" not in what:
        raise NonFiniteError(
            f"iteration {iteration}: non-finite {what}; stopping (train.nan_policy=stop). Lower optim.lr, "
            "check the data, or resume from the last checkpoint with train.nan_policy=skip"
        )
    state.skipped += 1
    logger.print(f"iteration {iteration}: non-finite {what}; update skipped ({state.skipped} so far)")
    if state.skipped > t.max_skipped_steps:
        raise NonFiniteError(
            f"{state.skipped} updates skipped for non-finite loss/grad (train.max_skipped_steps="
            f"{t.max_skipped_steps}); the run is diverging. Lower optim.lr or resume from an earlier "
            "checkpoint"
        )


def train(
    cfg: TrainConfig,
    engine: Any,
    state: TrainState,
    next_batches: Callable[[], list[Batch]],
    logger: MetricsLogger,
    flops_per_sequence: float,
    peak_tflops: float | None,
    device: torch.device,
    on_interval: Callable[[int, bool], None],
    stop: StopFlag,
) -> TrainState:
    """Run iterations state.iteration+1 .. train_iters. `on_interval(iteration, stopping)` runs
    validation/checkpointing after each iteration (it decides from the config what is due)."""
    t = cfg.train
    num_micro = None
    world = dist.get_world_size() if dist.is_initialized() else 1
    with ScheduledGC(t.gc_interval) as collector:
        while state.iteration < t.train_iters:
            iteration = state.iteration + 1
            start = time.perf_counter()
            batches = next_batches()
            num_micro = len(batches)
            out = train_step(engine, iteration, batches)
            elapsed = time.perf_counter() - start
            state.iteration = iteration
            state.consumed_samples += t.global_batch_size
            lr = engine.scheduler.optimizer.param_groups[0]["lr"]
            if out.applied and engine.scheduler is not None:
                engine.scheduler.step(1)
            if not out.applied:
                _count_skipped_update(out, iteration, state, t, logger)
            tokens = (
                num_micro
                * t.micro_batch_size
                * cfg.data.seq_length
                * parallel_state.get_data_parallel_world_size()
            )
            tflops = flops_per_sequence * t.global_batch_size / elapsed / world / 1e12
            mcfg = engine.model_config
            align = out.aux.get("align_loss")
            metrics: dict[str, Any] = {
                "loss": out.ce_loss + (mcfg.alignment_weight * align if align is not None else 0.0),
                "ce_loss": out.ce_loss,
                **out.aux,
                "mode": "".join(m[0].upper() for m in drawn_modes(mcfg, iteration, num_micro)),
                "lr": lr,
                "grad_norm": out.grad_norm,
                "tokens_per_s": tokens / elapsed,
                "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None,
                "mem_gib": memory_gib(device),
                "skipped": state.skipped or None,
            }
            state.history.append({"iteration": iteration, **metrics})
            if iteration % cfg.logging.interval == 0 or iteration == t.train_iters:
                logger.log_step(iteration, metrics)
            collector.step(iteration)
            stopping = stop.agreed()
            if t.stop_after is not None and iteration == t.stop_after and iteration < t.train_iters:
                on_interval(iteration, True)
                logger.print(f"stopped after iteration {iteration} (train.stop_after)")
                break
            on_interval(iteration, stopping)
            if stopping:
                logger.print(
                    f"signal {stop.signum or 'on another rank'} received: stopped after iteration {iteration}"
                )
                break
    return state
