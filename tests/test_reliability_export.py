"""Bad input to the export / import / evaluation command lines, through the real CLIs (subprocesses): exit
code 2 for usage and input errors, 1 for damaged files, one line naming the value, no traceback, and no file
on disk created, changed or removed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ssa_megatron.convert.export import save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.hf_export_helpers import MODEL_VOCAB, train_tokenizer
from tests.run_helpers import default_and_slow, write_packed_split

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama HF directory, its Megatron SSA checkpoint, an SSA export, a tokenizer that is not theirs,
    validation data (packed MDS rows of 8 tokens, JSONL documents)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ssa_megatron.convert.llama_import import ssa_from_llama
    from ssa_megatron.convert.megatron_bridge import write_megatron_checkpoint

    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
        )
    )  # fmt: skip
    llama.save_pretrained(root / "llama")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"</s>": VOCAB - 1}, "w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(root / "llama" / "tokenizer.json"))
    ssa = ssa_from_llama(root / "llama", block_size=4, block_count=3, seq_length=48)
    write_megatron_checkpoint(ssa, root / "ckpt", tokenizer=root / "llama" / "tokenizer.json")
    torch.manual_seed(1)
    save_hf_directory(
        SSAForCausalLM(tiny_config(vocab_size=MODEL_VOCAB, max_position_embeddings=32)),
        root / "export",
        include_kernels=False,
    )
    tok = train_tokenizer(root)
    write_packed_split(root / "mds" / "val")
    (root / "docs.jsonl").write_text('{"text": "a first document"}\n{"body": "no text field"}\n')
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("not to be lost")
    _damaged_inputs(root)
    return {"root": root, "ckpt": root / "ckpt", "export": root / "export", "tok": tok}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damaged_inputs(root: Path) -> None:
    """Copies of the checkpoint and the Llama directory, each with one fault."""
    trunc = shutil.copytree(root / "ckpt", root / "ckpt_trunc")
    _truncate(max((trunc / "iter_0000000" / "model").glob("*.distcp"), key=lambda p: p.stat().st_size))
    partial = shutil.copytree(root / "ckpt", root / "ckpt_incomplete")
    (partial / "iter_0000000" / "complete.json").unlink()
    _truncate(shutil.copytree(root / "llama", root / "llama_trunc") / "model.safetensors")
    gpt2 = shutil.copytree(root / "llama", root / "gpt2")
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt2 / "config.json").write_text(json.dumps(cfg))


# id: (tool, arguments ({root}: the fixture's files, {tmp}: the case's own empty directory), exit code,
# texts the one error line must hold)
CASES: dict[str, tuple[str, str, int, list[str]]] = {
    "to_hf_out_not_empty": (
        "convert_to_hf", "--checkpoint {root}/ckpt --out {root}/full", 2, ["full", "--overwrite"]),
    "to_hf_missing_checkpoint": (
        "convert_to_hf", "--checkpoint {tmp}/nope --out {tmp}/o", 2, ["nope"]),
    "to_hf_block_count_zero": (
        "convert_to_hf", "--checkpoint {root}/ckpt --out {tmp}/o --block-count 0", 2, ["--block-count 0"]),
    "to_hf_truncated_shard": (
        "convert_to_hf", "--checkpoint {root}/ckpt_trunc --out {tmp}/o", 1, [".distcp", "truncated"]),
    "to_hf_incomplete_checkpoint": (
        "convert_to_hf", "--checkpoint {root}/ckpt_incomplete --out {tmp}/o", 1,
        ["incomplete", "iter_0000000"]),
    "to_hf_wrong_tokenizer": (
        "convert_to_hf", "--checkpoint {root}/ckpt --out {tmp}/o --tokenizer {root}/tok_bpe.model", 2,
        ["tok_bpe.model", "--allow-vocab-mismatch"]),
    "to_hf_missing_tokenizer": (
        "convert_to_hf", "--checkpoint {root}/ckpt --out {tmp}/o --tokenizer {tmp}/tok.model", 2,
        ["tok.model"]),
    "from_hf_truncated_weights": (
        "convert_from_hf", "--hf {root}/llama_trunc --out {tmp}/o", 1, ["model.safetensors", "truncated"]),
    "from_hf_out_not_empty": (
        "convert_from_hf", "--hf {root}/llama --out {root}/full", 2, ["full", "--overwrite"]),
    "from_hf_tp_zero": (
        "convert_from_hf", "--hf {root}/llama --out {tmp}/o --tp 0", 2, ["--tp 0"]),
    "from_hf_tp_does_not_divide": (
        "convert_from_hf", "--hf {root}/llama --out {tmp}/o --tp 3", 2, ["--tp 3", "does not divide"]),
    "from_hf_not_llama": (
        "convert_from_hf", "--hf {root}/gpt2 --out {tmp}/o", 2, ["gpt2", "Llama"]),
    "eval_batch_size_zero": (
        "evaluate", "--checkpoint {root}/export --data {root}/mds --batch-size 0", 2, ["--batch-size 0"]),
    "eval_seq_len_differs_from_rows": (
        "evaluate", "--checkpoint {root}/export --data {root}/mds --seq-len 16 --out {tmp}/o --device cpu", 2,
        ["--seq-len 16", "8-token rows"]),
    "eval_jsonl_without_text": (
        "evaluate", "--checkpoint {root}/export --data {root}/docs.jsonl --tokenizer {root}/tok_bpe.model "
        "--out {tmp}/o --device cpu", 2, ["docs.jsonl:2", "'text'"]),
    "eval_missing_data": (
        "evaluate", "--checkpoint {root}/export --data {tmp}/val.npy", 2, ["val.npy"]),
    "eval_harness_on_megatron_checkpoint": (
        "evaluate", "--checkpoint {root}/ckpt --lm-eval-tasks hellaswag --out {tmp}/o", 2, ["convert_to_hf"]),
}  # fmt: skip


def _tree_hash(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            digest.update(str(path.relative_to(root)).encode())
            if path.is_file():
                digest.update(f"{path.stat().st_mode:o}".encode() + path.read_bytes())
    return digest.hexdigest()


# Per tool, one case of each kind in the default run (a usage error, a damaged input, a mismatched or
# wrong kind of input); every case with -m slow.
@pytest.mark.parametrize(
    "case",
    default_and_slow(
        CASES,
        default=(
            "to_hf_out_not_empty", "to_hf_truncated_shard", "to_hf_wrong_tokenizer",
            "from_hf_truncated_weights", "from_hf_tp_does_not_divide",
            "eval_jsonl_without_text", "eval_harness_on_megatron_checkpoint",
        ),
    ),
)
def test_cli_refuses_bad_input_in_one_line_and_changes_nothing(
    world: dict[str, Path], tmp_path: Path, case: str
) -> None:
    tool, template, code, needles = CASES[case]
    args = template.format(root=world["root"], tmp=tmp_path).split()
    before = _tree_hash(world["root"], tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert _tree_hash(world["root"], tmp_path) == before


def test_evaluate_scores_jsonl_documents_as_their_tokens(world: dict[str, Path], tmp_path: Path) -> None:
    """A JSONL file is read as documents (each tokenized and ended with EOS), not scored as raw text: it gives
    exactly the perplexity of the same token ids given as .npy."""
    import sentencepiece as spm

    texts = ["the first document, with words", "a second one", "and a third document to score"] * 4
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sp = spm.SentencePieceProcessor(model_file=str(world["tok"]))
    ids = [i for t in texts for i in [*sp.encode(t), sp.eos_id()]]
    np.save(tmp_path / "docs.npy", np.asarray(ids))
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ppl = {}
    for name in ("docs.jsonl", "docs.npy"):
        out = tmp_path / name.replace(".", "_")
        rc = module.main(
            ["--checkpoint", str(world["export"]), "--data", str(tmp_path / name), "--tokenizer",
             str(world["tok"]), "--out", str(out), "--max-windows", "2", "--block-counts", "",
             "--extrapolation-factors", "", "--no-progress", "--device", "cpu"]
        )  # fmt: skip
        assert rc == 0
        ppl[name] = json.loads((out / "results.json").read_text())["perplexity"]
    assert ppl["docs.jsonl"] == ppl["docs.npy"]


def test_llama_import_config_trains_as_is_once_data_path_is_given(world: dict[str, Path]) -> None:
    from ssa_megatron.training.checkpoint import resolve_checkpoint
    from ssa_megatron.training.config import load_config

    config = world["ckpt"] / "iter_0000000" / "config.yaml"
    cfg = load_config(config, [("data", "path", str(world["root"] / "mds"))], warn=lambda line: None)
    assert cfg.model.num_layers == 2 and cfg.data.seq_length == 48
    assert cfg.checkpoint.load_weights_only
    # The tokenizer is a copy beside the weights, the one the checkpoint's vocabulary was made for.
    assert Path(cfg.data.tokenizer) == world["ckpt"] / "tokenizer.json"
    assert resolve_checkpoint(cfg.checkpoint.load, cfg.checkpoint.dir) == world["ckpt"] / "iter_0000000"
    # Without data.path it is refused, naming the key (the one thing left to the user).
    from ssa_megatron.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(config, warn=lambda line: None)


def test_a_successful_export_prints_no_third_party_noise(world: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint", str(world["ckpt"]),
         "--out", str(tmp_path / "hf"), "--no-kernels"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = ("Transformer Engine", "Apex", "deprecated", "Setting accelerator", "CUDA_HOME", "Warning")
    heard = [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in noise)]
    assert heard == [], heard
    assert proc.stdout.strip() == f"exported {world['ckpt']} -> {tmp_path / 'hf'}"
    # The tokenizer the checkpoint names (a copy of the Llama directory's) came along, its EOS with it.
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == VOCAB - 1
