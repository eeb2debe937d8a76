"""SSA self-attention for megatron's TransformerLayer.

``SSASelfAttention``: QKV projection (megatron's ``SelfAttention`` layout, GQA), RoPE at per-token
positions, a per-head sigmoid output gate (column-parallel ``hidden -> heads``, no bias) and the output
projection. ``SSACoreAttention`` runs the full and/or sparse branch through ``kernels.ssa`` (converting
megatron's ``[s, b, h, d]`` to the kernels' ``[b, s, h, d]`` once), the alignment loss and the metrics.

Per-forward information (drawn mode, RoPE angles, document boundaries) travels in ``SSAForwardParams``,
a ``PackedSeqParams`` the model builds once per forward and megatron passes to every layer; because
megatron's full-layer recompute keeps that object in its closure, a recomputed layer replays the same
mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import Tensor

import kernels.ssa as ssa_ops
from ssa_megatron.model import mode as ssa_mode
from ssa_megatron.model.alignment import attach_alignment_loss, global_alignment_loss, tracker
from ssa_megatron.model.megatron_config import SSATransformerConfig
from ssa_megatron.parallel.context import gather_sequence, local_query_chunks, split_for_rank


@dataclass
class SSAForwardParams(PackedSeqParams):
    """What every SSA layer of one forward shares.

    ``mode``: the branch that drives the residual stream (``"full"``/``"sparse"``), ``block_count`` its
    sparse budget, ``both_branches``: run both (SSA training), all three from ``mode.resolve``. ``rope_cos``/
    ``rope_sin``: ``[s_local, b, 1, head_dim]`` fp32 at this rank's token positions.
    ``doc_cu_seqlens``: per batch row, int32 document boundaries over the *global* row (FlashAttention
    convention), or None to attend across documents. They live on the host: every kernel call reads
    them there, and a device copy would cost a device-to-host sync per layer and branch.
    """

    mode: str = "sparse"
    block_count: int = 16
    both_branches: bool = False
    rope_cos: Tensor | None = None
    rope_sin: Tensor | None = None
    doc_cu_seqlens: list[Tensor] | None = field(default=None)


def _cp_group_rank_size() -> tuple[dist.ProcessGroup | None, int, int]:
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None, 0, 1
    return (
        parallel_state.get_context_parallel_group(),
        parallel_state.get_context_parallel_rank(),
        parallel_state.get_context_parallel_world_size(),
    )


def default_position_ids(batch: int, seq_local: int, device: torch.device) -> Tensor:
    """Positions 0..S-1 of the global row, as this CP rank holds them: ``[b, s_local]``."""
    _, cp_rank, cp_size = _cp_group_rank_size()
    full = torch.arange(seq_local * cp_size, device=device)
    return split_for_rank(full, 0, cp_rank, cp_size).expand(batch, seq_local)


def rope_angles(position_ids: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin ``[s, b, 1, head_dim]`` (fp32) of Llama-style RoPE (rotate-half, non-interleaved)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device)
                               / head_dim))
    angles = position_ids.t().double()[..., None] * inv_freq  # [s, b, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[s, b, h, d]`` by the angles (computed in fp32, returned in x's dtype)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def document_cu_seqlens(position_ids_full: Tensor) -> list[Tensor]:
    """Per row, int32 cu_seqlens (on the host) of the documents, which start where ``position_ids == 0``
    (and at 0)."""
    position_ids_full = position_ids_full.cpu()  # the micro-batch's one device-to-host sync
    rows = []
    seq = position_ids_full.shape[1]
    for row in position_ids_full:
        starts = torch.nonzero(row == 0).flatten()
        if starts.numel() == 0 or int(starts[0]) != 0:
            starts = torch.cat([starts.new_zeros(1), starts])
        rows.append(torch.cat([starts, starts.new_full((1,), seq)]).to(torch.int32))
    return rows


def build_forward_params(
    config: SSATransformerConfig,
    position_ids: Tensor | None,
    batch: int,
    seq_local: int,
    device: torch.device,
    training: bool,
    schedule_microbatch: int | None = None,
    override: ssa_mode.ModeOverride | None = None,
) -> SSAForwardParams:
    """Everything the layers of one forward share (see ``SSAForwardParams``); ``override`` is the
    model's ``override_mode`` scope, if any."""
    if position_ids is None:
        position_ids = default_position_ids(batch, seq_local, device)
    position_ids = position_ids.to(device)
    resolved = ssa_mode.resolve(config, training, schedule_microbatch, override)
    cos, sin = rope_angles(position_ids, config.kv_channels, config.rotary_base)
    doc = None
    if config.document_causal:
        cp_group, _, _ = _cp_group_rank_size()
        doc = document_cu_seqlens(gather_sequence(position_ids, 1, cp_group))
    return SSAForwardParams(
        qkv_format="sbhd", mode=resolved.drive, block_count=resolved.block_count,
        both_branches=resolved.both_branches, rope_cos=cos, rope_sin=sin, doc_cu_seqlens=doc,
    )


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    # torch.cat copies even a single tensor: one launch and one copy of the output per branch and
    # layer that the common case (one chunk, one row) does not need.
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class SSACoreAttention(MegatronModule):
    """Both SSA branches on ``[b, s_local, heads, d]`` tensors, CP-aware, with the alignment loss."""

    def __init__(
        self,
        config: SSATransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SSA attention is causal; got attn_mask_type={attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.pg_collection = pg_collection

    def _tp_cp_group(self) -> dist.ProcessGroup | None:
        from megatron.core import parallel_state

        if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
            return None
        return parallel_state.get_tensor_and_context_parallel_group()

    def _branch(self, kind: str, q: Tensor, k: Tensor, v: Tensor, params: SSAForwardParams,
                block_count: int) -> tuple[Tensor, Tensor]:
        """One branch for this rank's query chunks against the global keys; ``(o, lse)``."""
        _, cp_rank, cp_size = _cp_group_rank_size()
        common = {"scale": self.softmax_scale, "backend": self.config.kernel_backend}
        outs, lses = [], []
        for start, length, offset in local_query_chunks(q.shape[1], cp_rank, cp_size):
            qc = q[:, start : start + length]
            if params.doc_cu_seqlens is None:
                # Keys after the chunk are never attended; dropping them saves work on early chunks.
                calls = [(qc, k[:, : offset + length], v[:, : offset + length], None)]
            else:
                docs = enumerate(params.doc_cu_seqlens)
                calls = [(qc[r : r + 1], k[r : r + 1], v[r : r + 1], cu) for r, cu in docs]
            row_o, row_lse = [], []
            for qi, ki, vi, cu in calls:
                if kind == "full":
                    o, lse = ssa_ops.dense_attention(qi, ki, vi, q_offset=offset, cu_seqlens=cu, **common)
                else:
                    o, lse, _ = ssa_ops.sparse_attention(
                        qi, ki, vi, self.config.block_size, block_count, q_offset=offset, cu_seqlens=cu,
                        **common,
                    )
                row_o.append(o)
                row_lse.append(lse)
            outs.append(_joined(row_o, 0))
            lses.append(_joined(row_lse, 0))
        return _joined(outs, 1), _joined(lses, 1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, params: SSAForwardParams) -> Tensor:
        """``q`` ``[b, s_local, hq, d]``, ``k``/``v`` ``[b, s_local, hkv, d]`` (this CP rank's chunks)."""
        cp_group, _, _ = _cp_group_rank_size()
        k = gather_sequence(k, 1, cp_group)
        v = gather_sequence(v, 1, cp_group)
        config = self.config
        if not params.both_branches:
            return self._branch(params.mode, q, k, v, params, params.block_count)[0]
        o_full, lse_full = self._branch("full", q, k, v, params, params.block_count)
        o_sparse, lse_sparse = self._branch("sparse", q, k, v, params, params.block_count)
        local = global_alignment_loss(
            o_full, o_sparse, config.alignment_loss, self._tp_cp_group(), config.kernel_backend
        )
        tracker.record_alignment(self.layer_number, config.num_layers, local)
        tracker.record_sparsity(self.layer_number, config.num_layers, lse_sparse, lse_full)
        main = o_full if params.mode == "full" else o_sparse
        return attach_alignment_loss(main, local * (config.alignment_weight / config.num_layers))


@dataclass
class SSASelfAttentionSubmodules(SelfAttentionSubmodules):
    """megatron's self-attention submodules plus the per-head gate projection."""

    linear_gate: object = None


class SSASelfAttention(SelfAttention):
    """QKV -> RoPE -> SSA core attention -> per-head sigmoid gate -> output projection."""

    def __init__(
        self,
        config: SSATransformerConfig,
        submodules: SSASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        if not isinstance(config, SSATransformerConfig):
            raise TypeError(f"SSASelfAttention needs an SSATransformerConfig; got {type(config).__name__}")
        super().__init__(config, submodules, layer_number, attn_mask_type, cp_comm_type, pg_collection)
        if submodules.linear_gate is None:
            raise ValueError("SSASelfAttentionSubmodules.linear_gate is required (the per-head output gate)")
        self.linear_gate = build_module(
            submodules.linear_gate,
            config.hidden_size,
            config.num_attention_heads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
            tp_group=self.pg_collection.tp,
        )

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        key_value_states: Tensor | None = None,
        inference_context: object | None = None,
        rotary_pos_emb: object | None = None,
        rotary_pos_cos: Tensor | None = None,
        rotary_pos_sin: Tensor | None = None,
        rotary_pos_cos_sin: Tensor | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        sequence_len_offset: Tensor | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, Tensor | None]:
        """``hidden_states`` ``[s, b, hidden]`` -> ``(output, bias)`` like megatron's SelfAttention.

        The causal structure comes from SSA itself; ``attention_mask`` is ignored. Positions and mode come
        from ``packed_seq_params`` (an ``SSAForwardParams``); without it (a bare TransformerBlock) they are
        built here from default positions and the published mode state.
        """
        if inference_context is not None or key_value_states is not None:
            raise ValueError("SSASelfAttention supports neither KV-cache inference nor cross attention")
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        params = packed_seq_params
        if not isinstance(params, SSAForwardParams):
            if params is not None:
                raise ValueError("SSASelfAttention takes SSAForwardParams, not megatron's PackedSeqParams")
            params = build_forward_params(self.config, None, query.shape[1], query.shape[0], query.device,
                                          self.training)
        query = apply_rope(query, params.rope_cos, params.rope_sin)
        key = apply_rope(key, params.rope_cos, params.rope_sin)
        gate, _ = self.linear_gate(hidden_states)  # [s, b, heads_local]
        out = self.core_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), params
        )  # [b, s, hq, d]
        out = out * torch.sigmoid(gate.float()).transpose(0, 1).unsqueeze(-1).to(out.dtype)
        out = out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)
        return self.linear_proj(out)
