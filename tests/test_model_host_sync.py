"""The SSA training path never makes the host wait for the GPU (GPU machine: ``pytest -m gpu``).

A host sync inside a layer (``.item()``, a copy from pageable host memory, reading ``cu_seqlens``)
drains the GPU's queue, and the kernels that follow then run at the host's launch pace. Profiled
on an H200, the 1B ssa step idled the GPU ~65 of 270 ms that way, from a count tensor made on the
host and a loss scale copied over in every layer. CUDA's sync debug mode turns every such sync into
an error here. Plans and other per-geometry tables are built on the first call and cached, so the
first call may copy; the second must not.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ssa
from ssa_megatron.model import mode as ssa_mode
from tests.test_model_equivalence import tiny_config


def _without_host_syncs(step) -> None:
    step()  # fills the per-geometry caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _qkv(t: int, hq: int, h: int, d: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(t)
    shapes = [(1, t, hq, d), (1, t, h, d), (1, t, h, d)]
    return tuple(torch.randn(s, device="cuda", generator=gen).bfloat16().requires_grad_(True) for s in shapes)


@pytest.mark.gpu
def test_gpu_sparse_branch_forward_backward_without_host_syncs() -> None:
    q, k, v = _qkv(2048, 32, 2, 64)

    def step() -> None:
        o, lse, _ = ssa.sparse_attention(q, k, v, 16, 16)
        (o.float().square().sum() + lse.sum()).backward()

    _without_host_syncs(step)


@pytest.mark.gpu
@pytest.mark.parametrize("document_causal", [False, True], ids=["one-document", "documents"])
def test_gpu_ssa_core_attention_training_step_without_host_syncs(document_causal: bool) -> None:
    # Both branches, the alignment loss and its backward hook, the sparsity statistic.
    from ssa_megatron.model.alignment import set_alignment_loss_scale, tracker
    from ssa_megatron.model.attention import SSACoreAttention, build_forward_params

    t = 1024
    config = tiny_config("ssa", document_causal, kernel_backend="auto", num_attention_heads=8,
                         num_query_groups=2, kv_channels=64, hidden_size=512)  # fmt: skip
    core = SSACoreAttention(config, layer_number=1, softmax_scale=64**-0.5).cuda().train()
    positions = torch.cat([torch.arange(300), torch.arange(t - 300)])[None].cuda()
    ssa_mode.set_microbatch(3, 0)
    set_alignment_loss_scale(0.5)
    try:
        # Built once per micro-batch (the model's one device-to-host read of the positions).
        params = build_forward_params(config, positions, 1, t, torch.device("cuda"), training=True)
        q, k, v = _qkv(t, 8, 2, 64)

        def step() -> None:
            core(q, k, v, params).float().square().sum().backward()

        _without_host_syncs(step)
    finally:
        ssa_mode.clear()
        tracker.sums = None
