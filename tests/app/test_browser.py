"""The dashboard in a real browser: the app served on localhost, headless Chromium through Playwright.

Two browser sessions apply different edits at the same time; each sees only its own edit and the server's
shared model is bit-identical to the model files afterwards. A Playground edit gets its result while another
session's sequential experiment is still running. Screenshots of every page are saved under the
test's tmp folder (and copied to screenshots/ when EDITSCOPE_SCREENSHOTS is set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.app.conftest import APP, ROOT, preferred_method
from ui import browser as serving

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(serving.CHROMIUM)
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LONG = 600_000  # ms: edits and first loads on a busy CPU (300 s once ran out with two burners and two workers)
MODE_SEQUENTIAL = "Sequential — one edit after another"  # pages/batch.py MODE_LABELS


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_handle):
    """``streamlit run app.py`` on a free local port (the demo model is built before)."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (`make browser` installs Debian's chromium)")
    pytest.importorskip("playwright.sync_api")
    folder = tmp_path_factory.mktemp("server")
    port = serving.free_port()
    env = {**os.environ, "EDITSCOPE_DIAGNOSTICS": "1", "EDITSCOPE_RUN_STORE": str(folder / "runs.sqlite")}
    log = open(folder / "server.log", "w")  # closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        serving.wait_healthy(url, process, time.perf_counter() + 120)
    except (RuntimeError, TimeoutError):
        log.close()
        pytest.fail(f"the app did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path):
    """Where screenshots go; copied to ROOT/screenshots when EDITSCOPE_SCREENSHOTS is set."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    if os.environ.get("EDITSCOPE_SCREENSHOTS"):
        target = ROOT / "screenshots"
        target.mkdir(exist_ok=True)
        for shot in folder.iterdir():
            shutil.copy2(shot, target / shot.name)


def _open(browser, url: str, height: int = 1100):
    # Streamlit scrolls inside its own container, so a screenshot shows the viewport: ``height`` sets how much.
    page = browser.new_context(viewport={"width": 1500, "height": height}).new_page()
    page.goto(url, timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)
    page.get_by_text("Apply edit").first.wait_for(timeout=LONG)
    return page


def _go(page, title: str) -> None:
    """Switch page with the sidebar's navigation (a link keeps the session; a new URL would not)."""
    page.locator("[data-testid='stSidebarNavLink']", has_text=title).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)


def _fill(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)


def _apply_fact(page, prompt: str, subject: str, target_new: str) -> None:
    """Type a fact into the Playground's form (the true target as it stands) and apply the edit."""
    _fill(page, "Prompt (with the subject)", prompt)
    _fill(page, "Subject", subject)
    _fill(page, "New target", target_new)
    page.get_by_role("button", name="Apply edit", exact=True).click()


def _pick_method(page, method: str) -> None:
    box = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="Editing method")
    if method not in box.inner_text():
        box.click()
        page.get_by_role("option", name=method, exact=True).click()
        page.wait_for_selector(serving.IDLE, timeout=LONG)


