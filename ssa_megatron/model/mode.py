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
"""

from __future__ import annotations

from dataclasses import dataclass

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
