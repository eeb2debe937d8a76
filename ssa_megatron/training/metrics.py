"""Per-iteration metrics: console (progress bar on a terminal, plain lines in logs), TensorBoard, wandb."""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

import torch

from ssa_megatron.training.config import TrainConfig

# Column order and format of the console line; keys missing from a step are left out.
_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("ce_loss", "ce {:.4f}"),
    ("align_loss", "align {:.4g}"),
    ("sparsity", "sparsity {:.3f}"),
    ("mode", "mode {}"),
    ("lr", "lr {:.3e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "tok/s {:.0f}"),
    ("tflops", "TFLOP/s {:.2f}"),
    ("mfu", "MFU {:.1%}"),
    ("mem_gib", "mem {:.2f}GiB"),
    ("skipped", "skipped {}"),
)


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, fmt in _FIELDS:
        value = metrics.get(key)
        if value is None:
            continue
        parts.append(fmt.format(value))
    return " | ".join(parts)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        # ru_maxrss is KiB on Linux: peak resident memory of this process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")


class MetricsLogger:
    """Only the logging rank writes; other ranks get a logger whose methods do nothing."""

    def __init__(
        self, cfg: TrainConfig, enabled: bool, total_iters: int, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.total = total_iters
        self.stream = stream or sys.stdout
        progress = cfg.logging.progress
        self.bar = enabled and (progress == "bar" or (progress == "auto" and self.stream.isatty()))
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                self.print(
                    f"logging.wandb_project={cfg.logging.wandb_project!r} set but wandb is not installed; "
                    "logging to console/TensorBoard only"
                )
            else:
                self.wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict())

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            # Finish the progress line before a normal message.
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()

    def log_step(self, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = f"iter {iteration:>6d}/{self.total} | " + format_metrics(metrics)
        if self.bar:
            width = 24
            done = int(width * iteration / max(self.total, 1))
            self.stream.write("\r[" + "#" * done + "." * (width - done) + "] " + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
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
            if "mode" in metrics:
                self.tb.add_scalar(f"{prefix}/mode_full", float(metrics["mode"] == "full"), iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numeric.items()}, step=iteration)

    def close(self) -> None:
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
