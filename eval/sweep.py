"""Distributed sweeps: a grid of methods × hyper-parameters × data slices, run on Ray.

``python -m eval sweep`` builds the grid, validates it, skips the points whose run is already
stored as done, and stores every other point's run in the same :class:`~eval.store.RunStore` as
``python -m eval run``. Each point is one :func:`~eval.runs.run_experiment` call inside a Ray
actor that loads the model once (one model per worker). There is no home-made scheduler: Ray
places the workers on the cluster's nodes by their CPU/GPU requests and Ray's
:class:`ray.util.ActorPool` hands the next point to whichever worker is free; EditScope only
builds the grid and stores the results.

Results travel back to the driver, which alone writes the SQLite store: workers on other
machines cannot reach the driver's file, and one writer keeps SQLite off network file systems.
A point's run is therefore written when it finishes; a sweep that is stopped loses only the
points still running, and running the same command again resumes it (failed points are retried).

Ray is imported lazily, inside the functions that need it, so ``python -m eval`` works without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.runs import MODES

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle
    from eval.datasets import EditCase
    from eval.store import RunStore

#: the repository root, shipped to a remote cluster as Ray's working_dir (code and data/)
ROOT = Path(__file__).resolve().parent.parent
#: what a remote cluster does not need of the repository
SHIP_EXCLUDES = [".git", "tests", "docs", "scripts", "screenshots", "__pycache__"]

GRID_SYNTAX = """\
Grid syntax (--grid, one option per method; repeat it for several methods):

  METHOD:NAME=V1,V2,...;NAME=V1,...

  Every combination of the listed values is one grid point of METHOD, e.g.
  --grid "ROME:v_lr=0.1,0.5;layer=0,1" gives 4 ROME points. A value is read as JSON when it is
  JSON (0.1, 3, true, null, "text", [0,1]) and as plain text otherwise (fact_token=last,
  mom2_corpus=/data/wiki.txt); commas inside [...] or quotes do not separate values, so FT's
  layers=[0],[0,1] gives two points. Names are the method's hyper-parameters (the fields of its
  HParams class); unset ones keep their defaults for the model. A method in --methods without a
  --grid runs once with its defaults; a --grid method missing from --methods is an error.

Slices (--slices): START:STOP,... over the data set's cases in order (zero-based, STOP
excluded; ":20" and "20:" are allowed); the default is all cases. Grid points = methods' value
combinations × slices.
"""


# -- the grid ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseSlice:
    """Cases ``start`` (included) to ``stop`` (excluded) of the data set."""

    start: int
    stop: int

    @property
    def label(self) -> str:
        return f"{self.start}:{self.stop}"


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: a method, its hyper-parameter overrides and a slice of cases."""

    method: str  # the registered name (canonical spelling)
    hparams: dict[str, Any]
    cases: CaseSlice

    @property
    def label(self) -> str:
        return f"{settings_label(self.method, self.hparams)} [{self.cases.label}]"


def settings_label(method: str, hparams: dict[str, Any]) -> str:
    """``ROME v_lr=0.1 layer=0`` (``ROME defaults`` without overrides)."""
    return f"{method} " + (" ".join(f"{k}={json.dumps(v)}" for k, v in hparams.items()) or "defaults")


@dataclass(frozen=True)
class SweepSettings:
    """What every point of a sweep shares: the model, the data and the mode."""

    model: str = "demo"
    data: str = "demo"
    fmt: str | None = None
    seed: int = 0
    mode: str = "single"
    batch_size: int = 1
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None  # as `--device-map` takes it: each worker spreads its model over its GPUs

    @property
    def dataset(self) -> str:
        """The run store's ``dataset`` label: as ``python -m eval run`` stores it, plus the seed
        when it is not 0 (the demo cases depend on it, and the label is part of a point's identity)."""
        return str(self.data) if self.seed == 0 else f"{self.data}#seed={self.seed}"


