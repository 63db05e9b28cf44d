"""Seconds spent in named phases: what a stage does before its first step and after its last, the parts of an
RL step. `with clock("tokenize"): ...` adds the block's wall time to that phase; phases repeat and add up."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class PhaseClock:
    """Wall seconds per named phase, in the order the phases first ran. `sync` (e.g. torch.cuda.synchronize)
    runs before each reading, so that queued device work is counted in the phase that queued it."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.sync = sync

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The phases so far (rounded to milliseconds), and start over."""
        out = {name: round(value, 3) for name, value in self.seconds.items()}
        self.seconds.clear()
        return out
