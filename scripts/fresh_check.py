"""Try EditScope as a newcomer on a fresh machine, and time each phase.

Clones the committed repository into a temporary folder (with ``../shared`` beside it, as CI has),
points ``EDITSCOPE_CACHE`` at an empty folder, starts CPU-bound background processes (two by
default: a busy shared machine; ``--burners 0`` for an idle one), runs the README's test command
(``make test``), then the README's app command (``make run``) and waits in headless Chromium until
the Playground is ready to take an edit. Prints each phase's wall time; exits non-zero when a
phase fails. Run it from anywhere inside the repository: ``scripts/fresh-check [--burners N]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ui.browser import CHROMIUM, IDLE, free_port, wait_healthy  # noqa: E402  (standard library only: nothing is installed yet)

BURN = "while True:\n    pass\n"


def start_burners(n: int) -> list[subprocess.Popen]:
    """``n`` busy-looping Python processes, each keeping one core at 100 %."""
    return [subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_phase(name: str, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[bool, float]:
    """Run ``command`` to completion with its output in ``log``; (succeeded, seconds)."""
    print(f"== {name}: {' '.join(command)} (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    print("   " + "\n   ".join(tail), flush=True)
    return code == 0, seconds


def playground_ready(clone: Path, env: dict[str, str], log: Path, timeout_s: float) -> tuple[bool, float, str]:
    """Start ``make run`` and wait in Chromium until the Playground shows its Apply button."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"== app: make run PORT={port} (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=clone, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, server, started + timeout_s)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            remaining_ms = int(max(1.0, timeout_s - (time.perf_counter() - started)) * 1000)
            page.goto(url, timeout=remaining_ms)
            page.get_by_role("button", name="Apply edit").first.wait_for(timeout=remaining_ms)
            page.wait_for_selector(IDLE, timeout=remaining_ms)
            seconds = time.perf_counter() - started
            shot = log.with_suffix(".png")
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        return True, seconds, f"screenshot {shot}"
    except Exception as err:  # any failure of the phase is reported, not raised
        return False, time.perf_counter() - started, f"{type(err).__name__}: {err}"
    finally:
        stop([server])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fresh-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--burners", type=int, default=2, help="CPU-bound background processes (default 2)")
    parser.add_argument("--skip-tests", action="store_true", help="only time the app's first start")
    parser.add_argument("--app-timeout", type=float, default=1800.0, help="seconds to wait for the Playground")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="editscope-fresh-"))
    clone = work / "editscope"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared)
    env = {**os.environ, "EDITSCOPE_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("EDITSCOPE_DEFAULT_MODEL", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True).stdout.strip()
    print(f"fresh clone of {commit} in {clone}; EDITSCOPE_CACHE={env['EDITSCOPE_CACHE']} (empty); "
          f"{args.burners} CPU-bound background process(es); {os.cpu_count()} cores", flush=True)

    burners = start_burners(args.burners)
    rows: list[tuple[str, bool, float, str]] = []
    try:
        if not args.skip_tests:
            ok, seconds = run_phase("make test", ["make", "test"], clone, env, work / "make-test.log")
            rows.append(("make test (install, prepare, lint, pytest)", ok, seconds, str(work / "make-test.log")))
        ok, seconds, detail = playground_ready(clone, env, work / "make-run.log", args.app_timeout)
        rows.append(("make run until the Playground is ready", ok, seconds, detail))
    finally:
        stop(burners)
    print(f"\nphase times ({args.burners} CPU-bound background process(es)):")
    for name, ok, seconds, detail in rows:
        print(f"  {'ok  ' if ok else 'FAIL'} {seconds:8.1f} s  {name}  [{detail}]")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
