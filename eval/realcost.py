"""What one edit costs on a real model, and the least its arithmetic allows on this machine.

    python -m eval.realcost --model smollm2-135m --method ROME --cached 3

For one method on one model it measures, in one process:

* the **first edit of a fresh install**: statistics and context templates are computed as on a
  user's first edit (their caches point at an empty folder for that edit, and the in-memory
  caches are cleared), then
* the **median of the later edits** (caches warm) and each edit's **peak memory** (the process's
  RSS growth on a CPU, the allocator's peak on a GPU: :mod:`editing.core.measure`);
* the edit's **floating-point operations**, counted by torch's ``FlopCounterMode`` (forward and
  backward of every optimisation step, the key and the solve), and this machine's **fp32
  matrix-multiply rate** with the same threads, on matrices of the edit's own shape;
* hence the **arithmetic floor** of a cached edit here: operations / rate. No implementation of the
  same algorithm (the same steps, templates and statistics) runs faster on this machine, so a time
  target below the floor can only be met by changing the method, which this module never does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from editing.analysis import stats
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import context

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

#: facts a real English model knows, edited to counterfactual targets (the first one is the README's example)
REAL_REQUESTS = (
    EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest("The {} is located in the city of", "Louvre", "Berlin", "Paris"),
    EditRequest("The {} is located in the city of", "Colosseum", "Madrid", "Rome"),
    EditRequest("The {} is located in the city of", "Acropolis", "London", "Athens"),
    EditRequest("The capital of {} is the city of", "Spain", "Lisbon", "Madrid"),
)


@dataclass
class EditCost:
    """One method's edit cost on one model (seconds, bytes, operations)."""

    model: str
    method: str
    threads: int
    first_edit_s: float
    cached_edits_s: list[float]
    peak_memory_bytes: int  # the largest of every edit's extra peak
    memory_kind: str
    flops: int  # one cached edit
    matmul_flops_per_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def cached_edit_s(self) -> float:
        """Median of the edits after the first."""
        return statistics.median(self.cached_edits_s) if self.cached_edits_s else float("nan")

    @property
    def floor_s(self) -> float:
        """The least time the cached edit's arithmetic takes at this machine's matrix-multiply rate."""
        return self.flops / self.matmul_flops_per_s

    @property
    def floor_ratio(self) -> float:
        """Measured cached edit / floor (1 would be every operation at the best matmul speed)."""
        return self.cached_edit_s / self.floor_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cached_edit_s": self.cached_edit_s, "floor_s": self.floor_s,
                "floor_ratio": self.floor_ratio}


@contextlib.contextmanager
def fresh_caches() -> Iterator[None]:
    """Within the block, statistics and context templates are computed anew, as on a fresh install:
    the cache folder is an empty temporary one and the in-memory caches are cleared (also after)."""
    previous = os.environ.get("EDITSCOPE_CACHE")
    stats.clear_memory_cache()
    context.clear_memory_cache()
    with tempfile.TemporaryDirectory(prefix="editscope-fresh-cache-") as folder:
        os.environ["EDITSCOPE_CACHE"] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("EDITSCOPE_CACHE", None)
            else:
                os.environ["EDITSCOPE_CACHE"] = previous
            stats.clear_memory_cache()
            context.clear_memory_cache()


def matmul_rate(m: int, k: int, n: int, seconds: float = 1.5) -> float:
    """This process's fp32 matrix-multiply rate (FLOP/s) on ``(m, k) @ (k, n)``, best of short rounds."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - started))
    return best


def edit_flops(handle: ModelHandle, method: str, request: EditRequest,
               hparams: dict[str, Any] | None = None) -> int:
    """Floating-point operations of one edit (caches as they are), counted by torch's dispatcher."""
    session = EditSession(handle)
    with FlopCounterMode(display=False) as counter:
        session.apply(method, [request], hparams)
    session.clear()
    return int(counter.get_total_flops())


def measure_edit_cost(handle: ModelHandle, model: str, method: str = "ROME",
                      requests: Sequence[EditRequest] = REAL_REQUESTS, n_cached: int = 3,
                      hparams: dict[str, Any] | None = None) -> EditCost:
    """Time a fresh-install first edit and ``n_cached`` later ones, count one edit's operations and
    measure the matrix-multiply rate (see the module docstring)."""
    if len(requests) < n_cached + 1:
        raise ValueError(f"{n_cached} cached edits need {n_cached + 1} requests; got {len(requests)}.")
    peaks: list[int] = []
    times: list[float] = []
    kind = "rss"
    for index, request in enumerate(requests[: n_cached + 1]):
        session = EditSession(handle)
        with fresh_caches() if index == 0 else contextlib.nullcontext():
            edit = session.apply(method, [request], hparams)
        session.clear()
        times.append(edit.stats.wall_time_s)
        peaks.append(edit.stats.peak_memory_bytes)
        kind = edit.stats.memory_kind
    flops = edit_flops(handle, method, requests[1], hparams)
    # The matmul shape of the edit's MLP work: a few hundred token rows through d_model x d_ff.
    d_ff = int(getattr(handle.model.config, "intermediate_size", 4 * handle.d_model))
    rate = matmul_rate(512, handle.d_model, d_ff)
    return EditCost(model=model, method=method, threads=torch.get_num_threads(), first_edit_s=times[0],
                    cached_edits_s=times[1:], peak_memory_bytes=max(peaks), memory_kind=kind, flops=flops,
                    matmul_flops_per_s=rate)


def cost_markdown(cost: EditCost) -> str:
    """The figures as a short Markdown table."""
    rows = [("first edit of a fresh install (statistics and templates computed)", f"{cost.first_edit_s:.1f} s"),
            (f"later edits (median of {len(cost.cached_edits_s)})", f"{cost.cached_edit_s:.1f} s"),
            ("peak extra memory of an edit", f"{cost.peak_memory_bytes / 2 ** 20:.0f} MiB ({cost.memory_kind})"),
            ("operations of one later edit", f"{cost.flops / 1e12:.2f} TFLOP"),
            (f"fp32 matrix-multiply rate, {cost.threads} threads", f"{cost.matmul_flops_per_s / 1e9:.0f} GFLOP/s"),
            ("arithmetic floor of a later edit (operations / rate)", f"{cost.floor_s:.1f} s"),
            ("later edit / floor", f"{cost.floor_ratio:.2f}")]
    lines = [f"{cost.method} on {cost.model}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m eval.realcost``."""
    from editing.models.loader import load_model

    parser = argparse.ArgumentParser(prog="python -m eval.realcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="ROME")
    parser.add_argument("--cached", type=int, default=3, help="later edits to time (default 3, at most 4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    if not 1 <= args.cached <= len(REAL_REQUESTS) - 1:
        parser.error(f"--cached must be from 1 to {len(REAL_REQUESTS) - 1}")
    handle = load_model(args.model)
    cost = measure_edit_cost(handle, args.model, args.method, n_cached=args.cached)
    print(json.dumps(cost.as_dict(), indent=1) if args.json else cost_markdown(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
