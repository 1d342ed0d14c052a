"""The model-preparation panel: progress while a build runs, the error and a Retry button when it fails."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest


def _failing_page() -> None:
    import ui.models
    from editing.storage.buildonce import BuildFailed

    def broken(spec, progress=None):
        progress(0.3, "waiting for another process that is building the demo model: step 480 of 1600")
        raise BuildFailed("Building the demo model failed: OSError: No space left on device")

    ui.models.prepare_model = broken
    ui.models._prepare_with_progress("demo")
    import streamlit as st

    st.write("not reached")


def _working_page() -> None:
    import ui.models

    ui.models.prepare_model = lambda spec, progress=None: progress(1.0, "the demo model ready")
    ui.models._prepare_with_progress("demo")
    import streamlit as st

    st.write("page continues")


def test_a_failed_build_shows_its_error_and_a_retry_button():
    app = AppTest.from_function(_failing_page, default_timeout=30).run()
    assert not app.exception
    assert any("No space left on device" in e.value for e in app.error)
    assert [b.label for b in app.button] == ["Retry"]
    assert not any("not reached" in m.value for m in app.markdown)
    app.button[0].click().run()  # retrying runs the preparation again (and fails the same way here)
    assert any("No space left on device" in e.value for e in app.error)


def test_a_finished_build_lets_the_page_continue():
    app = AppTest.from_function(_working_page, default_timeout=30).run()
    assert not app.exception and not app.error
    assert any("page continues" in m.value for m in app.markdown)
