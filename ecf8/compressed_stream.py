"""A compressed checkpoint's tensors in data order, read ahead: worker threads read and checksum
the next tensors' stored bytes (``read_ahead``) while the caller decodes or uploads the current
one, with the bytes read ahead bounded (``window``, tens of MB a file).

Every tensor is checked before it is handed out, as ``PackedFile`` checks one read alone: its
stored checksum; an ECF8 frame's header, and its payload checksum from the same single pass over
the bytes (``crc32``); on the host, a decoded tensor's original checksum.  On a GPU a frame goes
up as it is stored (compressed), piece by piece from a few pinned staging buffers into the device
buffer it then lives in, and is handed out (a DeviceTensor, or decoded there just in time) once
its checksums hold and its copies are done; zstd and raw tensors are restored on the host and
uploaded.  A file changed meanwhile is a CorruptDataError (``StableFile``), raised before the
tensor read from it is handed out.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Iterator

import numpy as np

from . import crc32
from . import format as fmt
from .decoder_cpu import decode_frame
from .errors import CorruptDataError, ECF8Error
from .read_ahead import PIECE, WINDOW, ReadAhead, Staging

__all__ = ["tensors", "upload_array", "WINDOW"]

_DIRECT = 1 << 16          # payloads up to this many bytes, read in one piece, are checked directly


def tensors(p: Any, device: str = "cpu", *, compressed: bool = False, frames: bool = False,
            window: int = WINDOW, workers: int | None = None) -> Iterator[tuple[str, str, Any]]:
    """(name, dtype name, value) of every tensor of an open compressed file p (a ``PackedFile``),
    in data order.  device "cpu": NumPy arrays of the original dtype and shape, or with
    frames=True each ECF8 frame as its checked bytes; "cuda:N": ECF8 frames uploaded as stored,
    kept so (compressed=True: a DeviceTensor) or decoded there (a CudaArray), other tensors
    CudaArrays.  window: bytes read ahead at most (on a GPU, in pinned staging buffers);
    workers: reading threads (default ``read_ahead.default_workers``).  Raises CorruptDataError
    for a damaged tensor or a file changed meanwhile, before handing that tensor out."""
    names = p.names()
    spans = [p.span(name) for name in names]
    if device == "cpu":
        with ReadAhead(p.file, spans, window=window, piece=_piece(window), workers=workers) as ra:
            while (got := ra.take_span()) is not None:
                index, data, crc = got
                name = names[index]
                value = _host_value(p, name, data, crc, frames)
                del got, data                   # (not held while the caller uses the value)
                yield name, p.tensors[name].dtype, value
                del value
    else:
        yield from _to_gpu(p, names, spans, device, compressed, window, workers)
    p.file.check()              # (a write after the last read, while the caller took tensors)


def _piece(window: int) -> int:
    """Bytes per read: at least four reads in flight in a window."""
    return max(1 << 16, min(PIECE, window // 4))


def _host_value(p: Any, name: str, data: np.ndarray, crc: int, frames: bool) -> Any:
    p.check_stored(name, crc)
    if p.codecs[name][0] != "ecf8":
        return p.as_array(name, p.restored(name, data, crc))
    view = memoryview(data)
    frame = _frame(p, name, view, data.size, crc, bytes(view[-4:]), view)
    if frames:
        return data.tobytes()
    x = decode_frame(view, frame)
    p.original_bytes(name, x.reshape(-1).view(np.uint8))
    return x


def _frame(p: Any, name: str, head: Any, size: int, crc: int, tail: bytes, whole: Any = None) -> fmt.Frame:
    """A stored frame's header parsed and its payload checksum checked, from its header bytes,
    its size, the CRC-32 of all its bytes but the last 4 from the tensor's checksum seed and those
    last 4 (the payload CRC); whole: all its bytes, where the caller has them on the host."""
    try:
        frame = fmt.parse(memoryview(head), verify=False, size=size)
        end = size - 4
        if whole is not None and end - frame.payload_offset <= _DIRECT:
            fmt.verify_payload(whole, frame)
        else:                   # the payload's CRC from the whole's: one pass over the bytes
            seed = p.span(name).seed
            before = zlib.crc32(memoryview(head)[:frame.payload_offset], seed)
            payload = crc ^ crc32.shift(before ^ frame.payload_seed, end - frame.payload_offset)
            if payload != struct.unpack("<I", tail)[0]:
                raise CorruptDataError("payload checksum mismatch")
    except ECF8Error as e:
        raise type(e)(f"{p.path}: tensor {name!r}: {e}") from None
    p.check_frame(name, frame)
    return frame


def _to_gpu(p, names, spans, device, compressed, window, workers) -> Iterator[tuple[str, str, Any]]:
    """tensors() on a GPU: pieces read into pinned staging buffers (freed when the read-ahead has
    waited for their last copies), frames copied up as they are stored."""
    from . import gpu
    from .decoder_cuda import decode, resident

    cp = gpu.cupy()
    dev = gpu.device_id(device)
    piece = _piece(window)
    with cp.cuda.Device(dev):
        arrays, addresses = gpu.pinned_buffers(max(2, window // piece), piece)
    staging = Staging([memoryview(a) for a in arrays], lambda e: e.done, lambda e: e.synchronize())
    with ReadAhead(p.file, spans, window=window, piece=piece, workers=workers, staging=staging) as ra:
        for name, span in zip(names, spans):
            t = p.tensors[name]
            with cp.cuda.Device(dev):             # (not across the yield: the caller's device stays)
                if p.codecs[name][0] == "ecf8":
                    value = _upload_frame(p, name, ra, addresses, span.size, dev, resident)
                    if not compressed:
                        value = decode(value, f"cuda:{dev}")
                else:
                    data, crc = _gather(ra, span.size)
                    p.check_stored(name, crc)
                    value = upload_array(p.as_array(name, p.restored(name, data, crc)), f"cuda:{dev}")
                    del data                    # (not held while the caller uses the value)
            yield name, t.dtype, value
            del value


def _gather(ra: ReadAhead, size: int) -> tuple[np.ndarray, int]:
    """The next span's bytes copied out of the staging buffers, and its CRC-32."""
    data, crc = np.empty(size, np.uint8), 0
    while True:
        piece = ra.take()
        data[piece.start:piece.start + len(piece.data)] = piece.data
        ra.release(piece)
        crc = piece.fold(crc)
        if piece.last:
            return data, crc


