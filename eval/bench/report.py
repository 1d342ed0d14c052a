"""Writing the benchmark's results: one CSV per table, machine.json, Markdown tables and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from editing.storage.files import atomic_write_text
from eval.bench.common import describe_machine
from eval.bench.rows import BenchResults, scaling_ratio
from eval.realcost import cost_markdown


# ---------------------------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(results: BenchResults) -> str:
    """The benchmark tables in Markdown (what docs/benchmark.md and the README show)."""
    lines = ["## Benchmark", "",
             "Regenerate with `python -m eval.bench --markdown docs/benchmark.md` (add `--quick` for a two-minute "
             "run). Times are wall-clock seconds; *CPU* is this process's CPU time for the same work (all its "
             "threads): on a shared machine the wall time grows with other programs' work, the CPU time does not. "
             "Memory is the peak above the level before the edit: the CUDA allocator's peak on a GPU; on a CPU the "
             "growth of the process's resident set, which stays 0 when the edit fits in memory the process "
             "already holds. *Training (s)*: the wall time of training a learned editor in this run (its default "
             "config with `--train` on the demo model; a few-step config on the tiny models, only so that their "
             "edits can be timed); – where none was trained (a cached editor was used).", "",
             f"Measured on: {describe_machine(results.machine)}.", ""]
    lines += ["### Performance targets (demo model)", "",
              "| target | measured (wall) | CPU time | limit | ratio | status | note |",
              "|---|---|---|---|---|---|---|"]
    for t in results.targets:
        cpu = f"{_fmt(t.cpu_s)} s" if not math.isnan(t.cpu_s) else "–"
        lines.append(f"| {t.description} | {_fmt(t.measured)} {t.unit} | {cpu} | {_fmt(t.limit, 0)} {t.unit} | "
                     f"{_fmt(t.ratio, 2)} | {t.status} | {t.note} |")
    for model in dict.fromkeys(r.model for r in results.latency):
        rows = [r for r in results.latency if r.model == model]
        lines += ["", f"### Edit latency and memory — {model}", "",
                  "| method | kind | median edit (s) | CPU (s) | cold edit (s) | peak memory (MiB) | edit size (KiB) "
                  "| probes/s | training (s) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            status = "ok" if r.status == "ok" else f"{r.status}: {r.reason}"
            lines.append(f"| {r.method} | {r.edit_kind} | {_fmt(r.median_s)} | {_fmt(r.median_cpu_s)} | "
                         f"{_fmt(r.cold_s)} | "
                         f"{_fmt(r.peak_memory_bytes / 2 ** 20, 1) if r.status == 'ok' else '–'} | "
                         f"{_fmt(r.edit_size_bytes / 1024, 1) if r.status == 'ok' else '–'} | "
                         f"{_fmt(r.eval_probes_per_s, 0)} | {_fmt(r.train_s, 0)} | {status} |")
    for mode, title in (("batch", "Batch scaling (one edit of n requests)"),
                        ("sequential", "Sequential editing (cost of the n-th edit)")):
        rows = [r for r in results.scaling if r.mode == mode]
        if not rows:
            continue
        sizes = sorted({r.n for r in rows})
        if mode == "sequential" and len(sizes) > 4:
            sizes = sorted({sizes[0], sizes[1], sizes[len(sizes) // 2], sizes[-1]})
        reference = ("per request, relative to one request (n=1)" if mode == "batch"
                     else "relative to the first edit (n=1)")
        lines += ["", f"### {title}, seconds (peak MiB) ×ratio — demo model", "",
                  f"×: the time {reference}, both measured in this run (on a shared machine the ratio holds "
                  "better than the seconds).", "",
                  "| method | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for method in dict.fromkeys(r.method for r in rows):
            cells = []
            for n in sizes:
                cell = next((r for r in rows if r.method == method and r.n == n), None)
                if cell is None:
                    cells.append("–")
                elif cell.status != "ok":
                    cells.append(cell.status)
                else:
                    ratio = scaling_ratio(rows, cell)
                    shown = f" ×{ratio:.2f}" if not math.isnan(ratio) and cell.n != 1 else ""
                    cells.append(f"{cell.wall_s:.2f} ({cell.peak_memory_bytes / 2 ** 20:.0f}){shown}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for r in results.sequential_long:
        lines += ["", f"### Long sequential run — {r.n} {r.method} edits, {r.model} model", ""]
        if r.status != "ok":
            lines.append(f"Not measured ({r.status}: {r.reason}).")
            continue
        lines += ["Each step edits, then enters the session again to judge the new edit (as a sequential run "
                  "does; judging every edit so far is left out, it grows with n by definition).", "",
                  "| | early steps | late steps | late / early |", "|---|---|---|---|",
                  f"| steps | {r.early_steps} | {r.late_steps} | |",
                  f"| time per step (median, s) | {_fmt(r.early_step_s)} | {_fmt(r.late_step_s)} | "
                  f"{_fmt(r.ratio, 2)} |",
                  f"| of which outside {r.method}'s computation (s) | {_fmt(r.early_overhead_s, 4)} | "
                  f"{_fmt(r.late_overhead_s, 4)} | {_fmt(r.overhead_ratio, 2)} |", "",
                  f"Whole run: {_fmt(r.total_s, 0)} s; peak memory {_fmt(r.peak_memory_bytes / 2 ** 20, 1)} MiB "
                  f"({r.memory_kind} growth over the run). Entering and leaving the session with all {r.n} edits: "
                  f"{_fmt(r.restack_cached_s * 1e3, 2)} ms through the cache, {_fmt(r.restack_plain_s * 1e3, 1)} ms "
                  f"applying and reverting them one by one (peak {_fmt(r.restack_plain_peak_bytes / 2 ** 20, 1)} MiB). "
                  f"Weights after the run identical to the original: {'yes' if r.bit_identical else 'NO'}."]
    for cost in results.real_costs:
        lines += ["", f"### ROME edit cost on a real model — {cost_markdown(cost)}"]
    lines += ["", "The dashboard's figures (time to the first result in a browser, the Scope map's first render) "
              "are the UI's benchmark: `python -m ui.bench --markdown docs/benchmark-ui.md`."]
    return "\n".join(lines) + "\n"


def write_results(results: BenchResults, out: Path) -> dict[str, Path]:
    """CSV per table, machine.json, benchmark.md and the plot; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, frame in results.frames().items():
        path = out / f"{name}.csv"
        atomic_write_text(path, frame.to_csv(index=False))
        written[name] = path
    written["machine"] = out / "machine.json"
    atomic_write_text(written["machine"], json.dumps({"machine": results.machine, "config": results.config,
                                                     "measured": results.measured}, indent=1, default=str))
    written["markdown"] = out / "benchmark.md"
    atomic_write_text(written["markdown"], markdown_report(results))
    plot = write_plot(results, out)
    if plot is not None:
        written["plot"] = plot
    return written