def test_two_browser_sessions_edit_at_once_and_every_page_renders(server, browser, shots, demo_handle):
    from ui.models import weights_digest

    method = preferred_method()
    alice, bob = _open(browser, server), _open(browser, server)
    for page in (alice, bob):
        _pick_method(page, method)
    # Bob types another fact and a probe about Alice's fact before anyone edits.
    _fill(bob, "Prompt (with the subject)", "The capital of Japan is")
    _fill(bob, "Subject", "Japan")
    _fill(bob, "New target", "Berlin")
    _fill(bob, "True target (optional)", "Tokyo")
    bob.get_by_text("Add your own probes").click()
    _fill(bob, "Probe prompt", "Eiffel Tower is a famous landmark in")
    _fill(bob, "Expected answer", "France")
    bob.get_by_role("button", name="Add probe", exact=True).click()
    bob.get_by_text("Your probes are added to every edit").wait_for(timeout=LONG)
    bob.wait_for_selector(serving.IDLE, timeout=LONG)
    # Both apply at the same time: the server computes the two edits concurrently on one shared model.
    alice.get_by_role("button", name="Apply edit", exact=True).click()
    bob.get_by_role("button", name="Apply edit", exact=True).click()
    alice_result = alice.locator(".st-key-pg_edit_result")
    bob_result = bob.locator(".st-key-pg_edit_result")
    alice_result.wait_for(timeout=LONG)
    bob_result.wait_for(timeout=LONG)
    alice.wait_for_selector(serving.IDLE, timeout=LONG)
    bob.wait_for_selector(serving.IDLE, timeout=LONG)
    assert "after: Italy" in alice_result.inner_text()
    assert "before the edit: Tokyo" in bob_result.inner_text() and "after: Berlin" in bob_result.inner_text()
    # Bob's probe of Alice's fact is still France with his edit: he never sees her edit.
    bob_probes = bob.locator(".st-key-pg_user_probes").inner_text()
    assert "expected France: before France, after France" in bob_probes, bob_probes
    assert "Eiffel Tower: France → Italy" in alice.locator("[data-testid='stSidebar']").inner_text()
    assert "Japan: Tokyo → Berlin" in bob.locator("[data-testid='stSidebar']").inner_text()
    assert "Eiffel Tower: France → Italy" not in bob.locator("[data-testid='stSidebar']").inner_text()
    alice.screenshot(path=str(shots / "1-playground.png"), full_page=True)

    # The server's shared model holds no edit at rest and has exactly the weights of the model files.
    _go(alice, "Shared model")
    code = alice.locator(".st-key-weights_digest code")
    code.wait_for(timeout=LONG)
    digest = code.inner_text().strip()
    assert digest == weights_digest(demo_handle)
    assert alice.locator("[data-testid='stMetric']", has_text="Edits held at rest").inner_text().strip().endswith("0")
    alice.screenshot(path=str(shots / "6-shared-model.png"), full_page=True)

    # Scope map (UMAP): click a point to filter the table.
    _go(alice, "Scope map")
    alice.locator(".js-plotly-plot").first.wait_for(timeout=LONG)
    alice.get_by_text("Select points").wait_for(timeout=LONG)
    alice.screenshot(path=str(shots / "2-scope-map.png"), full_page=True)
    total = int(alice.get_by_text(" probes · ").inner_text().split()[0])
    # Box-select a small square around one marker: the table keeps only the selected probes.
    marker = alice.locator(".js-plotly-plot .scatterlayer .trace .points path").first.bounding_box()
    x, y = marker["x"] + marker["width"] / 2, marker["y"] + marker["height"] / 2
    alice.mouse.move(x - 8, y - 8)
    alice.mouse.down()
    alice.mouse.move(x, y, steps=4)
    alice.mouse.move(x + 8, y + 8, steps=4)
    alice.mouse.up()
    caption = alice.get_by_text("selected probe(s)")
    caption.wait_for(timeout=60_000)
    selected = int(caption.inner_text().split()[0])
    assert 1 <= selected < total
    alice.wait_for_selector(serving.IDLE, timeout=LONG)
    alice.screenshot(path=str(shots / "2b-scope-map-selection.png"), full_page=True)

    _go(alice, "Compare methods")  # the comparison itself is run by the AppTest tests
    alice.screenshot(path=str(shots / "3-compare.png"), full_page=True)

    _go(alice, "Batch & sequential")
    alice.screenshot(path=str(shots / "4-batch.png"), full_page=True)

    _go(alice, "Locate")
    _fill(alice, "Noise samples", "3")
    alice.get_by_role("button", name="Trace", exact=True).click()
    alice.locator(".js-plotly-plot").first.wait_for(timeout=LONG)
    alice.wait_for_selector(serving.IDLE, timeout=LONG)
    assert "→ France" in alice.inner_text("body")
    alice.screenshot(path=str(shots / "5-locate.png"), full_page=True)
    assert len(list(shots.iterdir())) == 7


def _shot(page, shots, name: str, selector: str | None = None) -> None:
    """A full-page screenshot, or one of the element ``selector`` (a closer look)."""
    target = page.locator(selector).first if selector else page
    kwargs = {} if selector else {"full_page": True}
    target.screenshot(path=str(shots / name), **kwargs)


