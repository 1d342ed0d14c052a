"""Many people, one model: sessions never see each other's edits, and the shared weights stay bit-identical."""

from __future__ import annotations

import threading

import pytest

from editing.core.request import EditRequest
from editing.core.session import EditSession
from eval.evaluate import predict
from eval.probes import Probe
from tests.app.conftest import app_state, assert_clean, click, new_app, preferred_method
from tests.helpers import assert_params_equal, params_snapshot
from ui.actions import apply_and_evaluate, probeset_for
from ui.models import edits_at_rest, weights_digest
from ui.widgets import fact_key

EIFFEL = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
JAPAN = EditRequest("The capital of {} is", "Japan", "Berlin", "Tokyo")
PROBE_EIFFEL = Probe("a", EIFFEL.text, "France", "locality")
PROBE_JAPAN = Probe("b", JAPAN.text, "Tokyo", "locality")


def test_two_sessions_editing_at_once_never_see_each_other(app_handle):
    """Two sessions on the dashboard's shared handle apply different edits concurrently, then keep
    reading both facts from their threads; each sees only its own edit, and afterwards the shared
    weights are exactly the ones loaded."""
    method = preferred_method()
    snapshot = params_snapshot(app_handle)
    digest = weights_digest(app_handle)
    sessions = {"alice": (EditSession(app_handle), EIFFEL), "bob": (EditSession(app_handle), JAPAN)}
    seen: dict[str, list[tuple[str, str]]] = {name: [] for name in sessions}
    failures: list[BaseException] = []
    start = threading.Barrier(len(sessions))

    def person(name: str) -> None:
        session, request = sessions[name]
        try:
            start.wait(timeout=60)
            apply_and_evaluate(session, method, request, probeset_for(request), None)
            for _ in range(5):
                eiffel, japan = predict(session, [PROBE_EIFFEL, PROBE_JAPAN], k=1)
                seen[name].append((eiffel.pred, japan.pred))
        except BaseException as err:  # reported below
            failures.append(err)

    threads = [threading.Thread(target=person, args=(name,)) for name in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not failures, failures
    assert set(seen["alice"]) == {("Italy", "Tokyo")}, seen["alice"]
    assert set(seen["bob"]) == {("France", "Berlin")}, seen["bob"]
    assert edits_at_rest(app_handle) == 0
    assert_params_equal(app_handle, snapshot)
    assert weights_digest(app_handle) == digest


def test_two_dashboard_sessions_keep_their_own_stacks(app_handle):
    """Two AppTest sessions of the dashboard: the second never sees the first one's edit."""
    digest = weights_digest(app_handle)
    alice = new_app().run()
    click(alice, "Apply edit")
    assert_clean(alice)
    assert app_state(alice).playground.outcome.table.iloc[0]["pred_after"] == "Italy"
    bob = new_app().run()
    bob.text_input(key="pg_probe_prompt").set_value(EIFFEL.text)
    bob.text_input(key="pg_probe_answer").set_value("France")
    bob.selectbox(key="pg_probe_kind").set_value("unrelated")
    click(bob, "Add probe")
    for name, value in (("prompt", JAPAN.text), ("subject", "Japan"), ("target_new", "Berlin"),
                        ("target_true", "Tokyo")):
        bob.text_input(key=fact_key("pg", name)).set_value(value)
    click(bob, "Apply edit")
    assert_clean(bob)
    table = app_state(bob).playground.outcome.table
    assert table[table["kind"] == "reliability"].iloc[0]["pred_after"] == "Berlin"
    # Bob's probe about Alice's fact: France before and after Bob's edit — Alice's edit is invisible to him.
    own = table[table["source"] == "user"].iloc[0]
    assert own["prompt"] == EIFFEL.text and own["pred_before"] == "France" == own["pred_after"]
    assert len(app_state(alice).current_session().edits) == 1 and len(app_state(bob).current_session().edits) == 1
    assert app_state(alice).current_session() is not app_state(bob).current_session()
    assert app_state(alice).current_session().handle is app_handle  # one model, loaded once per process
    assert weights_digest(app_handle) == digest


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_session_edits_are_absent_at_rest_on_tiny_models(family):
    """The same guarantee on other architectures, with a cheap edit method."""
    from editing.methods import available_methods
    from editing.models.tiny import tiny_model

    if "FT-L" not in available_methods():
        pytest.skip("FT-L is not registered")
    handle = tiny_model(family)
    snapshot = params_snapshot(handle)
    session = EditSession(handle)
    apply_and_evaluate(session, "FT-L", EIFFEL, probeset_for(EIFFEL), {"steps": 3})
    assert edits_at_rest(handle) == 0 and len(session.edits) == 1
    assert_params_equal(handle, snapshot)
