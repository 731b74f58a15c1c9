"""Ctrl-C and SIGTERM around critical sections, and in worker processes.

``held()`` makes SIGINT/SIGTERM wait for the end of a block (a worker process started and
registered, a temporary file created and its clean-up armed), then act as they would have;
``worker_init(parent)`` is what every worker process runs first: Ctrl-C is left to the parent,
SIGTERM kills, and (Linux) the worker dies with the parent, whatever stops it, so that no worker
can outlive the command and wait for ever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

__all__ = ["STOP", "held", "worker_init", "worker_parent"]

STOP = {signal.SIGINT, signal.SIGTERM}
_PR_SET_PDEATHSIG = 1           # prctl(2), Linux: the signal this process gets when its parent ends


def worker_init(parent: int | None = None) -> None:
    """Workers leave Ctrl-C to the parent (which stops them), die on SIGTERM, and (Linux) die with
    the process that started them, `parent` (its pid; None: not checked), whatever stops it.  (The
    kernel's parent-death signal comes when the *thread* that started the worker ends: start
    workers from a thread that outlives them, as compress_file and gpu_pool do.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL))
    if parent is not None and os.getppid() != parent:          # it ended before that was set
        os._exit(1)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)     # held while the parent started us


def worker_parent() -> int | None:
    """The pid a worker of the default multiprocessing context has as its parent: ours (fork,
    spawn), or None (forkserver: the server's)."""
    import multiprocessing

    return None if multiprocessing.get_start_method() == "forkserver" else os.getpid()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block (say, a worker process started in it is
    registered with its pool, so that the pool can stop it), then act as they would have.

    Blocking them (pthread_sigmask) only covers this thread: the kernel gives a signal sent to the
    process to any thread that does not block it (tqdm's monitor thread, say), and Python then runs
    the handler in the main thread wherever it is, inside the block too.  So in the main thread the
    handlers are also swapped for one that only notes the signal; other threads never run handlers.
    (Blocking still matters: a worker started in the block inherits it until worker_init.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict[int, Any] = {}
    mask = None
    try:
        for s in sorted(STOP):
            previous[s] = signal.getsignal(s)
            signal.signal(s, lambda signum, frame: noted.append(signum))
        if hasattr(signal, "pthread_sigmask"):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
        yield
    finally:
        try:
            _restore(previous)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)      # (a pending signal acts here)
        if noted:
            _act(noted[0], previous[noted[0]])


def _restore(previous: dict[int, Any]) -> None:
    """Put signal handlers back; a signal coming in meanwhile runs its (noting or restored) handler,
    whose exception is raised once every handler is back."""
    error = None
    for s, handler in previous.items():
        handler = signal.SIG_DFL if handler is None else handler
        for _ in range(3):          # (each try first runs the handlers of signals come in)
            try:
                signal.signal(s, handler)
                break
            except BaseException as e:  # noqa: BLE001 - raised below
                error = error or e
    if error is not None:
        raise error


def _act(signum: int, handler: Any) -> None:
    """What a signal noted by held() would have done under `handler`."""
    if callable(handler):
        handler(signum, None)
    elif handler in (None, signal.SIG_DFL):
        signal.raise_signal(signum)
