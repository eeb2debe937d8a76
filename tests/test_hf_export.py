"""An exported directory loads, tokenizes and generates where only torch and HF libraries are installed."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from ssa_megatron.convert.export import HF_CODE_FILES, ExportError, save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.convert.tokenizer_files import (
    TokenizerExportError,
    sentencepiece_to_tokenizer,
    write_tokenizer_files,
)
from ssa_megatron.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.hf_export_helpers import (
    MODEL_VOCAB,
    NEW_TOKENS,
    PROMPT,
    TOKENIZER_VOCAB,
    clean_site,
    eos_model,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]

# Runs under `python -I -S` with a clean site directory as its only site: torch, transformers, safetensors,
# tokenizers and their own dependencies, so neither this project, megatron, sentencepiece nor protobuf can be
# imported, and a hidden dependency of the exported directory shows up as an error.
ISOLATED = textwrap.dedent(
    """
    import importlib.util, json, sys
    site, model_dir, ids_path, texts_path, prompt_path, new_tokens = sys.argv[1:7]
    sys.path.insert(0, site)
    absent = ("ssa_megatron", "kernels", "megatron", "sentencepiece", "google", "tiktoken")
    present = [name for name in absent if importlib.util.find_spec(name) is not None]
    assert not present, f"the clean environment has {present}"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {"transformers": transformers.__version__}
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = json.load(open(texts_path))
    out["encoded"] = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    out["decoded"] = [tok.decode(ids) for ids in out["encoded"]]
    out["specials"] = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    out["generation_eos"] = model.generation_config.eos_token_id
    ids = torch.load(ids_path)
    prompt = torch.load(prompt_path)
    with torch.no_grad():
        out["sparse"] = model(ids, use_cache=False).logits.tolist()
        out["full"] = model(ids, use_cache=False, attention_mode="full").logits.tolist()
        for mode in ("sparse", "full"):
            # No eos_token_id / pad_token_id arguments: generate() must take them from the directory.
            gen = model.generate(prompt, max_new_tokens=int(new_tokens), do_sample=False, attention_mode=mode)
            out["generate_" + mode] = gen[0, prompt.shape[1]:].tolist()
        # The shipped Triton package must import and run from the directory alone; on CPU its Triton kernels
        # run in the interpreter (TRITON_INTERPRET=1 is set by the parent).
        modeling = sys.modules[type(model).__module__]
        kernels = modeling.load_shipped_kernels(model_dir, require_cuda=False)
        q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
        mine = modeling.sparse_attention(q, k, v, 4, 3)
        for backend in ("naive", "triton"):
            shipped = kernels.sparse_attention(q, k, v, 4, 3, backend=backend)
            out["kernel_diff_" + backend] = (mine[0] - shipped[0]).abs().max().item()
            out["kernel_idx_" + backend] = bool((mine[2] == shipped[2].long()).all())
    print("RESULT" + json.dumps(out))
    """
)
TEXTS = ["Hello world", "  two  spaces\nand a newline", "digits 12345 and 3.14", "unicode \u00e9\u65e5", ""]


def test_exported_directory_loads_tokenizes_and_generates_in_a_clean_environment(tmp_path: Path) -> None:
    import sentencepiece as spm

    tok_path = train_tokenizer(tmp_path)
    prompt = torch.randint(4, TOKENIZER_VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    model = eos_model(prompt)
    out_dir = save_hf_directory(model, tmp_path / "export", tokenizer_path=tok_path)
    names = {p.name for p in out_dir.iterdir()}
    assert names >= {
        *HF_CODE_FILES, "config.json", "generation_config.json", "model.safetensors", "ssa_kernels",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }  # fmt: skip
    # The shipped kernels are kernels.ssa only: the benchmark probe stays in the repository.
    assert not (out_dir / "ssa_kernels" / "gather_bound.py").exists()
    modes = {p.relative_to(out_dir).as_posix(): p.stat().st_mode & 0o777 for p in out_dir.rglob("*")}
    assert {m for name, m in modes.items() if (out_dir / name).is_file()} == {0o644}, modes
    assert json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    specials = json.loads((out_dir / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

    ids = torch.randint(0, MODEL_VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(prompt, tmp_path / "prompt.pt")
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    site = clean_site(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    args = [site, out_dir, tmp_path / "ids.pt", tmp_path / "texts.json", tmp_path / "prompt.pt", NEW_TOKENS]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ISOLATED, *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["transformers"] == transformers.__version__

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    assert result["encoded"] == [sp.encode(t) for t in TEXTS]  # no BOS added: training data has none
    assert result["decoded"] == TEXTS
    assert result["specials"] == [BOS_ID, EOS_ID, PAD_ID]
    assert result["generation_eos"] == EOS_ID
    with torch.no_grad():
        for mode in ("sparse", "full"):
            expected = model(ids, use_cache=False, attention_mode=mode).logits
            torch.testing.assert_close(torch.tensor(result[mode]), expected, rtol=1e-5, atol=1e-5)
            # Stops at the first EOS, before max_new_tokens, in both modes.
            gen = result["generate_" + mode]
            assert gen[-1] == EOS_ID and EOS_ID not in gen[:-1] and len(gen) < NEW_TOKENS, (mode, gen)
            want = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mode=mode)
            assert gen == want[0, PROMPT:].tolist()
    assert result["generate_sparse"] != result["generate_full"]
    for backend in ("naive", "triton"):
        assert result["kernel_diff_" + backend] < 1e-5 and result["kernel_idx_" + backend], backend


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(tmp_path: Path, model_type: str) -> None:
    import sentencepiece as spm

    tok_path = train_tokenizer(tmp_path, model_type)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    fast = sentencepiece_to_tokenizer(tok_path)
    rng = random.Random(5)
    alphabet = "abcdefgh ijklmnop qrstuvwxyz  THE 0123456789.,'\n\t\u00e9\u65e5\U0001f642-_"
    texts = [*TEXTS, " leading", "trailing ", "tab\tand\r\nCRLF", "unseen \u0416\u0437 bytes"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    for text in texts:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert fast.decode(ids) == sp.decode(ids), text


def test_tokenizer_files_from_a_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "my_tok.json"))
    out = tmp_path / "out"
    out.mkdir()
    specials = write_tokenizer_files(tmp_path / "my_tok.json", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert specials.ids() == {"bos_token_id": None, "eos_token_id": 3, "pad_token_id": 3}
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded("hello world")["input_ids"] == [1, 2]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (3, 3)
    with pytest.raises(TokenizerExportError, match=r"missing\.json does not exist"):
        write_tokenizer_files(tmp_path / "missing.json", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerExportError, match=r"no tokenizer\.json"):
        write_tokenizer_files(empty, out)


def test_export_refuses_a_non_empty_directory_and_replaces_it_whole_with_overwrite(tmp_path: Path) -> None:
    model = SSAForCausalLM(tiny_config()).eval()
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="--overwrite"):
        save_hf_directory(model, out, include_kernels=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # A failing export (unreadable tokenizer) leaves the old directory as it was, even with overwrite.
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerExportError, match=r"bad\.model"):
        save_hf_directory(model, out, tokenizer_path=tmp_path / "bad.model", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    save_hf_directory(model, out, include_kernels=False, overwrite=True)
    assert "notes.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model", "export"]  # no temporary left


@pytest.mark.gpu
def test_exported_model_runs_the_shipped_triton_kernels_on_cuda(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # head_dim 16: the Triton kernels' tiles need at least 16 columns.
    model = SSAForCausalLM(
        tiny_config(hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    ).eval()
    out_dir = save_hf_directory(model, tmp_path / "export")
    gpu = SSAForCausalLM.from_pretrained(out_dir).cuda().eval()
    ops = gpu.model.layers[0].self_attn.kernel_ops
    assert ops is not None and ops.__name__.startswith("ssa_shipped_kernels_")
    ids = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode in ("sparse", "full"):
            want = model(ids, use_cache=False, attention_mode=mode).logits
            got = gpu(ids.cuda(), use_cache=False, attention_mode=mode).logits.cpu()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        for mode in ("sparse", "full"):
            want = gpu(ids.cuda(), use_cache=False, attention_mode=mode).logits
            out = gpu(ids[:, :150].cuda(), use_cache=True, attention_mode=mode)
            steps, cache = [out.logits], out.past_key_values
            for t in range(150, 200):
                out = gpu(
                    ids[:, t : t + 1].cuda(), past_key_values=cache, use_cache=True, attention_mode=mode
                )
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-3, atol=1e-3)


def test_kernel_shipping_detects_unrewritten_project_imports() -> None:
    from ssa_megatron.convert.export import _absolute_project_import

    assert _absolute_project_import("from . import naive\nmsg = 'use kernels.ssa.dense_attention'\n") is None
    assert (
        _absolute_project_import("import os\nimport kernels.ssa.naive as n\n")
        == "line 2: import of kernels.ssa.naive"
    )
    assert _absolute_project_import("def f():\n    from kernels import ssa\n") == "line 2: import of kernels"
