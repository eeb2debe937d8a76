"""The benchmark helpers: modes taking turns in timing, and idle device time charged to host launches."""

import json
from pathlib import Path

import pytest
import torch

from ssa_megatron.benchmarking import idle_gaps, interleaved_cuda_times_ms


def test_interleaved_timing_takes_turns_after_warmup() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("full", "ssa", "sparse")}
    times = interleaved_cuda_times_ms(fns, reps=3, warmup=2)
    assert calls == ["full", "ssa", "sparse"] * 5
    assert {name: len(samples) for name, samples in times.items()} == {"full": 3, "ssa": 3, "sparse": 3}
    assert all(t >= 0 for samples in times.values() for t in samples)


def _op(name: str, ts: float, dur: float, tid: int) -> dict:
    return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def _launch(ts: float, corr: int, tid: int, cat: str = "cuda_runtime") -> dict:
    return {"cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 2.0, "tid": tid,
            "args": {"correlation": corr}}


def _kernel(name: str, ts: float, dur: float, corr: int, stream: int = 7) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"correlation": corr, "stream": stream}}


def test_idle_gaps_charge_each_gap_to_the_launch_that_ended_it() -> None:
    events = [
        # Thread 1 (forward): a matmul, then a Triton kernel launched through the driver outside any op.
        _op("aten::mm", 0.0, 10.0, tid=1), _launch(5.0, 1, tid=1),
        _launch(40.0, 2, tid=1, cat="cuda_driver"),
        # Thread 2 (backward): a sort nested in an autograd node, launched late.
        _op("autograd::engine::evaluate_function: XBackward0", 100.0, 80.0, tid=2),
        _op("aten::sort", 150.0, 20.0, tid=2), _launch(160.0, 3, tid=2),
        # A later op on thread 2 that must not be taken for an enclosing one.
        _op("aten::add", 300.0, 5.0, tid=2),
        _kernel("gemm", 10.0, 30.0, 1),  # busy 10-40
        _kernel("_select_topk_kernel", 50.0, 100.0, 2),  # idle 40-50: charged to the driver launch
        _kernel("overlap_on_other_stream", 60.0, 20.0, 9, stream=8),  # no launch record, no idle
        _kernel("sort_kernel", 170.0, 10.0, 3),  # idle 150-170: charged to the backward's sort
    ]
    result = idle_gaps(events, steps=2)
    assert result["idle_ms"] == pytest.approx((10.0 + 20.0) / 1e3 / 2)
    by_op = {row["name"]: row for row in result["by_launching_op"]}
    assert set(by_op) == {"autograd::engine::evaluate_function: XBackward0 > aten::sort", "(no host op)"}
    assert by_op["autograd::engine::evaluate_function: XBackward0 > aten::sort"]["ms"] == pytest.approx(0.01)
    assert by_op["(no host op)"]["gaps"] == pytest.approx(0.5)
    assert [row["name"] for row in result["by_next_kernel"]] == ["sort_kernel", "_select_topk_kernel"]


def test_idle_gaps_read_a_real_profiler_trace(tmp_path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).relu().sum()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "cpu_op" and e.get("name") == "aten::mm" for e in events)
    # A CPU-only trace has no device work, so nothing is idle and nothing is charged.
    assert idle_gaps(events, steps=1) == {"idle_ms": 0.0, "by_launching_op": [], "by_next_kernel": []}
