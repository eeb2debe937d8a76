"""Per-iteration metrics: console (a tqdm bar on a terminal, plain lines in logs), TensorBoard, wandb.

The console shows a Megatron-like table that fits 120 columns: a header (repeated every
HEADER_EVERY rows) and one row per logged iteration, e.g.

    time                iteration tokens  ms/it    eta    loss      ce   align      lr   gnorm ...
    12-07 14:20:01          20/60  41.0k    123  4m56s  5.1234  5.0000 1.2e-03 3.0e-03   0.512 ...

(then tok/s, MFU, full, mem, skip)
The columns are explained once at the start (`column_legend`).
"""

from __future__ import annotations

import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch

from ssa_megatron.training.config import TrainConfig

LINE_WIDTH = 120


HEADER_EVERY = 25

# (header, width, format of the value); a value that is absent shows as "-".
_COLUMNS = (
    ("iteration", 14, None),
    ("tokens", 6, "si"),
    ("ms/it", 6, "{:.0f}"),
    ("eta", 6, "duration"),
    ("loss", 7, "{:.4f}"),
    ("ce", 7, "{:.4f}"),
    ("align", 7, "{:.1e}"),
    ("lr", 7, "{:.1e}"),
    ("gnorm", 7, "norm"),
    ("tok/s", 6, "si"),
    ("MFU", 5, "{:.1%}"),
    ("full", 4, "{:.0%}"),
    ("mem", 6, "{:.1f}G"),
    ("skip", 4, "{}"),
)
_KEYS = {
    "tokens": "consumed_tokens", "ms/it": "ms_per_iter", "loss": "loss", "ce": "ce_loss",
    "align": "align_loss", "lr": "lr", "gnorm": "grad_norm", "tok/s": "tokens_per_s", "MFU": "mfu",
    "full": "mode_full", "mem": "mem_gib", "skip": "skipped",
}  # fmt: skip
_TIME_WIDTH = 14


def column_legend(alignment_weight: float) -> str:
    """The log header's explanation of the table's columns."""
    return "\n".join([
        "columns: tokens = tokens consumed so far | ms/it = time per iteration | eta = time left at the",
        f"  recent pace | loss = ce + {alignment_weight:g} x align (alignment loss, mean over layers) |",
        "  gnorm = grad norm | MFU = model FLOPs utilisation | mem = peak memory (GiB) |",
        "  skip = updates skipped so far (non-finite loss or grad norm)",
        "  full = share of the step's micro-batches that full attention drove (the rest: sparse; in ssa",
        "  mode each micro-batch draws its mode with probability model.p_full)",
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


def format_header() -> str:
    return " ".join(["time".ljust(_TIME_WIDTH)] + [name.rjust(width) for name, width, _ in _COLUMNS])


def format_line(iteration: int, total: int, metrics: dict[str, Any], eta_s: float | None) -> str:
    """One row of the table (see format_header) for `iteration`."""
    values = {**{name: metrics.get(key) for name, key in _KEYS.items()}, "eta": eta_s}
    cells = [f"{datetime.now():%m-%d %H:%M:%S}"]
    for name, width, fmt in _COLUMNS:
        if name == "iteration":
            text = f"{iteration}/{total}"
        else:
            value = values[name]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                text = "-"
            elif fmt == "si":
                text = _si(value)
            elif fmt == "duration":
                text = _duration(value)
            elif fmt == "norm":
                # Three decimals while they fit the column; a diverging norm needs none.
                big = f"{value:.0f}" if abs(value) < 1e7 else f"{value:.0e}"
                text = f"{value:.3f}" if abs(value) < 1000 else big
            else:
                text = fmt.format(value)
        cells.append(text.rjust(width))
    return " ".join(cells)


_ROW = re.compile(r"^\d\d-\d\d \d\d:\d\d:\d\d +\d+/\d+ ")


def parse_rows(log: str) -> list[dict[str, str]]:
    """The table rows in a console log, each as {column: cell} (column names as in the header).

    For tools and tests that read a run's printed metrics back.
    """
    names = [name for name, _, _ in _COLUMNS]
    rows = []
    for line in log.splitlines():
        if _ROW.match(line):
            date, clock, *cells = line.split()
            rows.append({"time": f"{date} {clock}", **dict(zip(names, cells))})
    return rows


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
        self._rows = 0
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
            if self._rows % HEADER_EVERY == 0:
                self.print(format_header())
            self._rows += 1
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
