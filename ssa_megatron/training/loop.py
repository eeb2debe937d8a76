"""The training loop: one readable iteration function and the loop around it.

Per iteration: fetch this rank's micro-batches, run the engine's forward/backward (every SSA
layer draws each micro-batch's attention mode from (seed, iteration, micro-batch)), check the
loss and grad norm, step the optimizer and the LR schedule, then hand the iteration's metrics to
the logger and let the caller validate/checkpoint. SIGTERM/SIGINT stop after the current step.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ssa_megatron.model.alignment import tracker
from ssa_megatron.model.mode import planned_modes
from ssa_megatron.parallel.state import collective_device
from ssa_megatron.training.config import TrainConfig
from ssa_megatron.training.engine import Batch, Engine
from ssa_megatron.training.gc_schedule import ScheduledGC
from ssa_megatron.training.metrics import MetricsLogger, memory_gib

# Per-iteration metrics kept in memory (RunResult.history): the last HISTORY_LENGTH iterations.
HISTORY_LENGTH = 1000


class NonFiniteError(RuntimeError):
    """Raised under train.nan_policy=stop (or after too many skipped steps)."""


def drawn_modes(model_config: Any, iteration: int, num_microbatches: int) -> list[str]:
    """The attention mode that drives each micro-batch of an iteration (what every SSA layer draws)."""
    return planned_modes(model_config, iteration, num_microbatches)


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
    # Bounded: a long run must not grow host memory with its step count.
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))


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


def train_step(engine: Engine, iteration: int, batches: list[Batch]) -> StepOutput:
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
    """SIGTERM or a first Ctrl-C (SIGINT) asks the loop to stop after the current step (it saves and
    exits 0); a second Ctrl-C aborts at once (the default SIGINT action: no save)."""

    requested: bool = False
    signum: int | None = None
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handler)

    def restore(self) -> None:
        """Put back the handlers that were there before `install` (training is over)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # os.write: a signal handler may interrupt a print in progress on the same stream.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving; "
                    "press Ctrl-C again to abort at once without saving\n".encode())  # fmt: skip

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


@dataclass
class LoopContext:
    """What the loop needs besides the engine and its state."""

    cfg: TrainConfig
    # This rank's micro-batches of the next iteration.
    next_batches: Callable[[], list[Batch]]
    logger: MetricsLogger
    # Model FLOPs of one sequence's forward+backward, and the device's peak (None: unknown, no MFU).
    flops_per_sequence: float
    peak_tflops: float | None
    device: torch.device
    # Runs after each iteration: validation/checkpoints as due; `stopping` asks for the final save.
    after_iteration: Callable[[int, bool], None]
    stop: StopFlag


def iteration_metrics(
    ctx: LoopContext, engine: Engine, state: TrainState, out: StepOutput, lr: float, elapsed: float,
    num_micro: int,
) -> dict[str, Any]:  # fmt: skip
    """The step's metrics as logged (console, TensorBoard, wandb) and kept in the history."""
    cfg, t = ctx.cfg, ctx.cfg.train
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = parallel_state.get_data_parallel_world_size()
    tokens = num_micro * t.micro_batch_size * cfg.data.seq_length * dp
    tflops = ctx.flops_per_sequence * t.global_batch_size / elapsed / world / 1e12
    mcfg = engine.model_config
    align = out.aux.get("align_loss")
    modes = drawn_modes(mcfg, state.iteration, num_micro)
    return {
        "loss": out.ce_loss + (mcfg.alignment_weight * align if align is not None else 0.0),
        "ce_loss": out.ce_loss,
        **out.aux,
        # One letter per micro-batch (F: full attention drove it, S: sparse), and the full share.
        "mode": "".join(m[0].upper() for m in modes),
        "mode_full": sum(m == "full" for m in modes) / len(modes),
        "lr": lr,
        "grad_norm": out.grad_norm,
        "consumed_tokens": state.consumed_samples * cfg.data.seq_length,
        "ms_per_iter": elapsed * 1e3,
        "tokens_per_s": tokens / elapsed,
        "tflops": tflops,
        "mfu": tflops / ctx.peak_tflops if ctx.peak_tflops else None,
        "mem_gib": memory_gib(ctx.device),
        "skipped": state.skipped,
    }


def train(engine: Engine, state: TrainState, ctx: LoopContext) -> TrainState:
    """Run iterations state.iteration+1 .. train_iters (or up to train.stop_after / a stop signal)."""
    t = ctx.cfg.train
    with ScheduledGC(t.gc_interval) as collector:
        while state.iteration < t.train_iters:
            iteration = state.iteration + 1
            start = time.perf_counter()
            batches = ctx.next_batches()
            out = train_step(engine, iteration, batches)
            elapsed = time.perf_counter() - start
            state.iteration = iteration
            state.consumed_samples += t.global_batch_size
            lr = engine.learning_rate()
            if out.applied and engine.scheduler is not None:
                engine.scheduler.step(1)
            if not out.applied:
                _count_skipped_update(out, iteration, state, t, ctx.logger)
            metrics = iteration_metrics(ctx, engine, state, out, lr, elapsed, len(batches))
            state.history.append({"iteration": iteration, **metrics})
            ctx.logger.log_step(iteration, metrics)
            collector.step(iteration)
            stopping = ctx.stop.agreed()
            if t.stop_after is not None and iteration == t.stop_after and iteration < t.train_iters:
                ctx.after_iteration(iteration, True)
                ctx.logger.print(f"stopped after iteration {iteration} (train.stop_after)")
                break
            ctx.after_iteration(iteration, stopping)
            if stopping:
                who = signal.Signals(ctx.stop.signum).name if ctx.stop.signum else "a signal on another rank"
                ctx.logger.print(f"{who}: stopped after iteration {iteration}")
                break
    return state
