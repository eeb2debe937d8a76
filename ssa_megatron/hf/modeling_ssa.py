"""Hugging Face model of an SSA decoder (shipped inside exported model directories).

Loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` where only
transformers, torch and safetensors are installed, so this file imports nothing from this
project: its attention math lives in the sibling ``ssa_attention.py`` (copied with it).

Attention back ends. Every attention call goes through an "ops" object that follows the
``kernels.ssa`` contract (``dense_attention``, ``sparse_attention``). The default is the PyTorch
path in ``ssa_attention.py``. An exported directory may also carry a copy of the project's Triton
kernels in ``<dir>/ssa_kernels/``; ``from_pretrained`` imports it when CUDA is available and the
import succeeds (triton present), and the layers then use it for CUDA tensors, falling back to the
PyTorch path for CPU tensors or when ``config.use_kernels == "never"``. In-repo users can inject
``kernels.ssa`` with ``model.set_attention_ops(kernels.ssa)``.

Modes: ``config.attention_mode`` (``"sparse"`` default, or ``"full"``) and ``config.block_count``
are defaults; ``forward``/``generate`` accept ``attention_mode=`` and ``block_count=`` per call.
KV cache: keys are cached after RoPE. A decoding step (one new token per sequence after a prompt)
takes the decode path: in sparse mode the cache's block keys are kept per layer and updated as blocks
fill (``decode_block_keys``), and ``sparse_decode`` selects over them and reads only the selected
blocks' keys and values; in full mode ``dense_decode`` (SDPA on the PyTorch path) reads the cache in
place. Both give the logits of the no-cache forward. ``SSAStaticCache`` is a preallocated cache for
loops that must not copy the cache every step (``DynamicCache`` concatenates).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_ssa import ATTENTION_MODES, SSAConfig
from .ssa_attention import (
    attention_statistics,
    block_keys,
    decode_block_keys,
    dense_attention,
    sparse_attention,
    sparse_decode,
)

logger = logging.getLogger(__name__)

TORCH_OPS = SimpleNamespace(
    dense_attention=dense_attention,
    sparse_attention=sparse_attention,
    block_keys=block_keys,
    decode_block_keys=decode_block_keys,
    sparse_decode=sparse_decode,
)
SHIPPED_KERNELS_DIR = "ssa_kernels"


def load_shipped_kernels(model_dir: str, *, require_cuda: bool = True) -> ModuleType | None:
    """Import ``<model_dir>/ssa_kernels`` (a copy of the project's ``kernels.ssa``) when usable, else None.

    Only attempted with CUDA available (unless ``require_cuda=False``, which tests use to check the copy
    on CPU), since the Triton kernels run on CUDA tensors only; any
    import failure (no triton, incompatible version) falls back to the PyTorch path with a warning.
    """
    init = os.path.join(model_dir, SHIPPED_KERNELS_DIR, "__init__.py")
    if not os.path.isfile(init) or (require_cuda and not torch.cuda.is_available()):
        return None
    # A name unique per directory so two exported models never share a cached module.
    name = "ssa_shipped_kernels_" + hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.dirname(init)]
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        logger.warning(
            "SSA Triton kernels in %s not usable (%s); using the PyTorch attention path", init, exc
        )
        return None
    return module


class SSARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SSARotaryEmbedding(nn.Module):
    """RoPE (non-interleaved halves, like Llama and Megatron) with any transformers rope_scaling type."""

    def __init__(self, config: SSAConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is unknown; use 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}"
            )
        inv_freq, self.attention_factor = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and cos/sin factor of the configured RoPE type."""
        if self.rope_type == "default":
            # Plain RoPE is computed here: transformers 5 dropped "default" from ROPE_INIT_FUNCTIONS.
            head_dim = self.config.head_dim
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
            return 1.0 / (self.config.rope_theta**exponents), 1.0
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            # Dynamic NTK rescales the base from the longest position seen in this call.
            seq_len = int(position_ids.max()) + 1
            inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](self.config, position_ids.device, seq_len=seq_len)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device).float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, heads, D]``, ``cos/sin [B, T, D]``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class SSAAttention(nn.Module):
    """QKV projections, RoPE, dense or SSA sparse attention, per-head sigmoid gate, output projection."""

    def __init__(self, config: SSAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        # The paper's gated attention: one sigmoid gate per query head, computed from the layer input.
        self.head_gate = nn.Linear(hidden, self.num_heads, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.kernel_ops: Any = None
        self.stats_sink: list[dict[str, Any]] | None = None

    def _ops(self, x: torch.Tensor) -> Any:
        if self.kernel_ops is not None and (
            self.config.use_kernels == "always" or (x.is_cuda and self.config.use_kernels == "auto")
        ):
            return self.kernel_ops
        return TORCH_OPS

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        mode: str,
        block_count: int,
    ) -> torch.Tensor:
        b, t, _ = hidden.shape
        q = apply_rope(self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
        q_offset = k.shape[1] - t
        ops = self._ops(q)
        if cache is not None and t > 1:
            decode_block_keys_of(cache).pop(self.layer_idx, None)  # rebuilt at the next decoding step
        if (
            cache is not None
            and t == 1
            and q_offset > 0
            and (mode == "full" or hasattr(ops, "sparse_decode"))
        ):
            o = self._decode(ops, q[:, 0], k, v, cache, mode, block_count)[:, None]
        else:
            if ops is not TORCH_OPS:
                # The cache hands back [B, H, T, D] storage viewed as [B, T, H, D]; kernels get dense tensors.
                k, v = k.contiguous(), v.contiguous()
            if mode == "full":
                o, _ = ops.dense_attention(q, k, v, q_offset=q_offset)
            else:
                o, _, _ = ops.sparse_attention(
                    q, k, v, self.config.block_size, block_count, q_offset=q_offset
                )
        if self.stats_sink is not None:
            with torch.no_grad():
                stats = attention_statistics(q, k, self.config.block_size, block_count, q_offset=q_offset)
            self.stats_sink.append({"layer": self.layer_idx, **stats})
        gate = torch.sigmoid(self.head_gate(hidden)).unsqueeze(-1)
        return self.o_proj((o.to(hidden.dtype) * gate).reshape(b, t, self.num_heads * self.head_dim))

    def _decode(
        self,
        ops: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: Any,
        mode: str,
        block_count: int,
    ) -> torch.Tensor:
        """One new token per sequence: ``q [B, HQ, D]`` at position L - 1 against the cache's L keys
        (``k``/``v [B, L, H, D]`` views of the cache, not copied). Returns ``[B, HQ, D]``."""
        b, length, h, d = k.shape
        if mode == "full" and hasattr(ops, "dense_decode"):
            # Split over the keys (flash decoding): one sequence still spreads over the whole GPU.
            seq_lens = torch.full((b,), length, dtype=torch.int32, device=q.device)
            return ops.dense_decode(q, k, v, seq_lens)[0]
        if mode == "full":
            # The last position sees every cached key: the group's G query heads become G query rows
            # of their KV head, so SDPA reads each cached key once, in place, with no mask and no GQA
            # expansion of the cache.
            qg = q.view(b, h, -1, d)
            return F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2)).reshape(b, -1, d)
        seq_lens = torch.full((b,), length, dtype=torch.int32, device=q.device)
        kblock = self._cached_block_keys(ops, cache, k, seq_lens)
        o, _, _ = ops.sparse_decode(q, k, v, kblock, seq_lens, self.config.block_size, block_count)
        return o

    def _cached_block_keys(
        self, ops: Any, cache: Any, k: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """This layer's block keys of the cache, current for its ``L = k.shape[1]`` tokens.

        Kept between steps (per cache object, per layer) and updated in place as blocks fill; rebuilt
        from the cached keys when they do not cover the first L - 1 tokens (the first step after a
        prompt, or a cache this layer has not seen). Capacity doubles as the context grows.
        """
        bs = self.config.block_size
        b, length, h, d = k.shape
        need = -(-length // bs)
        entries = decode_block_keys_of(cache)
        entry = entries.get(self.layer_idx)
        stale = (
            entry is None
            or entry[1] < length - 1
            or entry[0].shape[0] != b
            or entry[0].device != k.device
            or entry[0].dtype != k.dtype
        )
        if stale:
            buf = k.new_zeros(b, need, h, d)
            full = length // bs
            if full:
                buf[:, :full] = ops.block_keys(k[:, : full * bs].contiguous(), bs)
        else:
            buf = entry[0]
            if buf.shape[1] < need:
                grown = buf.new_zeros(b, max(need, 2 * buf.shape[1]), h, d)
                grown[:, : buf.shape[1]] = buf
                buf = grown
            ops.decode_block_keys(k, buf, seq_lens, bs)
        entries[self.layer_idx] = (buf, length)
        return buf[:, :need]


_BLOCK_KEYS_ATTR = "_ssa_decode_block_keys"


def decode_block_keys_of(cache: Any) -> dict[int, tuple[torch.Tensor, int]]:
    """The decode path's block keys kept on ``cache``: ``{layer: (block keys [B, capacity, H, D], tokens
    covered)}``. Stored on the cache object itself, so they live and go with it (any cache class)."""
    entries = getattr(cache, _BLOCK_KEYS_ATTR, None)
    if entries is None:
        entries = {}
        setattr(cache, _BLOCK_KEYS_ATTR, entries)
    return entries


class SSAStaticCache:
    """A preallocated KV cache: ``update`` writes the new keys/values in place and hands back views.

    ``DynamicCache`` concatenates the whole cache in every step, a copy as large as the reads a sparse
    decoding step saves; loops that decode at long context (``tools/bench_inference.py --decode``)
    pass this instead as ``past_key_values``. Storage is ``[B, H, max_length, D]`` per layer, the
    layout SDPA reads in place; ``set_length`` rewinds (or, after filling the storage directly,
    declares) the cached length of every layer.
    """

    def __init__(
        self, config: SSAConfig, batch_size: int, max_length: int, *, device: Any = None, dtype: Any = None
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.lengths = [0] * layers
        self.max_length = max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def set_length(self, length: int) -> None:
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} is outside this cache's [0, {self.max_length}]")
        self.lengths = [length] * len(self.lengths)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"SSAStaticCache holds {self.max_length} tokens but {end} were requested; "
                "build it with a larger max_length"
            )
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class SSAMLP(nn.Module):
    def __init__(self, config: SSAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SSADecoderLayer(nn.Module):
    def __init__(self, config: SSAConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SSAAttention(config, layer_idx)
        self.post_attention_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SSAMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        mode: str,
        block_count: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mode, block_count)
        return x + self.mlp(self.post_attention_layernorm(x))


class SSAPreTrainedModel(PreTrainedModel):
    config_class = SSAConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["SSADecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init rather than in-place .data writes: transformers 5 wraps these functions during
        # from_pretrained so that they skip tensors already loaded from the checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SSARMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, SSARotaryEmbedding):
            # transformers 5 builds the model on the meta device and refills non-persistent buffers with
            # uninitialised memory, expecting _init_weights to recompute them; inv_freq is one (4.x never
            # drops it, and recomputing gives the same values there).
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device)[0])


class SSAModel(SSAPreTrainedModel):
    def __init__(self, config: SSAConfig) -> None:
        super().__init__(config)
        config.validate_ssa()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SSADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = SSARotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        mode: str,
        block_count: int,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (
                torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
            )
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mode, block_count)
        return self.norm(x)


