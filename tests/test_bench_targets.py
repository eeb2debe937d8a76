"""The training benchmark's target table, and the argument checks of it and of the SSA authors' step."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _row(step_ms: float, tokens_per_s: float, tflops: float, peak_gib: float) -> dict:
    return {"step_ms": step_ms, "step_tokens_per_s_per_gpu": tokens_per_s, "step_tflops_main_path": tflops,
            "peak_memory_gib": peak_gib}  # fmt: skip


def test_target_table_gives_each_target_its_value_and_verdict() -> None:
    bench = load_tool("bench_train")
    result = {
        "matmul_peak_tflops": 800.0,
        "geometries": {
            8192: {"full": _row(200.0, 40960.0, 420.0, 40.0), "ssa": _row(220.0, 37236.0, 380.0, 41.0)},
            32768: {"full": _row(1000.0, 32768.0, 500.0, 30.0), "ssa": _row(1050.0, 31208.0, 480.0, 33.0)},
        },
        "attention": {8192: {"sparse_over_dense_device": 0.2}},
        # The authors' step only at 8k: the 32k ratio is reported as not measured.
        "authors": {8192: {"step_tokens_per_s": 20000.0}},
    }
    table = {row["name"]: row for row in bench.target_table(result)}
    assert list(table) == list(bench.TARGETS)
    expected = {
        "ssa_over_full_8k": (200 / 220, "MISS"),  # 0.909 < 0.95
        "full_mfu_8k": (420 / 800, "PASS"),
        "ssa_over_full_32k": (1000 / 1050, "PASS"),  # 0.952 >= 0.92
        "ssa_over_authors_8k": (37236 / 20000, "PASS"),
        "ssa_over_authors_32k": (None, "NOT MEASURED"),
        "sparse_over_dense_8k": (0.2, "PASS"),
        "ssa_over_full_memory_8k": (41 / 40, "PASS"),
        "ssa_over_full_memory_32k": (33 / 30, "MISS"),  # 1.1 > 1.05
    }
    for name, (value, verdict) in expected.items():
        assert table[name]["value"] == pytest.approx(value), name
        assert table[name]["verdict"] == verdict, name
    assert table["ssa_over_full_8k"]["target"] == ">= 0.95"
    assert table["sparse_over_dense_8k"]["target"] == "<= 0.25"
    printed = bench.format_table(list(table.values())).splitlines()
    assert len(printed) == 1 + len(bench.TARGETS)
    assert printed[1].split()[:4] == ["ssa_over_full_8k", "0.909", ">=", "0.95"] and "MISS" in printed[1]
    assert "NOT MEASURED" in printed[5] and printed[5].split()[1] == "-"


def test_target_table_without_a_gpu_measures_nothing_it_cannot() -> None:
    bench = load_tool("bench_train")
    # A CPU smoke run: no matmul peak, no peak memory, no attention or authors' rows.
    rows = {"full": _row(2.0, 10.0, 1.0, None), "ssa": _row(2.5, 8.0, 1.0, None)}
    table = bench.target_table({"matmul_peak_tflops": None, "geometries": {8192: rows}, "attention": {},
                                "authors": {}})  # fmt: skip
    verdicts = {row["name"]: row["verdict"] for row in table}
    assert verdicts.pop("ssa_over_full_8k") == "MISS"
    assert set(verdicts.values()) == {"NOT MEASURED"}


def _run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tools" / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _fake_checkouts(tmp_path: Path) -> tuple[Path, Path]:
    """Folders holding the files the authors' step links (empty: only their presence is checked)."""
    authors, nsa = tmp_path / "ssa", tmp_path / "nsa"
    model = "configs/ssa-1b-init/"
    names = ("config.json", "configuration_llama_nsa.py", "modeling_llama_nsa.py")
    files = [*(authors / (model + n) for n in names), authors / "hf_files/parallel.py"]
    for path in (*files, nsa / "native_sparse_attention/ops/utils.py"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return authors, nsa


def _assert_one_line_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_authors_step_rejects_checkouts_without_their_files(tmp_path: Path) -> None:
    authors, nsa = _fake_checkouts(tmp_path)
    proc = _run_tool("authors_step.py", "--authors-repo", str(tmp_path / "nowhere"), "--nsa-repo", str(nsa))
    _assert_one_line_usage_error(proc, "--authors-repo", "nowhere", "configs/ssa-1b-init/config.json",
                                 "zhenyi4/ssa")  # fmt: skip
    (nsa / "native_sparse_attention/ops/utils.py").unlink()
    proc = _run_tool("authors_step.py", "--authors-repo", str(authors), "--nsa-repo", str(nsa))
    _assert_one_line_usage_error(proc, "--nsa-repo", "native_sparse_attention/ops/utils.py",
                                 "fla-org/native-sparse-attention")  # fmt: skip


def test_bench_train_rejects_bad_authors_paths(tmp_path: Path) -> None:
    authors, nsa = _fake_checkouts(tmp_path)
    config = ["--config", str(ROOT / "examples" / "tiny_cpu.yaml")]
    proc = _run_tool("bench_train.py", *config, "--authors-repo", str(authors))
    _assert_one_line_usage_error(proc, "--authors-repo and --nsa-repo go together")
    missing = str(tmp_path / "x")
    proc = _run_tool("bench_train.py", *config, "--authors-repo", str(authors), "--nsa-repo", missing)
    _assert_one_line_usage_error(proc, "--nsa-repo", missing, "native_sparse_attention/ops/utils.py")
    proc = _run_tool("bench_train.py", *config, "--authors-repo", str(authors), "--nsa-repo", str(nsa),
                     "--authors-site", str(tmp_path / "site"))  # fmt: skip
    _assert_one_line_usage_error(proc, "--authors-site", str(tmp_path / "site"), "no such folder")


def test_sparse_over_dense_device_times_both_calls_on_the_same_inputs() -> None:
    import torch

    from ssa_megatron.benchmarking import attention_inputs, sparse_over_dense_device

    q, k, v, do = attention_inputs(64, 4, 2, 16, device="cpu")
    assert [tuple(x.shape) for x in (q, k, v, do)] == [(1, 64, 4, 16), (1, 64, 2, 16), (1, 64, 2, 16),
                                                       (1, 64, 4, 16)]  # fmt: skip
    assert q.dtype == torch.bfloat16 and q.requires_grad and not do.requires_grad
    # Seeded by the length: the same inputs on every call.
    assert torch.equal(attention_inputs(64, 4, 2, 16, device="cpu")[0], q)
    row = sparse_over_dense_device(q, k, v, do, block_size=16, block_count=2, reps=1)
    assert row["sdpa_fwdbwd_device_ms"] > 0 and row["sparse_fwdbwd_device_ms"] > 0
    ratio = row["sparse_fwdbwd_device_ms"] / row["sdpa_fwdbwd_device_ms"]
    assert row["sparse_over_dense_device"] == pytest.approx(ratio)
    # Gradients are returned, not accumulated on the inputs.
    assert q.grad is None and k.grad is None
