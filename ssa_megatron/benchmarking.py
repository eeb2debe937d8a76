"""What every benchmark script shares: CUDA-event timing, the environment record, the JSON result.

Numbers are medians of repeated CUDA-event timings after warm-up, and every result file says
which GPU, which torch/triton and when, so figures from different machines are never mixed up.
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _time_call_ms(fn: Callable[[], object]) -> float:
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved_cuda_times_ms(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Wall time of each of ``reps`` calls of every function, in milliseconds, the functions taking
    turns (one call of each, then the next round).

    Taking turns spreads slow drift (clocks and temperature settling over a minute of load) over every
    function alike; timing one function's repetitions after another's charges the drift to whichever
    runs later. Without CUDA (smoke runs of the scripts on CPU) it uses the host clock; such numbers
    are not benchmark figures and the result files say ``"gpu": "cpu"``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_call_ms(fn))
    return times


def cuda_times_ms(fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
    """Wall time of each of ``reps`` calls of ``fn`` on the current CUDA stream, in milliseconds."""
    return interleaved_cuda_times_ms({"fn": fn}, reps, warmup)["fn"]


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median of ``cuda_times_ms``."""
    return statistics.median(cuda_times_ms(fn, reps, warmup))


# Host calls that wait for the device (or read a device value, which waits): where they happen per
# step, the GPU drains and then idles while the host launches again.
_HOST_WAITS = frozenset({
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "aten::_local_scalar_dense", "aten::nonzero",
})  # fmt: skip


_DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
_LAUNCHES = frozenset({"cuda_runtime", "cuda_driver"})
_HOST_OPS = frozenset({"cpu_op", "user_annotation"})


