"""Per-iteration metrics: console (a tqdm bar on a terminal, plain lines in logs), TensorBoard, wandb.

The console line is Megatron-like and fits 120 columns, e.g.

    2026-12-07 14:20:01 it 20/60 | 41.0k tok | 123ms/it | eta 4m56s | loss 5.1234 ce 5.0000 al 1.2e-03 |
    lr 3.0e-03 gn 0.512 | 8.3k tok/s MFU 1.2% | full 50% | 1.23GiB

(one line); the columns are explained once in the header (`column_legend`).
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch

from ssa_megatron.training.config import TrainConfig

LINE_WIDTH = 120


def column_legend(alignment_weight: float) -> str:
    """The log header's explanation of the step line's columns."""
    return "\n".join([
        "columns: it = iteration/total | tok = tokens consumed | ms/it | eta = time left at the recent pace",
        f"  loss = ce + {alignment_weight:g} x al (alignment loss, mean over layers) | lr | gn = grad norm",
        "  tok/s | MFU = model FLOPs utilisation | peak memory | skip = skipped updates",
        "  full = share of the step's micro-batches that full attention drove (the rest: sparse;",
        "  in ssa mode each micro-batch draws its mode with probability model.p_full)",
    ])  # fmt: skip


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_line(iteration: int, total: int, metrics: dict[str, Any], eta_s: float | None) -> str:
    """The console line of one iteration (keys missing from `metrics` are left out)."""

    def get(key: str) -> Any:
        value = metrics.get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    groups = [f"{datetime.now():%Y-%m-%d %H:%M:%S} it {iteration}/{total}"]
    if get("consumed_tokens") is not None:
        groups.append(f"{_si(metrics['consumed_tokens'])} tok")
    if get("ms_per_iter") is not None:
        groups.append(f"{metrics['ms_per_iter']:.0f}ms/it")
    if eta_s is not None:
        groups.append(f"eta {_duration(eta_s)}")
    losses = [f"loss {metrics['loss']:.4f}"] if get("loss") is not None else []
    if get("ce_loss") is not None:
        losses.append(f"ce {metrics['ce_loss']:.4f}")
    if get("align_loss") is not None:
        losses.append(f"al {metrics['align_loss']:.1e}")
    groups.append(" ".join(losses))
    optim = [f"lr {metrics['lr']:.1e}"] if get("lr") is not None else []
    if get("grad_norm") is not None:
        optim.append(f"gn {metrics['grad_norm']:.3f}")
    groups.append(" ".join(optim))
    speed = [f"{_si(metrics['tokens_per_s'])} tok/s"] if get("tokens_per_s") is not None else []
    if get("mfu") is not None:
        speed.append(f"MFU {metrics['mfu']:.1%}")
    groups.append(" ".join(speed))
    if get("mode_full") is not None:
        groups.append(f"full {metrics['mode_full']:.0%}")
    if get("mem_gib") is not None:
        groups.append(f"{metrics['mem_gib']:.2f}GiB")
    if metrics.get("skipped"):
        groups.append(f"skip {metrics['skipped']}")
    return " | ".join(g for g in groups if g)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        # ru_maxrss is KiB on Linux: peak resident memory of this process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")


def tensorboard_dir(cfg: TrainConfig) -> str | None:
    """Where this run's TensorBoard events go: "auto" -> <checkpoint.dir>/tensorboard (per run)."""
    value = cfg.logging.tensorboard_dir
    if value == "auto":
        return str(Path(cfg.checkpoint.dir) / "tensorboard") if cfg.checkpoint.dir else None
    return value


class MetricsLogger:
    """Only the logging rank writes; other ranks get a logger whose methods do nothing."""

    def __init__(
        self, cfg: TrainConfig, enabled: bool, total_iters: int, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.total = total_iters
        self.interval = max(cfg.logging.interval, 1)
        self.stream = stream or sys.stdout
        self.bar: Any = None
        self.tb: Any = None
        self.wandb: Any = None
        # Pace for the ETA: the time of the first logged step (its iteration included) onwards.
        self._pace_start: tuple[int, float] | None = None
        if not enabled:
            return
        progress = cfg.logging.progress
        if progress == "bar" or (progress == "auto" and self.stream.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, file=self.stream, dynamic_ncols=True, unit="it", leave=True)
        tb_dir = tensorboard_dir(cfg)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tb_dir)
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                self.print(
                    f"logging.wandb_project={cfg.logging.wandb_project!r} set but wandb is not installed; "
                    "logging to console/TensorBoard only"
                )
            else:
                run_dir = cfg.checkpoint.dir
                self.wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    config=cfg.to_dict(),
                    dir=run_dir,
                    name=Path(run_dir).name if run_dir else None,
                )

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, iteration: int) -> None:
        """Training starts after `iteration` (0, or where a resume left off)."""
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.reset(total=self.total)
            self.bar.update(iteration)

    def eta(self, iteration: int) -> float | None:
        now = time.perf_counter()
        if self._pace_start is None:
            self._pace_start = (iteration, now)
            return None
        done = iteration - self._pace_start[0]
        if done <= 0:
            return None
        return (now - self._pace_start[1]) / done * (self.total - iteration)

    def log_step(self, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        eta = self.eta(iteration)
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            if metrics.get("loss") is not None:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if iteration % self.interval == 0 or iteration == self.total:
            self.print(format_line(iteration, self.total, metrics, eta))
            self.scalars("train", iteration, metrics)

    def scalars(self, prefix: str, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numeric.items()}, step=iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
