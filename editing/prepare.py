"""`python -m editing.prepare`: build every cached model the app and the tests need, up front.

The README's test command runs this before pytest, so no test ever waits for a model build under
its timeout, and a person sees one progress bar per step with what it waits for. Each step is
idempotent: a second run finds the caches and takes about a second.

Steps: the demo model (unpacked from the shipped weights, or trained when its data changed) and
every installed pretrained model (converted once into a plain safetensors folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from editing.storage.buildonce import ProgressFn

Step = tuple[str, Callable[[ProgressFn], object]]


@contextmanager
def progress_bar(title: str) -> Iterator[ProgressFn]:
    """A text progress bar on stderr (one line, redrawn) fed by ``(fraction, message)`` calls."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=title, unit="‰", bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {postfix}",
               file=sys.stderr)

    def report(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(1.0, max(0.0, fraction)))
        bar.set_postfix_str(message[:90], refresh=True)

    try:
        yield report
    finally:
        bar.close()


def model_is_prepared(spec: str) -> bool:
    """Whether loading ``spec`` needs no build or conversion first (always True for plain folders/ids)."""
    from editing.models.demo import demo_is_built
    from editing.models.pretrained import PRETRAINED_NAMES, is_converted

    if spec == "demo":
        return demo_is_built()
    if spec in PRETRAINED_NAMES:
        return is_converted(spec)
    return True


def prepare_model(spec: str, progress: ProgressFn | None = None) -> Path | None:
    """The cached folder of ``"demo"`` or a pretrained short name, built or converted first if needed.

    While another process builds the same files, ``progress`` says so and relays that build's
    progress. None for local folders and Hugging Face ids (they load as they are).
    """
    from editing.models.demo import ensure_demo_model
    from editing.models.pretrained import PRETRAINED_NAMES, ensure_pretrained

    if spec == "demo":
        return ensure_demo_model(progress=progress)
    if spec in PRETRAINED_NAMES:
        return ensure_pretrained(spec, progress=progress)
    return None


def steps() -> list[Step]:
    """The preparation steps, in order."""
    from editing.models.pretrained import available_pretrained

    return [(title, lambda report, spec=spec: prepare_model(spec, report))
            for title, spec in [("demo model", "demo"), *((name, name) for name in available_pretrained())]]


def main(argv: list[str] | None = None) -> int:
    """Run every preparation step; print each one's time. Exit status 1 when a step fails."""
    parser = argparse.ArgumentParser(prog="python -m editing.prepare", description=main.__doc__)
    parser.add_argument("--demo-only", action="store_true", help="prepare the demo model only")
    args = parser.parse_args(argv)
    todo = steps()[:1] if args.demo_only else steps()
    for index, (title, run) in enumerate(todo, start=1):
        started = time.perf_counter()
        try:
            with progress_bar(f"[{index}/{len(todo)}] {title}") as report:
                run(report)
        except Exception as err:  # report which step failed and why, then stop with an error status
            print(f"[{index}/{len(todo)}] {title}: FAILED — {err}", file=sys.stderr)
            return 1
        print(f"[{index}/{len(todo)}] {title}: ready in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
