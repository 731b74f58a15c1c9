"""Progress bars on stderr (tqdm), one per job, with an ETA over all of a job's files.

``_Progress(total, label, enabled)`` is what the checkpoint code uses per file.  Inside
``job(total, label)`` (opened by the command line over a multi-file job) every ``_Progress``
advances the job's single bar instead of drawing its own, so the ETA covers the whole job.
Bars are drawn only when stderr is a terminal, unless enabled says otherwise.  In a worker
process, ``relay(report)`` makes every ``_Progress`` report to the parent instead, which advances
its one bar (``ecf8.gpu_pool``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from tqdm import tqdm

__all__ = ["Bar", "job", "relay"]

_current: "Bar | _Relay | None" = None


class Bar:
    """A byte-counting bar: advance(amount, what) moves it and names the current file/tensor."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self._bar = tqdm(total=max(int(total), 1), desc=label, unit="B", unit_scale=True,
                         unit_divisor=1024, dynamic_ncols=True, leave=False, file=sys.stderr,
                         disable=not self.enabled, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                         "{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}] {postfix}")

    def advance(self, amount: int, what: str = "") -> None:
        """Count `amount` more bytes done; `what` names the tensor being worked on."""
        if self.enabled:
            if what:
                self._bar.set_postfix_str(what[-40:], refresh=False)
            self._bar.update(amount)

    def describe(self, label: str) -> None:
        """Name the file being worked on."""
        self._bar.set_description_str(label, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Progress:
    """A file's progress: its own bar, or the enclosing job's bar when one is open."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        job_bar = _current
        self._own = job_bar is None or enabled is False
        if self._own:
            self._bar = Bar(total, label, enabled)
        else:
            self._bar = job_bar
            job_bar.describe(label)

    @property
    def enabled(self) -> bool:
        """Whether anything is drawn (or relayed to a parent that draws)."""
        return self._bar.enabled

    def advance(self, amount: int, what: str = "") -> None:
        self._bar.advance(amount, what)

    def close(self) -> None:
        if self._own:
            self._bar.close()


@contextlib.contextmanager
def job(total: int, label: str, enabled: bool | None = None) -> Iterator[Bar]:
    """One bar over a whole job of `total` bytes; the files' _Progress bars feed it."""
    global _current
    previous = _current
    bar = Bar(total, label, enabled)
    _current = bar
    try:
        yield bar
    finally:
        _current = previous
        bar.close()


class _Relay:
    """The job's bar as a worker process sees it: each advance goes to the parent's bar."""

    enabled = True

    def __init__(self, report: Callable[[int, str], None]):
        self.report = report

    def advance(self, amount: int, what: str = "") -> None:
        self.report(int(amount), what[-40:])

    def describe(self, label: str) -> None:
        pass


def relay(report: Callable[[int, str], None]) -> None:
    """In a worker process: every _Progress from now on calls report(bytes, tensor name) instead of
    drawing, and the parent advances its one bar by what is reported."""
    global _current
    _current = _Relay(report)
