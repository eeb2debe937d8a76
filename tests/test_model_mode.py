"""The one place a forward's attention mode is decided (``mode.resolve``), and ``override_mode``, the scoped
way evaluation and benchmarks ask for a mode without editing the shared model config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssa_megatron.model import mode as ssa_mode
from tests.test_model_equivalence import VOCAB, tiny_config


def _config(**fields: object) -> SimpleNamespace:
    base = dict(attention_mode="ssa", inference_mode="sparse", p_full=0.5, mode_seed=3, block_count=4,
                effective_inference_block_count=9)  # fmt: skip
    return SimpleNamespace(**{**base, **fields})


def test_resolve_covers_training_eval_and_overrides() -> None:
    ssa_mode.set_microbatch(7, 1)
    try:
        drawn = ssa_mode.draw_mode(3, 7, 1, 0.5)
        assert ssa_mode.resolve(_config(), True) == ssa_mode.ResolvedMode(drawn, 4, True)
        full = _config(attention_mode="full")
        assert ssa_mode.resolve(full, True) == ssa_mode.ResolvedMode("full", 4, False)
        assert ssa_mode.resolve(_config(), False) == ssa_mode.ResolvedMode("sparse", 9, False)
        full_eval = ssa_mode.ModeOverride(inference_mode="full")
        assert ssa_mode.resolve(_config(), False, override=full_eval).drive == "full"
        # An eval override leaves training forwards alone, and the other way round.
        assert ssa_mode.resolve(_config(), True, override=full_eval) == ssa_mode.ResolvedMode(drawn, 4, True)
        pinned = ssa_mode.ModeOverride(attention_mode="ssa", p_full=1.0)
        assert ssa_mode.resolve(_config(attention_mode="sparse"), True, override=pinned) == (
            ssa_mode.ResolvedMode("full", 4, True))  # fmt: skip
        assert ssa_mode.resolve(_config(), False, override=pinned).drive == "sparse"
        sparse = ssa_mode.ModeOverride(attention_mode="sparse")
        assert ssa_mode.planned_modes(_config(), 7, 3, sparse) == ["sparse"] * 3
        assert ssa_mode.planned_modes(_config(), 7, 3) == [ssa_mode.draw_mode(3, 7, i, 0.5) for i in range(3)]
    finally:
        ssa_mode.clear()


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"attention_mode": "dense"}, "attention_mode='dense'"),
     ({"inference_mode": "ssa"}, "inference_mode='ssa'"), ({"p_full": 2.0}, "p_full=2.0")],
)  # fmt: skip
def test_mode_override_refuses_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ssa_mode.ModeOverride(**fields)


def test_override_mode_needs_ssa_models() -> None:
    with pytest.raises(TypeError, match="needs SSA models"), ssa_mode.override_mode(torch.nn.Linear(2, 2)):
        pass


def _model(**fields: object) -> torch.nn.Module:
    from ssa_megatron.model.gpt import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(**fields), VOCAB, 64)


def _twins(
    seed: int, field: str, mode: str, reference_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.nn.Module]:
    """Seeded tokens and positions, a model with `field` = `mode`, and a reference in `reference_mode`
    holding the same weights."""
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(64).expand(2, 64)
    model = _model(**{field: mode})
    reference = _model(**{field: reference_mode})
    reference.load_state_dict(model.state_dict())
    return tokens, positions, model, reference


def test_override_mode_equals_a_config_in_that_mode(single_rank: None) -> None:
    tokens, positions, model, reference = _twins(1, "inference_mode", "sparse", "full")
    model.eval()
    reference.eval()
    with torch.no_grad():
        sparse = model(tokens, positions, None)
        # A list of chunks, as the engines hold them.
        with ssa_mode.override_mode([model], inference_mode="full") as override:
            assert model.mode_override is override
            full = model(tokens, positions, None)
        want = reference(tokens, positions, None)
        after = model(tokens, positions, None)
    assert torch.equal(full, want) and not torch.equal(full, sparse)
    assert torch.equal(after, sparse)
    assert model.mode_override is None and model.config.inference_mode == "sparse"


def test_training_override_pins_the_driving_branch(single_rank: None) -> None:
    tokens, positions, model, reference = _twins(2, "attention_mode", "sparse", "full")
    model.train()
    reference.train()
    ssa_mode.set_microbatch(0, 0)
    try:
        with torch.no_grad():
            with ssa_mode.override_mode(model, attention_mode="ssa", p_full=1.0):
                params = model.forward_params(tokens, positions)
                pinned = model(tokens, positions, None)
            want = reference(tokens, positions, None)
            plain = model(tokens, positions, None)
    finally:
        ssa_mode.clear()
    # Both branches ran (SSA training), full drove the residual stream: the full model's output.
    assert (params.mode, params.both_branches) == ("full", True)
    assert torch.equal(pinned, want) and not torch.equal(plain, want)
    assert model.config.attention_mode == "sparse" and model.config.p_full == 0.5
