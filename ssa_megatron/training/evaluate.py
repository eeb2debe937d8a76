"""Validation during training: loss/perplexity under sparse and full inference, and attention sparsity.

Each evaluation names its mode explicitly (`override_mode` on the engine's model chunks); the
shared model config is never edited. The same validation rows are scored in each mode, so the
numbers are comparable across modes and across evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ssa_megatron.model.mode import override_mode
from ssa_megatron.training.loop import Batch, _reduce_ce, ssa_step_metrics


def validation_batches(
    loader: Iterable[Batch] | None, num_microbatches: int, iters: int
) -> list[list[Batch]]:
    """The first `iters` global batches of the validation split (the same rows at every evaluation)."""
    if loader is None or iters <= 0:
        return []
    out: list[list[Batch]] = []
    current: list[Batch] = []
    for batch in loader:
        current.append(batch)
        if len(current) == num_microbatches:
            out.append(current)
            current = []
            if len(out) == iters:
                break
    return out


@torch.no_grad()
def evaluate(engine: Any, batches: list[list[Batch]], mode: str) -> dict[str, float]:
    """Mean token CE and perplexity of `batches` with the model in eval mode running `mode`."""
    config = engine.model_config
    engine.eval_mode(True)
    total, count = 0.0, 0.0
    try:
        with override_mode(engine.model, inference_mode=mode):
            for global_batch in batches:
                store = engine.forward_backward(0, global_batch, forward_only=True)
                s, c = _reduce_ce(store)
                total += s
                count += c
    finally:
        engine.eval_mode(False)
    # Eval forwards may record stats of their own; they must not leak into the next training step.
    ssa_step_metrics(config)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def attention_sparsity(engine: Any, batches: list[Batch], mode: str) -> float | None:
    """The paper's Definition 1 on `batches`: the share of full-attention mass inside the selected
    blocks, averaged over queries, heads and layers, with the residual stream driven by `mode`.

    Both branches must run to get both log-sum-exps, which is what SSA training does; so this runs
    the training-time SSA forward (no grad, no dropout in these models) with p_full pinned to 1
    ("full run") or 0 ("sparse run"), for any trained attention_mode.
    """
    config = engine.model_config
    ssa_step_metrics(config)
    with override_mode(engine.model, attention_mode="ssa", p_full=1.0 if mode == "full" else 0.0):
        engine.forward_backward(0, batches, forward_only=True)
    return ssa_step_metrics(config).get("sparsity")
