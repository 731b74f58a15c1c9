"""Reading a file that may change while it is read: one open file, positional reads, identity checks.

A file is never memory-mapped here: a file that shrinks under a mapping kills the reading process
with SIGBUS, and one overwritten in place changes every array that views the mapping.  Instead each
read copies its bytes (``os.preadv``) into a new array and then checks the open file's identity
(device, inode, size, modification time) against the one it had when opened; ``check_path`` also
checks that the path still names that file (not one renamed over it).  Any difference, or a short
read, is one CorruptDataError naming the file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import CorruptDataError

__all__ = ["Identity", "StableFile"]

_READ_STEP = 1 << 30                # bytes per preadv call (Linux moves at most ~2 GiB per call)


class Identity(NamedTuple):
    """What tells a file and its contents apart cheaply: (device, inode, size in bytes, mtime in ns)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class StableFile:
    """A file opened once for reading; every read is an independent copy, checked against the
    file's identity at opening.

    expect: the Identity the file must have (a worker process reopening the file its parent
    opened); CorruptDataError if it differs.  OSError propagates from opening.
    """

    _fd: int | None = None

    def __init__(self, path: Path | str, expect: Identity | None = None):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            self.identity = Identity.of(os.fstat(self._fd))
            if expect is not None and self.identity != expect:
                raise self.changed()
        except BaseException:
            self.close()
            raise

    def changed(self) -> CorruptDataError:
        return CorruptDataError(f"{self.path}: the file changed while being read (replaced, written "
                                "to or truncated meanwhile)")

    @property
    def size(self) -> int:
        return self.identity.size

    def read(self, offset: int, n: int) -> np.ndarray:
        """n bytes from offset, as a new writeable uint8 array (checked: the file is unchanged)."""
        out = np.empty(n, np.uint8)
        self.read_into(offset, memoryview(out))
        return out

    def read_into(self, offset: int, view: memoryview) -> None:
        """len(view) bytes from offset into a writeable byte buffer (a NumPy array's, pinned host
        memory's); checked like read.  Safe to call from several threads at once."""
        fd, n = self._fd, len(view)
        if fd is None:
            raise CorruptDataError(f"{self.path}: the file is closed")
        if offset + n > self.identity.size:
            raise self.changed()
        got = 0
        while got < n:
            step = self._pread(fd, view[got:got + _READ_STEP], offset + got)
            if step <= 0:
                raise self.changed()
            got += step
        self.check()

    def _pread(self, fd: int, view: memoryview, offset: int) -> int:
        """Bytes read into view from offset, without moving a shared file position (preadv), or
        under a lock where the platform has no positional reads (Windows)."""
        if hasattr(os, "preadv"):
            return os.preadv(fd, [view], offset)
        with self._lock:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
            view[:len(data)] = data
            return len(data)

    def check(self) -> None:
        """CorruptDataError unless the open file still has its identity (size, mtime: not written)."""
        if self._fd is None or Identity.of(os.fstat(self._fd)) != self.identity:
            raise self.changed()

    def check_path(self) -> None:
        """CorruptDataError unless the path still names the open file, unchanged (not replaced by
        a rename, not written to)."""
        try:
            now = Identity.of(os.stat(self.path))
        except OSError:
            raise self.changed() from None
        if now != self.identity:
            raise self.changed()
        self.check()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> StableFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
