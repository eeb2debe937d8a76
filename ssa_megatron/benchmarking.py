"""What every benchmark script shares: CUDA-event timing, the environment record, the JSON result.

Numbers are medians of repeated CUDA-event timings after warm-up, and every result file says
which GPU, which torch/triton and when, so figures from different machines are never mixed up.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median wall time of ``fn`` on the current CUDA stream, in milliseconds.

    Without CUDA (smoke runs of the scripts on CPU) it falls back to the host clock; such
    numbers are not benchmark figures and the result files say ``"gpu": "cpu"``.
    """
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 dense matmul rate of this GPU, measured (the peak that MFU-style targets refer to)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms = cuda_time_ms(lambda: a @ b, reps=reps, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def environment() -> dict[str, Any]:
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": now.isoformat(timespec="seconds"),
    }


def write_result(result: dict[str, Any], prefix: str, out: Path | None = None) -> Path:
    """Write ``result`` as JSON (default ``benchmarks/results/<prefix>_<utc time>.json``)."""
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
        out = RESULTS_DIR / f"{prefix}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out
