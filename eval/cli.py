"""Command line: run experiments and manage stored runs without the UI.

    python -m eval run --model demo --method ROME --data demo --mode sequential --n 50 --out results.csv
    python -m eval list
    python -m eval show RUN_ID
    python -m eval export RUN_ID results.json
    python -m eval delete RUN_ID
    python -m eval methods
    python -m eval sweep --methods FT-L,ROME --grid "ROME:v_lr=0.1,0.5;layer=0,1" --slices 0:20,20:40
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from editing.core.edit import EditError
from eval.runs import MODES
from eval.store import RunStore

SHOWN = ["step", "n_edits", "reliability", "generality", "locality", "portability", "efficacy_score",
         "paraphrase_score", "neighborhood_score", "score", "edit_success", "n_efficacy_without_reliability",
         "locality_known", "n_locality_known", "locality_same_relation", "unrelated_unchanged", "wall_time_s"]


def _at_least_one(text: str) -> int:
    """A whole number ≥ 1 (``--n -1`` would otherwise run every case but the last)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


#: accelerate's placement strategies (a JSON object names the device of each module instead)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = ("spread the model over several GPUs: auto, balanced, balanced_low_0, sequential, or a JSON "
                   'object module -> device, e.g. \'{"model.embed_tokens": 0, "model.layers": 0, "lm_head": 1}\' '
                   "(--device is then ignored)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="EditScope experiments and stored runs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", type=Path, default=None, help="SQLite run store (default: the user cache)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=[common], help="run an editing experiment and store it")
    run.add_argument("--model", default="demo", help="'demo', a local model folder or a cached Hugging Face id")
    run.add_argument("--method", required=True, help="editing method (see `python -m eval methods`)")
    run.add_argument("--data", default="demo", help="data set file (CounterFact, ZsRE, MQuAKE, KnowEdit, fact base) "
                                                    "or 'demo' for the bundled fact base")
    run.add_argument("--format", dest="fmt", default=None, help="data set format (default: detected)")
    run.add_argument("--mode", choices=MODES, default="single")
    run.add_argument("--n", type=_at_least_one, default=None, help="number of cases (default: all)")
    run.add_argument("--batch-size", type=_at_least_one, default=1, help="edits per call in batch mode")
    run.add_argument("--hparams", default=None,
                     help='hyper-parameter overrides as JSON, e.g. \'{"layer": 1}\', or @FILE to read the JSON '
                          "object from a file (a preset file's \"hparams\" object is taken as is)")
    run.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    run.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (GPU only)")
    run.add_argument("--device-map", default=None, help=DEVICE_MAP_HELP)
    run.add_argument("--seed", type=int, default=0, help="seed of the demo cases")
    run.add_argument("--generations", action="store_true", help="also measure fluency of generations")
    run.add_argument("--out", type=Path, default=None, help="write the results to a .csv or .json file")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("list", parents=[common], help="list stored runs")
    show = commands.add_parser("show", parents=[common], help="print a stored run's per-step summary")
    show.add_argument("run_id", type=int)
    export = commands.add_parser("export", parents=[common], help="export a stored run to .csv or .json")
    export.add_argument("run_id", type=int)
    export.add_argument("path", type=Path)
    export.add_argument("--table", choices=("summary", "probes"), default="summary", help="which table a CSV holds")
    delete = commands.add_parser("delete", parents=[common], help="delete a stored run")
    delete.add_argument("run_id", type=int)
    commands.add_parser("methods", parents=[common], help="list the editing methods")
    _sweep_parser(commands, common)
    return parser


