"""The one model config: ``ModelConfig`` (the training config's ``model:`` section) and everything derived.

``ModelConfig`` holds the hyper-parameters of an SSA model; every other form of them is computed from it:
megatron's ``SSATransformerConfig`` (``transformer_config``), the Hugging Face ``SSAConfig`` keyword
arguments (``hf_config_kwargs``) and back (``model_config_from_hf``). The choices of the string fields
are defined here once; ``ModelConfig.validate`` runs at config load time and
``SSATransformerConfig`` re-checks the same fields with the same function.

This module imports neither torch nor megatron, so a config is checked in a fraction of a second,
before any model is built. ``SSATransformerConfig``, ``llama_block_config`` and
``check_sequence_length`` live in ``ssa_megatron.model.megatron_config`` and are importable from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Training modes: "ssa" trains both branches with the alignment loss; "full"/"sparse" one branch each.
ATTENTION_MODES = ("ssa", "full", "sparse")
# The branch an eval-mode (inference) forward runs.
INFERENCE_MODES = ("sparse", "full")
ALIGNMENT_LOSSES = ("smooth_l1", "mse")
KERNEL_BACKENDS = ("auto", "triton", "naive")
PRECISIONS = ("bf16", "fp16", "fp32")
RECOMPUTE = ("none", "full")
FUSED_OPS = ("auto", "off")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the bad value and the fix."""


