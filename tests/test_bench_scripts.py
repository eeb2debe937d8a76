"""The benchmark scripts run end to end (CPU smoke run of a tiny model) and write well-formed results.

Their numbers only mean something on a GPU; here the point is that a device call never finds a
broken script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import PREFILL_KERNELS, load_tool

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), "--model.num_layers", "2", "--reps", "1",
        "--warmup", "0"]  # fmt: skip


def _run(script: str, out: Path, *extra: str) -> tuple[dict, str]:
    """The script's JSON result and its printed report."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), *TINY, *extra, "--out", str(out)],
        cwd=out.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_train_times_every_mode_and_checks_targets(tmp_path: Path) -> None:
    result, report = _run("bench_train.py", tmp_path / "train.json", "--modes", "full", "ssa",
                  "--data.seq_length", "64", "--model.block_count", "2", "--train.micro_batch_size", "2",
                  "--profile", "1")  # fmt: skip
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"full", "ssa"}
    for row in rows.values():
        assert row["seq_length"] == 64 and row["num_layers"] == 2
        assert row["fwd_bwd_ms"] > 0 and row["step_ms"] > 0
        assert len(row["step_ms_samples"]) == 1 and row["step_main_branches"][0][0] in ("full", "sparse")
        # Both branches run in ssa mode, so its honest FLOP count exceeds the main path's.
        profile = row["profile_fwd_bwd"]
        assert profile["steps"] == 1 and profile["device_busy_ms"] > 0 and profile["wall_ms"] > 0
        assert any(k["name"] == "aten::mm" and k["launches"] > 0 for k in profile["top_kernels"])
        # A step reads its loss on the host: the profile names that wait.
        assert any(w["name"] == "aten::_local_scalar_dense" for w in row["profile_step"]["host_waits"])
    assert "ssa 64 fwd_bwd: device busy" in report and "full 64 step: device busy" in report
    ssa_row = rows["ssa"]
    assert ssa_row["step_tflops_all_branches"] > ssa_row["step_tflops_main_path"]
    assert rows["full"]["step_tflops_all_branches"] == pytest.approx(rows["full"]["step_tflops_main_path"])
    assert result["gpu"] == "cpu" and result["seq_lengths"] == [64]
    assert all(row["recompute"] == "none" for row in rows.values())
    # Every target is reported; at 64 tokens none of them (set at 8k and 32k) is measured.
    bench = load_tool("bench_train")
    assert [t["name"] for t in result["targets"]] == list(bench.TARGETS)
    assert {t["verdict"] for t in result["targets"]} == {"NOT MEASURED"} and "NOT MEASURED" in report


def test_bench_inference_times_both_modes(tmp_path: Path) -> None:
    result, _ = _run("bench_inference.py", tmp_path / "prefill.json", "--seq-lens", "64", "96", "--profile")
    assert [r["T"] for r in result["rows"]] == [64, 96]
    for row in result["rows"]:
        assert row["full_ms"] > 0 and row["sparse_ms"] > 0
        assert row["speedup"] == pytest.approx(row["full_ms"] / row["sparse_ms"])
        # On CPU the naive attention's own ops are not named like kernels: the split is only checked
        # for consistency here (the GPU run names cuDNN/flash and the SSA kernels).
        assert 0 <= row["full_attention_ms"] <= row["full_busy_ms"]
        assert row["speedup_ceiling_free_attention"] >= 1.0


