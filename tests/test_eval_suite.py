"""The whole evaluation on a tiny random model: every stage, internal consistency, and the written report."""

import json
from pathlib import Path

import pytest
import torch

from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.evaluation.runner import EvalOptions, run_evaluation
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM


def _char_encode(text: str) -> list[int]:
    return [ord(c) % 90 for c in text]


def test_run_evaluation_writes_consistent_results(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SSAForCausalLM(tiny_config(max_position_embeddings=32)).eval()
    stream = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(1))
    options = EvalOptions(
        max_windows=3,
        block_counts=(2, 8),
        extrapolation_factors=(1, 2, 8),
        rope_scaling="linear",
        passkey_lengths=(130,),
        passkey_depths=(0.5,),
        passkey_trials=2,
        progress=False,
    )
    res = run_evaluation(model, stream, options, tmp_path, encode=_char_encode)

    sparse, full = res["perplexity"]["sparse"], res["perplexity"]["full"]
    assert sparse["tokens"] == full["tokens"] == 3 * 31
    assert len(sparse["attention"]["per_layer"]) == 2
    assert 0 < sparse["attention"]["mean"]["sparsity"] < 1  # 3 blocks of 4 out of up to 8 blocks
    # 8 blocks of 4 cover each 32-token window: sparse equals full, all mass inside the selection.
    covering = next(r for r in res["budget_sweep"]["rows"] if r["block_count"] == 8)
    assert covering["ppl_sparse"] == pytest.approx(full["ppl"], rel=1e-5)
    assert covering["sparsity"] == pytest.approx(1.0) and covering["kl_sparse_full"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert res["budget_sweep"]["ppl_full"] == pytest.approx(full["ppl"], rel=1e-6)
    narrow = next(r for r in res["budget_sweep"]["rows"] if r["block_count"] == 2)
    assert narrow["sparsity"] < covering["sparsity"]

    ext = res["extrapolation"]
    assert [(r["length"], r["mode"]) for r in ext["rows"]] == [
        (32, "sparse"),
        (32, "full"),
        (64, "sparse"),
        (64, "full"),
    ]
    assert ext["rows"][1]["ppl"] == pytest.approx(full["ppl"], rel=1e-5)  # factor 1: no scaling
    assert [s["length"] for s in ext["skipped"]] == [256]
    assert model.config.rope_scaling is None  # restored after the stage

    assert [(r["length"], r["mode"]) for r in res["passkey"]["rows"]] == [(130, "sparse"), (130, "full")]
    assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in res["passkey"]["rows"])

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["perplexity"]["full"]["ppl"] == pytest.approx(full["ppl"])
    report = (tmp_path / "report.md").read_text()
    for text in ("## Budget sweep", "## Passkey retrieval", "| 1 | ", "KL(sparse, full)"):
        assert text in report
    for png in ("budget_sweep.png", "layer_sparsity.png", "extrapolation.png", "passkey.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_passkey_without_tokenizer_is_refused(tmp_path: Path) -> None:
    model = SSAForCausalLM(tiny_config(max_position_embeddings=16)).eval()
    options = EvalOptions(
        max_windows=1, block_counts=(), extrapolation_factors=(), passkey_lengths=(130,), progress=False
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        run_evaluation(model, torch.randint(0, 97, (40,)), options, tmp_path)
