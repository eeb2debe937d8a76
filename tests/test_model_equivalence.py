"""N-rank vs 1-rank equivalence of the SSA model under megatron's schedules (CPU, gloo).

Every layout (TP=2, CP=2, PP=2, TP=2 x CP=2) is compared, for each attention mode, with a single-rank run
of the same weights on the same batches: per-token CE (the forward output), the step's CE, the per-layer
alignment loss, and every gathered gradient. Each worker computes the single-rank reference itself
(megatron state with TP=PP=CP=1), then rebuilds the parallel state in the layout under test.
The drawn modes of all ranks are all-gathered and must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ssa_megatron.model import mode as ssa_mode
from ssa_megatron.model.config import SSATransformerConfig
from tests.distributed import run_distributed

SEQ, BATCH, VOCAB, MICROBATCHES, SEED = 64, 2, 96, 2, 5
# (attention_mode, document_causal); "ssa" runs one micro-batch of each drawn mode (see _iteration).
CASES = (("ssa", False), ("full", False), ("sparse", False), ("ssa", True))


def tiny_config(attention_mode: str = "ssa", document_causal: bool = False, tp: int = 1, pp: int = 1,
                cp: int = 1, **overrides: object) -> SSATransformerConfig:
    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        attention_mode=attention_mode, document_causal=document_causal, block_size=16, block_count=2,
        rotary_base=10000.0, kernel_backend="naive",
    )
    fields.update(overrides)
    return SSATransformerConfig(**fields)


def make_batches(seed: int = SEED) -> list[dict[str, torch.Tensor]]:
    """Packed rows: row 0 one document, row 1 documents of 20 and 44 tokens (RoPE restarts)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        position_ids = torch.stack([torch.arange(SEQ), torch.cat([torch.arange(20), torch.arange(SEQ - 20)])])
        loss_mask = (position_ids != 0).float()
        loss_mask[:, -3:] = 0.0
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask,
                        "position_ids": position_ids})
    return batches


def iteration_with_both_modes(config: SSATransformerConfig) -> int:
    """An iteration whose two micro-batches draw different modes, so both main branches are exercised."""
    for it in range(1000):
        modes = {ssa_mode.draw_mode(config.mode_seed, it, mb, config.p_full) for mb in range(MICROBATCHES)}
        if modes == {"full", "sparse"}:
            return it
    raise AssertionError("no iteration draws both modes")


