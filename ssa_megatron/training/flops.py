"""Model FLOPs per training sequence, counting the attention of every branch that runs.

Matmul FLOPs only (2 per multiply-add), as in MFU. Per layer and token: QKV, output gate,
output projection and the SwiGLU MLP; per sequence: the causal attention itself, summed over
query positions exactly (no s^2/2 approximation), for each branch that is computed:

- full branch: query t attends to t + 1 keys: QK^T and PV cost 2 * 2 * head_dim * (t + 1) per head;
- sparse branch: block scoring of q against the block keys of complete blocks
  (2 * head_dim * complete_blocks per head, forward only: selection has no gradient), plus
  selected attention over at most block_count blocks, the own block causally.

`ssa` runs both branches in every layer; `full` and `sparse` only their own. Training counts
forward + backward (3x) for everything with a gradient, and one more forward when layers are
fully recomputed.
"""

from __future__ import annotations

from ssa_megatron.training.config import ModelSection


def _attended_full(seq: int) -> int:
    return seq * (seq + 1) // 2


def _attended_sparse(seq: int, block_size: int, block_count: int) -> tuple[int, int]:
    """(keys attended, block keys scored) summed over query positions 0..seq-1."""
    attended = 0
    scored = 0
    for t in range(seq):
        own = t // block_size
        own_tokens = t - own * block_size + 1
        earlier = min(own, block_count - 1)
        attended += own_tokens + earlier * block_size
        # Blocks complete at t: every earlier block, plus the own block at its last token.
        scored += own + (1 if own_tokens == block_size else 0)
    return attended, scored


def training_flops_per_sequence(
    model: ModelSection, seq: int, vocab_size: int, recompute: str = "none"
) -> float:
    h = model.hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    hq, hkv = model.num_attention_heads, model.num_query_groups
    per_token_dense = (
        2 * h * (hq * d + 2 * hkv * d) + 2 * h * hq + 2 * hq * d * h + 2 * 3 * h * model.ffn_hidden_size
    )
    dense = model.num_layers * per_token_dense * seq
    attn_grad = 0
    attn_fwd_only = 0
    if model.attention_mode in ("ssa", "full"):
        attn_grad += 4 * d * hq * _attended_full(seq)
    if model.attention_mode in ("ssa", "sparse"):
        attended, scored = _attended_sparse(seq, model.block_size, model.block_count)
        attn_grad += 4 * d * hq * attended
        attn_fwd_only += 2 * d * hq * scored
    attn_grad *= model.num_layers
    attn_fwd_only *= model.num_layers
    logits = 2 * h * vocab_size * seq
    forward_passes = 4 if recompute == "full" else 3
    layer_total = forward_passes * (dense + attn_grad) + (2 if recompute == "full" else 1) * attn_fwd_only
    return float(layer_total + 3 * logits)


# Dense bf16 peak (no sparsity) per device, TFLOP/s, from the vendors' data sheets.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in _PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
