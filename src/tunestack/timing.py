"""Seconds spent in named phases: what a stage does before its first step and after its last, the parts of an
RL step. `with clock("tokenize"): ...` adds the block's wall time to that phase; phases repeat and add up."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


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


def process_age() -> float | None:
    """Seconds since this process started (the interpreter's start, its imports ...), or None off Linux."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def describe(phases: dict[str, float]) -> str:
    """'start 3.1 s, options 0.0 s, ...' in the order the phases ran."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())


_COMMAND = PhaseClock()


def command_clock() -> PhaseClock:
    """The phases of this command: `tunestack` adds the interpreter's start and the command's imports, the stage
    scaffold what follows; run.json keeps them, `--log_level info` prints them."""
    return _COMMAND


def matmul_gflops(dtype_name: str = "float32", seconds: float = 1.0) -> dict[str, float]:
    """Best measured torch.mm rate (GFLOP/s, 2*m*n*k per product) over a few shapes, on the training device.

    Shapes: square 1024/2048 and the model's own kind of product (2048 tokens x 576 -> 1536).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    if device == "cuda":
        shapes = [(4096, 4096, 4096), (8192, 8192, 8192), (8192, 576, 1536)]
    else:
        shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (2048, 576, 1536)]
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm up (thread pool, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / len(shapes) and reps >= 3:
                break
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / elapsed / 1e9
    rates["best"] = max(rates.values())
    return rates