def test_prefill_attention_share_counts_only_attention_kernels() -> None:
    bench = load_tool("bench_inference")
    flash = {"name": "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "ms": 2.0}
    profile = {"top_kernels": [*PREFILL_KERNELS, flash]}
    # All but the GEMM (40) and the elementwise op (5): 10 + 1 + 2 + 0.25 + 1.5 + 2.
    assert bench.attention_ms(profile) == pytest.approx(16.75)


def test_kernel_verdicts_name_the_limiting_term() -> None:
    bench = load_tool("bench_kernels")
    row = {"T": 65536, "sparse_over_dense_fwdbwd": 14.0 / 142.0, "sparse_fwdbwd_ms": 14.0,
           "selection_ms": 9.0, "sdpa_fwdbwd_ms": 142.0, "sel_attn_fwd_tflops": 118.0,
           "sel_attn_fwd_tflops_gather_ceiling": 158.0}  # fmt: skip
    assert bench.verdicts(row) == [
        "ratio 0.099 vs <= 0.09: MISS (selection 64% of the branch; without it 0.035)",
        "sel-attn fwd 118 TFLOP/s vs >= 150: MISS (its loads alone allow 158)",
    ]
    assert bench.misses([row]) == [f"T=65536: {v}" for v in bench.verdicts(row)]
    row |= {"T": 32768, "sparse_over_dense_fwdbwd": 0.1}
    assert bench.verdicts(row) == ["ratio 0.100 vs <= 0.12: ok"]
    assert bench.misses([row]) == []


def test_sweep_compares_indices_by_rows_and_floats_by_their_finite_entries() -> None:
    import torch

    sweep = load_tool("sweep_selected_attention")
    idx = torch.arange(24, dtype=torch.int32).view(2, 3, 4)
    moved = idx.clone()
    moved[1, 2, 0] = -1
    assert sweep.difference(idx, idx) == {"rows_differing_vs_shipped": 0.0}
    assert sweep.difference(moved, idx) == {"rows_differing_vs_shipped": pytest.approx(1 / 6)}
    lse = torch.tensor([float("inf"), 1.0, 2.0])
    assert sweep.difference(lse + torch.tensor([0.0, 0.0, 1e-3]), lse)["rel_err_vs_shipped"] == pytest.approx(
        1e-3 / 5**0.5, rel=1e-4
    )
    # A launch that leaves a row without its LSE (or gives one where there is none) is not "close".
    assert sweep.difference(torch.tensor([1.0, 1.0, 2.0]), lse) == {"rel_err_vs_shipped": float("inf")}


def sweep_launches(kernel: str, grids: list[str]) -> list[dict]:
    return load_tool("sweep_selected_attention").launches(kernel, grids, quick=True)


def test_sweep_launches_concatenate_the_named_grids() -> None:
    import dataclasses

    sweep = load_tool("sweep_selected_attention")
    shape = sweep.launches("dq", ["shape"], quick=False)
    registers = sweep.launches("dq", ["registers"], quick=False)
    assert len(shape) == 27 and registers == [{"dq_maxnreg": None}, {"dq_maxnreg": 128}, {"dq_maxnreg": 112}]
    assert sweep.launches("dq", ["shape", "registers"], quick=False) == shape + registers
    assert sweep.launches("dkdv", ["registers", "shape"], quick=True) == [
        {"dkdv_stages": 2, "dkdv_maxnreg": 128}, {"dkdv_stages": 2, "dkdv_maxnreg": 96}
    ]
    # Every swept field is a launch parameter of that kernel (a misspelt one would fail at replace()).
    shipped = sweep.shipped_launches(64, 16)
    for kernel, grids in sweep.GRIDS.items():
        assert set(grids) == set(sweep.GRID_NAMES)
        for grid in grids.values():
            assert set(grid) <= {f.name for f in dataclasses.fields(shipped[kernel])}, kernel


SWEPT_KERNELS = ["dkdv", "dq", "fwd", "select_lse", "select_topk"]


# By default one attention and one selection kernel; every kernel (the tool's default) with -m slow.
@pytest.mark.parametrize(
    "kernels",
    [["fwd", "select_topk"], pytest.param(SWEPT_KERNELS, marks=pytest.mark.slow),
     pytest.param(["dkdv"], marks=pytest.mark.slow)],
)  # fmt: skip
def test_sweep_selected_attention_times_launches_against_the_shipped_one(
    tmp_path: Path, kernels: list[str]
) -> None:
    out = tmp_path / "sweep.json"
    if len(kernels) == 1:
        # One kernel alone: its register caps (dropped by the interpreter, but the path is the GPU's).
        only = ["--kernels", *kernels, "--grids", "registers"]
    else:
        only = [] if kernels == SWEPT_KERNELS else ["--kernels", *kernels]
    # Its main() in this process (Triton's interpreter on CPU, see conftest.py): a process of its own
    # would spend most of the test importing torch and Triton again.
    code = load_tool("sweep_selected_attention").main(
        ["--seq-lens", "32", "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--quick",
         "--reps", "1", "--warmup", "0", "--out", str(out), *only]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert {row["kernel"] for row in result["rows"]} == set(kernels)
    assert len(result["rows"]) == 2 * len(kernels)
    for row in result["rows"]:
        # Every launch computes the same function: only rounding may differ from the shipped launch
        # (the selected indices of these small fp32 cases have no near-ties).
        assert row["ms"] > 0 and row["shipped_ms"] > 0
        assert row.get("rel_err_vs_shipped", 0.0) < 1e-5 and row.get("rows_differing_vs_shipped", 0.0) == 0.0
    assert {row["kernel"] for row in result["fastest"]} == set(kernels)
    assert result["shipped_launch"]["fwd"]["fwd_warps"] >= 1 and result["layout"]["head_dim"] == 16
    if kernels == ["dkdv"]:
        assert [r["launch"] for r in result["rows"]] == sweep_launches("dkdv", ["registers"])
    if "select_topk" in kernels:
        assert result["shipped_launch"]["select_topk"]["topk_warps"] == 1
        assert {tuple(r["launch"]) for r in result["rows"] if r["kernel"] == "select_topk"} == {
            ("topk_rows", "topk_blocks", "topk_warps")
        }