@dataclass
class ModelConfig:
    # Transformer layers.
    num_layers: int = 2
    # Model width (residual stream).
    hidden_size: int = 64
    # Hidden size of the SwiGLU MLP.
    ffn_hidden_size: int = 256
    # Query heads.
    num_attention_heads: int = 4
    # Key/value heads (GQA groups); SSA selects blocks per group.
    num_query_groups: int = 2
    # Head dimension (None: hidden_size / num_attention_heads).
    kv_channels: int | None = None
    # "ssa" trains both branches with the alignment loss and draws the branch that drives each
    # micro-batch; "full" and "sparse" are the single-branch baselines (no alignment loss).
    attention_mode: str = "ssa"
    # Tokens per key block (a power of two).
    block_size: int = 16
    # Blocks each query attends to in the sparse branch, its own block included.
    block_count: int = 16
    # Probability that full attention drives a micro-batch (ssa mode).
    p_full: float = 0.5
    # alpha of the paper: total loss = CE + alignment_weight * mean over layers of the alignment loss.
    alignment_weight: float = 10.0
    # smooth_l1 (the paper's) or mse.
    alignment_loss: str = "smooth_l1"
    # Restrict attention to the current document (position_ids restart); the paper attends across.
    document_causal: bool = False
    # The branch eval-mode forwards run when no mode is asked for (sparse or full).
    inference_mode: str = "sparse"
    # Eval-time sparse budget (None: block_count), e.g. 64 for the paper's RF 1024.
    inference_block_count: int | None = None
    # Attention kernels: auto (Triton on CUDA tensors, PyTorch reference on CPU), triton or naive.
    kernel_backend: str = "auto"
    # RoPE base (theta).
    rotary_base: float = 500000.0
    # RMSNorm epsilon.
    norm_epsilon: float = 1e-5
    # Standard deviation of the initial weights.
    init_method_std: float = 0.02
    # Share the input embedding and the output layer.
    tie_embeddings: bool = True
    # Liger's fused Triton RMSNorm, SwiGLU and (at TP=1) LM-head linear + cross entropy: auto (on with
    # CUDA and the liger-kernel package, the [gpu] extra) or off (megatron's own ops). CPU runs are off.
    # Off by default until its GPU tests (tests/test_fused_ops.py, -m gpu) and a bench_train
    # comparison have run on a GPU: so far only its CPU-interpreter tests have.
    fused_ops: str = "off"
    # Set from the tokenizer when None; an explicit value must cover the tokenizer.
    vocab_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def effective_inference_block_count(self) -> int:
        """The block budget of eval-mode sparse attention."""
        return self.inference_block_count if self.inference_block_count is not None else self.block_count

    def validate(self, prefix: str = "model.") -> None:
        """Raise ``ConfigError`` (key, value, fix) for the first value the model cannot run with."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{prefix}{f.name}={value} is not a finite number; give a finite value")
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}{name}={getattr(self, name)} must be positive")
        if self.kv_channels is not None and self.kv_channels < 1:
            raise ConfigError(f"{prefix}kv_channels={self.kv_channels} must be positive (or null)")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{prefix}num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"{prefix}num_query_groups={self.num_query_groups}; pick a divisor of the head count"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}hidden_size={self.hidden_size} is not divisible by {prefix}num_attention_heads="
                f"{self.num_attention_heads}; set {prefix}kv_channels explicitly or change the head count"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"{prefix}vocab_size={self.vocab_size} must be positive (or null)")
        if self.norm_epsilon <= 0:
            raise ConfigError(f"{prefix}norm_epsilon={self.norm_epsilon} must be > 0")
        if self.rotary_base <= 0:
            raise ConfigError(f"{prefix}rotary_base={self.rotary_base} must be > 0")
        check_ssa_fields(self, prefix)


def check_ssa_fields(cfg: Any, prefix: str = "") -> None:
    """The SSA fields' checks, shared by ``ModelConfig`` and ``SSATransformerConfig`` (which has the same
    field names), so the two cannot disagree about what is valid."""
    _check_choice(prefix + "attention_mode", cfg.attention_mode, ATTENTION_MODES)
    _check_choice(prefix + "alignment_loss", cfg.alignment_loss, ALIGNMENT_LOSSES)
    _check_choice(prefix + "inference_mode", cfg.inference_mode, INFERENCE_MODES)
    _check_choice(prefix + "kernel_backend", cfg.kernel_backend, KERNEL_BACKENDS)
    _check_choice(prefix + "fused_ops", cfg.fused_ops, FUSED_OPS)
    if cfg.block_size < 1 or cfg.block_size & (cfg.block_size - 1):
        raise ConfigError(f"{prefix}block_size must be a power of two (e.g. 16); got {cfg.block_size}")
    if cfg.block_count < 1:
        raise ConfigError(
            f"{prefix}block_count must be >= 1 (the own block is always in); got {cfg.block_count}"
        )
    if cfg.inference_block_count is not None and cfg.inference_block_count < 1:
        raise ConfigError(
            f"{prefix}inference_block_count must be >= 1 or null (null: block_count); got "
            f"{cfg.inference_block_count}"
        )
    if not (math.isfinite(cfg.p_full) and 0.0 <= cfg.p_full <= 1.0):
        raise ConfigError(f"{prefix}p_full={cfg.p_full} is a probability: give a value in [0, 1]")
    if not (math.isfinite(cfg.alignment_weight) and cfg.alignment_weight >= 0):
        raise ConfigError(
            f"{prefix}alignment_weight={cfg.alignment_weight} (alpha) must be a finite value >= 0"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}; choose one of them")


def check_block_budget(model: ModelConfig, seq_length: int, seq_key: str = "data.seq_length") -> str | None:
    """Refuse a training sequence that the sparse branch covers whole; return a warning line (or None)
    when eval-time sparse attention would cover it whole.

    With ``seq_length <= block_size * block_count`` every query selects every block it can see, so the
    sparse branch is full attention and the alignment loss is 0: an ssa or sparse run would train
    nothing of what it claims.
    """
    budget = model.block_size * model.block_count
    if model.attention_mode in ("ssa", "sparse") and seq_length <= budget:
        raise ConfigError(
            f"{seq_key}={seq_length} <= model.block_size x model.block_count = {model.block_size} x "
            f"{model.block_count} = {budget}: the sparse branch would equal full attention (alignment "
            f"loss 0); use a longer {seq_key} or a smaller model.block_count"
        )
    inference = model.block_size * model.effective_inference_block_count
    if seq_length <= inference:
        return (
            f"{seq_key}={seq_length} <= model.block_size x inference block count = {model.block_size} x "
            f"{model.effective_inference_block_count} = {inference}: sparse-mode evaluation at this length "
            "equals full attention; lower model.inference_block_count to measure sparse inference"
        )
    return None


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from a saved ``model:`` section (keys absent from older saves keep their
    defaults); unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown model key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    return ModelConfig(**dict(data))


# --- derived configs ----------------------------------------------------------------------------------


def hf_config_kwargs(model: ModelConfig, *, vocab_size: int, seq_length: int) -> dict[str, Any]:
    """Keyword arguments of the Hugging Face ``SSAConfig`` of a model trained with ``model``.

    The HF model is an inference model: its ``attention_mode`` is ``model.inference_mode`` and its
    ``block_count`` the inference budget (``inference_block_count`` or ``block_count``).
    """
    return {
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_method_std,
        "block_size": model.block_size,
        "block_count": model.effective_inference_block_count,
        "max_position_embeddings": seq_length,
        "train_seq_length": seq_length,
        "attention_mode": model.inference_mode,
    }


def model_config_from_hf(hf: Any) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``SSAConfig`` (or a mapping of its fields): the inverse of
    ``hf_config_kwargs``; training-only fields (attention_mode, p_full, alignment) keep their defaults."""
    get = hf.get if isinstance(hf, Mapping) else lambda name, default=None: getattr(hf, name, default)
    heads = int(get("num_attention_heads"))
    head_dim = get("head_dim")
    return ModelConfig(
        num_layers=int(get("num_hidden_layers")),
        hidden_size=int(get("hidden_size")),
        ffn_hidden_size=int(get("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(get("num_key_value_heads")),
        kv_channels=int(head_dim) if head_dim is not None else int(get("hidden_size")) // heads,
        block_size=int(get("block_size")),
        block_count=int(get("block_count")),
        inference_mode=str(get("attention_mode", "sparse")),
        rotary_base=float(get("rope_theta")),
        norm_epsilon=float(get("rms_norm_eps")),
        init_method_std=float(get("initializer_range", 0.02)),
        tie_embeddings=bool(get("tie_word_embeddings", True)),
        vocab_size=int(get("vocab_size")),
    )


# The ModelConfig fields that megatron's config takes unchanged and under the same name.
_TRANSFORMER_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "init_method_std",
    "attention_mode",
    "block_size",
    "block_count",
    "p_full",
    "alignment_weight",
    "alignment_loss",
    "inference_mode",
    "inference_block_count",
    "document_causal",
    "rotary_base",
    "kernel_backend",
    "fused_ops",
)


def transformer_config(
    model: ModelConfig,
    *,
    tensor: int = 1,
    pipeline: int = 1,
    virtual_pipeline: int | None = None,
    context: int = 1,
    sequence_parallel: bool = False,
    precision: str = "fp32",
    params_dtype: Any = None,
    recompute: str = "none",
    cpu_initialization: bool = False,
    mode_seed: int = 0,
) -> Any:
    """megatron's ``SSATransformerConfig`` for ``model`` on a parallel layout (Llama-style blocks).

    ``precision`` sets megatron's mixed-precision flags and the parameters' dtype; ``params_dtype``
    overrides that dtype alone (conversion builds bf16 weights without mixed-precision training).
    ``recompute``: ``none`` or ``full`` (whole layers). ``mode_seed`` seeds the per-micro-batch draw.
    """
    import torch

    from ssa_megatron.model.megatron_config import llama_block_config

    _check_choice("precision", precision, PRECISIONS)
    _check_choice("recompute", recompute, RECOMPUTE)
    dtype = params_dtype or {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    recompute_fields: dict[str, Any] = {
        "none": {},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[recompute]
    m = model
    return llama_block_config(
        **{name: getattr(m, name) for name in _TRANSFORMER_FIELDS},
        kv_channels=m.head_dim,
        layernorm_epsilon=m.norm_epsilon,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        context_parallel_size=context,
        sequence_parallel=sequence_parallel,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=cpu_initialization,
        mode_seed=mode_seed,
        **recompute_fields,
    )


_MEGATRON_NAMES = ("SSATransformerConfig", "llama_block_config", "check_sequence_length")


def __getattr__(name: str) -> Any:
    # The megatron-side names load megatron on first use only, so config checks stay import-light.
    if name in _MEGATRON_NAMES:
        from ssa_megatron.model import megatron_config

        return getattr(megatron_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
