"""An exported directory loads with only transformers/torch/safetensors (isolated process, no project)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from ssa_megatron.convert.export import HF_CODE_FILES, copy_tokenizer, save_hf_directory
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM

ROOT = Path(__file__).resolve().parents[1]

# Runs under `python -I` (no PYTHONPATH, no cwd on sys.path); a meta-path finder makes any import of this
# project or of megatron fail, so a hidden dependency of the shipped code shows up as an ImportError.
ISOLATED = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = ("ssa_megatron", "kernels", "megatron")
    repo, model_dir, ids_path, transformers_home = sys.argv[1:5]
    # Run the transformers this test run uses (e.g. a 5.x overlay on PYTHONPATH, which -I drops).
    if transformers_home not in sys.path:
        sys.path.insert(0, transformers_home)
    # The project is installed editable in this venv: drop its finder so it is not importable at all.
    keep = lambda f: "editable" not in str(getattr(f, "__module__", "")).lower()
    sys.meta_path[:] = [f for f in sys.meta_path if keep(f)]
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                # Refuse to find (like an absent package) so optional-dependency probes see "not installed".
                return None if name == "kernels" else self._refuse(name)
        def _refuse(self, name):
            raise ModuleNotFoundError(f"blocked import of {name}", name=name)
    sys.meta_path.insert(0, Block())
    assert not any(p and repo.rstrip("/") == p.rstrip("/") for p in sys.path), sys.path
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    ids = torch.load(ids_path)
    out = {}
    with torch.no_grad():
        out["sparse"] = model(ids, use_cache=False).logits.tolist()
        out["full"] = model(ids, use_cache=False, attention_mode="full").logits.tolist()
        gen = model.generate(ids[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
        out["generate"] = gen.tolist()
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
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    out["leaked"] = leaked
    out["transformers"] = transformers.__version__
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_exported_directory_loads_in_isolated_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SSAForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    out_dir = save_hf_directory(model, tmp_path / "export")
    assert {p.name for p in out_dir.iterdir()} >= {
        *HF_CODE_FILES,
        "config.json",
        "model.safetensors",
        "ssa_kernels",
    }
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["TRITON_INTERPRET"] = "1"
    transformers_home = str(Path(transformers.__file__).resolve().parents[1])
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            ISOLATED,
            str(ROOT),
            str(out_dir),
            str(tmp_path / "ids.pt"),
            transformers_home,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["leaked"] == []
    assert result["transformers"] == transformers.__version__
    with torch.no_grad():
        for mode in ("sparse", "full"):
            expected = model(ids, use_cache=False, attention_mode=mode).logits
            torch.testing.assert_close(torch.tensor(result[mode]), expected, rtol=1e-5, atol=1e-5)
        generated = model.generate(ids[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert result["generate"] == generated.tolist()
    for backend in ("naive", "triton"):
        assert result["kernel_diff_" + backend] < 1e-5 and result["kernel_idx_" + backend], backend


def test_tokenizer_copy_writes_a_loadable_config(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "my_tok.json"))
    out = tmp_path / "out"
    out.mkdir()
    assert copy_tokenizer(tmp_path / "my_tok.json", out) == ["tokenizer.json", "tokenizer_config.json"]
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        copy_tokenizer(tmp_path / "missing.json", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        copy_tokenizer(empty, out)


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
