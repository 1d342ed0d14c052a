"""The results table of a real model: every ready method on CounterFact-style records the model knows.

    python -m eval.realmodel --model smollm2-135m                       # every ready method, N=50
    python -m eval.realmodel --model smollm2-135m --methods ROME --n 10 --out docs/smollm2-results.md

For each method: edit time (the first edit of the process, which pays one-off costs such as
ROME's second-moment statistics, and the median of the later, cached ones) and reliability,
generality, locality and portability both teacher-forced (the survey's token-level accuracy and
pre/post agreement) and by greedy generation (does the continuation contain the probe's answer,
:func:`eval.metrics.generation_contains`). Records come from :mod:`eval.realfacts` (facts the
model knows, filtered and cached per model); every case is edited alone on the unedited model.
The unedited model's numbers are computed once and shown as the first row; the command keeps
them in the cache (keyed by the model, its device and dtype, every probe and the generation
length), so a later run over the same records does not pay the unedited pass again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from editing.core.edit import EditError
from editing.core.request import InvalidEditRequest
from editing.core.session import EditSession
from editing.storage.files import atomic_write_text
from editing.storage.paths import cache_dir
from eval.evaluate import GENERATION_KINDS, ProbeOutcome, generate_probes, outcome_table, predict, with_generations
from eval.metrics import GENERATION_METRICS, TOKEN_METRICS, summarize
from eval.realfacts import KnownFacts, generate_records, known_facts, record_to_case

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle
    from eval.datasets import EditCase

ProgressFn = Callable[[float, str], None]
DEFAULT_OUT = Path("docs/smollm2-results.md")
#: part of the unedited pass's cache key: bump it when what that pass computes changes meaning
UNEDITED_PASS_VERSION = 1


@dataclass
class MethodResult:
    """One method's row: mean metrics over the cases it edited, and its edit times."""

    method: str
    n: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    edit_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)  # each edit's extra peak (RSS on CPU, CUDA on GPU)
    failures: int = 0
    error: str | None = None

    @property
    def first_edit_s(self) -> float:
        return self.edit_times_s[0] if self.edit_times_s else math.nan

    @property
    def cached_edit_s(self) -> float:
        """Median time of the edits after the first (NaN with a single edit)."""
        return statistics.median(self.edit_times_s[1:]) if len(self.edit_times_s) > 1 else math.nan


def ready_methods(handle: ModelHandle) -> list[str]:
    """Every registered method that can edit ``handle`` now (learned editors need a trained checkpoint)."""
    from editing.methods import available_methods, get_method

    return [name for name in available_methods() if get_method(name).readiness(handle) is None]


def _mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for row in rows for k in row)
    out = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=float)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if values.size else math.nan
    return out