def test_the_playground_says_what_really_happened(server, browser, shots):
    """A two-token target: its whole probability and whether the model now says it; the scope map's three
    in-scope outcomes; a fact typed over an example: the example's true target is dropped and the model's
    own answer used; an unknown subject: why the tiles read n/a, with the probe box right there."""
    from playwright.sync_api import expect

    page = _open(browser, server, height=3200)
    _pick_method(page, preferred_method())
    expect(page.get_by_label("True target (optional)", exact=True)).to_have_value("")
    _apply_fact(page, "The Statue of Liberty is located in", "Statue of Liberty", "United Kingdom")
    verdict = page.locator(".st-key-pg_verdict")
    verdict.wait_for(timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)
    assert "Does the model now say “United Kingdom”?" in verdict.inner_text()
    edit_box = page.locator(".st-key-pg_edit_result").inner_text()
    assert "the whole target (product over its 2 tokens)" in edit_box and "0.000 → 0.000" not in edit_box
    assert "the model's own answer before the edit" in page.locator(".st-key-pg_true_target").inner_text()
    page.get_by_text("What the model writes", exact=True).wait_for(timeout=LONG)
    _shot(page, shots, "truth-1-playground-whole-target-and-verdict.png")
    _shot(page, shots, "truth-1b-verdict.png", ".st-key-pg_verdict")
    _shot(page, shots, "truth-1c-edit-prompt-probabilities.png", ".st-key-pg_edit_result")

    # the scope map of a one-token edit that takes: the edit reaches its answer, consequences may not
    _apply_fact(page, "Eiffel Tower is a famous landmark in", "Eiffel Tower", "Italy")
    page.locator("[data-testid='stSidebar']").get_by_text("Eiffel Tower: France → Italy").wait_for(timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)
    _go(page, "Scope map")
    page.locator(".js-plotly-plot").first.wait_for(timeout=LONG)
    page.get_by_text("Select points").wait_for(timeout=LONG)
    tiles = page.locator("[data-testid='stMetric']").all_inner_texts()
    assert any("In scope: expected" in t for t in tiles) and any("In scope: other answer" in t
                                                                        for t in tiles), tiles
    legend = page.locator(".js-plotly-plot .legendtext").all_text_contents()
    assert "changed to the expected answer" in legend and "changed, as intended" not in legend, legend
    _shot(page, shots, "truth-2-scope-map-three-outcomes.png")

    _go(page, "Playground")
    examples = page.locator("[data-testid='stSelectbox']", has_text="Start from a fact of the fact base")
    examples.click()
    page.keyboard.type("Japan — country capital")
    page.keyboard.press("Enter")
    true_box = page.get_by_label("True target (optional)", exact=True)
    expect(true_box).to_have_value("Tokyo", timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)
    _apply_fact(page, "Albert Einstein worked as a", "Albert Einstein", "painter")
    missing = page.locator(".st-key-pg_missing")
    missing.wait_for(timeout=LONG)
    page.wait_for_selector(serving.IDLE, timeout=LONG)
    explanation = missing.inner_text()
    assert "no facts about “Albert Einstein”" in explanation and "Add your own probes" in explanation
    assert missing.get_by_role("textbox", name="Probe prompt").is_visible()  # the probe box is right there, open
    told = page.locator(".st-key-pg_true_target").inner_text()
    assert "“Tokyo” was left from the example" in told and "True target: **Tokyo**" not in told
    expect(true_box).to_have_value("", timeout=LONG)
    assert "Albert Einstein: Tokyo" not in page.locator("[data-testid='stSidebar']").inner_text()
    _shot(page, shots, "truth-3-unknown-subject.png")
    _shot(page, shots, "truth-3b-true-target-and-missing-probes.png", ".st-key-pg_missing")
    _shot(page, shots, "truth-3c-true-target-line.png", ".st-key-pg_true_target")


PROGRESS = "[data-testid='stProgress']"  # the Batch page's progress bar, with the run's message
NOW = 30_000  # ms: reading an element that is on the page now (a finished run's bar goes: fail fast, not in LONG)
STEP_MESSAGE = re.compile(r"edit (\d+)/(\d+)(: judged)?")  # eval.runs: "edit 3/12: judged 40 probes" ends step 3


def _steps_done(message: str) -> tuple[int, int] | None:
    """(steps finished, steps in all) from a sequential run's progress message; None before its first edit
    ("predicting before any edit", "starting", "queued")."""
    match = STEP_MESSAGE.search(message)
    if match is None:
        return None
    step, total = int(match.group(1)), int(match.group(2))
    return (step if match.group(3) else step - 1), total


def _wait_for_steps(page, at_least: int, timeout_s: float) -> tuple[int, int]:
    """Poll the Batch page's progress bar (redrawn every second) until ``at_least`` steps are done."""
    deadline = time.perf_counter() + timeout_s
    while True:
        done = _steps_done(page.locator(PROGRESS).first.inner_text(timeout=LONG))
        if done is not None and done[0] >= at_least:
            return done
        assert time.perf_counter() < deadline, f"the run did not reach {at_least} step(s) in {timeout_s:g} s"
        page.wait_for_timeout(250)


