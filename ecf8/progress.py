"""Progress bars on stderr (tqdm), one per job, with an ETA over all of a job's files.

``_Progress(total, label, enabled)`` is what the checkpoint code uses per file.  Inside
``job(total, label)`` (opened by the command line over a multi-file job) every ``_Progress``
advances the job's single bar instead of drawing its own, so the ETA covers the whole job.
Bars are drawn only when stderr is a terminal, unless enabled says otherwise.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from tqdm import tqdm

__all__ = ["Bar", "job"]

_current: "Bar | None" = None


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
            job_bar._bar.set_description_str(label, refresh=False)

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
