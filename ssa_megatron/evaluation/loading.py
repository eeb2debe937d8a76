"""Open what the user points evaluation at: an exported HF directory or a Megatron training checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ssa_megatron.hf.modeling_ssa import SSAForCausalLM


def _transformers_at_least(major: int, minor: int) -> bool:
    import transformers

    found = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    return found >= (major, minor)


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_hf_model(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **config_overrides: Any
) -> SSAForCausalLM:
    """``SSAForCausalLM`` from an HF directory; refuses other architectures naming what it found."""
    p = Path(path)
    config_file = p / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; expected an exported SSA model directory")
    found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if found != "ssa":
        raise ValueError(
            f"{config_file}: model_type is {found!r}, not 'ssa'. Convert a Llama-architecture checkpoint "
            "with tools/convert_from_hf.py, then export it with tools/convert_to_hf.py"
        )
    # transformers 4.56 renamed torch_dtype to dtype (the old name still works there, with a warning).
    dtype_key = "dtype" if _transformers_at_least(4, 56) else "torch_dtype"
    model = SSAForCausalLM.from_pretrained(p, **{dtype_key: dtype}, **config_overrides)
    return model.to(device).eval()


def find_tokenizer_file(path: Path) -> Path | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return path / name
    return None


def load_eval_tokenizer(path: str | Path, vocab_size: int) -> Any:
    """The project's tokenizer wrapper for ``path``; refuses one whose ids do not fit the model."""
    from ssa_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary is {vocab_size}; "
            "it is not the tokenizer this model was trained with"
        )
    return tok


def _with_kernels(model: SSAForCausalLM) -> SSAForCausalLM:
    """On CUDA, use this project's Triton kernels unless the directory shipped its own copy."""
    layer = model.model.layers[0].self_attn if len(model.model.layers) else None
    if layer is not None and layer.kernel_ops is None and next(model.parameters()).is_cuda:
        import kernels.ssa

        model.set_attention_ops(kernels.ssa)
    return model


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / "latest").is_file() or (path / "complete.json").is_file()


def load_model(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **config_overrides: Any
) -> tuple[SSAForCausalLM, Path]:
    """Model from an HF directory or a Megatron checkpoint, and the directory to look for a tokenizer in."""
    p = Path(path)
    if is_hf_directory(p):
        return _with_kernels(load_hf_model(p, device=device, dtype=dtype, **config_overrides)), p
    if is_megatron_checkpoint(p):
        from ssa_megatron.convert.megatron_bridge import load_megatron_as_hf

        model = load_megatron_as_hf(p, **config_overrides)
        return _with_kernels(model.to(device=device, dtype=dtype).eval()), p
    raise FileNotFoundError(
        f"{p} is neither an HF model directory (no config.json) nor a Megatron checkpoint (no `latest` "
        "or complete.json)"
    )
