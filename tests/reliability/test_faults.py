"""Faults: a diverging or interrupted edit leaves the model untouched and reports the failure; the
run store survives a killed process; a half-written export never replaces a good one."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from editing.core.edit import EditError, ParamDelta, WeightDelta, handle_stack, load_edit
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import EditMethod, HParams, available_methods, get_method
from editing.models.tiny import tiny_model
from tests import helpers
from tests.helpers import assert_params_equal, params_snapshot
from tests.reliability.common import few_steps, run_hparams

ROOT = Path(__file__).resolve().parents[2]
REQ = EditRequest("The capital of {} is", "France", "Berlin", "Paris")
METHODS = available_methods()
#: the low-rank deltas these tests push (small files, see the size-limited writes)
random_delta = partial(helpers.random_delta, rank=2, request=REQ)


def logits(handle, text: str = "The capital of France is") -> torch.Tensor:
    with torch.no_grad():
        return handle.model(torch.tensor([handle.tokenizer(text)["input_ids"]])).logits


def session_with_prior(handle, seed: int) -> tuple[dict[str, torch.Tensor], EditSession, WeightDelta, torch.Tensor]:
    """The state an interrupted edit must leave as it found: the model's weights, a session
    holding one random edit (``seed``), that edit, and the logits while the session is active."""
    before = params_snapshot(handle)
    session = EditSession(handle)
    prior = random_delta(handle, seed=seed)
    session.push(prior)
    with session.active():
        expected = logits(handle)
    return before, session, prior, expected


def big_delta(handle) -> WeightDelta:
    """Dense deltas on three layers: its safetensors file is larger than LIMIT."""
    deltas = {handle.arch.mlp_out_name(layer) + ".weight": ParamDelta(dense=torch.full(
        tuple(handle.parameter(handle.arch.mlp_out_name(layer) + ".weight").shape), 1e-3)) for layer in (1, 2, 3)}
    return WeightDelta(method="test", requests=[REQ], hparams={}, deltas=deltas)


# -- test-only methods (never registered: other tests list the registry) -------------------------
@dataclass
class _NoParams(HParams):
    pass


class _Diverging(EditMethod):
    """Perturbs a weight in place while computing (restored in finally), applies a first valid
    partial edit, then produces a NaN update — like an optimisation that blew up."""

    name: ClassVar[str] = "test-diverging"
    hparams_class: ClassVar[type[HParams]] = _NoParams
    edit_kind: ClassVar[str] = "weight_delta"

    def _execute(self, handle, requests, hparams, progress):
        weight = handle.arch.mlp_out_weight(handle.model, 0)
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.mul_(1e30)  # the computation overflows ...
            random_delta(handle, layer=2, seed=5).apply(handle)  # ... after a partial edit went in
            progress(0.5, "half way")
            update = weight.detach() * 1e30 - weight.detach() * 1e30  # inf - inf = NaN
            return WeightDelta(method=self.name, requests=requests, hparams={},
                               deltas={handle.arch.mlp_out_name(1) + ".weight": ParamDelta(dense=update.T.clone())})
        finally:
            with torch.no_grad():
                weight.copy_(saved)


class _Steady(EditMethod):
    """A valid edit that reports progress at every step of a small loop."""

    name: ClassVar[str] = "test-steady"
    hparams_class: ClassVar[type[HParams]] = _NoParams
    edit_kind: ClassVar[str] = "weight_delta"

    def _execute(self, handle, requests, hparams, progress):
        for step in range(4):
            progress(step / 4, f"step {step}")
        return random_delta(handle, seed=9)


class _Interrupt:
    """A progress callback that raises KeyboardInterrupt at its ``at``-th call before the end
    (``at=None`` only counts the calls); ``at_end`` interrupts at the final "done" report."""

    def __init__(self, at: int | None = None, at_end: bool = False) -> None:
        self.at, self.at_end, self.calls = at, at_end, 0

    def __call__(self, fraction: float, message: str) -> None:
        if fraction >= 1.0:
            if self.at_end:
                raise KeyboardInterrupt
            return
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt


def test_a_diverging_edit_is_refused_and_restores_everything():
    handle = tiny_model("gpt2")
    before = params_snapshot(handle)
    session = EditSession(handle)
    session.push(random_delta(handle, seed=1))
    with pytest.raises(EditError, match="NaN or infinite"):
        session.apply(_Diverging(), REQ)
    assert_params_equal(handle, before)
    assert not handle_stack(handle) and len(session.edits) == 1


@pytest.mark.parametrize("where", ["first step", "last step", "final report"])
def test_an_interrupted_edit_leaves_the_model_and_session_as_they_were(where):
    handle = tiny_model("llama")
    before, session, prior, expected = session_with_prior(handle, seed=1)
    interrupt = {"first step": _Interrupt(1), "last step": _Interrupt(4), "final report": _Interrupt(at_end=True)}
    with pytest.raises(KeyboardInterrupt):
        session.apply(_Steady(), REQ, progress=interrupt[where])
    with pytest.raises(KeyboardInterrupt):  # called directly, without a session, the same holds
        _Steady().apply(handle, [REQ], progress=_Interrupt(at_end=True) if where == "final report" else _Interrupt(1))
    assert_params_equal(handle, before)
    assert not handle_stack(handle) and session.edits == (prior,)
    with session.active():
        assert torch.equal(logits(handle), expected)


# -- every registered method -------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_methods_stopped_mid_edit_leave_the_model_untouched(method, tiny_editors):
    """Stopped at its first progress report and at its second (or, for a method that reports only
    once, at the final "done"), a method leaves the model and the session as they were."""
    handle = tiny_model("gpt2")
    hparams = run_hparams(handle, method, tiny_editors, steps=None)
    before, session, prior, expected = session_with_prior(handle, seed=3)
    for at in (1, 2):
        interrupt = _Interrupt(at)
        interrupt.at_end = True  # a method with fewer reports is stopped at the final one
        with pytest.raises(KeyboardInterrupt):
            session.apply(method, REQ, hparams, progress=interrupt)
        assert_params_equal(handle, before)
        assert not handle_stack(handle) and session.edits == (prior,), f"stopped at report {at}"
    with session.active():
        assert torch.equal(logits(handle), expected)


EDITS_WITHOUT_BASE_ACTIVATIONS = {"IKE", "SERAC"}


@pytest.mark.parametrize("method", METHODS)
def test_methods_fed_nan_activations_never_apply_a_nonfinite_edit(method, tiny_editors):
    """NaN injected into the residual stream while a method computes its edit: it fails with an
    error that says why, and the model is untouched. Only methods whose edit is computed without
    the base model's activations (IKE's sentence encoder, SERAC's own memory) may still return an
    edit, and then every tensor of it is finite."""
    handle = tiny_model("gpt2")
    hparams = run_hparams(handle, method, tiny_editors)
    before = params_snapshot(handle)
    session = EditSession(handle)
    embed = handle.module(handle.arch.embed)
    hook = embed.register_forward_hook(lambda _module, _args, output: output * float("nan"))
    try:
        edit = session.apply(method, REQ, hparams=hparams)
    except Exception as err:  # reported: any error with a message
        assert str(err), f"{method} failed without saying why ({type(err).__name__})"
        assert session.edits == ()
    else:
        assert method in EDITS_WITHOUT_BASE_ACTIVATIONS, f"{method} returned an edit computed from NaN activations"
        for key, tensor in edit.tensors().items():
            assert torch.isfinite(tensor).all(), f"{method} returned a non-finite {key}"
    finally:
        hook.remove()
    assert_params_equal(handle, before)
    assert not handle_stack(handle)


# -- the run store and a killed process --------------------------------------------------------
def _python(script: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _store_method() -> str | None:
    handle = tiny_model("gpt2")
    for name in ("FT-L", "FT", "ROME", "MEMIT"):
        if name in METHODS and get_method(name).readiness(handle) is None:
            return name
    return None


def test_the_run_store_survives_a_process_killed_mid_transaction(tmp_path):
    pytest.importorskip("eval.store")
    pytest.importorskip("eval.runs")
    method = _store_method()
    if method is None:
        pytest.skip("no fine-tuning or locate-then-edit method is registered yet")
    db = tmp_path / "runs.sqlite"
    hparams = few_steps(tiny_model("gpt2"), method)
    script = f"""
        import json, os
        from editing.models.tiny import tiny_model
        from eval.datasets import load_dataset
        from eval.runs import run_experiment
        from eval.store import RunStore

        store = RunStore({str(db)!r})
        handle = tiny_model("gpt2")
        cases = load_dataset("demo", limit=3)
        done = run_experiment(handle, {method!r}, cases[:1], mode="single", hparams={hparams!r}, store=store)
        print("DONE", json.dumps({{"run_id": done.run_id, "steps": len(done.summary)}}), flush=True)

        class DieMidway(list):
            # iterating the probe rows happens inside add_step's open transaction
            def __iter__(self):
                for index, row in enumerate(list.__iter__(self)):
                    if index == len(self) // 2:
                        os._exit(9)
                    yield row

        original, calls = RunStore.add_step, []
        def add_step(self, run_id, summary_row, probe_rows):
            calls.append(run_id)
            if len(calls) == 3:
                original(self, run_id, summary_row, DieMidway(probe_rows))
            original(self, run_id, summary_row, probe_rows)
            print("COMMITTED", json.dumps({{"run_id": run_id, "step": int(summary_row["step"]),
                                            "n_probes": len(probe_rows)}}), flush=True)
        RunStore.add_step = add_step
        run_experiment(handle, {method!r}, cases, mode="sequential", hparams={hparams!r}, store=store)
        print("NOT KILLED", flush=True)
    """
    result = _python(script)
    assert result.returncode == 9, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    finished = json.loads(next(line for line in lines if line.startswith("DONE")).split(" ", 1)[1])
    committed = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("COMMITTED")]
    killed_run = committed[0]["run_id"]
    assert [c["step"] for c in committed] == [1, 2]

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    from eval.store import RunStore

    store = RunStore(db)
    runs = store.list_runs().set_index("run_id")
    assert runs.loc[finished["run_id"], "status"] == "done"
    assert runs.loc[killed_run, "status"] == "interrupted"
    assert len(store.load_run(finished["run_id"]).summary) == finished["steps"]
    partial = store.load_run(killed_run)
    assert list(partial.summary["step"]) == [1, 2], "the step being written when the process died must roll back"
    assert sorted(partial.probes["step"].unique()) == [1, 2]
    assert len(partial.probes) == sum(c["n_probes"] for c in committed)
    new_run = store.create_run({"model": "m", "method": "x", "mode": "single"})  # still writable
    store.delete(killed_run)
    assert set(store.list_runs()["run_id"]) == {finished["run_id"], new_run}


# -- half-written exports ----------------------------------------------------------------------
LIMIT = 96 * 1024  # bytes a child process may write to any one file


def _write_limited(imports: str, calls: list[str]) -> list[str]:
    """Run each of ``calls`` in one child process that cannot write files past LIMIT bytes (as on a
    full disk); returns "FAILED ..." or "SUCCEEDED" per call."""
    pytest.importorskip("resource")  # Linux/macOS: the child limits its file sizes with it
    attempts = "\n".join(f"attempt(lambda: {call})" for call in calls)
    script = f"""
