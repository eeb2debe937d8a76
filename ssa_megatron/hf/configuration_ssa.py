"""Hugging Face config of an SSA model (shipped in exported model directories; torch/transformers only)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

ATTENTION_MODES = ("sparse", "full")
# Keys of a rope_scaling dict that still describe unscaled RoPE (transformers 5 writes such dicts).
_PLAIN_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta"})


class SSAConfig(PretrainedConfig):
    """Llama-shaped decoder with a per-head sigmoid output gate and SSA block-sparse attention.

    SSA fields:
        attention_mode: ``"sparse"`` (default, as the paper evaluates) or ``"full"``.
        block_size: tokens per key block (fixed by training).
        block_count: blocks each query attends to, its own block included; may be raised at load time
            (``from_pretrained(dir, block_count=64)``) or per call (``model(ids, block_count=64)``).
        train_seq_length: sequence length the model was trained at (used by the extrapolation eval).
        use_kernels: ``"auto"`` uses the Triton kernels shipped in the model directory on CUDA tensors,
            ``"never"`` always uses the PyTorch path, ``"always"`` uses the kernel ops set on the model for
            every device (e.g. Triton's CPU interpreter in tests).
    """

    model_type = "ssa"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 2048,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        attention_mode: str = "sparse",
        block_size: int = 16,
        block_count: int = 16,
        train_seq_length: int | None = None,
        use_kernels: str = "auto",
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers 5 writes RoPE settings to config.json as `rope_parameters` (its name for
        # rope_scaling); accept that key so a directory saved under 5.x keeps its scaling when 4.x loads it.
        # Copied because transformers 5 edits the dict in place while standardising it.
        legacy = kwargs.pop("rope_parameters", None)
        scaling = rope_scaling if rope_scaling is not None else legacy
        self.rope_scaling = dict(scaling) if isinstance(scaling, dict) else scaling
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_mode = attention_mode
        self.block_size = block_size
        self.block_count = block_count
        self.train_seq_length = train_seq_length if train_seq_length is not None else max_position_embeddings
        self.use_kernels = use_kernels
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_ssa()

    def validate_ssa(self) -> None:
        """Refuse settings the model cannot run, naming the field and the fix."""
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if int(self.block_size) < 1 or int(self.block_count) < 1:
            raise ValueError(
                f"block_size and block_count must be >= 1, got block_size={self.block_size}, "
                f"block_count={self.block_count}"
            )
        if self.use_kernels not in ("auto", "never", "always"):
            raise ValueError(f"use_kernels must be 'auto', 'never' or 'always', got {self.use_kernels!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(
                    f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 2.0}}, "
                    f"got {self.rope_scaling!r}"
                )
            scaling = dict(self.rope_scaling)
            # transformers' RoPE helpers read "rope_type"; older configs wrote "type".
            if "rope_type" not in scaling and "type" in scaling:
                scaling["rope_type"] = scaling["type"]
            # transformers 5 keeps the base inside the dict (and prefers it); mirror it so 4.x's helpers and
            # the plain-RoPE path, which read config.rope_theta, use the same base.
            if "rope_theta" in scaling:
                self.rope_theta = float(scaling["rope_theta"])
            # transformers 5 turns "no scaling" into {"rope_type": "default", "rope_theta": ...}; store
            # plain RoPE as None on every version, so `config.rope_scaling is None` keeps meaning plain RoPE.
            plain = scaling.get("rope_type", "default") == "default" and set(scaling) <= _PLAIN_ROPE_KEYS
            self.rope_scaling = None if plain else scaling
