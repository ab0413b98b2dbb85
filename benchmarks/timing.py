"""Timing helpers shared by the benchmark scripts (not a benchmark itself: run_all.py runs bench_*.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable[[], Any], device: torch.device, repeats: int,
            clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """Best time of ``repeats`` calls of ``fn`` (device work finished inside each timing) and the
    last result. ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's
    CPU time, steadier on a shared CPU machine)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = clock()
        out = fn()
        sync(device)
        best = min(best, clock() - t)
    return best, out