import resource, signal
{imports}
def attempt(call):
    try:
        call()
    except Exception as err:  # OSError(EFBIG), or a library's wrapper of it
        print("FAILED", type(err).__name__, str(err).replace("\\n", " "), flush=True)
    else:
        print("SUCCEEDED", flush=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying
resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
{attempts}
"""
    result = _python(script)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "SUCCEEDED"))]
    assert len(outcomes) == len(calls), result.stdout
    return outcomes


def test_a_failed_run_export_keeps_the_previous_file(tmp_path):
    pytest.importorskip("eval.store")
    from eval.store import RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    small = store.create_run({"model": "m", "method": "ROME", "mode": "single"})
    store.add_step(small, {"step": 1, "n_edits": 1, "reliability": 1.0}, [{"probe_id": "rel-0", "prompt": "p"}])
    big = store.create_run({"model": "m", "method": "MEMIT", "mode": "batch"})
    rows = [{"probe_id": f"loc-{i}", "prompt": "The capital of France is " * 8, "answer": "Paris"} for i in range(800)]
    store.add_step(big, {"step": 1, "n_edits": 400, "reliability": 0.5}, rows)
    targets, good = {}, {}
    for suffix in (".json", ".csv"):
        targets[suffix] = tmp_path / f"export{suffix}"
        store.export(small, targets[suffix], **({"table": "probes"} if suffix == ".csv" else {}))
        good[suffix] = targets[suffix].read_bytes()
    outcomes = _write_limited("from eval.store import RunStore", [
        f"RunStore({str(store.path)!r}).export({big}, {str(targets['.json'])!r})",
        f"RunStore({str(store.path)!r}).export({big}, {str(targets['.csv'])!r}, table='probes')"])
    for suffix, outcome in zip(targets, outcomes, strict=True):
        assert outcome.startswith("FAILED"), f"the {suffix} export was expected to hit the size limit: {outcome}"
        assert targets[suffix].read_bytes() == good[suffix], f"a failed {suffix} export replaced the good file"


def test_a_failed_edit_save_keeps_the_previous_files(tmp_path):
    handle = tiny_model("gpt2")
    good = random_delta(handle, seed=1)  # low rank: small
    path = good.save(tmp_path / "edit")
    staged = big_delta(handle).save(tmp_path / "staged" / "big")
    assert staged.with_suffix(".safetensors").stat().st_size > LIMIT
    [outcome] = _write_limited("from editing.core.edit import load_edit",
                               [f"load_edit({str(staged)!r}).save({str(path)!r})"])
    assert outcome.startswith("FAILED"), outcome
    loaded = load_edit(path)
    name = next(iter(good.deltas))
    assert torch.equal(loaded.deltas[name].left, good.deltas[name].left) and set(loaded.deltas) == set(good.deltas)


def test_a_failed_session_save_keeps_the_previous_stack(tmp_path):
    handle = tiny_model("gpt2")
    folder = tmp_path / "stack"
    saved = EditSession(handle)
    saved.push(random_delta(handle, seed=1))
    saved.push(random_delta(handle, seed=2, layer=2))
    with saved.active():
        expected = logits(handle)
    saved.save(folder)
    newer = EditSession(handle)
    newer.push(random_delta(handle, seed=3))  # small: its file is written ...
    newer.push(big_delta(handle))  # ... this one hits the limit
    newer.push(random_delta(handle, seed=5))
    newer.save(tmp_path / "staged")
    imports = ("import types\nfrom editing.core.session import EditSession\n"
               "stack = EditSession(types.SimpleNamespace(name='tiny-gpt2'))  # saving needs only the name\n"
               f"stack.load({str(tmp_path / 'staged')!r})")
    [outcome] = _write_limited(imports, [f"stack.save({str(folder)!r})"])
    assert outcome.startswith("FAILED"), outcome
    restored = EditSession(handle)
    restored.load(folder)
    assert len(restored.edits) == 2
    with restored.active():
        assert torch.equal(logits(handle), expected), "a failed save mixed the new stack into the old one"
    # a later successful save replaces the whole stack and leaves no stale file behind
    single = EditSession(handle)
    single.push(random_delta(handle, seed=6))
    single.save(folder)
    names = json.loads((folder / "session.json").read_text())["edits"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["session.json", f"{names[0]}.json", f"{names[0]}.safetensors"])