def _upload_frame(p, name: str, ra: ReadAhead, addresses: list[int], size: int, dev: int, resident):
    """The next span, an ECF8 frame, copied piece by piece from the staging buffers into a new
    device buffer on the current stream (each buffer reused once its copy is done), checked, and
    made a DeviceTensor once every copy has finished."""
    from . import gpu

    cp = gpu.cupy()
    st = cp.cuda.get_current_stream()
    buf = cp.empty(size, np.uint8)
    head, need, tail, crc, event = bytearray(), 0, b"", 0, None
    try:
        while True:
            piece = ra.take()
            n = len(piece.data)
            if piece.start == 0:
                try:
                    need = fmt.header_size(piece.data)
                except ECF8Error as e:
                    raise type(e)(f"{p.path}: tensor {name!r}: {e}") from None
            if len(head) < need:
                head += piece.data[:need - len(head)]
            tail = (tail + bytes(piece.data[-4:]))[-4:]
            if n:
                cp.cuda.runtime.memcpyAsync(buf.data.ptr + piece.start, addresses[piece.slot], n,
                                            cp.cuda.runtime.memcpyHostToDevice, st.ptr)
            event = cp.cuda.Event(block=False, disable_timing=True)
            event.record(st)
            ra.release(piece, event)
            crc = piece.fold(crc)
            if piece.last:
                break
        p.check_stored(name, crc)
        frame = _frame(p, name, bytes(head), size, crc, tail)
        event.synchronize()                       # on the device before anyone can use it
        return resident(frame, dev, buf)
    except BaseException:
        st.synchronize()                          # no copy into buf still running when it is freed
        raise


def upload_array(x: np.ndarray, device: str) -> Any:
    """A host array uploaded to a GPU as it is: a CudaArray of its element bits."""
    from . import gpu
    from .decoder_cuda import CudaArray

    cp = gpu.cupy()
    with cp.cuda.Device(gpu.device_id(device)):
        bits = gpu.upload(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
        if x.size:
            bits = bits.view(f"u{x.dtype.itemsize}")
    return CudaArray(bits, x.dtype, x.shape)
