"""Python garbage collection at fixed iterations instead of whenever allocation counts trigger it.

The automatic collector pauses the host at arbitrary points of a step. A pause early in the
forward, before the host has run ahead of the GPU, idles the GPU for its whole length, and a
rank that pauses makes every other rank wait at the next collective. Both grow with the heap
(megatron, torch, triton) and with the Python work per step, which SSA mode roughly doubles in
the attention. As in Megatron-LM (``--manual-gc``) and torchtitan (``gc_freq``): automatic
collection off while training, a full collection when training starts, and a collection of the
young generations every ``interval`` iterations, at the same iteration on every rank.
"""

from __future__ import annotations

import gc
from types import TracebackType


class ScheduledGC:
    """``with ScheduledGC(interval) as collector: ... collector.step(iteration)``.

    ``interval`` 0 leaves Python's automatic collector as it is.
    """

    def __init__(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"gc interval must be >= 0 (0: Python's automatic collection); got {interval}")
        self.interval = interval
        self._was_enabled = False

    def __enter__(self) -> ScheduledGC:
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()
        return self

    def step(self, iteration: int) -> None:
        """Call once per iteration, after its work."""
        if self.interval and iteration % self.interval == 0:
            gc.collect(1)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.interval and self._was_enabled:
            gc.enable()
