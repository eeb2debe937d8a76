"""Which attention ("full" or "sparse") drives the residual stream of a micro-batch.

``draw_mode`` is a pure function of (seed, iteration, micro-batch, p_full): every layer and every
tensor-, context- and pipeline-parallel rank of a replica gets the same answer without communicating,
and activation recomputation replays the same mode.

Data-parallel replicas draw the *same* mode (the seed has no DP rank in it). Why: the paper samples
one mode per forward pass of the global batch; with identical draws a DP run sees exactly the mode
sequence a single-GPU run with the same micro-batch order sees, so changing the DP size does not change
the training distribution, and a DP step never mixes full- and sparse-driven gradients inside one
micro-batch index. Independent draws would also be valid (same expectation); identical ones are
reproducible across layouts.

The training loop publishes the iteration with ``set_microbatch(iteration)`` once per step; megatron's
schedules tell every layer the micro-batch index (``TransformerLayer.current_microbatch``), which the
model reads. A caller driving the model without megatron's schedules passes the index explicitly:
``set_microbatch(iteration, microbatch)``.

``resolve`` is the one place that decides what a forward runs (which branch drives the residual
stream, with which block budget, and whether both branches run), from the model config, train/eval
state and an optional ``ModeOverride``. Evaluation and benchmarks ask for a mode with
``override_mode(models, inference_mode="full")`` (a scope on the model objects), never by editing the
shared config.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ssa_megatron.model.config import ATTENTION_MODES, INFERENCE_MODES

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mode_uniform(seed: int, iteration: int, microbatch: int) -> float:
    """A uniform number in [0, 1) that depends only on its arguments (splitmix64 chain)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (iteration & _MASK64))
    h = _splitmix64(h ^ (microbatch & _MASK64))
    return (h >> 11) / float(1 << 53)


def draw_mode(seed: int, iteration: int, microbatch: int, p_full: float) -> str:
    """``"full"`` with probability ``p_full``, else ``"sparse"``; pure."""
    if iteration < 0 or microbatch < 0:
        raise ValueError(f"iteration and microbatch must be >= 0; got {iteration}, {microbatch}")
    return "full" if mode_uniform(seed, iteration, microbatch) < p_full else "sparse"


@dataclass
class _Published:
    iteration: int | None = None
    microbatch: int | None = None


# A module-level value because megatron's schedules call the model's forward with the batch only: the
# iteration cannot travel as a forward argument through them, so the loop publishes it here once per
# step. It carries the iteration/micro-batch of the draw only; the mode itself is resolved per forward.
_state = _Published()


def set_microbatch(iteration: int, microbatch: int | None = None) -> None:
    """Publish the current iteration (and optionally the micro-batch index) for the next forwards."""
    if iteration < 0 or (microbatch is not None and microbatch < 0):
        raise ValueError(f"iteration and microbatch must be >= 0; got {iteration}, {microbatch}")
    _state.iteration = iteration
    _state.microbatch = microbatch


def clear() -> None:
    """Forget the published iteration/micro-batch (a training forward then refuses to guess)."""
    _state.iteration = None
    _state.microbatch = None


def current(schedule_microbatch: int | None = None) -> tuple[int, int]:
    """(iteration, micro-batch) for the forward about to run.

    ``schedule_microbatch`` is megatron's ``current_microbatch`` of this stage's layers; an explicitly
    published micro-batch wins over it.
    """
    if _state.iteration is None:
        raise RuntimeError(
            "no iteration published for the SSA mode draw: call "
            "ssa_megatron.model.mode.set_microbatch(iteration) "
            "before each training step (and pass the micro-batch index when not using megatron's schedules)"
        )
    microbatch = _state.microbatch
    if microbatch is None:
        microbatch = schedule_microbatch
    if microbatch is None or microbatch < 0:
        raise RuntimeError(
            "micro-batch index unknown for the SSA mode draw: megatron's schedules set it; when calling the "
            "model directly use ssa_megatron.model.mode.set_microbatch(iteration, microbatch)"
        )
    return _state.iteration, microbatch