@dataclass
class SweepPlan:
    """A validated grid and the cases it runs on."""

    settings: SweepSettings
    points: list[SweepPoint]
    cases: list[EditCase]

    def cases_of(self, point: SweepPoint) -> list[EditCase]:
        return self.cases[point.cases.start: point.cases.stop]

    def config(self, point: SweepPoint) -> dict[str, Any]:
        """The run config :func:`~eval.runs.run_experiment` stores for ``point`` (the same keys and
        values): how a stored run is matched to its point, and what a point that failed before
        ``run_experiment`` stored anything is recorded with."""
        s = self.settings
        cases = self.cases_of(point)
        return {"model": s.model.strip(), "method": point.method, "mode": s.mode, "n": len(cases),
                "batch_size": s.batch_size if s.mode == "batch" else 1, "hparams": dict(point.hparams),
                "dataset": s.dataset, "k": 0, "case_ids": [c.case_id for c in cases]}


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes (``"[0,1],[2]"`` -> two parts)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_value(text: str) -> Any:
    """A grid value: JSON when it parses (numbers, booleans, null, lists, quoted text), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_grid(spec: str) -> tuple[str, list[dict[str, Any]]]:
    """``"ROME:v_lr=0.1,0.5;layer=0,1"`` -> ``("ROME", [4 hyper-parameter dicts])`` (see :data:`GRID_SYNTAX`)."""
    method, colon, body = spec.partition(":")
    method = method.strip()
    if not colon or not method:
        raise ValueError(f"--grid {spec!r}: expected METHOD:NAME=V1,V2;NAME=V1 (e.g. 'ROME:v_lr=0.1,0.5;layer=0,1').")
    names: list[str] = []
    values: list[list[Any]] = []
    for part in split_top(body, ";") if body.strip() else []:
        name, equals, listed = part.partition("=")
        name = name.strip()
        if not equals or not name.isidentifier():
            raise ValueError(f"--grid {spec!r}: {part!r} is not NAME=V1,V2 (a hyper-parameter name, '=', values).")
        if name in names:
            raise ValueError(f"--grid {spec!r}: {name} is given twice; list all its values once (NAME=V1,V2).")
        texts = split_top(listed, ",")
        if any(not t for t in texts):
            raise ValueError(f"--grid {spec!r}: {name} has an empty value.")
        parsed = [parse_value(t) for t in texts]
        if len({json.dumps(v, sort_keys=True) for v in parsed}) != len(parsed):
            raise ValueError(f"--grid {spec!r}: {name} repeats a value.")
        names.append(name)
        values.append(parsed)
    return method, [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def parse_slices(text: str | None, n_cases: int) -> list[CaseSlice]:
    """``"0:20,20:40"`` -> slices, checked against the ``n_cases`` the data set holds (default: all)."""
    if text is None or not text.strip():
        return [CaseSlice(0, n_cases)]
    slices: list[CaseSlice] = []
    for part in (p.strip() for p in text.split(",")):
        start_text, colon, stop_text = part.partition(":")
        try:
            if not colon:
                raise ValueError
            start = int(start_text) if start_text.strip() else 0
            stop = int(stop_text) if stop_text.strip() else n_cases
        except ValueError:
            raise ValueError(f"--slices: {part!r} is not START:STOP (e.g. 0:20,20:40).") from None
        if not 0 <= start < stop:
            raise ValueError(f"--slices: {part!r} must satisfy 0 ≤ START < STOP.")
        if stop > n_cases:
            raise ValueError(f"--slices: {part!r} ends after the data set's {n_cases} cases.")
        if CaseSlice(start, stop) in slices:
            raise ValueError(f"--slices: {part!r} is given twice.")
        slices.append(CaseSlice(start, stop))
    return slices


def check_hparams(method: str, hparams: dict[str, Any]) -> None:
    """What can be checked of ``method``'s overrides without the model: names, types and fixed
    bounds (the field checks :meth:`HParams.validate` runs); the model's own bounds (layers,
    context length) are checked by the first worker, which has the model loaded."""
    from editing.methods.base import method_class
    from editing.methods.checks import InvalidHParams, check_fields

    cls = method_class(method).hparams_class
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise InvalidHParams(f"Unknown hyper-parameters for {cls.__name__}: {unknown}; known: {sorted(known)}.")
    check_fields(hparams, cls.field_checks(), None)


def plan_sweep(settings: SweepSettings, methods: str | Sequence[str] | None, grids: Sequence[str] = (),
               slices: str | None = None) -> SweepPlan:
    """Parse and check the grid, read the data set and return every grid point; raises
    ``ValueError``/``KeyError`` naming what is wrong, before anything runs or is stored."""
    from editing.methods.base import method_class
    from eval.datasets import load_dataset

    if settings.mode not in MODES:
        raise ValueError(f"Unknown mode {settings.mode!r}; choose one of {', '.join(MODES)}.")
    if settings.batch_size < 1:
        raise ValueError("The batch size must be at least 1.")
    grid: dict[str, list[dict[str, Any]]] = {}
    for spec in grids:
        written, combos = parse_grid(spec)
        name = method_class(written).name  # an unknown method fails here, with the list of methods
        if name in grid:
            raise ValueError(f"--grid: {name} has two grids; put all its hyper-parameters in one (NAME=..;NAME=..).")
        for combo in combos:
            try:
                check_hparams(name, combo)
            except ValueError as err:
                raise type(err)(f"--grid {spec!r}: {err}") from None
        grid[name] = combos
    listed = [m for m in (methods.split(",") if isinstance(methods, str) else methods or []) if m.strip()]
    names = [method_class(m).name for m in listed] if listed else list(grid)
    if not names:
        raise ValueError("No methods: give --methods (e.g. FT-L,ROME) or at least one --grid.")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {', '.join(names)}.")
    missing = [m for m in grid if m not in names]
    if missing:
        raise ValueError(f"--grid for {', '.join(missing)}, which --methods does not list ({', '.join(names)}).")
    cases = load_dataset(settings.data, fmt=settings.fmt, seed=settings.seed)
    if not cases:
        raise ValueError(f"The data set {settings.data!r} holds no cases.")
    case_slices = parse_slices(slices, len(cases))
    points = [SweepPoint(m, combo, s) for m in names for combo in grid.get(m, [{}]) for s in case_slices]
    return SweepPlan(settings, points, cases)


# -- what is already stored ------------------------------------------------------------------------
def _identity(config: dict[str, Any]) -> str:
    """The parts of a run config that make two runs the same experiment (JSON-normalised, as stored)."""
    keys = ("model", "method", "mode", "batch_size", "dataset", "hparams", "case_ids")
    return json.dumps({k: json.loads(json.dumps(config.get(k), default=str)) for k in keys}, sort_keys=True)


def stored_done(plan: SweepPlan, store: RunStore) -> dict[int, int]:
    """Grid point index -> id of a stored run of it whose status is ``done`` (also one made by
    ``python -m eval run`` with the same settings). Failed, cancelled and interrupted runs do not count."""
    runs = store.list_runs()
    methods = {p.method for p in plan.points}
    candidates = runs[(runs["status"] == "done") & runs["method"].isin(methods)
                      & (runs["model"] == plan.settings.model.strip()) & (runs["mode"] == plan.settings.mode)
                      & (runs["dataset"] == plan.settings.dataset)]
    by_identity: dict[str, int] = {}
    for run_id in candidates["run_id"]:  # newest first: the newest done run of a point is reported
        config = store.load_run(int(run_id)).config
        by_identity.setdefault(_identity(config), int(run_id))
    found = {}
    for index, point in enumerate(plan.points):
        run_id = by_identity.get(_identity(plan.config(point)))
        if run_id is not None:
            found[index] = run_id
    return found


# -- on a worker -------------------------------------------------------------------------------------
@dataclass
class RecordedRun:
    """The store calls a point's :func:`~eval.runs.run_experiment` made on a worker, kept to be
    replayed by the driver into the real :class:`~eval.store.RunStore` (it has the same three
    writing methods, so ``run_experiment`` stores through it as it would into the store)."""

    config: dict[str, Any] | None = None
    steps: list[tuple[dict[str, Any], list[dict[str, Any]]]] = field(default_factory=list)
    status: str | None = None
    error: str | None = None
    final: dict[str, Any] | None = None

    def create_run(self, config: dict[str, Any]) -> int:
        self.config = config
        return 0  # the real id comes from the driver's store

    def add_step(self, run_id: int, summary_row: dict[str, Any], probe_rows: Sequence[dict[str, Any]]) -> None:
        self.steps.append((summary_row, list(probe_rows)))

    def finish_run(self, run_id: int, status: str = "done", error: str | None = None,
                   final: dict[str, Any] | None = None) -> None:
        self.status, self.error, self.final = status, error, final

    def replay(self, store: RunStore, config: dict[str, Any]) -> int:
        """Write the run into ``store`` (``config`` when the point failed before it was created)."""
        run_id = store.create_run(self.config or config)
        for row, probes in self.steps:
            store.add_step(run_id, row, probes)
        store.finish_run(run_id, self.status or "failed", error=self.error, final=self.final)
        return run_id


def _message(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()


class PointWorker:
    """A Ray actor (see :func:`run_sweep`): one model, loaded on first use, and the points given to it.

    Its torch intra-op threads are the CPUs Ray reserved for it, so workers on one node do not
    oversubscribe its cores."""

    def __init__(self, settings: SweepSettings, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.settings = settings
        self._handle: ModelHandle | None = None

    def handle(self) -> ModelHandle:
        if self._handle is None:
            from editing.models.loader import load_model
            from eval.cli import device_map_arg

            self._handle = load_model(self.settings.model, device=self.settings.device, dtype=self.settings.dtype,
                                      device_map=device_map_arg(self.settings.device_map))
        return self._handle

    def validate(self, checks: list[tuple[str, dict[str, Any]]], cases: list[EditCase]) -> list[str]:
        """What :func:`~eval.runs.run_experiment` would refuse, for every (method, overrides) and
        case, with the model's own bounds; also methods not ready (an editor still to train)."""
        from editing.methods import get_method
        from editing.methods.base import check_fits_context, check_spelled

        try:
            handle = self.handle()
        except Exception as err:  # a wrong model name or path: said once, not as a worker traceback
            return [f"model {self.settings.model!r}: {err}"]
        problems = []
        for name, hparams in checks:
            label = settings_label(name, hparams)
            try:
                method = get_method(name)
                params = method.resolve_hparams(handle, dict(hparams))
                params.validate(handle)
                ready = method.readiness(handle, params)
                if ready:
                    problems.append(f"{label}: {ready}")
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"{label}: {err.args[0] if err.args else err}")
        for case in cases:
            try:
                check_fits_context(handle, case.requests)
                check_spelled(handle, case.requests)
            except ValueError as err:
                problems.append(f"case {case.case_id}: {err}")
        return problems

    def run(self, index: int, point: SweepPoint, cases: list[EditCase]) -> tuple[int, RecordedRun]:
        """Run one point; any error is recorded (as run_experiment records it) rather than raised,
        so the driver stores the point as failed and a later sweep retries it."""
        from eval.runs import run_experiment

        recorded = RecordedRun()
        try:
            s = self.settings
            run_experiment(self.handle(), point.method, cases, mode=s.mode, batch_size=s.batch_size,
                           hparams=dict(point.hparams), store=recorded, dataset=s.dataset)  # type: ignore[arg-type]
        except Exception as err:  # recorded; run_experiment already marked its run failed when it had one
            if recorded.status is None:
                recorded.status, recorded.error = "failed", _message(err)
        return index, recorded


