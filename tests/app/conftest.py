"""Fixtures for the dashboard tests: AppTest instances of app.py on the demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
#: AppTest's default of 3 s is far too short for pages that load the model or compute edits
TIMEOUT = 300


def preferred_method() -> str:
    """The method the tests edit with: ROME when registered, else FT-L, else the first available
    (``$EDITSCOPE_TEST_METHOD`` picks another registered one)."""
    from editing.methods import available_methods

    methods = available_methods()
    if not methods:
        pytest.skip("no editing method is registered yet")
    for name in (os.environ.get("EDITSCOPE_TEST_METHOD", ""), "ROME", "FT-L"):
        if name in methods:
            return name
    return methods[0]


def new_app(method: str | None = None, **session_values):
    """An AppTest of app.py (not yet run) with the given widget/session values set first."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["sb_method"] = method or preferred_method()
    for key, value in session_values.items():
        at.session_state[key] = value
    return at


def app_state(at):
    """The typed per-session state object of an AppTest."""
    from ui.state import STATE_KEY

    return at.session_state[STATE_KEY]


def assert_clean(at) -> None:
    """No exception escaped to the page."""
    assert not at.exception, [e.value for e in at.exception]


def click(at, label: str):
    """Click the (form submit) button whose label is ``label`` and rerun."""
    buttons = [b for b in at.button if b.label == label]
    assert buttons, f"no button {label!r}; have {[b.label for b in at.button]}"
    return buttons[0].click().run()


@pytest.fixture(scope="session", autouse=True)
def _navigation_not_pages_folder():
    """Run app.py as the navigation script on every AppTest run, as the server does.

    AppTest resets ``PagesManager.uses_pages_directory`` before each run; because a ``pages/``
    folder exists it then takes the app for an old-style (v1) multipage app and, after the first
    run, executes the current page file alone — without app.py's sidebar. A live server clears
    the flag for good as soon as app.py calls ``st.navigation``; the patch does the same here.
    """
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PagesManager, "__init__", init)
        yield


@pytest.fixture
def run_store_path(tmp_path, monkeypatch) -> Path:
    """Point the dashboard's run store at a fresh file."""
    from ui.jobs import RUN_STORE_ENV

    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv(RUN_STORE_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def app_handle(demo_handle):
    """The demo model as the dashboard shares it (the st.cache_resource entry AppTests use)."""
    from ui.models import _shared_handle

    return _shared_handle("demo", "auto", "float32")