@dataclass(frozen=True)
class ModeOverride:
    """Config values replaced for the forwards inside an ``override_mode`` scope (None: the config's)."""

    attention_mode: str | None = None
    inference_mode: str | None = None
    p_full: float | None = None

    def __post_init__(self) -> None:
        if self.attention_mode is not None and self.attention_mode not in ATTENTION_MODES:
            raise ValueError(
                f"attention_mode={self.attention_mode!r} is not one of {', '.join(ATTENTION_MODES)}"
            )
        if self.inference_mode is not None and self.inference_mode not in INFERENCE_MODES:
            raise ValueError(
                f"inference_mode={self.inference_mode!r} is not one of {', '.join(INFERENCE_MODES)}"
            )
        if self.p_full is not None and not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"p_full={self.p_full} is a probability: give a value in [0, 1]")


@dataclass(frozen=True)
class ResolvedMode:
    """What one forward runs: ``drive`` (``"full"``/``"sparse"``) feeds the residual stream with
    ``block_count`` blocks per query in the sparse branch; ``both_branches``: SSA training (both branches,
    alignment loss, metrics)."""

    drive: str
    block_count: int
    both_branches: bool


def _effective(config: Any, override: ModeOverride | None) -> tuple[str, str, float]:
    o = override or ModeOverride()
    return (
        o.attention_mode or config.attention_mode,
        o.inference_mode or config.inference_mode,
        config.p_full if o.p_full is None else o.p_full,
    )


def resolve(
    config: Any, training: bool, schedule_microbatch: int | None = None, override: ModeOverride | None = None
) -> ResolvedMode:
    """The mode of the next forward. Training: ``ssa`` draws the driving branch per micro-batch (see
    ``current``) and runs both; ``full``/``sparse`` run that branch. Eval: ``inference_mode`` with the
    inference block budget."""
    attention_mode, inference_mode, p_full = _effective(config, override)
    if training and attention_mode == "ssa":
        iteration, microbatch = current(schedule_microbatch)
        drive = draw_mode(config.mode_seed, iteration, microbatch, p_full)
        return ResolvedMode(drive, config.block_count, True)
    if training:
        return ResolvedMode(attention_mode, config.block_count, False)
    return ResolvedMode(inference_mode, config.effective_inference_block_count, False)


def planned_modes(
    config: Any, iteration: int, num_microbatches: int, override: ModeOverride | None = None
) -> list[str]:
    """The branch that drives each micro-batch of a training iteration (what ``resolve`` draws)."""
    attention_mode, _, p_full = _effective(config, override)
    if attention_mode != "ssa":
        return [attention_mode] * num_microbatches
    return [draw_mode(config.mode_seed, iteration, i, p_full) for i in range(num_microbatches)]


def _overridable(models: Any) -> list[Any]:
    roots = models if isinstance(models, (list, tuple)) else [models]
    # The class attribute marks SSA models; wrappers that forward attribute reads (DeepSpeed's engine)
    # must not count.
    found = [m for root in roots for m in root.modules() if hasattr(type(m), "mode_override")]
    if not found:
        raise TypeError("override_mode needs SSA models (SSAGPTModel, possibly wrapped); none found")
    return found


@contextmanager
def override_mode(
    models: Any | Iterable[Any],
    *,
    attention_mode: str | None = None,
    inference_mode: str | None = None,
    p_full: float | None = None,
) -> Iterator[ModeOverride]:
    """Run the forwards of ``models`` (a model, wrapped or not, or a list of pipeline chunks) inside the
    scope with these config values replaced; restored on exit, the shared config untouched.

    ``inference_mode`` picks the branch of eval-mode forwards; ``attention_mode``/``p_full`` those of
    training-mode forwards (e.g. ``attention_mode="ssa", p_full=1.0``: both branches, full drives).
    """
    override = ModeOverride(attention_mode, inference_mode, p_full)
    targets = _overridable(models)
    saved = [m.mode_override for m in targets]
    for m in targets:
        m.mode_override = override
    try:
        yield override
    finally:
        for m, previous in zip(targets, saved):
            m.mode_override = previous
