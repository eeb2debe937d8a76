"""tools/bench_inference.py: the --decode benchmark (CPU smoke run), the prefill phase split and the
decode byte accounting it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.ssa.decode_kernel import decode_read_bytes
from tests.run_helpers import PREFILL_KERNELS, load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_decode_benchmark_times_both_modes_and_counts_bytes(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_inference.py"), "--config",
           str(ROOT / "examples" / "tiny_cpu.yaml"), "--model.num_layers", "2", "--reps", "1",
           "--warmup", "0", "--decode", "2x40", "1x37", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in result["rows"]] == [(2, 40), (1, 37)]
    for row in result["rows"]:
        assert row["full_ms"] > 0 and row["sparse_ms"] > 0
        assert row["full_over_sparse"] == pytest.approx(row["full_ms"] / row["sparse_ms"])
        read = row["attention_bytes_per_step"]
        assert row["sparse_bytes_over_minimum"] == pytest.approx(read["kernels"] / read["minimum"])
    assert any("sparse attention bytes" in c for c in result["checks"])


def test_decode_argument_errors_are_one_line_usage_errors(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_inference.py"), "--config",
           str(ROOT / "examples" / "tiny_cpu.yaml"), "--decode", "16by32768"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--decode takes BATCHxCONTEXT, e.g. 16x32768; got '16by32768'" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_prefill_phases_split_kernels_by_name() -> None:
    profile = {"top_kernels": PREFILL_KERNELS}
    phases = load_tool("bench_inference").phase_ms(profile)
    assert phases == pytest.approx(
        {"selection": 3.25, "sparse_attention": 1.5, "dense_attention": 10.0, "non_attention": 45.0}
    )
    # flash's forward carries "_fwd_kernel" in its name too: it is dense attention, not the SSA forward.
    flash = {"name": "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "ms": 2.0}
    phases = load_tool("bench_inference").phase_ms({"top_kernels": [*PREFILL_KERNELS, flash]})
    assert phases["dense_attention"] == pytest.approx(12.0)
    assert phases["sparse_attention"] == pytest.approx(1.5)


def test_decode_bytes_of_the_1b_layout() -> None:
    # Batch 16 at 128k tokens, 2 KV heads, head_dim 64, blocks of 16, 16 selected, bf16.
    read = decode_read_bytes(16, 131072, 2, 16, 64, 16, 16, 2)
    units = 16 * 2
    assert read["full"] == units * 2 * 131072 * 64 * 2  # every key and value: 1 GiB per layer
    block_keys = units * 8192 * 64 * 2
    assert read["minimum"] == block_keys + units * 2 * 16 * 16 * 64 * 2
    # The selection reads the block keys twice; everything else is small next to them.
    assert 2 * block_keys < read["kernels"] < 2.4 * block_keys
    # A context shorter than a block: no complete block, only the own block's tokens.
    short = decode_read_bytes(1, 5, 1, 1, 16, 16, 4, 2)
    assert short["minimum"] == 2 * 16 * 16 * 2
