"""Byte ranges of one open file read ahead of their use: worker threads copy the next ranges out of
the file (``StableFile.read_into``: every read checked against the file's identity) and checksum
them (CRC-32) while the caller uses the ones before, with a bounded number of bytes read but not
yet taken.

Each range (a Span) is read in pieces of at most `piece` bytes, so one large range is read and
checksummed by several threads at once.  Pieces land either in an array of their span's own (the
caller takes whole spans: ``take_span``) or in a few staging buffers the caller provides, such as
pinned host memory that a GPU copies from (the caller takes pieces, in order, and releases each
buffer once nothing reads it any longer: ``take`` and ``release``).  Only the caller's thread
calls these methods; the workers only read and checksum.  ``close`` (or the with block's end)
cancels what has not started and waits for what has, so no read outlives the reader.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import crc32
from .stable_file import StableFile

__all__ = ["Span", "Piece", "Staging", "ReadAhead", "PIECE", "WINDOW", "default_workers"]

PIECE = 8 << 20            # bytes per read (and per staging buffer)
WINDOW = 64 << 20          # bytes read ahead of the caller, at most (one larger span alone)
_MAX_PENDING = 256         # pieces submitted at once, at most (many small spans)


def default_workers() -> int:
    """Reading threads per file: the machine's cores, at most 8 (a page-cache copy and a CRC-32
    run at several GB/s a thread: 8 keep pace with a GPU's host link)."""
    return max(1, min(8, os.cpu_count() or 1))


class Span(NamedTuple):
    """A byte range of the file: `size` bytes from `offset`; its first `crc_bytes` bytes are
    checksummed, starting from the CRC-32 value `seed` (zlib.crc32's second argument)."""

    offset: int
    size: int
    crc_bytes: int
    seed: int = 0


class Piece(NamedTuple):
    """Bytes start .. start + len(data) of span `index`, read.  crc: CRC-32 of their first
    crc_bytes bytes, from the span's seed for its first piece, from 0 for the others (``fold``
    joins them).  last: the span's last piece.  slot: the staging buffer holding them."""

    index: int
    start: int
    data: memoryview
    crc: int
    crc_bytes: int
    last: bool
    slot: int

    def fold(self, crc: int) -> int:
        """The span's CRC-32 so far (`crc`, over the pieces before this one) with this piece's."""
        return self.crc if self.start == 0 else crc32.combine(crc, self.crc, self.crc_bytes)


class Staging(NamedTuple):
    """Buffers that pieces are read into: `buffers` (writeable, `piece` bytes each, at least one);
    done(token) tells whether a use of a buffer that release() reported has finished, wait(token)
    waits for it (e.g. a CUDA event recorded after a copy from the buffer)."""

    buffers: Sequence[memoryview]
    done: Callable[[Any], bool]
    wait: Callable[[Any], None]


def _read(file: StableFile, view: memoryview, offset: int, crc_bytes: int, seed: int) -> int:
    file.read_into(offset, view)
    return zlib.crc32(view[:crc_bytes], seed) if crc_bytes else seed


class ReadAhead:
    """Spans of `file` read in order by `workers` threads, at most `window` bytes ahead of the
    caller (a span larger than that is read alone, once the caller waits for it) or, with
    `staging`, into its buffers.

    Errors of a read (CorruptDataError for a file changed meanwhile, OSError) are raised by the
    take that reaches its piece.
    """

    def __init__(self, file: StableFile, spans: Sequence[Span], *, window: int = WINDOW,
                 piece: int = PIECE, workers: int | None = None, staging: Staging | None = None):
        if piece < 1 or window < 1:
            raise ValueError("piece and window are positive byte counts")
        self.file, self.spans, self.window, self.piece = file, list(spans), window, piece
        self.staging = staging
        self._plan = self._pieces()
        self._next: tuple | None = None
        self._pending: collections.deque = collections.deque()
        self._arrays: dict[int, np.ndarray] = {}      # spans being read (without staging)
        self._ahead = 0                                 # their bytes
        self._free = collections.deque(range(len(staging.buffers))) if staging else None
        self._uses: dict[int, Any] = {}                 # staging buffer -> its last use's token
        self._pool = cf.ThreadPoolExecutor(max(1, workers or default_workers()),
                                           thread_name_prefix="ecf8-read")

    def _pieces(self):
        for index, s in enumerate(self.spans):
            start = 0
            while True:
                n = min(self.piece, s.size - start)
                last = start + n >= s.size
                yield index, start, n, max(0, min(n, s.crc_bytes - start)), s.seed if start == 0 else 0, last
                if last:
                    break
                start += n

    def _fill(self, waiting: bool = False) -> None:
        """Submit the next pieces while the window (or a free staging buffer) allows; a span larger
        than the window only once the caller waits for it (nothing else is read meanwhile)."""
        while len(self._pending) < _MAX_PENDING:
            if self._next is None:
                self._next = next(self._plan, None)
                if self._next is None:
                    return
            index, start, n, crc_bytes, seed, last = self._next
            slot = -1
            if self.staging is not None:
                if not self._free:
                    return
                slot = self._free[0]
                token = self._uses.get(slot)
                if token is not None and not self.staging.done(token):
                    if self._pending:
                        return                          # read on meanwhile; try again later
                    self.staging.wait(token)
                self._free.popleft()
                self._uses.pop(slot, None)
                view = self.staging.buffers[slot][:n]
            else:
                if start == 0:
                    size = self.spans[index].size
                    if self._ahead + size > self.window and (self._ahead or self._pending or not waiting):
                        return
                    self._arrays[index] = np.empty(size, np.uint8)
                    self._ahead += size
                view = memoryview(self._arrays[index])[start:start + n]
            future = self._pool.submit(_read, self.file, view, self.spans[index].offset + start,
                                       crc_bytes, seed)
            self._pending.append((Piece(index, start, view, 0, crc_bytes, last, slot), future))
            self._next = None

    def take(self) -> Piece | None:
        """The next piece, read and checksummed (None after the last); with staging, its buffer
        stays the caller's until release(piece)."""
        self._fill(waiting=True)
        if not self._pending:
            if self._next is not None:
                raise RuntimeError("every staging buffer is taken: release pieces before taking more")
            return None
        piece, future = self._pending.popleft()
        return piece._replace(crc=future.result())

    def release(self, piece: Piece, token: Any = None) -> None:
        """Give a piece's staging buffer back, for reuse once `token`'s use has finished."""
        if token is not None:
            self._uses[piece.slot] = token
        self._free.append(piece.slot)
        self._fill()

    def take_span(self) -> tuple[int, np.ndarray, int] | None:
        """(index, its bytes as a new uint8 array, CRC-32 of its first crc_bytes bytes from its
        seed) of the next span (None after the last); the array is the caller's (not counted in
        the window any longer)."""
        if self.staging is not None:
            raise ValueError("with staging buffers, take pieces")
        crc = 0
        while True:
            piece = self.take()
            if piece is None:
                return None
            crc = piece.fold(crc)
            if piece.last:
                array = self._arrays.pop(piece.index)
                self._ahead -= array.nbytes
                self._fill()
                return piece.index, array, crc

    def close(self) -> None:
        """Cancel the reads not started, wait for those running and for every staging buffer's
        last use."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._arrays.clear()
        if self.staging is not None:
            for token in self._uses.values():
                self.staging.wait(token)
            self._uses.clear()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
