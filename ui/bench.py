"""The dashboard's benchmark: how long a person waits in a real browser.

    python -m ui.bench [--markdown docs/benchmark-ui.md] [--model demo] [--method ROME]

Starts ``streamlit run app.py`` on a free port, opens it in headless Chromium (Debian's package,
driven by Playwright) and times the server's start, the Playground's first render, the first
edit's result and the Scope map's first render. The core's figures (edit latency, scaling,
targets) are :mod:`eval.bench`; this one needs the UI, so it lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from editing.methods import available_methods, get_method
from editing.storage.files import atomic_write_text
from eval.bench.common import describe_machine, machine_info, reason_of
from ui.browser import CHROMIUM, IDLE, RESULT, free_port, server_unavailable_reason, streamlit_server, wait_healthy


def bench_time_to_first_result(timeout_s: float = 240.0, method: str | None = "ROME",
                               model: str = "demo") -> dict[str, Any]:
    """Seconds from starting the server to the Playground showing an edit's result.

    Starts ``streamlit run app.py`` (the demo model is cached, as for a returning user), opens it
    in headless Chromium, picks ``method`` in the sidebar when it is registered (else keeps the
    app's default), applies the Playground's pre-filled fact and waits for the result panel.
    Then opens the Scope map and waits for its plot. Returns ``status`` and, when it ran,
    ``server_up_s`` (health check answers), ``page_ready_s`` (Playground rendered),
    ``first_result_s`` (the edit's result shown), ``method``, ``scope_map_s`` (from the click on
    "Scope map" to its plot drawn) and ``scope_map_after_start_s``. ``model`` picks the app's model
    (``$EDITSCOPE_DEFAULT_MODEL``; default: the demo model, as the figures in the README).
    """
    reason = server_unavailable_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    import tempfile

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout_ms = int(timeout_s * 1000)
    result: dict[str, Any] = {"status": "error"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        started = time.perf_counter()
        proc = stack.enter_context(streamlit_server(port, {"EDITSCOPE_RUN_STORE": str(Path(tmp) / "runs.sqlite"),
                                                           "EDITSCOPE_DEFAULT_MODEL": model}))
        try:
            wait_healthy(url, proc, started + timeout_s)
            result["server_up_s"] = time.perf_counter() - started
            pw = stack.enter_context(sync_playwright())
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            stack.callback(browser.close)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(url, timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            apply_button = page.get_by_role("button", name="Apply edit").first
            apply_button.wait_for(timeout=timeout_ms)
            result["page_ready_s"] = time.perf_counter() - started
            result["method"] = _pick_method(page, method, timeout_ms)
            apply_button.click()
            page.locator(RESULT).wait_for(timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            result["first_result_s"] = time.perf_counter() - started
            # The Scope map's first render after the server started (UMAP's compilation is warmed in the
            # background at start-up, app.py): from the click in the navigation to the plot drawn.
            clicked = time.perf_counter()
            page.locator("[data-testid='stSidebarNavLink']", has_text="Scope map").click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=timeout_ms)
            page.wait_for_selector(IDLE, timeout=timeout_ms)
            result["scope_map_s"] = time.perf_counter() - clicked
            result["scope_map_after_start_s"] = time.perf_counter() - started
            result["status"] = "ok"
        except (PlaywrightError, RuntimeError, TimeoutError) as err:
            result["reason"] = reason_of(err)
    return result


def _pick_method(page: Any, method: str | None, timeout_ms: int) -> str:
    """Choose ``method`` in the sidebar's picker when it is offered; returns the method in use."""
    if method:
        box = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="Editing method")
        box.first.click()
        option = page.get_by_role("option", name=method, exact=True)
        if option.count():
            option.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_selector(IDLE, timeout=timeout_ms)
    # the sidebar shows the picked method's one-line summary (the picker's value is not page text)
    sidebar = page.locator("[data-testid='stSidebar']").inner_text()
    for name in available_methods():
        summary = get_method(name).summary.strip()
        if summary and summary[:80] in sidebar:
            return name
    return "?"


def server_markdown(server: dict[str, Any], machine: dict[str, Any]) -> str:
    """The time-to-first-result figures as a Markdown section."""
    lines = ["## Dashboard benchmark", "",
             "Regenerate with `python -m ui.bench --markdown docs/benchmark-ui.md`.", "",
             f"Measured on: {describe_machine(machine)}.", "",
             "### Time to first result in the Playground", ""]
    if server.get("status") == "ok":
        lines.append(f"From `streamlit run app.py` to the server answering: {server['server_up_s']:.1f} s; to the "
                     f"Playground rendered: {server['page_ready_s']:.1f} s; to the first edit's result shown "
                     f"({server['method']}, the pre-filled fact): {server['first_result_s']:.1f} s "
                     f"(headless Chromium, model cached on disk). Then the Scope map's first render: "
                     f"{server['scope_map_s']:.1f} s from the click ({server['scope_map_after_start_s']:.1f} s "
                     f"after the server started; goal ≤ 10 s on an idle machine).")
    else:
        lines.append(f"Not measured ({server.get('status', 'not run')}: {server.get('reason', '')}).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ui.bench``; prints the section, writes it with ``--markdown``."""
    parser = argparse.ArgumentParser(prog="python -m ui.bench", description="Time to first result in a browser.")
    parser.add_argument("--model", default="demo", help="the app's model (default: the demo model)")
    parser.add_argument("--method", default="ROME", help="method picked in the sidebar (default ROME)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each phase")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown section here")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    server = bench_time_to_first_result(args.timeout, args.method, args.model)
    text = server_markdown(server, machine_info(torch.device("cpu")))
    print(text)
    for path, content in ((args.markdown, text), (args.json, json.dumps(server, indent=1))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, content)
    return 0 if server.get("status") in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