# -- the driver --------------------------------------------------------------------------------------
@dataclass
class PointResult:
    """What became of one grid point in a sweep: ``skipped`` (already done), ``done`` or ``failed``."""

    point: SweepPoint
    status: str
    run_id: int | None = None
    error: str | None = None


@dataclass
class SweepReport:
    """Every grid point's outcome, in the order they finished (skipped ones first)."""

    results: list[PointResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[PointResult]:
        return [r for r in self.results if r.status not in ("done", "skipped")]


def import_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("The sweep runs on Ray, which is not installed: pip install -r requirements.txt "
                          "(or pip install ray).") from err
    return ray


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless it is already initialised; True when this call did."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"log_to_driver": True}
    if num_cpus is not None:  # only a new local instance takes a CPU count
        if address not in (None, "local"):
            raise ValueError("--num-cpus sizes a new local Ray instance; a cluster's CPUs are its nodes'.")
        address = "local"
        options["num_cpus"] = num_cpus
    if address == "local":
        options["include_dashboard"] = False
    elif address is not None and address != "auto":
        # another machine's cluster: its nodes get this checkout's code and data/ (cached by content)
        options["runtime_env"] = {"working_dir": str(ROOT), "excludes": SHIP_EXCLUDES}
    ray.init(address=address, **options)
    return True


def _worker_count(ray: Any, wanted: int | None, points: int, cpus: float, gpus: float) -> int:
    """``wanted`` workers, else as many as the cluster's CPUs (and GPUs) hold, at most one per point."""
    if wanted is not None:
        return max(1, min(wanted, points))
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // cpus)
    if gpus > 0:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
        if fits == 0:
            raise ValueError(f"Each worker asks for {gpus:g} GPU but the Ray cluster has "
                             f"{resources.get('GPU', 0):g}; use --gpus-per-worker 0, or --workers N to wait for "
                             "an autoscaler to add GPU nodes.")
    return max(1, min(fits, points))


def run_sweep(plan: SweepPlan, store: RunStore, *, address: str | None = None, num_cpus: int | None = None,
              workers: int | None = None, cpus_per_worker: int = 1, gpus_per_worker: float = 0,
              progress: Callable[[str], None] = print) -> SweepReport:
    """Run every grid point of ``plan`` not already stored as done, on Ray, storing each run in ``store``.

    Connects to ``address`` (``ray://head:10001``, ``auto``, ``local``; default ``$RAY_ADDRESS``,
    else a running local cluster, else a new local instance of ``num_cpus`` CPUs), unless Ray is
    already initialised; a Ray started here is shut down at the end. ``workers`` actors (default:
    as many as the cluster's resources hold) each reserve ``cpus_per_worker`` CPUs (its torch
    threads) and ``gpus_per_worker`` GPUs, and load the model once. The grid's model-dependent
    checks run on the first worker before any point starts: a refused grid raises ``ValueError``
    with every problem and stores nothing. ``progress`` gets one line per finished point.
    """
    if cpus_per_worker < 1 or gpus_per_worker < 0:
        raise ValueError("A worker needs at least 1 CPU and a non-negative number of GPUs.")
    report = SweepReport()
    done = stored_done(plan, store)
    for index, run_id in done.items():
        report.results.append(PointResult(plan.points[index], "skipped", run_id))
    todo = [i for i in range(len(plan.points)) if i not in done]
    progress(f"{len(plan.points)} grid points: {len(done)} already done, {len(todo)} to run.")
    if not todo:
        return report

    ray = import_ray()
    from ray.util import ActorPool

    started = _start_ray(ray, address, num_cpus)
    actors: list[Any] = []
    try:
        worker_class = ray.remote(PointWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        count = _worker_count(ray, workers, len(todo), cpus_per_worker, gpus_per_worker)
        # one copy of each slice's cases in Ray's object store, shared by all its points
        refs = {s: ray.put(plan.cases[s.start: s.stop]) for s in {plan.points[i].cases for i in todo}}
        actors.append(worker_class.remote(plan.settings, cpus_per_worker))
        checks = list({json.dumps([p.method, p.hparams], sort_keys=True): (p.method, p.hparams)
                       for p in (plan.points[i] for i in todo)}.values())
        needed = sorted({k for s in refs for k in range(s.start, s.stop)})
        problems = ray.get(actors[0].validate.remote(checks, [plan.cases[k] for k in needed]))
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            shown = "\n  ".join(problems[:20]) + more
            raise ValueError(f"The grid was refused before any point ran (nothing stored):\n  {shown}")
        actors += [worker_class.remote(plan.settings, cpus_per_worker) for _ in range(count - 1)]
        pool = ActorPool(actors)
        for i in todo:
            pool.submit(lambda actor, i: actor.run.remote(i, plan.points[i], refs[plan.points[i].cases]), i)
        finished: set[int] = set()
        lost = "the worker running it died"
        while pool.has_next():
            try:
                index, recorded = pool.get_next_unordered()
            except ray.exceptions.RayError as err:  # a worker died (out of memory, killed); its point is lost
                lines = [line.strip() for line in _message(err).splitlines() if line.strip()]
                cause = " ".join(dict.fromkeys(lines[:1] + lines[-1:]))  # what died, and why (Ray's last line)
                lost = f"the worker running it died: {cause[:500]}"
                continue
            finished.add(index)
            report.results.append(_store(plan, store, index, recorded, progress, len(report.results), len(plan.points)))
        for index in (i for i in todo if i not in finished):  # only when workers died
            recorded = RecordedRun(status="failed", error=lost)
            report.results.append(_store(plan, store, index, recorded, progress, len(report.results), len(plan.points)))
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return report


def _store(plan: SweepPlan, store: RunStore, index: int, recorded: RecordedRun, progress: Callable[[str], None],
           position: int, total: int) -> PointResult:
    point = plan.points[index]
    run_id = recorded.replay(store, plan.config(point))
    status = recorded.status or "failed"
    score = (recorded.final or {}).get("reliability")
    detail = f"reliability {score:.3f}" if isinstance(score, float) else (recorded.error or "")
    progress(f"[{position + 1}/{total}] {point.label}: run {run_id} {status}" + (f" ({detail})" if detail else ""))
    return PointResult(point, status, run_id, recorded.error)