class SSAForCausalLM(SSAPreTrainedModel, GenerationMixin):
    # A {tied: source} mapping: transformers 5 requires it (it reads .keys()/.values()); 4.x iterates it and
    # so sees the same key list it used to get.
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SSAConfig) -> None:
        super().__init__(config)
        self.model = SSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> SSAForCausalLM:
        # transformers (4.5x and 5.x) pops a boolean `use_kernels` from these kwargs for its Hub-kernels
        # feature and fails without the `kernels` package; SSAConfig.use_kernels is a string, so a string
        # value is ours: apply it to the config instead of letting transformers see it.
        ssa_use_kernels = kwargs.pop("use_kernels") if isinstance(kwargs.get("use_kernels"), str) else None
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if ssa_use_kernels is not None:
            model.config.use_kernels = ssa_use_kernels
        model.config.validate_ssa()
        if os.path.isdir(str(pretrained_model_name_or_path)):
            kernels = load_shipped_kernels(str(pretrained_model_name_or_path))
            if kernels is not None:
                model.set_attention_ops(kernels)
        return model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _chunked_prefill(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, cache: Any, mode: str,
        block_count: int, chunk: int,
    ) -> torch.Tensor:  # fmt: skip
        """The prompt in chunks of ``chunk`` tokens through the cache: each chunk's queries attend to the
        cached keys at their absolute positions, so the result equals one pass, while the activations
        (attention scores, MLP intermediates) are those of one chunk at a time."""
        source = input_ids if inputs_embeds is None else inputs_embeds
        pieces = []
        for start in range(0, source.shape[1], chunk):
            part = source[:, start : start + chunk]
            ids, embeds = (part, None) if inputs_embeds is None else (None, part)
            pieces.append(self.model(ids, embeds, None, cache, mode, block_count))
        return torch.cat(pieces, dim=1)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_rope_scaling(self, rope_scaling: dict[str, Any] | None) -> None:
        """Change RoPE scaling in place (e.g. ``{"rope_type": "linear", "factor": 2.0}`` to run at twice the
        training length); ``None`` restores plain RoPE. A KV cache built before the change is stale."""
        self.config.rope_scaling = rope_scaling
        self.config.validate_ssa()
        device = self.model.rotary_emb.inv_freq.device
        self.model.rotary_emb = SSARotaryEmbedding(self.config).to(device)

    def _attention_layers(self) -> list[SSAAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def set_attention_ops(self, ops: Any) -> None:
        """Use ``ops`` (any object with the ``kernels.ssa`` ``dense_attention``/``sparse_attention``
        signatures) for CUDA tensors; ``None`` restores the PyTorch path everywhere."""
        for attn in self._attention_layers():
            attn.kernel_ops = ops

    @contextlib.contextmanager
    def collect_attention_stats(self) -> Iterator[list[dict[str, Any]]]:
        """Within the block, every attention layer appends a dict with ``layer`` and ``sparsity``,
        ``entropy``, ``kl_sparse_full`` (fp32 ``[B, Tq, HQ]``; see ``ssa_attention.attention_statistics``)
        per forward call, computed on the q/k of the mode being run with the block_count of that call."""
        sink: list[dict[str, Any]] = []
        for attn in self._attention_layers():
            attn.stats_sink = sink
        try:
            yield sink
        finally:
            for attn in self._attention_layers():
                attn.stats_sink = None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        attention_mode: str | None = None,
        block_count: int | None = None,
        return_dict: bool | None = None,
        prefill_chunk_size: int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        mode = attention_mode or self.config.attention_mode
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
        block_count = int(self.config.block_count if block_count is None else block_count)
        if block_count < 1:
            raise ValueError(f"block_count must be >= 1, got {block_count}")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            # Block selection is defined on contiguous token positions; a padded row would shift blocks.
            raise ValueError(
                "SSA models do not support padding in attention_mask (blocks are contiguous positions); "
                "run sequences of equal length or one sequence at a time"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        chunked = prefill_chunk_size is not None and length > prefill_chunk_size and position_ids is None
        if (use_cache or chunked) and past_key_values is None:
            past_key_values = DynamicCache()
        if chunked:
            hidden = self._chunked_prefill(input_ids, inputs_embeds, past_key_values, mode, block_count,
                                           prefill_chunk_size)  # fmt: skip
        else:
            cache = past_key_values if use_cache else None
            hidden = self.model(input_ids, inputs_embeds, position_ids, cache, mode, block_count)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None
        )