def run_step(config: SSATransformerConfig, batches: list[dict[str, torch.Tensor]], full_weights: dict | None,
             iteration: int) -> dict:
    """Build this rank's model, load ``full_weights`` (or keep its init), run one forward/backward through
    megatron's schedule; return per-token CE (global order), step CE, alignment per layer, gathered grads,
    the full weights and the drawn modes."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ssa_megatron.model.alignment import alignment_loss_scale, set_alignment_loss_scale, tracker
    from ssa_megatron.model.gpt import build_model_chunks
    from ssa_megatron.parallel.context import gather_sequence, split_for_rank
    from ssa_megatron.parallel.cpu_compat import compute_device
    from ssa_megatron.parallel.state import gather_full_tensors, load_full_state_dict

    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_group = parallel_state.get_context_parallel_group()
    device = compute_device()
    chunks = [chunk.to(device) for chunk in build_model_chunks(config, VOCAB, SEQ)]
    weights: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        if full_weights is not None:
            load_full_state_dict(chunk, full_weights)
        weights.update(gather_full_tensors(chunk))
    modes: dict[int, str] = {}
    local = []
    for batch in batches:
        part = {k: split_for_rank(v, 1, cp_rank, cp).to(device) for k, v in batch.items()}
        part["count"] = batch["loss_mask"].sum().to(device)  # the micro-batch's global target count
        local.append(part)
    per_token: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        params = model.forward_params(batch["tokens"], batch["position_ids"])  # what forward would build
        microbatch = model.decoder.layers[0].current_microbatch
        assert modes.setdefault(microbatch, params.mode) == params.mode, "chunks drew different modes"
        out = model(
            batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=params
        )

        def loss_func(output: torch.Tensor):
            per_token.append(gather_sequence(output.detach(), 1, cp_group).cpu())
            return (output * batch["loss_mask"]).sum() / batch["count"], {"ce": output.detach()}

        return out, loss_func

    ssa_mode.set_microbatch(iteration)
    set_alignment_loss_scale(alignment_loss_scale(len(batches), cp))
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(local) for _ in chunks], model=chunks,
        num_microbatches=len(batches), seq_length=SEQ // cp, micro_batch_size=BATCH, forward_only=False,
    )
    ssa_mode.clear()
    grads: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for param in chunk.parameters():  # what DDP's average over the CP part of DP x CP does
            if param.grad is not None and cp > 1:
                dist.all_reduce(param.grad, group=cp_group)
                param.grad /= cp
        grads.update(gather_full_tensors(chunk, grads=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and "output_layer.weight" in grads:
        # The last stage's tied copy of the word embedding: its gradient adds to the embedding's.
        grads["embedding.word_embeddings.weight"] = grads["embedding.word_embeddings.weight"] + grads.pop(
            "output_layer.weight"
        )
        weights.pop("output_layer.weight", None)
    reduced = tracker.reduce(config.num_layers)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    shared = [per_token]
    dist.broadcast_object_list(shared, group_src=dist.get_world_size(pp_group) - 1, group=pp_group)
    all_modes: list[dict[int, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(all_modes, modes)
    assert all(m == all_modes[0] for m in all_modes), f"ranks drew different modes: {all_modes}"
    return {"per_token": shared[0], "align": reduced["alignment_loss"],
            "sparsity": reduced["attention_sparsity"], "grads": grads, "weights": weights, "modes": modes}


def step_ce(result: dict) -> torch.Tensor:
    masks = [b["loss_mask"] for b in make_batches()]
    return sum((t * m).sum() / m.sum() for t, m in zip(result["per_token"], masks)) / len(masks)


def compare(got: dict, want: dict, what: str, tol: dict) -> None:
    assert got["modes"] == want["modes"], what
    for a, b in zip(got["per_token"], want["per_token"]):
        torch.testing.assert_close(a, b, **tol, msg=f"{what}: per-token CE")
    torch.testing.assert_close(step_ce(got), step_ce(want), **tol, msg=f"{what}: step CE")
    for key in ("align", "sparsity"):
        torch.testing.assert_close(got[key], want[key], **tol, equal_nan=True, msg=f"{what}: {key}")
    assert set(got["grads"]) == set(want["grads"]), what
    for name, g in want["grads"].items():
        assert g.abs().sum() > 0, f"{what}: reference grad of {name} is zero"
        torch.testing.assert_close(got["grads"][name], g, **tol, msg=f"{what}: grad {name}")


CPU_TOL = {"rtol": 2e-4, "atol": 2e-5}


def _equivalence_body(rank: int, world_size: int, tp: int, pp: int, cp: int, kernel_backend: str = "naive",
                      tol: dict = CPU_TOL, target_overrides: dict | None = None, num_layers: int = 2,
                      cases: tuple = CASES) -> None:
    """``target_overrides`` change only the parallel run (features that must not change the numbers)."""
    from ssa_megatron.parallel.state import destroy_parallel, initialize_parallel

    batches = make_batches()
    target_overrides = dict(target_overrides or {}, num_layers=num_layers)
    vpp = target_overrides.get("virtual_pipeline_model_parallel_size")
    for attention_mode, document_causal in cases:
        what = f"TP={tp} PP={pp} CP={cp} mode={attention_mode} document_causal={document_causal}"
        single = tiny_config(
            attention_mode, document_causal, kernel_backend=kernel_backend, num_layers=num_layers
        )
        iteration = iteration_with_both_modes(single)
        initialize_parallel(seed=SEED)
        want = run_step(single, batches, None, iteration)
        destroy_parallel()
        initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                            virtual_pipeline_parallel=vpp, seed=SEED + 1)
        config = tiny_config(attention_mode, document_causal, tp, pp, cp, kernel_backend=kernel_backend,
                             **target_overrides)
        got = run_step(config, batches, want["weights"], iteration)
        destroy_parallel()
        if attention_mode == "ssa":
            assert sorted(want["modes"].values()) == ["full", "sparse"], want["modes"]
            assert torch.isfinite(want["align"]).all() and (want["align"] > 0).all(), what
        else:
            assert torch.isnan(want["align"]).all(), what
        compare(got, want, what, tol)


# Full-layer activation recompute must replay the same mode (it rides in the forward params).
RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


@pytest.mark.parametrize(
    ("tp", "pp", "cp", "target_overrides"),
    [(2, 1, 1, RECOMPUTE), (1, 1, 2, None), (1, 2, 1, None), (2, 1, 2, None)],
    ids=["tp2-recompute", "cp2", "pp2", "tp2xcp2"],
)
def test_parallel_layout_matches_single_rank(
    tp: int, pp: int, cp: int, target_overrides: dict | None
) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU/gloo variant; tests/test_model_gpu.py runs NCCL")
    args = (tp, pp, cp, "naive", CPU_TOL, target_overrides)
    run_distributed(_equivalence_body, world_size=tp * pp * cp, args=args)


def test_virtual_pipeline_matches_single_rank() -> None:
    """PP=2 with two virtual stages each (4 layers, megatron's interleaved 1F1B), SSA mode only."""
    if torch.cuda.is_available():
        pytest.skip("the CPU/gloo variant")
    args = (1, 2, 1, "naive", CPU_TOL, {"virtual_pipeline_model_parallel_size": 2}, 4, CASES[:1])
    run_distributed(_equivalence_body, world_size=2, args=args)