def _enclosing_ops(ops: list[dict], moments: list[tuple[float, Any]]) -> dict[Any, list[str]]:
    """For each ``(time, key)``, the names of the host ops open at that time, outermost first (one
    thread's ops, which nest)."""
    ops = sorted(ops, key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack: list[dict] = []
    out: dict[Any, list[str]] = {}
    i = 0
    for moment, key in sorted(moments, key=lambda m: m[0]):
        while i < len(ops) and ops[i]["ts"] <= moment:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < ops[i]["ts"]:
                stack.pop()
            stack.append(ops[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < moment:
            stack.pop()
        out[key] = [e["name"] for e in stack]
    return out


def idle_gaps(trace_events: list[dict], steps: int, top: int = 12) -> dict[str, Any]:
    """Where the device waited for the host, from a Kineto chrome trace's events.

    Every stretch of idle device time between two pieces of device work is charged to the host op
    that launched the work ending it (outermost and innermost op open at the launch): the GPU was
    waiting for that launch. Returns the idle time per call and the ``top`` charges (ms and gaps per
    call, largest first), by launching op and by the kernel that ended the gap.
    """
    work = sorted((e for e in trace_events if e.get("cat") in _DEVICE_WORK and "dur" in e),
                  key=lambda e: e["ts"])  # fmt: skip
    launch_of = {e["args"]["correlation"]: e for e in trace_events
                 if e.get("cat") in _LAUNCHES and "correlation" in e.get("args", {})}  # fmt: skip
    gaps: list[tuple[float, dict]] = []
    busy_until = None
    for event in work:
        if busy_until is not None and event["ts"] > busy_until:
            gaps.append((event["ts"] - busy_until, event))
        end = event["ts"] + event["dur"]
        busy_until = end if busy_until is None else max(busy_until, end)
    moments_by_thread: dict[Any, list[tuple[float, int]]] = {}
    for n, (_, event) in enumerate(gaps):
        launch = launch_of.get(event.get("args", {}).get("correlation"))
        if launch is not None:
            moments_by_thread.setdefault(launch["tid"], []).append((launch["ts"], n))
    stacks: dict[int, list[str]] = {}
    for tid, moments in moments_by_thread.items():
        ops = [e for e in trace_events if e.get("cat") in _HOST_OPS and e.get("tid") == tid and "dur" in e]
        stacks.update(_enclosing_ops(ops, moments))
    by_op: dict[str, list[float]] = {}
    by_kernel: dict[str, list[float]] = {}
    for n, (gap_us, event) in enumerate(gaps):
        names = stacks.get(n) or ["(no host op)"]
        op = names[0] if len(names) == 1 else f"{names[0]} > {names[-1]}"
        for table, key in ((by_op, op), (by_kernel, event["name"])):
            charge = table.setdefault(key[:160], [0.0, 0])
            charge[0] += gap_us
            charge[1] += 1

    def ranked(table: dict[str, list[float]]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": k, "ms": us / 1e3 / steps, "gaps": n / steps} for k, (us, n) in rows]

    return {
        "idle_ms": sum(g for g, _ in gaps) / 1e3 / steps,
        "by_launching_op": ranked(by_op),
        "by_next_kernel": ranked(by_kernel),
    }


def kernel_profile(fn: Callable[[], object], steps: int, top: int = 25) -> dict[str, Any]:
    """Where the device time of ``fn`` goes: per call, the busy time summed over kernels and copies,
    the wall time, the ``top`` kernels by time (name, ms, launches), the host calls that waited
    for the device, and (on a GPU) the device's idle gaps charged to the host ops it waited for
    (``idle_gaps``). Busy well under wall means the device waited for the host (launch gaps, syncs).
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
    result = {
        "steps": steps,
        "wall_ms": wall_ms,
        "device_busy_ms": sum(row[1] for row in rows),
        "top_kernels": [{"name": n[:120], "ms": ms, "launches": c} for n, ms, c in rows[:top]],
        "host_waits": sorted(waits, key=lambda w: -w["ms"]),
    }
    if on_gpu:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            result["idle_gaps"] = idle_gaps(json.loads(trace.read_text())["traceEvents"], steps)
    return result


def input_grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> None:
    """Backward of ``out`` into ``inputs``, the gradients returned and dropped.

    Not accumulated into ``.grad``: inside a model q, k and v are activations, and an accumulation
    would add to every call a read-modify-write of each gradient (0.1 ms per query-sized tensor at
    32k tokens on an H200) that is not attention's work.
    """
    torch.autograd.grad(out, inputs, grad_out)


def attention_inputs(
    t: int, q_heads: int, kv_heads: int, head_dim: int, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 q, k, v (leaves requiring grad) and an output gradient, ``[1, t, heads, head_dim]``,
    seeded by ``t``."""
    gen = torch.Generator(device=device).manual_seed(t)

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(1, t, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)

    q, k, v = (draw(heads).requires_grad_(True) for heads in (q_heads, kv_heads, kv_heads))
    return q, k, v, draw(q_heads)


def dense_sdpa_calls(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """The dense baseline's forward and forward+backward: SDPA causal on ``[B, H, T, D]``, K/V expanded
    to the query heads here, outside the timed calls (what a dense GQA layer hands to SDPA's flash
    backend)."""
    import torch.nn.functional as F

    group = q.shape[2] // k.shape[2]
    qd = q.detach().transpose(1, 2).contiguous().requires_grad_(True)
    kd = k.detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous().requires_grad_(True)
    vd = v.detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous().requires_grad_(True)
    dod = do.transpose(1, 2).contiguous()

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)

    return forward, lambda: input_grads(forward(), (qd, kd, vd), dod)


def sparse_branch_fwdbwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, block_size: int, block_count: int
) -> Callable[[], None]:
    """The whole SSA sparse branch (block keys + selection + selected attention), forward+backward."""
    from kernels import ssa

    return lambda: input_grads(ssa.sparse_attention(q, k, v, block_size, block_count)[0], (q, k, v), do)


def sparse_over_dense_device(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    block_size: int,
    block_count: int,
    reps: int,
) -> dict[str, float]:
    """Device busy time (kernels only, ``kernel_profile``) of the sparse branch and of dense SDPA, each
    forward+backward, and their ratio: what the two cost inside a model, where the host launches
    ahead; wall times would also hold each call's launch overhead."""
    _, dense = dense_sdpa_calls(q, k, v, do)
    sparse = sparse_branch_fwdbwd(q, k, v, do, block_size, block_count)
    dense_ms = kernel_profile(dense, reps)["device_busy_ms"]
    sparse_ms = kernel_profile(sparse, reps)["device_busy_ms"]
    return {"sdpa_fwdbwd_device_ms": dense_ms, "sparse_fwdbwd_device_ms": sparse_ms,
            "sparse_over_dense_device": sparse_ms / dense_ms}  # fmt: skip


# The SSA authors' 1B model (github.com/zhenyi4/ssa) and the NSA kernels it runs on
# (github.com/fla-org/native-sparse-attention): the files tools/authors_step.py assembles, relative
# to each checkout.
AUTHORS_MODEL_DIR = Path("configs") / "ssa-1b-init"
AUTHORS_FILES = (AUTHORS_MODEL_DIR / "config.json", AUTHORS_MODEL_DIR / "configuration_llama_nsa.py",
                 AUTHORS_MODEL_DIR / "modeling_llama_nsa.py", Path("hf_files") / "parallel.py")  # fmt: skip
NSA_FILES = (Path("native_sparse_attention") / "ops" / "utils.py",)


def authors_checkout_problem(authors_repo: Path, nsa_repo: Path) -> str | None:
    """One line naming the first checkout that lacks a file the authors' step needs, or None."""
    for flag, root, files, source in (
        ("--authors-repo", authors_repo, AUTHORS_FILES, "zhenyi4/ssa"),
        ("--nsa-repo", nsa_repo, NSA_FILES, "fla-org/native-sparse-attention"),
    ):
        missing = [str(f) for f in files if not (root / f).is_file()]
        if missing:
            return f"{flag} {root}: no {missing[0]} there; pass a checkout of github.com/{source}"
    return None


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