def write_plot(results: BenchResults, out: Path) -> Path | None:
    """Latency per method and the batch/sequential curves: PNG when a static exporter is
    installed (kaleido for plotly, else matplotlib), else a self-contained HTML file."""
    import importlib.util

    frames = results.frames()
    latency = frames["latency"][frames["latency"]["status"] == "ok"]
    scaling = frames["scaling"][frames["scaling"]["status"] == "ok"]
    if latency.empty and scaling.empty:
        return None
    if importlib.util.find_spec("plotly") is not None:
        figure = _plotly_figure(latency, scaling)
        if importlib.util.find_spec("kaleido") is not None:
            try:
                path = out / "benchmark.png"
                figure.write_image(path, width=1500, height=500)
                return path
            except Exception:  # kaleido without a usable browser: fall through to the others
                pass
    if importlib.util.find_spec("matplotlib") is not None:
        return _matplotlib_plot(latency, scaling, out / "benchmark.png")
    if importlib.util.find_spec("plotly") is not None:
        path = out / "benchmark.html"
        figure.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    return None


def _plotly_figure(latency: pd.DataFrame, scaling: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=3, subplot_titles=(
        "median edit latency (s)", "batch: seconds per edit call", "sequential: seconds of the n-th edit"))
    for model in dict.fromkeys(latency["model"]):
        rows = latency[latency["model"] == model]
        figure.add_trace(go.Bar(name=model, x=rows["method"], y=rows["median_s"]), row=1, col=1)
    for mode, col in (("batch", 2), ("sequential", 3)):
        rows = scaling[scaling["mode"] == mode]
        for method in dict.fromkeys(rows["method"]):
            part = rows[rows["method"] == method]
            figure.add_trace(go.Scatter(name=f"{method} ({mode})", x=part["n"], y=part["wall_s"],
                                        mode="lines+markers"), row=1, col=col)
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_xaxes(type="log", row=1, col=2)
    figure.update_yaxes(type="log", row=1, col=2)
    figure.update_layout(title="EditScope benchmark", barmode="group", height=500, width=1500)
    return figure


def _matplotlib_plot(latency: pd.DataFrame, scaling: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for model in dict.fromkeys(latency["model"]):
        rows = latency[latency["model"] == model]
        axes[0].plot(rows["method"], rows["median_s"], "o", label=model)
    axes[0].set_yscale("log")
    axes[0].set_title("median edit latency (s)")
    axes[0].tick_params(axis="x", rotation=60)
    for mode, ax in (("batch", axes[1]), ("sequential", axes[2])):
        rows = scaling[scaling["mode"] == mode]
        for method in dict.fromkeys(rows["method"]):
            part = rows[rows["method"] == method]
            ax.plot(part["n"], part["wall_s"], marker="o", label=method)
        ax.set_title(f"{mode}: seconds per edit call")
        if mode == "batch":
            ax.set_xscale("log")
            ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