def _non_negative(text: str) -> float:
    """A number ≥ 0 (GPUs per worker may be a fraction: 0.5 puts two workers on one GPU)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _sweep_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    from eval.sweep import GRID_SYNTAX  # a plain module: Ray itself is only imported when a sweep runs

    sweep = commands.add_parser(
        "sweep", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GRID_SYNTAX,
        help="run a grid of methods × hyper-parameters × data slices on Ray, into the run store",
        description="Run every grid point as one stored run, on Ray workers that each load the model once. "
                    "Points already stored as done are skipped; failed ones run again.")
    sweep.add_argument("--model", default="demo", help="'demo', a local model folder or a cached Hugging Face id")
    sweep.add_argument("--methods", default=None,
                       help="comma-separated methods, e.g. FT-L,ROME (default: those given a --grid)")
    sweep.add_argument("--grid", action="append", default=[], metavar="METHOD:NAME=V1,V2;NAME=V1",
                       help="a method's hyper-parameter values (repeat for several methods; see below)")
    sweep.add_argument("--slices", default=None, metavar="START:STOP,...", help="slices of the cases (default: all)")
    sweep.add_argument("--data", default="demo", help="data set file or 'demo' for the bundled fact base")
    sweep.add_argument("--format", dest="fmt", default=None, help="data set format (default: detected)")
    sweep.add_argument("--mode", choices=MODES, default="single")
    sweep.add_argument("--batch-size", type=_at_least_one, default=1, help="edits per call in batch mode")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the demo cases")
    sweep.add_argument("--device", default=None, help="each worker's device: cpu, cuda, mps (default: best available)")
    sweep.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (GPU only)")
    sweep.add_argument("--device-map", default=None,
                       help="each worker's model over the GPUs Ray gives it (--gpus-per-worker above 1): "
                            + DEVICE_MAP_HELP)
    sweep.add_argument("--address", default=None,
                       help="Ray cluster, e.g. ray://head:10001 (default: $RAY_ADDRESS, else a local cluster "
                            "started with `ray start`, else a new local Ray instance)")
    sweep.add_argument("--num-cpus", type=_at_least_one, default=None, help="CPUs of a new local Ray instance")
    sweep.add_argument("--workers", type=_at_least_one, default=None,
                       help="Ray actors, each with its own copy of the model (default: as many as the cluster holds)")
    sweep.add_argument("--cpus-per-worker", type=_at_least_one, default=1,
                       help="CPUs Ray reserves per worker; also its torch threads (default 1)")
    sweep.add_argument("--gpus-per-worker", type=_non_negative, default=0.0, help="GPUs per worker (default 0)")
    sweep.add_argument("--dry-run", action="store_true", help="check the grid and list its points; run nothing")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m eval``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (KeyError, ValueError, OSError, EditError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2


def hparams_arg(text: str) -> dict[str, Any]:
    """``--hparams``: inline JSON, or ``@path`` to a JSON file holding the object — or a whole preset
    file (editing/methods/presets), whose ``"hparams"`` are taken, so a preset can be tried as is."""
    source = "--hparams"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        source = f"--hparams file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"{source}: cannot read it ({err.strerror or err}).") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}).") from None
    if isinstance(value, dict) and "applies_to" in value and isinstance(value.get("hparams"), dict):
        value = value["hparams"]
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object.")
    return value


def device_map_arg(text: str | None) -> str | dict[str, int | str] | None:
    """``--device-map``: one of :data:`DEVICE_MAP_STRATEGIES`, or a JSON object module -> device."""
    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, str)) for v in value.values()):
        raise ValueError(f"--device-map {text!r}: give one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object "
                         'module -> device (a GPU number or "cuda:1").')
    return value


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", 200, "display.max_columns", 30, "display.width", 160,
                           "display.float_format", "{:.3f}".format):
        print(frame.to_string(index=False) if not frame.empty else "(nothing)")


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from editing.models.loader import load_model
    from eval.datasets import load_dataset
    from eval.runs import run_experiment

    hparams = hparams_arg(args.hparams) if args.hparams else None
    cases = load_dataset(args.data, fmt=args.fmt, limit=args.n, seed=args.seed)
    # a first use says what it waits for: a build or conversion, or another process's
    handle = load_model(args.model, device=args.device, dtype=args.dtype, device_map=device_map_arg(args.device_map),
                        progress=lambda fraction, message: print(f"[{fraction:4.0%}] {message}", file=sys.stderr,
                                                                 flush=True))
    store = RunStore(args.store)
    bar = tqdm(total=100, desc=f"{args.method} {args.mode}", disable=args.quiet,
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction, 1)
        bar.set_postfix_str(message[:70], refresh=False)
        bar.refresh()

    cancel = threading.Event()
    try:
        result = run_experiment(handle, args.method, cases, mode=args.mode, n=args.n, batch_size=args.batch_size,
                                hparams=hparams, progress=progress, cancel=cancel, store=store,
                                dataset=str(args.data), generations=args.generations)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: the steps finished so far are stored.", file=sys.stderr)
        return 130
    bar.close()
    _print_table(result.summary[[c for c in SHOWN if c in result.summary.columns]])
    print(f"run {result.run_id} stored in {store.path}")
    if args.out is not None:
        store.export(result.run_id, args.out)
        print(f"wrote {args.out}")
    return 0


def _list(args: argparse.Namespace) -> int:
    runs = RunStore(args.store).list_runs()
    if not runs.empty:
        runs = runs.assign(created_at=runs["created_at"].dt.strftime("%Y-%m-%d %H:%M"))
    _print_table(runs.drop(columns=["error"]))
    return 0


def _show(args: argparse.Namespace) -> int:
    result = RunStore(args.store).load_run(args.run_id)
    print(f"run {args.run_id}: {result.status}; " + ", ".join(
        f"{k}={result.config.get(k)}" for k in ("model", "method", "mode", "n", "batch_size", "dataset")))
    _print_table(result.summary[[c for c in SHOWN if c in result.summary.columns]])
    if result.error:
        print(f"error: {result.error}")
    return 0


def _export(args: argparse.Namespace) -> int:
    path = RunStore(args.store).export(args.run_id, args.path, table=args.table)
    print(f"wrote {path}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    RunStore(args.store).delete(args.run_id)
    print(f"deleted run {args.run_id}")
    return 0


def _methods(_args: argparse.Namespace) -> int:
    from editing.methods import METHODS

    for name in sorted(METHODS):
        cls = METHODS[name]
        print(f"{name:12s} {cls.edit_kind:18s} {cls.summary}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from eval.sweep import SweepSettings, plan_sweep, run_sweep, stored_done

    device_map_arg(args.device_map)  # a bad map fails here, before any worker starts
    settings = SweepSettings(model=args.model, data=str(args.data), fmt=args.fmt, seed=args.seed, mode=args.mode,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             device_map=args.device_map)
    plan = plan_sweep(settings, args.methods, args.grid, args.slices)  # refuses a bad grid before anything starts
    store = RunStore(args.store)
    if args.dry_run:
        done = stored_done(plan, store)
        for index, point in enumerate(plan.points):
            print(f"{point.label}: " + (f"done (run {done[index]})" if index in done else "to run"))
        print(f"{len(plan.points)} grid points: {len(done)} already done, {len(plan.points) - len(done)} to run.")
        return 0
    try:
        report = run_sweep(plan, store, address=args.address, num_cpus=args.num_cpus, workers=args.workers,
                           cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                           progress=lambda line: print(line, flush=True))
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the points finished so far are stored; run the same command to resume.", file=sys.stderr)
        return 130
    print(f"{report.count('done')} ran, {report.count('skipped')} skipped (already done), "
          f"{len(report.failed)} failed; runs stored in {store.path}")
    if report.failed:
        print("re-run the same command to retry the failed points.", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"run": _run, "list": _list, "show": _show, "export": _export, "delete": _delete, "methods": _methods,
            "sweep": _sweep}
