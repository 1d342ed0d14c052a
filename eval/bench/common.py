"""What every benchmark figure shares: the machine it ran on, timing and failure helpers."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

GIB = 1024 ** 3

Log = Callable[[str], None]


def print_line(message: str) -> None:
    """The default log: one flushed line on standard output."""
    print(message, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()`` with its wall time and this process's CPU time (all threads).

    On a shared machine the wall time grows with other people's work; the CPU time does not, so
    both are reported.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def reason_of(err: BaseException) -> str:
    """An exception as one short line for a table's reason column."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 240 else text[:237] + "..."


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` says memory ran out (host or accelerator)."""
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


def mib(n_bytes: float) -> str:
    """Bytes as MiB with one decimal, for log lines."""
    return f"{n_bytes / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, RAM, accelerator and library versions of this machine."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 1),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        # other work on the machine slows every figure: record how busy it was
        "load_avg_1m": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    }
    return info


def describe_machine(machine: dict[str, Any]) -> str:
    """One line naming the machine a run was measured on."""
    accel = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    load = machine.get("load_avg_1m")
    busy = f", load average {load} at the start" if load is not None else ""
    during = machine.get("load_during")
    if during:
        busy += (f", {during['min']}–{during['max']} (mean {during['mean']}) during the run of "
                 f"{during['wall_s']:.0f} s")
    return (f"{machine['cpu']}, {machine['cores_available']} of {machine['cores']} cores available "
            f"({machine['torch_threads']} torch threads{busy}), {machine['ram_gib']} GiB RAM{accel}; "
            f"device {machine['device']}; Python {machine['python']}, torch {machine['torch']}, "
            f"transformers {machine['transformers']}; {machine['date']}")



@contextlib.contextmanager
def load_during(every_s: float = 5.0) -> Iterator[dict[str, float]]:
    """Sample the 1-minute load average while the block runs; the yielded dict is filled on exit
    with its min, mean and max and the block's wall time (empty where the OS has no load average).

    The figures of a shared machine mean little without how busy it was while they were taken.
    """
    summary: dict[str, float] = {}
    if not hasattr(os, "getloadavg"):
        yield summary
        return
    samples = [os.getloadavg()[0]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        yield summary
    finally:
        stop.set()
        sampler.join()
        samples.append(os.getloadavg()[0])
        summary.update(min=round(min(samples), 1), mean=round(statistics.fmean(samples), 1),
                       max=round(max(samples), 1), wall_s=round(time.perf_counter() - started, 1))
