"""The two SSA branches on separate CUDA streams give what they give on one (GPU: ``pytest -m gpu``).

Overlap is a scheduling change only: the same kernels run on the same inputs, so outputs, the
alignment loss and every gradient must match the one-stream run. A missing stream dependency or a
buffer the caching allocator handed out early shows up as a mismatch, so the comparison repeats
with allocations in between.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ssa_megatron import mode as ssa_mode
from tests.test_model_equivalence import tiny_config


def _run(core: torch.nn.Module, params: object, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    from ssa_megatron.alignment import tracker

    q, k, v = (x.detach().clone().requires_grad_(True) for x in inputs)
    out = core(q, k, v, params)
    # Churn the allocator on the main stream while the side stream's work may still be in flight.
    scratch = [torch.empty(1 << 20, device="cuda").normal_() for _ in range(8)]
    out.float().square().sum().backward()
    del scratch
    reduced = tracker.reduce(core.config.num_layers, torch.device("cuda"))
    return [out.detach(), q.grad, k.grad, v.grad, reduced["alignment_loss"], reduced["attention_sparsity"]]


@pytest.mark.gpu
@pytest.mark.parametrize("main_branch", ["full", "sparse"])
def test_gpu_overlapped_branches_match_one_stream(main_branch: str) -> None:
    from ssa_megatron.alignment import set_alignment_loss_scale
    from ssa_megatron.attention import SSACoreAttention, build_forward_params

    t = 4096
    base = tiny_config("ssa", kernel_backend="auto", num_attention_heads=32, num_query_groups=2,
                       kv_channels=64, hidden_size=2048, block_count=16,
                       p_full=1.0 if main_branch == "full" else 0.0)  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(11)
    shapes = [(1, t, 32, 64), (1, t, 2, 64), (1, t, 2, 64)]
    inputs = tuple(torch.randn(s, device="cuda", generator=gen).bfloat16() for s in shapes)
    ssa_mode.set_microbatch(5, 0)
    set_alignment_loss_scale(1.0)
    try:
        results = {}
        for overlap in (False, True):
            config = dataclasses.replace(base, overlap_branches=overlap)
            core = SSACoreAttention(config, layer_number=1, softmax_scale=64**-0.5).cuda().train()
            params = build_forward_params(config, None, 1, t, torch.device("cuda"), training=True)
            assert params.mode == main_branch
            results[overlap] = [_run(core, params, inputs) for _ in range(3)]
        torch.cuda.synchronize()
        reference = results[False][0]
        for run in results[True]:
            for got, want in zip(run, reference, strict=True):
                # Tolerances by dtype: cuDNN's attention backward need not be bitwise repeatable.
                torch.testing.assert_close(got, want, equal_nan=True)
    finally:
        ssa_mode.clear()


def test_overlap_is_a_model_config_switch() -> None:
    from ssa_megatron.training.config import load_config
    from ssa_megatron.training.runner import model_config

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
    cfg = load_config(tiny, [("model", "overlap_branches", "false")])
    assert model_config(cfg, 256, torch.device("cpu")).overlap_branches is False
    default = load_config(tiny, [])
    assert model_config(default, 256, torch.device("cpu")).overlap_branches is True
