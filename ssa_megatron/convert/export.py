"""Write a self-contained Hugging Face model directory for an SSA model.

The directory holds ``model.safetensors``, ``config.json`` (with ``auto_map`` so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` finds the classes), the
modeling code (``HF_CODE_FILES``, copied verbatim: they import only torch and transformers),
optionally the tokenizer files (``tokenizer_files``: a fast ``tokenizer.json`` that needs neither
sentencepiece nor protobuf, its config and special-token map) with ``generation_config.json`` holding
the EOS id, and optionally ``ssa_kernels/``: a copy of this project's
``kernels.ssa`` package whose absolute ``kernels.ssa`` imports are rewritten to relative ones so
the copy imports as a private package of the model directory (see ``modeling_ssa.load_shipped_kernels``).

This module is not shipped (it lives outside ``ssa_megatron.hf``); it is the project side of the export.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from ssa_megatron.hf.configuration_ssa import SSAConfig
from ssa_megatron.hf.modeling_ssa import SHIPPED_KERNELS_DIR, SSAForCausalLM

from .cli import ExportError, check_output_dir
from .tokenizer_files import write_tokenizer_files

__all__ = ["ExportError", "check_output_dir", "publish_dir", "save_hf_directory", "ship_kernels"]

HF_CODE_FILES = ("configuration_ssa.py", "modeling_ssa.py", "ssa_attention.py")
AUTO_MAP = {
    "AutoConfig": "configuration_ssa.SSAConfig",
    "AutoModel": "modeling_ssa.SSAModel",
    "AutoModelForCausalLM": "modeling_ssa.SSAForCausalLM",
}
_HF_DIR = Path(__file__).resolve().parents[1] / "hf"

# `from kernels.ssa import x` -> `from . import x`; `from kernels.ssa.m import x` -> `from .m import x`.
_FROM_PACKAGE = re.compile(r"^(\s*)from kernels\.ssa import ", re.MULTILINE)
_FROM_SUBMODULE = re.compile(r"^(\s*)from kernels\.ssa\.(\w+) import ", re.MULTILINE)


def _absolute_project_import(source: str) -> str | None:
    """The first import statement still naming the ``kernels`` package (None when all are relative)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        hit = next((n for n in names if n == "kernels" or n.startswith("kernels.")), None)
        if hit:
            return f"line {node.lineno}: import of {hit}"
    return None


def ship_kernels(out_dir: str | Path) -> Path:
    """Copy ``kernels/ssa/*.py`` to ``<out_dir>/ssa_kernels/`` with package-relative imports."""
    spec = importlib.util.find_spec("kernels.ssa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("cannot find the kernels.ssa package to ship; is ssa-megatron installed?")
    src = Path(next(iter(spec.submodule_search_locations)))
    dst = Path(out_dir) / SHIPPED_KERNELS_DIR
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.py")):
        text = _FROM_SUBMODULE.sub(r"\1from .\2 import ", path.read_text(encoding="utf-8"))
        text = _FROM_PACKAGE.sub(r"\1from . import ", text)
        leftover = _absolute_project_import(text)
        if leftover:
            raise ValueError(
                f"{path}: {leftover} cannot be rewritten for shipping; use "
                "`from kernels.ssa import x` or `from kernels.ssa.module import x`"
            )
        (dst / path.name).write_text(text, encoding="utf-8")
    return dst


def publish_dir(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` in as ``out``; the previous ``out`` (if any) is removed only afterwards."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def _readable(root: Path) -> None:
    # save_pretrained and tempfile-based writers leave 0600 files; a model directory is meant to be shared.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def save_hf_directory(
    model: SSAForCausalLM,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    include_kernels: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a self-contained HF directory (see module docstring); returns its path.

    Everything is written into a sibling temporary directory that replaces ``out_dir`` only when
    complete, so a failed export leaves ``out_dir`` as it was. With a tokenizer, its BOS/EOS/PAD ids go
    into config.json and generation_config.json, so ``generate()`` stops at EOS.
    """
    from transformers import GenerationConfig

    out = check_output_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        config: SSAConfig = model.config
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["SSAForCausalLM"]
        if tokenizer_path is not None:
            specials = write_tokenizer_files(
                tokenizer_path, tmp, model_max_length=config.max_position_embeddings
            )
            for key, value in specials.ids().items():
                setattr(config, key, value)
        ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        # No safe_serialization argument: safetensors is the default of transformers >= 4.35, and 5.x removed
        # the argument (it would be swallowed silently).
        model.save_pretrained(tmp)
        for name in HF_CODE_FILES:
            shutil.copyfile(_HF_DIR / name, tmp / name)
        if include_kernels:
            ship_kernels(tmp)
        (tmp / "README.md").write_text(_model_card(config, include_kernels), encoding="utf-8")
        _readable(tmp)
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _model_card(config: SSAConfig, include_kernels: bool) -> str:
    kernels = (
        "On CUDA the Triton kernels in `ssa_kernels/` are used when triton imports; otherwise a PyTorch path."
        if include_kernels
        else "Attention runs on the PyTorch path (no kernels were shipped)."
    )
    return f"""# SSA model (Sparse Sparse Attention)

{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} query / \
{config.num_key_value_heads} KV heads, vocabulary {config.vocab_size}; sparse attention with blocks of \
{config.block_size} tokens and {config.block_count} blocks per query by default; trained at \
{config.train_seq_length} tokens.

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)          # sparse mode
logits = model(ids, attention_mode="full").logits                                   # full attention
model.generate(ids, max_new_tokens=32, block_count=64)                              # larger budget
```
{kernels}
"""
