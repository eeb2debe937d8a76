"""Llama HF -> SSA Megatron checkpoint (TP=2 x PP=2) -> SSA HF: exact function, lossless trip, refusals."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ssa_megatron.convert.llama_import import (
    LlamaImportError,
    llama_rope,
    llama_state_from_ssa,
    ssa_from_llama,
)
from ssa_megatron.convert.megatron_bridge import CheckpointFormatError, export_checkpoint_to_hf
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from ssa_megatron.training.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _llama(path: Path, tied: bool, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(11 if tied else 12)
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
    )
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms start at exactly 1; perturb them so their mapping is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_full_mode_of_converted_llama_equals_the_original(tmp_path: Path, tied: bool) -> None:
    llama = _llama(tmp_path, tied)
    ssa = ssa_from_llama(tmp_path, block_size=4, block_count=3)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llama(ids).logits
        full = ssa(ids, use_cache=False, attention_mode="full").logits
        sparse = ssa(ids, use_cache=False).logits
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    assert (sparse - want).abs().max() > 1e-3  # sparse mode really restricts attention
    gates = [layer.self_attn.head_gate.weight for layer in ssa.model.layers]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gates)
    back, orig = llama_state_from_ssa(ssa), llama.state_dict()
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)


def test_llama_rope_reads_both_config_layouts() -> None:
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # transformers 4.x layout, then 5.x layout (one dict holding the base; "default" = unscaled).
    assert llama_rope({"rope_theta": 500000.0, "rope_scaling": llama3}) == (500000.0, llama3)
    assert llama_rope({"rope_theta": 500000.0, "rope_scaling": None}) == (500000.0, None)
    assert llama_rope({"rope_parameters": {**llama3, "rope_theta": 500000.0}}) == (500000.0, llama3)
    unscaled = {"rope_type": "default", "rope_theta": 500000.0}
    assert llama_rope({"rope_parameters": unscaled}) == (500000.0, None)
    assert llama_rope({}) == (10000.0, None)


def test_llama_import_refusals(tmp_path: Path) -> None:
    _llama(tmp_path / "scaled", False, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(LlamaImportError, match=r"rope_scaling=.*--drop-rope-scaling"):
        ssa_from_llama(tmp_path / "scaled")
    assert ssa_from_llama(tmp_path / "scaled", drop_rope_scaling=True).config.rope_scaling is None
    _llama(tmp_path / "biased", False, attention_bias=True)
    with pytest.raises(LlamaImportError, match="attention_bias=True"):
        ssa_from_llama(tmp_path / "biased")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(LlamaImportError, match="model_type='gpt2'"):
        ssa_from_llama(tmp_path / "gpt2")
    # A sharded checkpoint (index + several files) loads like a single file.
    multi = tmp_path / "multi"
    _llama(tmp_path / "plain", False).save_pretrained(multi, max_shard_size="20KB")
    assert len(list(multi.glob("model-*.safetensors"))) > 1 and not (multi / "model.safetensors").exists()
    single = LlamaForCausalLM.from_pretrained(multi)
    converted = ssa_from_llama(multi)
    assert torch.equal(
        converted.model.layers[1].mlp.up_proj.weight, single.model.layers[1].mlp.up_proj.weight
    )
    sharded = tmp_path / "sharded"
    shutil.copytree(tmp_path / "biased", sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    shutil.copyfile(tmp_path / "plain" / "config.json", sharded / "config.json")  # a convertible config
    with pytest.raises(LlamaImportError, match=r"model-00001-of-00002\.safetensors"):
        ssa_from_llama(sharded)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    llama = _llama(root / "llama", tied=False)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)} | {"</s>": 95}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(root / "llama" / "tokenizer.json"))
    ckpt = root / "ckpt"
    rc = _tool("convert_from_hf")(
        [
            "--hf",
            str(root / "llama"),
            "--hf-out",
            str(root / "hf_direct"),
            "--out",
            str(ckpt),
            "--tp",
            "2",
            "--pp",
            "2",
            "--block-size",
            "4",
            "--block-count",
            "3",
            "--seq-length",
            "48",
        ]
    )
    assert rc == 0
    return {"root": root, "llama": llama, "ckpt": ckpt}


def test_llama_megatron_hf_round_trip_is_lossless(converted: dict) -> None:
    root, ckpt = converted["root"], converted["ckpt"]
    layout = json.loads((ckpt / "iter_0000000" / "complete.json").read_text())
    assert (layout["tensor"], layout["pipeline"], layout["world_size"]) == (2, 2, 4)  # written by 4 ranks
    assert (ckpt / "latest").read_text().strip() == "iter_0000000"
    assert _tool("convert_to_hf")(["--checkpoint", str(ckpt), "--out", str(root / "hf"), "--no-kernels"]) == 0
    exported = SSAForCausalLM.from_pretrained(root / "hf").eval()
    # The Llama tokenizer travelled: into the checkpoint (named by its config), and on into both exports.
    from transformers import AutoTokenizer

    for hf_dir in (root / "hf", root / "hf_direct"):
        tok = AutoTokenizer.from_pretrained(hf_dir)
        assert tok("w3 w7")["input_ids"] == [3, 7] and tok.eos_token_id == 95, hf_dir
        assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 95
    hf_out = SSAForCausalLM.from_pretrained(root / "hf_direct").eval()
    assert all(torch.equal(hf_out.state_dict()[k], v) for k, v in exported.state_dict().items())
    assert exported.config.block_size == 4 and exported.config.train_seq_length == 48
    direct = ssa_from_llama(root / "llama", block_size=4, block_count=3, seq_length=48)
    for k, v in direct.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    back, orig = llama_state_from_ssa(exported), converted["llama"].state_dict()
    assert all(torch.equal(back[k], orig[k]) for k in orig)
    ids = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(ids, use_cache=False, attention_mode="full").logits,
            converted["llama"](ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_export_refuses_damaged_checkpoints_and_wrong_tokenizers(converted: dict, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(200)} | {"</s>": 200}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.save(str(tmp_path / "big.json"))
    with pytest.raises(
        CheckpointFormatError, match=r"big\.json has 201 tokens but the checkpoint's embedding has 96"
    ):
        export_checkpoint_to_hf(converted["ckpt"], tmp_path / "o1", tokenizer=tmp_path / "big.json")
    with pytest.raises(CheckpointFormatError, match=r"ids beyond the checkpoint's 96 embedding rows"):
        export_checkpoint_to_hf(
            converted["ckpt"], tmp_path / "o1", tokenizer=tmp_path / "big.json", allow_vocab_mismatch=True
        )
    assert not (tmp_path / "o1").exists()

    broken = tmp_path / "broken"
    shutil.copytree(converted["ckpt"], broken)
    shard = sorted((broken / "iter_0000000" / "model").glob("*.distcp"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard file\(s\) \['{shard.name}'\] missing"):
        export_checkpoint_to_hf(broken, tmp_path / "o2")

    wrong = tmp_path / "wrong"
    shutil.copytree(converted["ckpt"], wrong)
    cfg = wrong / "iter_0000000" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("num_query_groups: 2", "num_query_groups: 1"))
    with pytest.raises(CheckpointFormatError, match=r"linear_qkv\.weight has 64 rows, expected 48"):
        export_checkpoint_to_hf(wrong, tmp_path / "o3")

    (wrong / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="points at 'iter_0000009', which does not exist"):
        export_checkpoint_to_hf(wrong, tmp_path / "o4")


def test_evaluate_cli_reads_megatron_checkpoints(converted: dict, tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "val.npy", np.random.default_rng(0).integers(0, 96, size=200))
    rc = _tool("evaluate")(
        [
            "--checkpoint",
            str(converted["ckpt"]),
            "--data",
            str(tmp_path / "val.npy"),
            "--out",
            str(tmp_path / "eval"),
            "--max-windows",
            "2",
            "--block-counts",
            "3,12",
            "--extrapolation-factors",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["settings"]["seq_len"] == 48 and res["settings"]["block_size"] == 4
    # 12 blocks of 4 cover the 48-token windows: sparse equals full there.
    covering = next(r for r in res["budget_sweep"]["rows"] if r["block_count"] == 12)
    assert covering["ppl_sparse"] == pytest.approx(res["perplexity"]["full"]["ppl"], rel=1e-5)
