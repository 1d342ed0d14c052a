"""Wall time and peak memory of a piece of work (CUDA peak on GPU, process RSS peak otherwise)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Measurement:
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0  # above the level at the start
    memory_kind: str = "rss"  # "cuda" or "rss"


@contextmanager
def measure(device: torch.device | str | None = None, interval_s: float = 0.005) -> Iterator[Measurement]:
    """Measure the block's wall time and its peak extra memory.

    On CUDA the allocator's peak is exact; on CPU a sampling thread reads the process RSS, so
    the figure is the peak RSS growth seen at ``interval_s`` resolution.
    """
    result = Measurement()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            yield result
        finally:
            torch.cuda.synchronize(dev)
            result.wall_time_s = time.perf_counter() - start
            result.peak_memory_bytes = max(0, torch.cuda.max_memory_allocated(dev) - base)
            result.memory_kind = "cuda"
        return
    base = current_rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss_bytes())
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], current_rss_bytes())
        result.wall_time_s = time.perf_counter() - start
        result.peak_memory_bytes = max(0, peak[0] - base)
        result.memory_kind = "rss"
