"""Megatron SSA model vs the HF SSA model on the same weights: fp32 CPU logits agree in both modes."""

import pytest
import torch

from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.convert.weight_mapping import hf_to_megatron_state, megatron_to_hf_state
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.distributed import run_distributed

SEQ = 48


def packed_positions() -> torch.Tensor:
    """Row 0: one document; row 1: documents of 20 and 28 tokens (RoPE restarts, as in packed validation)."""
    return torch.stack([torch.arange(SEQ), torch.cat([torch.arange(20), torch.arange(SEQ - 20)])])


def _megatron_logits(rank: int, world: int, ids: torch.Tensor) -> dict:
    return {tied: _one_model(tied, ids) for tied in (True, False)}


def _one_model(tied: bool, ids: torch.Tensor) -> dict:
    from ssa_megatron.convert.megatron_bridge import build_megatron_model
    from ssa_megatron.parallel.state import (
        destroy_parallel,
        gather_full_tensors,
        initialize_parallel,
        load_full_state_dict,
    )

    initialize_parallel(1, 1, 1, seed=3)
    config = tiny_config(tie_word_embeddings=tied, max_position_embeddings=SEQ)
    model = build_megatron_model(config).eval()
    # Perturb every tensor (norm weights start at exactly 1) so a wrong mapping cannot cancel out.
    gen = torch.Generator().manual_seed(1)
    load_full_state_dict(
        model,
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in gather_full_tensors(model).items()},
    )
    weights = gather_full_tensors(model)
    pos = packed_positions()
    out = {"weights": weights}
    with torch.no_grad():
        for mode in ("sparse", "full"):
            model.config.inference_mode = mode
            out[mode] = model(ids, pos, None)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def megatron_runs() -> dict:
    ids = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return {"ids": ids, **run_distributed(_megatron_logits, 1, (ids,))[0]}


@pytest.mark.parametrize("tied", [True, False])
def test_megatron_and_hf_logits_agree(megatron_runs: dict, tied: bool) -> None:
    ids, ref = megatron_runs["ids"], megatron_runs[tied]
    config = tiny_config(tie_word_embeddings=tied, max_position_embeddings=SEQ)
    state = megatron_to_hf_state(ref["weights"], config)
    model = SSAForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for mode in ("sparse", "full"):
            got = model(ids, position_ids=packed_positions(), use_cache=False, attention_mode=mode).logits
            assert (got - ref[mode]).abs().max().item() < 1e-4, mode
        sparse = model(ids, position_ids=packed_positions(), use_cache=False).logits
        assert (sparse - ref["full"]).abs().max() > 1e-4  # the modes really differ
    back = hf_to_megatron_state(model.state_dict(), config)
    assert set(back) == set(ref["weights"])
    for k, v in ref["weights"].items():
        assert torch.equal(back[k], v), k