def results_table(handle: ModelHandle, cases: Sequence[EditCase], methods: Sequence[str],
                  probe_tokens: int = 20, hparams: dict[str, dict[str, Any]] | None = None,
                  progress: ProgressFn | None = None,
                  on_method: Callable[[MethodResult, list[MethodResult]], None] | None = None,
                  unedited_cache: Path | None = None) -> tuple[MethodResult, list[MethodResult]]:
    """The unedited baseline and one :class:`MethodResult` per method over ``cases``.

    Predictions and generations before the edit are computed once per case and shared by every
    method; each case is then edited alone in a fresh session and judged again. A method that
    fails on a case counts a failure (its first error is kept) and goes on with the next case.
    ``on_method(baseline, results so far)`` is called after each method, so a long run can keep
    what it has measured. With ``unedited_cache`` (:func:`unedited_pass_file`) the predictions and
    generations before the edits are read from that file when it exists, else written to it.
    """
    progress = progress or (lambda _f, _m: None)
    hparams = hparams or {}
    judged = [[p for p in c.probes.probes if p.kind in GENERATION_KINDS] for c in cases]
    cached = read_unedited_pass(unedited_cache, cases) if unedited_cache is not None else None
    if cached is not None:
        progress(0.0, f"unedited model: read from {unedited_cache}")
        before, gen_before = cached
    else:
        base = EditSession(handle)
        before, gen_before = [], []
        for index, case in enumerate(cases):
            progress(index / max(1, len(cases)) / (len(methods) + 1), f"unedited model: case {index + 1}/{len(cases)}")
            before.append(predict(base, case.probes.probes, k=0))
            gen_before.append(generate_probes(base, judged[index], probe_tokens))
        if unedited_cache is not None:
            write_unedited_pass(unedited_cache, before, gen_before)
    baseline_rows = []
    for index, case in enumerate(cases):
        table = _table(case, judged[index], before[index], before[index], gen_before[index], gen_before[index])
        baseline_rows.append(summarize(table))
    baseline = MethodResult("(unedited)", len(cases), _mean_metrics(baseline_rows))
    results = []
    for m_index, method in enumerate(methods):
        result = MethodResult(method)
        rows = []
        for index, case in enumerate(cases):
            done = (m_index + 1 + index / max(1, len(cases))) / (len(methods) + 1)
            progress(done, f"{method}: case {index + 1}/{len(cases)}")
            session = EditSession(handle)
            try:
                edit = session.apply(method, case.requests, hparams.get(method))
                after = predict(session, case.probes.probes, k=0)
                gen_after = generate_probes(session, judged[index], probe_tokens)
            except (EditError, InvalidEditRequest, ValueError, RuntimeError) as err:
                result.failures += 1
                result.error = result.error or f"{type(err).__name__}: {err}"
                continue
            finally:
                session.clear()
            result.edit_times_s.append(edit.stats.wall_time_s)
            result.peak_memory_bytes.append(edit.stats.peak_memory_bytes)
            rows.append(summarize(_table(case, judged[index], before[index], after, gen_before[index], gen_after)))
        result.n = len(rows)
        result.metrics = _mean_metrics(rows)
        results.append(result)
        if on_method is not None:
            on_method(baseline, results)
    progress(1.0, "done")
    return baseline, results


def unedited_pass_file(handle: ModelHandle, cases: Sequence[EditCase], probe_tokens: int) -> Path:
    """Where the unedited pass over ``cases`` is cached: a key over the model, its device and dtype,
    torch's version, every probe and the generation length."""
    probes = [[dataclasses.asdict(p) for p in case.probes.probes] for case in cases]
    parts = [handle.fingerprint(), str(handle.device), str(handle.dtype), torch.__version__, probes, probe_tokens,
             UNEDITED_PASS_VERSION]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir("realmodel") / f"unedited-{key}.json"


def write_unedited_pass(path: Path, before: Sequence[Sequence[ProbeOutcome]],
                        gen_before: Sequence[Sequence[str]]) -> None:
    """Keep the unedited pass (each outcome without its probe, which the key already fixes)."""
    outcomes = [[{k: v for k, v in dataclasses.asdict(o).items() if k != "probe"} for o in case] for case in before]
    atomic_write_text(path, json.dumps({"before": outcomes, "generations": [list(g) for g in gen_before]}))


