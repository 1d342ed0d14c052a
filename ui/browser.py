"""Serving the dashboard to a headless browser: the Streamlit server, its health check and the page
states the UI benchmark (ui.bench), the browser tests and the fresh-machine check wait for.

Standard library only, so ``scripts/fresh-check`` can use it on a machine where nothing is installed yet.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"  # Debian's package: playwright cannot download browsers here


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``streamlit run app.py`` headless on ``port`` for the duration of the block."""
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def server_unavailable_reason() -> str | None:
    """Why the server benchmark cannot run here, or None."""
    if not (ROOT / "app.py").exists():
        return "app.py not found"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (make browser installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"  # a Streamlit page done running
RESULT = ".st-key-pg_edit_result"  # the Playground's result panel


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> None:
    """Return once the Streamlit server at ``url`` answers its health check; raise
    ``RuntimeError`` if it exits first, ``TimeoutError`` after ``deadline`` (``perf_counter``)."""
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-400:] if proc.stderr else ""
            raise RuntimeError(f"streamlit exited: {err}")
        if time.perf_counter() > deadline:
            raise TimeoutError("the server never answered its health check")
        time.sleep(0.2)
