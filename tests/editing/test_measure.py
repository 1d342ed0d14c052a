"""Wall time and peak memory measurement (editing.core.measure): it sees what a block allocates."""

from __future__ import annotations

import gc
import time

import torch

from editing.core.measure import current_rss_bytes, measure

MIB = 2**20


def test_peak_memory_is_the_growth_a_block_causes():
    """A block that writes 64 MiB shows at least most of it; one that allocates nothing shows
    little; and the figure is growth above the start, never the process's whole resident size."""
    with measure("cpu") as idle:
        time.sleep(0.05)
    # RSS is process-wide: memory freed meanwhile elsewhere in this worker (most likely earlier tests'
    # cyclic garbage collected mid-block; CI once read 4096 bytes) hides the block's growth. So the
    # collector is off and the block is measured up to three times; one clean reading must show it.
    blocks, readings = [], []
    gc.disable()
    try:
        for _ in range(3):
            with measure("cpu") as busy:
                # above glibc's largest mmap threshold (32 MiB): fresh pages, visible in RSS
                blocks.append(torch.ones(64 * MIB // 4))
            readings.append(busy)
            if busy.peak_memory_bytes >= 48 * MIB:
                break
    finally:
        gc.enable()
    try:
        assert idle.memory_kind == busy.memory_kind == "rss"
        assert busy.peak_memory_bytes >= 48 * MIB, readings
        assert idle.peak_memory_bytes < 16 * MIB, idle
        assert busy.peak_memory_bytes < current_rss_bytes()  # growth, not the whole process
        assert idle.wall_time_s >= 0.05 and busy.wall_time_s > 0
    finally:
        blocks.clear()