def test_a_playground_edit_goes_through_while_another_session_runs_a_sequential_experiment(server, browser, shots):
    """Alice runs a sequential experiment on the Batch page; while it is still editing, Bob's Playground edit
    gets its result, then her run finishes with its whole curve. Bob's wait is printed, not asserted."""
    from playwright.sync_api import expect

    method, n_steps = preferred_method(), 12
    alice, bob = _open(browser, server, height=2400), _open(browser, server, height=1600)
    for page in (alice, bob):
        _pick_method(page, method)
    # Bob's first edit on the idle server: the method's caches (statistics, templates) are warm after it, so
    # his timed edit below measures the wait beside Alice's run, not a first use.
    bob_result = bob.locator(serving.RESULT)
    started = time.perf_counter()
    bob.get_by_role("button", name="Apply edit", exact=True).click()
    expect(bob_result).to_contain_text("after: Italy", timeout=LONG)
    idle_s = time.perf_counter() - started
    bob.wait_for_selector(serving.IDLE, timeout=LONG)
    computed_idle = bob.get_by_text("Computed in").first.inner_text().split(" · ")[0]

    _go(alice, "Batch & sequential")
    alice.get_by_role("button", name="Load data", exact=True).click()
    alice.get_by_text("Loaded: 16 case(s)").wait_for(timeout=LONG)
    alice.wait_for_selector(serving.IDLE, timeout=LONG)
    assert method in alice.locator("[data-testid='stMultiSelect']", has_text="Methods").inner_text()
    alice.get_by_text(MODE_SEQUENTIAL, exact=True).click()
    _fill(alice, "Sizes", str(n_steps))
    alice.get_by_role("button", name="Run", exact=True).click()
    first = _wait_for_steps(alice, 1, LONG / 1000)  # Bob edits while she edits, not while she predicts
    assert first[1] == n_steps, first
    alice_at_click = alice.locator(PROGRESS).first.inner_text(timeout=NOW)

    _fill(bob, "Prompt (with the subject)", "The capital of Japan is")
    _fill(bob, "Subject", "Japan")
    _fill(bob, "New target", "Berlin")
    _fill(bob, "True target (optional)", "Tokyo")
    started = time.perf_counter()
    bob.get_by_role("button", name="Apply edit", exact=True).click()
    expect(bob_result).to_contain_text("after: Berlin", timeout=LONG)
    busy_s = time.perf_counter() - started
    alice_message = alice.locator(PROGRESS).first.inner_text(timeout=NOW)  # at once: her page polls every 1 s
    alice.screenshot(path=str(shots / "busy-1-batch-while-playground-edit-lands.png"), full_page=True)
    bob.wait_for_selector(serving.IDLE, timeout=LONG)
    computed_busy = bob.get_by_text("Computed in").first.inner_text().split(" · ")[0]
    bob.screenshot(path=str(shots / "busy-2-playground-edit-beside-the-run.png"), full_page=True)
    done_then = _steps_done(alice_message)
    print(f"\n{method} Playground edit, click to result: {idle_s:.1f} s on the idle server ({computed_idle}), "
          f"{busy_s:.1f} s beside a sequential run ({computed_busy}); Alice's run at the click: {alice_at_click!r}, "
          f"at the result: {alice_message!r}")
    assert done_then is not None and 1 <= done_then[0] < done_then[1] == n_steps, alice_message
    assert "before the edit: Tokyo" in bob_result.inner_text()
    assert "Japan: Tokyo → Berlin" in bob.locator("[data-testid='stSidebar']").inner_text()

    # Alice's run goes on to its end and draws its whole curve: one point per edit in every panel.
    alice.get_by_text("Run ids in the store:").wait_for(timeout=LONG)
    alice.wait_for_selector(serving.IDLE, timeout=LONG)
    body = alice.inner_text("body")
    assert "The experiment was cancelled" not in body and "No step finished" not in body
    title = alice.locator(".js-plotly-plot .gtitle").first.text_content()
    assert "Metrics against the number of edits" in title and "so far" not in title, title
    first_trace = alice.locator(".js-plotly-plot .scatterlayer .trace").first
    assert first_trace.locator(".points path").count() == n_steps
    alice.screenshot(path=str(shots / "busy-3-batch-run-finished.png"), full_page=True)
