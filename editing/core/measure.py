"""Wall time and peak memory of a piece of work (CUDA peak on GPU, process RSS peak otherwise)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
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
def measure(device: torch.device | str | Sequence[torch.device | str] | None = None,
            interval_s: float = 0.005) -> Iterator[Measurement]:
    """Measure the block's wall time and its peak extra memory.

    On CUDA the allocator's peak is exact; with several devices (a model sharded by a
    ``device_map``: pass :attr:`ModelHandle.devices`) the figure is the sum of each device's peak,
    an upper bound of the peak of their sum. On CPU a sampling thread reads the process RSS, so the
    figure is the peak RSS growth seen at ``interval_s`` resolution.
    """
    result = Measurement()
    places = [device] if device is None or isinstance(device, (str, torch.device)) else list(device)
    gpus = list(dict.fromkeys(torch.device(d) for d in places if d is not None and torch.device(d).type == "cuda"))
    start = time.perf_counter()
    if gpus:
        base = {}
        for gpu in gpus:
            torch.cuda.synchronize(gpu)
            base[gpu] = torch.cuda.memory_allocated(gpu)
            torch.cuda.reset_peak_memory_stats(gpu)
        try:
            yield result
        finally:
            for gpu in gpus:
                torch.cuda.synchronize(gpu)
            result.wall_time_s = time.perf_counter() - start
            result.peak_memory_bytes = sum(max(0, torch.cuda.max_memory_allocated(gpu) - base[gpu]) for gpu in gpus)
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