def read_unedited_pass(path: Path, cases: Sequence[EditCase],
                       ) -> tuple[list[list[ProbeOutcome]], list[list[str]]] | None:
    """The cached unedited pass over ``cases``, or None when there is none (or it does not fit)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        before = [[ProbeOutcome(probe=probe, **{**fields, "top": [tuple(t) for t in fields["top"]]})
                   for probe, fields in zip(case.probes.probes, outcomes, strict=True)]
                  for case, outcomes in zip(cases, data["before"], strict=True)]
        return before, [list(g) for g in data["generations"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _table(case: EditCase, judged: Sequence[Any], before: Sequence[ProbeOutcome], after: Sequence[ProbeOutcome],
           gen_before: Sequence[str], gen_after: Sequence[str]):
    by_before = {p.id: t for p, t in zip(judged, gen_before, strict=True)}
    by_after = {p.id: t for p, t in zip(judged, gen_after, strict=True)}
    probes = case.probes.probes
    return with_generations(outcome_table(before, after), [by_before.get(p.id) for p in probes],
                            [by_after.get(p.id) for p in probes])


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def results_markdown(model: str, known: KnownFacts, cases: Sequence[EditCase], baseline: MethodResult,
                     results: Sequence[MethodResult], command: str, probe_tokens: int, seed: int,
                     device: str = "cpu", elapsed_s: float | None = None, pending: Sequence[str] = ()) -> str:
    """The results as a Markdown page: setup, the facts the model knows per relation, the table
    (``pending``: methods not measured yet, named so a partial page says it is partial)."""
    lines = [f"# Editing results on {model}", "",
             f"Command: `{command}`", "",
             f"- records: {len(cases)} CounterFact-style counterfactual edits of facts the model knows "
             f"(seed {seed}; {known.summary()}), each edited alone on the unedited model;",
             "- teacher-forced (TF): the survey's token-level accuracy of the expected answer (reliability, "
             "generality, portability) and pre/post argmax agreement on neighbours (locality);",
             f"- by generation (gen): greedy continuation of {probe_tokens} tokens contains the probe's answer "
             f"(case, accents and punctuation ignored): the new target for the edit and its paraphrases, the "
             f"chain's new answer for portability, the neighbour's own answer for locality;",
             f"- edit time: the first edit of the process (one-off costs such as statistics included) and the "
             f"median of the later ones; device {device}, torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} threads;",
             "- peak memory: the largest extra memory of one edit above the level before it (the process's RSS "
             "on a CPU, the allocator's peak on a GPU).", ""]
    header = ["method", "edits", "first edit (s)", "cached edit (s)", "peak memory (MiB)"]
    for metric in TOKEN_METRICS:
        header += [f"{metric} TF", f"{metric} gen"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(result: MethodResult, unedited: bool) -> str:
        m = result.metrics
        cells = [result.method, str(result.n) + (f" ({result.failures} failed)" if result.failures else ""),
                 "–" if unedited else _fmt(result.first_edit_s), "–" if unedited else _fmt(result.cached_edit_s),
                 _fmt(max(result.peak_memory_bytes) / 2 ** 20, 0) if result.peak_memory_bytes else "–"]
        for metric, gen in zip(TOKEN_METRICS, GENERATION_METRICS, strict=True):
            suffix = "_before" if unedited and metric != "locality" else ""
            cells += [_fmt(m.get(metric + suffix, math.nan)), _fmt(m.get(gen + ("_before" if unedited else ""),
                                                                               math.nan))]
        return "| " + " | ".join(cells) + " |"

    lines.append(row(baseline, True))
    lines += [row(r, False) for r in results]
    if pending:
        lines += ["", f"**Partial:** still running or interrupted before {', '.join(pending)}."]
    errors = [r for r in results if r.error]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {r.method}: {r.failures} of {r.failures + r.n} edits failed "
                                          f"({r.error})" for r in errors]
    lines += ["", "The unedited row reads the probes before any edit: reliability/generality/portability there are "
              "the new targets' scores (low is expected), locality is 1 by definition (teacher-forced).", "",
              "## Facts the model knows", "", "| relation | kept | asked |", "|---|---|---|"]
    lines += [f"| {rel} | {kept} | {asked} |" for rel, (kept, asked) in sorted(known.per_relation.items())]
    lines += [f"| **total** | **{known.kept}** | **{known.total}** |", ""]
    if elapsed_s is not None:
        lines += [f"Wall time of the whole command: {elapsed_s:.0f} s.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def method_hparams(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--hparams METHOD=JSON`` items as {method: settings}; each method must be one of ``methods``."""
    from editing.methods import get_method
    from eval.cli import hparams_arg

    chosen: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"--hparams {item!r}: write METHOD=JSON, e.g. MEND='{{\"lr_scale\": 2}}'.")
        method = get_method(name.strip()).name
        if method not in methods:
            raise ValueError(f"--hparams {item!r}: {method} is not among the methods run ({', '.join(methods)}).")
        chosen[method] = {**chosen.get(method, {}), **hparams_arg(value)}
    return chosen


