"""tools/compare_runs.py over real evaluations of tiny models: table, JSON and overlaid plots, labelled
with run and checkpoint iteration; and its refusals."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ssa_megatron.convert.export import save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.evaluation.compare import describe_checkpoint
from ssa_megatron.evaluation.runner import EvalOptions, run_evaluation
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.run_helpers import run_tool


def _compare(*args: str) -> subprocess.CompletedProcess:
    return run_tool("compare_runs", *args)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny models with different weights, each exported with a training iteration and evaluated."""
    root = tmp_path_factory.mktemp("cmp")
    stream = torch.from_numpy(np.random.default_rng(0).integers(0, 97, size=400))
    outs = []
    for seed, name, iteration in ((0, "full/seed0", 20), (1, "ssa/seed0", 40)):
        torch.manual_seed(seed)
        model_dir = save_hf_directory(
            SSAForCausalLM(tiny_config(max_position_embeddings=32)), root / f"m{seed}", include_kernels=False
        )
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["training_iteration"] = iteration
        (model_dir / "config.json").write_text(json.dumps(cfg))
        model = SSAForCausalLM.from_pretrained(model_dir).eval()
        options = EvalOptions(
            max_windows=2,
            block_counts=[1, 2, 4],
            extrapolation_factors=[],
            passkey_lengths=[],
            progress=False,
        )
        out = root / f"eval{seed}"
        run_evaluation(model, stream, options, out, checkpoint=describe_checkpoint(model_dir, name))
        outs.append(out)
    return outs


def test_report_names_the_checkpoint(evaluated: list[Path]) -> None:
    res = json.loads((evaluated[1] / "results.json").read_text())
    assert res["checkpoint"]["run"] == "ssa/seed0" and res["checkpoint"]["iteration"] == 40
    assert "# SSA evaluation: ssa/seed0 @ 40" in (evaluated[1] / "report.md").read_text()


def test_compare_runs_writes_table_json_and_plots(evaluated: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = _compare(*map(str, evaluated), "--out", str(out), "--title", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "comparison.json").read_text())
    labels = [r["label"] for r in table["runs"]]
    assert labels == ["full/seed0 @ 20", "ssa/seed0 @ 40"]
    for row, src in zip(table["runs"], evaluated):
        res = json.loads((src / "results.json").read_text())
        assert row["ppl_sparse"] == res["perplexity"]["sparse"]["ppl"]
        assert row["ppl_full"] == res["perplexity"]["full"]["ppl"]
        assert row["sweep"] == {str(r["block_count"]): r["ppl_sparse"] for r in res["budget_sweep"]["rows"]}
    # Different weights give different perplexities: the table is not one run copied twice.
    assert table["runs"][0]["ppl_full"] != table["runs"][1]["ppl_full"]
    assert set(table["by_mode"]) == {"full", "ssa"}
    md = (out / "comparison.md").read_text()
    assert "| full/seed0 @ 20 |" in md and "| ssa/seed0 @ 40 |" in md and "k=4" in md
    for name in ("budget_sweep.png", "layer_sparsity.png", "layer_entropy.png"):
        assert (out / name).stat().st_size > 5000, name


def test_layer_plot_has_integer_ticks(evaluated: list[Path], tmp_path: Path) -> None:
    from matplotlib import ticker

    from ssa_megatron.evaluation import compare

    results = compare.load_results(evaluated)
    captured = {}
    original = compare._save

    def keep(fig, path):  # records the figure, then saves it as usual
        captured[path.name] = [ax.xaxis.get_major_locator() for ax in fig.axes]
        return original(fig, path)

    compare._save = keep
    try:
        compare.plot_overlays(results, tmp_path, "t")
    finally:
        compare._save = original
    locators = captured["layer_sparsity.png"]
    assert all(isinstance(loc, ticker.MaxNLocator) and loc._integer for loc in locators)


def test_compare_runs_refuses_bad_inputs(evaluated: list[Path], tmp_path: Path) -> None:
    proc = _compare(str(evaluated[0]), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "at least two evaluated runs" in proc.stderr
    proc = _compare(str(evaluated[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "missing does not exist; pass directories" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    proc = _compare(str(evaluated[0]), str(evaluated[0]), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "same label 'full/seed0 @ 20'" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    proc = _compare(str(evaluated[0]), str(tmp_path / "bad"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "is not valid JSON" in proc.stderr
