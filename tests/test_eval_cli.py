"""tools/evaluate.py end to end on an exported tiny model, and its refusals."""

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ssa_megatron.convert.export import save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.run_helpers import run_tool

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_tool("evaluate", *args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_hf_directory(
        SSAForCausalLM(tiny_config(max_position_embeddings=32)),
        tmp_path_factory.mktemp("hf") / "model",
        include_kernels=False,
    )


def test_evaluate_cli_on_hf_directory(exported: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "val.npy", np.random.default_rng(0).integers(0, 97, size=300))
    proc = _run(
        "--checkpoint",
        str(exported),
        "--data",
        str(tmp_path / "val.npy"),
        "--out",
        str(tmp_path / "o"),
        "--max-windows",
        "2",
        "--block-counts",
        "2,8",
        "--extrapolation-factors",
        "1,2",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["settings"]["seq_len"] == 32
    assert set(res["perplexity"]) == {"sparse", "full"}
    assert "sparse: ppl" in proc.stdout


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_evaluate_cli_refuses_bad_inputs(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main = _evaluate_main()
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "x.npy"])
    assert exit_info.value.code == 2 and "--checkpoint is required" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", np.array([5, 500, 7] * 20))
    common = ["--data", str(tmp_path / "big.npy"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    # Each refusal: exit code 2 and one line on stderr naming the problem (no traceback).
    for checkpoint, message in (
        (exported, "token id 500 is outside the model's vocabulary of 97"),
        (tmp_path / "llama", "model_type is 'llama', not 'ssa'"),
        (tmp_path, "neither an HF model directory"),
    ):
        if checkpoint == tmp_path / "llama":
            (tmp_path / "llama").mkdir()
            (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(checkpoint), *common])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