def _parser() -> argparse.ArgumentParser:
    from eval.cli import DEVICE_MAP_HELP

    parser = argparse.ArgumentParser(prog="python -m eval.realmodel",
                                     description="Results table of editing methods on a real model.")
    parser.add_argument("--model", default="smollm2-135m", help="model spec for editing.load_model")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: every registered method ready on the model)")
    parser.add_argument("--n", type=int, default=50, help="number of records (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the records' choice and new targets")
    parser.add_argument("--tokens", type=int, default=20, help="greedy tokens generated per probe (default 20)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (GPU only)")
    parser.add_argument("--device-map", default=None, help=DEVICE_MAP_HELP)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown file (default {DEFAULT_OUT})")
    parser.add_argument("--records", type=Path, default=None,
                        help="also write the CounterFact-style records used (JSON; "
                             "`python -m eval run --data` reads it)")
    parser.add_argument("--hparams", action="append", default=[], metavar="METHOD=JSON",
                        help="settings for one method: inline JSON or @file, as `python -m eval run --hparams` "
                             "reads them (e.g. MEND='{\"checkpoint\": \"<editor folder>\"}'); repeatable")
    parser.add_argument("--fresh-baseline", action="store_true",
                        help="compute the unedited pass again instead of reading it from the cache")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m eval.realmodel``; returns the exit status."""
    from editing.models.loader import load_model
    from eval.cli import device_map_arg

    args = _parser().parse_args(argv)
    if args.n < 1:
        print("error: --n must be at least 1.", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        if not args.quiet:
            print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)

    try:
        handle = load_model(args.model, device=args.device, dtype=args.dtype,
                            device_map=device_map_arg(args.device_map))
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else ready_methods(handle)
        from editing.methods import get_method

        methods = [get_method(m).name for m in methods]  # a typo fails here, with the list of methods
        hparams = method_hparams(args.hparams, methods)
        for method, settings in hparams.items():  # a wrong field fails here, not once per case
            get_method(method).resolve_hparams(handle, settings).validate(handle)
        progress(0.0, f"finding the facts {args.model} knows (cached after the first time)")
        known = known_facts(handle)
        records = generate_records(known, n=args.n, seed=args.seed)
        cases = [record_to_case(r) for r in records]
        if args.records is not None:
            atomic_write_text(args.records, json.dumps(records, ensure_ascii=False, indent=1))
    except (KeyError, ValueError, OSError, EditError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: {args.model} knows none of the candidate facts ({known.summary()}).", file=sys.stderr)
        return 2
    progress(0.0, f"{known.summary()}; {len(cases)} records; methods: {', '.join(methods)}")
    command = "python -m eval.realmodel " + " ".join(sys.argv[1:] if argv is None else argv)

    def markdown(baseline: MethodResult, results: list[MethodResult]) -> str:
        return results_markdown(args.model, known, cases, baseline, results, command.strip(), args.tokens,
                                args.seed, device=str(handle.device), elapsed_s=time.perf_counter() - started,
                                pending=methods[len(results):])

    def keep_partial(baseline: MethodResult, results: list[MethodResult]) -> None:
        if len(results) < len(methods):  # the finished rows survive an interrupted run
            atomic_write_text(args.out, markdown(baseline, results))

    cache = unedited_pass_file(handle, cases, args.tokens)
    if args.fresh_baseline:
        cache.unlink(missing_ok=True)
    baseline, results = results_table(handle, cases, methods, probe_tokens=args.tokens, hparams=hparams,
                                      progress=progress, on_method=keep_partial, unedited_cache=cache)
    text = markdown(baseline, results)
    print(text)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
