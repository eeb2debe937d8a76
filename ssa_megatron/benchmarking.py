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


def cuda_times_ms(fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
    """Wall time of each of ``reps`` calls of ``fn`` on the current CUDA stream, in milliseconds.

    Without CUDA (smoke runs of the scripts on CPU) it falls back to the host clock; such
    numbers are not benchmark figures and the result files say ``"gpu": "cpu"``.
    """
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median of ``cuda_times_ms``."""
    return statistics.median(cuda_times_ms(fn, reps, warmup))


# Host calls that wait for the device (or read a device value, which waits): where they happen per
# step, the GPU drains and then idles while the host launches again.
_HOST_WAITS = frozenset({
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "aten::_local_scalar_dense", "aten::nonzero",
})  # fmt: skip


def kernel_profile(fn: Callable[[], object], steps: int, top: int = 25) -> dict[str, Any]:
    """Where the device time of ``fn`` goes: per call, the busy time summed over kernels and copies,
    the wall time, the ``top`` kernels by time (name, ms, launches), and the host calls that waited
    for the device. Busy well under wall means the device waited for the host (launch gaps, syncs).
    Without CUDA the ops' own CPU time stands in for kernel time (smoke runs)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    fn()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    rows, waits = [], []
    for event in prof.key_averages():
        if event.key in _HOST_WAITS and event.count:
            waits.append({"name": event.key, "ms": event.cpu_time_total / 1e3 / steps,
                          "calls": event.count / steps})  # fmt: skip
        if on_gpu:
            us = event.device_time_total if event.device_type.name == "CUDA" else 0
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1e3 / steps, event.count // steps))
    rows.sort(key=lambda row: -row[1])
    return {
        "steps": steps,
        "wall_ms": wall_ms,
        "device_busy_ms": sum(row[1] for row in rows),
        "top_kernels": [{"name": n[:120], "ms": ms, "launches": c} for n, ms, c in rows[:top]],
        "host_waits": sorted(waits, key=lambda w: -w["ms"]),
    }


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
