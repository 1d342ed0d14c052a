"""Running the benchmark: its configuration, the run over models and methods, the command line."""

from __future__ import annotations

import argparse
import shutil
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from editing.methods import available_methods, get_method
from editing.models.loader import ModelHandle, load_model
from editing.models.tiny import TINY_FAMILIES, tiny_model
from eval.bench.cases import (
    BATCH_METHODS,
    bench_batch,
    bench_eval_before_after,
    bench_latency,
    bench_scope_map,
    bench_sequential,
    bench_sequential_long,
    ensure_ready,
    request_pool,
)
from eval.bench.common import Log, describe_machine, is_oom, load_during, machine_info, mib, print_line, reason_of
from eval.bench.report import markdown_report, write_results
from eval.bench.rows import TARGETS, BenchResults, LatencyRow, SequentialLongRow, evaluate_targets
from eval.realcost import cost_markdown, measure_edit_cost


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to run; :func:`config_from_args` fills it from the command line."""

    models: tuple[str, ...] = ("demo", "tiny")
    methods: tuple[str, ...] | None = None  # None: every registered method
    n_edits: int = 5  # timed single edits per method on the demo model (after one warm-up)
    n_edits_tiny: int = 3
    n_sequential: int = 10
    batch_sizes: tuple[int, ...] = (1, 10, 100, 1000)  # for BATCH_METHODS
    batch_sizes_other: tuple[int, ...] = (1, 10)
    n_probes: int = 100
    n_scope_points: int = 100
    train: bool = False
    device: str | None = None
    seed: int = 0
    quick: bool = False
    #: pretrained models whose ROME edit cost (first, later, peak memory, arithmetic floor) is measured
    real_models: tuple[str, ...] = ()
    #: length of the long sequential ROME run on the demo model (0: not run; it takes minutes)
    n_sequential_long: int = 0


def quick_config(**changes: Any) -> BenchConfig:
    """Few edits and small sizes: the whole run takes about two minutes on a laptop CPU."""
    base = BenchConfig(n_edits=2, n_edits_tiny=1, n_sequential=3, batch_sizes=(1, 10), batch_sizes_other=(),
                       quick=True)
    return BenchConfig(**{**asdict(base), **changes})



# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def model_handles(config: BenchConfig, device: torch.device) -> Iterator[tuple[str, ModelHandle]]:
    """(label, handle) for each requested model: "demo", "tiny" (every family) or "tiny-<family>"."""
    for spec in config.models:
        if spec == "tiny":
            for family in TINY_FAMILIES:
                yield f"tiny-{family}", _tiny(family, device)
        elif spec.startswith("tiny-"):
            yield spec, _tiny(spec.removeprefix("tiny-"), device)
        else:
            yield spec, load_model(spec, device=device)


def _tiny(family: str, device: torch.device) -> ModelHandle:
    handle = tiny_model(family)
    handle.model.to(device)
    return handle


def run_benchmark(config: BenchConfig, log: Log = print_line) -> BenchResults:
    """Run every case of ``config`` and return the results (nothing is written)."""
    from editing.models.loader import pick_device

    device = pick_device(config.device)
    results = BenchResults(machine=machine_info(device), config=asdict(config))
    log(f"EditScope benchmark on {describe_machine(results.machine)}")
    with load_during() as load:
        _run_cases(config, results, device, log)
    results.machine["load_during"] = load
    results.targets = evaluate_targets(results, config.quick)
    return results


def _run_cases(config: BenchConfig, results: BenchResults, device: torch.device, log: Log) -> None:
    """Every model and method of ``config``, appended to ``results``."""
    registered = available_methods()
    wanted = list(config.methods) if config.methods else registered
    unknown = [m for m in wanted if m.lower() not in {r.lower() for r in registered}]
    for name in unknown:
        log(f"  unknown method {name!r} (registered: {', '.join(registered)}); skipped")
    methods = [get_method(m).name for m in wanted if m not in unknown]
    largest = max((*config.batch_sizes, *config.batch_sizes_other, config.n_edits + 1, config.n_sequential, 1))
    pool = request_pool(largest, config.seed)
    for label, handle in model_handles(config, device):
        is_demo = not label.startswith("tiny")
        log(f"\n== {label} ({handle.n_layers} layers, d_model {handle.d_model}) on {handle.device}")
        for method in methods:
            problem, hparams, train_s = ensure_ready(handle, method, config.train, log, quick=not is_demo)
            if problem is not None:
                results.latency.append(LatencyRow(model=label, method=method, status="skipped", reason=problem,
                                                  edit_kind=get_method(method).edit_kind, train_s=train_s))
                log(f"  {method}: skipped — {problem}")
                continue
            n_edits = (config.n_edits if is_demo else config.n_edits_tiny) + 1
            try:
                row = bench_latency(handle, label, method, pool[:n_edits],
                                    n_probes=config.n_probes if is_demo else 0, seed=config.seed, hparams=hparams)
            except Exception as err:
                row = LatencyRow(model=label, method=method, status="oom" if is_oom(err) else "error",
                                 reason=reason_of(err), edit_kind=get_method(method).edit_kind)
                log(traceback.format_exc(limit=3))
            row.train_s = train_s
            results.latency.append(row)
            log(f"  {method}: " + (f"median {row.median_s:.3f} s over {row.n_edits} edits (cold {row.cold_s:.2f} s), "
                                   f"peak {mib(row.peak_memory_bytes)} {row.memory_kind}"
                                   + (f", {row.eval_probes_per_s:.0f} probes/s" if row.eval_probes else "")
                                   if row.status == "ok" else f"{row.status} — {row.reason}"))
            if row.status != "ok" or not is_demo:
                continue
            sizes = config.batch_sizes if method in BATCH_METHODS else config.batch_sizes_other
            if sizes:
                results.scaling.extend(bench_batch(handle, label, method, pool, sizes, log))
            if config.n_sequential:
                results.scaling.extend(bench_sequential(handle, label, method, pool[: config.n_sequential], log))
        if is_demo:
            _measure_targets(results, handle, label, methods, config, log)
        if is_demo and config.n_sequential_long:
            _sequential_long(results, handle, label, config, log)
    for spec in config.real_models:
        log(f"\n== ROME edit cost on {spec} (fresh-install first edit, later edits, arithmetic floor)")
        results.real_costs.append(measure_edit_cost(load_model(spec, device=device), spec, "ROME"))
        log(cost_markdown(results.real_costs[-1]))
    results.targets = evaluate_targets(results, config.quick)
    return results


def _sequential_long(results: BenchResults, handle: ModelHandle, label: str, config: BenchConfig, log: Log) -> None:
    """The long sequential ROME run on the demo model (``--sequential-long N``)."""
    n = config.n_sequential_long
    log(f"\n== {n} sequential ROME edits on {label} (a step's cost against the number of edits)")
    problem = get_method("ROME").readiness(handle) if "ROME" in available_methods() else "ROME is not registered"
    if problem is not None:
        results.sequential_long.append(SequentialLongRow(model=label, method="ROME", n=n, status="skipped",
                                                         reason=problem))
        log(f"  skipped — {problem}")
        return
    row, steps = bench_sequential_long(handle, label, n, "ROME", seed=config.seed, log=log)
    results.sequential_long.append(row)
    results.sequential_long_steps.extend(steps)


def _measure_targets(results: BenchResults, handle: ModelHandle, label: str, methods: list[str],
                     config: BenchConfig, log: Log) -> None:
    """The targets' raw figures on the demo model (the MEMIT one comes from the batch rows)."""
    ok = [r.method for r in results.latency if r.model == label and r.status == "ok"]
    if "ROME" in ok:
        rome = next(r for r in results.latency if r.model == label and r.method == "ROME")
        results.measured["rome_edit_s"] = rome.median_s
        results.measured["rome_edit_s_cpu"] = rome.median_cpu_s
        results.measured["rome_edit_s_method"] = f"median of {rome.n_edits} warm edits; cold {rome.cold_s:.1f} s"
    editor = "ROME" if "ROME" in ok else (ok[0] if ok else None)
    if editor is None:
        return
    request = request_pool(1, config.seed + 1)[0]
    for key, fn, n in (("eval_100_probes_s", bench_eval_before_after, config.n_probes),
                       ("scope_map_100_s", bench_scope_map, config.n_scope_points)):
        try:
            results.measured[key], results.measured[f"{key}_cpu"] = fn(handle, editor, request, n, config.seed)
            results.measured[f"{key}_method"] = editor  # type: ignore[assignment]
            log(f"  {TARGETS[key][0]} ({n}, with a {editor} edit): {results.measured[key]:.3f} s "
                f"(CPU {results.measured[f'{key}_cpu']:.3f} s)")
        except Exception as err:
            results.measured[f"{key}_error"] = reason_of(err)  # type: ignore[assignment]
            log(f"  {TARGETS[key][0]}: error — {reason_of(err)}")



# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path, Path | None]:
    """Parse the command line into (config, output folder, optional Markdown copy)."""
    parser = argparse.ArgumentParser(prog="python -m eval.bench",
                                     description="What editing and evaluating cost, per method and model.")
    parser.add_argument("--quick", action="store_true", help="few edits and small sizes (about two minutes)")
    parser.add_argument("--methods", type=_csv, default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--models", type=_csv, default=("demo", "tiny"),
                        help="comma-separated: demo, tiny (every family), tiny-<family>, a local model folder")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables here")
    parser.add_argument("--train", action="store_true", help="train editors that need it before benchmarking")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--edits", type=int, default=None, help="timed single edits per method on the demo model")
    parser.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in _csv(s)), default=None,
                        help=f"batch sizes for {', '.join(BATCH_METHODS)} (default 1,10,100,1000)")
    parser.add_argument("--sequential", type=int, default=None, help="length of the sequential-editing run")
    parser.add_argument("--sequential-long", type=int, default=None, metavar="N",
                        help="also time N sequential ROME edits on the demo model, a step's cost against the "
                             "number of edits (default: not run; 1000 takes about half an hour on a 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=_csv, default=(),
                        help="pretrained models (e.g. smollm2-135m) whose ROME edit cost, peak memory and "
                             "arithmetic floor are measured (python -m eval.realcost)")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {"models": args.models, "methods": args.methods, "train": args.train,
                               "device": args.device, "seed": args.seed, "real_models": args.real}
    if args.edits is not None:
        changes["n_edits"] = args.edits
    if args.batch_sizes is not None:
        changes["batch_sizes"] = args.batch_sizes
    if args.sequential is not None:
        changes["n_sequential"] = args.sequential
    if args.sequential_long is not None:
        if args.sequential_long < 0:
            parser.error("--sequential-long takes a number of edits of at least 0")
        changes["n_sequential_long"] = args.sequential_long
    config = quick_config(**changes) if args.quick else BenchConfig(**changes)
    return config, args.out, args.markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; prints the tables and where the files went."""
    config, out, markdown = config_from_args(argv)
    results = run_benchmark(config)
    written = write_results(results, out)
    report = markdown_report(results)
    print("\n" + report)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written["markdown"], markdown)
        written["markdown copy"] = markdown
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
