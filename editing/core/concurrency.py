"""Sharing one model between interactive sessions and background work on few cores.

Two findings drive this module (measured on the shared 2-core machine): a torch computation with
two intra-op threads runs up to 7× slower than with one when another CPU-bound process competes
(OpenMP threads spin and wait on each other), and Python's locks are not fair — a background run
that releases the model's lock between steps and takes it straight back can starve a person's
interactive edit for the whole run.

* :func:`configure_threads` sets the process's intra-op threads to the cores per concurrent job
  (one on a 2-core machine serving an interactive edit beside a background run), unless
  ``EDITSCOPE_THREADS`` says otherwise. Set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported
  (app.py does) so idle OpenMP threads sleep instead of spinning.
* :class:`PriorityLock` is the model handle's lock: reentrant like ``threading.RLock``, but a
  thread inside :func:`background_priority` does not take it while an interactive thread waits,
  so an interactive edit waits for at most one step of a background run; an interactive flow that
  takes the lock several times (predictions, the edit, predictions again) holds
  :meth:`PriorityLock.claim` around them, so a background run does not slip a step in between.
* :func:`background_priority` also lowers the OS scheduling priority (``nice``) of the thread
  running it, so the work it does outside the lock yields the cores to interactive requests.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

#: overrides the intra-op thread count chosen by :func:`configure_threads`
THREADS_ENV = "EDITSCOPE_THREADS"
#: how much lower a background thread's OS priority is (a nice increment)
BACKGROUND_NICE = 10

_local = threading.local()


def is_background() -> bool:
    """Whether the calling thread runs background work (inside :func:`background_priority`)."""
    return bool(getattr(_local, "background", 0))


@contextlib.contextmanager
def background_priority() -> Iterator[None]:
    """Run the block as background work: it yields the model lock to interactive threads and runs
    at a lower OS priority (Linux schedules threads separately; elsewhere only the lock rule holds)."""
    _local.background = getattr(_local, "background", 0) + 1
    native = threading.get_native_id()
    previous = None
    with contextlib.suppress(OSError, AttributeError):
        previous = os.getpriority(os.PRIO_PROCESS, native)
        os.setpriority(os.PRIO_PROCESS, native, min(19, previous + BACKGROUND_NICE))
    try:
        yield
    finally:
        _local.background -= 1
        if previous is not None:
            # Raising a priority back needs privileges an unprivileged server may lack: then the
            # thread stays niced, which only affects later background work on the same thread.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, native, previous)


class PriorityLock:
    """A reentrant lock that interactive threads get before background ones.

    A thread inside :func:`background_priority` waits while any interactive thread is waiting;
    interactive threads take the lock as soon as it is free. Re-entry by the owner always
    succeeds. Use it as ``with lock:``, like ``threading.RLock``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._interactive_waiting = 0
        self._claims = 0  # interactive flows in progress (see claim)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (see the class docstring for who goes first); False on timeout."""
        me = threading.get_ident()
        background = is_background()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if not background:
                self._interactive_waiting += 1
            try:
                def free() -> bool:
                    return self._owner is None and (
                        not background or (self._interactive_waiting == 0 and self._claims == 0))

                if not blocking:
                    got = free()
                else:
                    got = self._cond.wait_for(free, None if timeout is None or timeout < 0 else timeout)
                if not got:
                    return False
                self._owner, self._depth = me, 1
                return True
            finally:
                if not background:
                    self._interactive_waiting -= 1

    def release(self) -> None:
        """Release one level of the lock; raises ``RuntimeError`` when the caller does not hold it."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a PriorityLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """Within the block, background threads do not take the lock, even while it is free.

        For an interactive flow that takes the lock several times (an edit's predictions before,
        the edit, the predictions after): measured in the browser, a background run otherwise took
        a step in each gap, and one Playground edit waited for several of its steps. Holding no
        lock itself, a claim never blocks; in a background thread it does nothing.
        """
        if is_background():
            yield
            return
        with self._cond:
            self._claims += 1
        try:
            yield
        finally:
            with self._cond:
                self._claims -= 1
                self._cond.notify_all()

    def locked(self) -> bool:
        return self._owner is not None

    def __enter__(self) -> PriorityLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def configure_threads(concurrent_jobs: int = 2) -> int:
    """Set torch's intra-op threads for a process that runs ``concurrent_jobs`` computations at once.

    ``$EDITSCOPE_THREADS`` wins when set; otherwise the cores are shared out (at least one thread
    each). Returns the thread count now in use.
    """
    import torch

    wanted = os.environ.get(THREADS_ENV, "").strip()
    if wanted:
        threads = max(1, int(wanted))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, concurrent_jobs))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
