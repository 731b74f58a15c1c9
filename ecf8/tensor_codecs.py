"""Per-tensor compression for compressed checkpoints: which codec each tensor is stored with (an ECF8
frame, zstandard, or its bytes), its checksums (FORMAT.md section 9), and a file's tensors
compressed in data order by worker processes (CPU) or overlapping threads (GPU), every byte read
through one open file (``stable_file``: no memory map; a file changed meanwhile is refused)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from . import encoder
from . import format as fmt
from .errors import ECF8Error
from .safetensors_io import DTYPE_NAMES, Layout, Tensor
from .signals import held, worker_init, worker_parent
from .stable_file import Identity, StableFile

__all__ = ["choose_codec", "checksum", "checksum_seed", "stored_checksum", "compress_tensors", "daemonic",
           "CODED", "ZSTD_LEVEL", "INLINE"]

CODED = fmt.CODED_NAMES       # dtype names stored as ECF8 frames
ZSTD_LEVEL = 19
INLINE = 1 << 16             # smaller tensors are compressed in the calling process (bytes)


def checksum(t: Tensor, data) -> int:
    """crc32 of a tensor's bytes, seeded with the crc32 of "name NUL dtype NUL d0,d1,..." (UTF-8)."""
    return zlib.crc32(data, checksum_seed(t))


def checksum_seed(t: Tensor) -> int:
    """The starting value of a tensor's checksums: crc32 of "name NUL dtype NUL d0,d1,..." (UTF-8)."""
    seed = f"{t.name}\0{t.dtype}\0{','.join(map(str, t.shape))}".encode("utf-8", "surrogatepass")
    return zlib.crc32(seed)


def choose_codec(dtype_name: str, shape: tuple, raw: np.ndarray, options: dict
                 ) -> tuple[str, bytes | None]:
    """(codec, payload) that compress stores a tensor as, from its dtype name, shape and bytes
    (uint8, C order); payload None means 'store unchanged'.  options: ``ecf8.encode``'s, plus
    ``zstd_level`` (default ZSTD_LEVEL).  ``ecf8 analyze`` calls this too, so its verdicts are
    what compress does."""
    options = dict(options)
    level = options.pop("zstd_level", ZSTD_LEVEL)
    device = options.pop("device", "cpu")
    raw = raw.reshape(-1)
    if dtype_name in CODED and raw.size and len(shape) <= fmt.MAX_NDIM:     # (more dims: zstd/raw)
        x = raw.view(DTYPE_NAMES[dtype_name]).reshape(shape)
        blob = encoder.encode(x, **options) if device == "cpu" else _encode_on_gpu(x, device, options)
        if len(blob) < raw.size:
            return "ecf8", blob
    if raw.size >= 64:
        packed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw.data)
        if len(packed) <= raw.size - raw.size // 16:
            return "zstd", packed
    return "none", None


def _encode_on_gpu(x: np.ndarray, device: str, options: dict) -> bytes:
    """The frame ``encoder.encode(x)`` makes, encoded by the CUDA encoder on `device`."""
    from . import encoder_cuda, gpu

    cupy = gpu.cupy()
    bits = x.view(np.uint8 if x.itemsize == 1 else np.uint16)
    try:
        with cupy.cuda.Device(gpu.device_id(device)):
            return encoder_cuda.encode_to_bytes(cupy.asarray(bits), dtype=x.dtype, **options)
    except cupy.cuda.memory.OutOfMemoryError as e:
        raise ECF8Error(f"out of GPU memory on {device} ({e})") from None


def stored_checksum(t: Tensor, data) -> int:
    """checksum of the stored bytes but their last 4.  (An ECF8 frame ends with a CRC-32 that runs
    over all of it before: a CRC-32 over the whole frame would then be one constant for every valid
    frame of a length, and could not tell two tensors' frames apart.)"""
    return checksum(t, memoryview(data).cast("B")[:-4])


def _compress_one(t: Tensor, raw: np.ndarray, options: dict) -> tuple[str, bytes | None, int, int]:
    """(codec, payload, crc, stored crc) of one tensor from its raw bytes (uint8); payload None:
    stored unchanged."""
    try:
        codec, payload = choose_codec(t.dtype, t.shape, raw, options)
    except ECF8Error as e:
        raise type(e)(f"tensor {t.name!r}: {e}") from None
    crc = checksum(t, raw)
    return codec, payload, crc, stored_checksum(t, raw if payload is None else payload)


def _worker(path: str, identity: Identity, start: int, t: Tensor, options: dict
            ) -> tuple[str, bytes | None, int, int]:
    """_compress_one in a worker process, on this tensor's bytes read from the file the parent opened
    (checked by identity: CorruptDataError if `path` now names another file, or it changed)."""
    with StableFile(path, identity) as f:
        raw = f.read(start + t.begin, t.nbytes)
    return _compress_one(t, raw, options)


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Kill a pool's workers at once, and let its manager thread end: a worker killed while sending
    a result leaves half a message in the result pipe, and the thread would wait for the rest for
    ever (hanging the interpreter's exit) unless the pipe's last writer, ours, is closed.  A second
    Ctrl-C waits for the end (every wait here is bounded)."""
    with held():
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            p.kill()
        for p in procs:
            p.join(5)
        writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
        if writer is not None:
            writer.close()
        pool.shutdown(wait=False, cancel_futures=True)


def compress_tensors(src: Path, layout: Layout, jobs: int, options: dict,
                     raws: list[np.ndarray] | None = None, source: StableFile | None = None
                     ) -> Iterator[tuple]:
    """_compress_one of each tensor of the file src, in data order, read through `source` (src
    opened once; worker processes check they reopen that same file); raws: the tensors' bytes
    (uint8, one array per tensor of layout, in data order) instead of a file's, compressed in this
    process.  With jobs > 1, tensors of INLINE bytes or more go to worker processes, at most
    2 * jobs in flight (on a GPU: 4, whatever jobs); if the consumer stops early (an error, Ctrl-C,
    SIGTERM), the workers are killed at once.  A daemonic process (a worker of another pool), which
    may start no processes, compresses every tensor itself."""
    def raw(i: int, t: Tensor) -> np.ndarray:
        return raws[i] if raws is not None else source.read(layout.data_start + t.begin, t.nbytes)

    if raws is not None:
        jobs = 1
    on_gpu = options.get("device", "cpu") != "cpu"
    big = jobs > 1 and any(t.nbytes >= INLINE for t in layout.tensors) and not daemonic()
    pool = cf.ProcessPoolExecutor(jobs, initializer=worker_init, initargs=(worker_parent(),)) \
        if big and not on_gpu else None
    # On a GPU: tensors are read, encoded and written in overlapping threads (no worker processes).
    threads = cf.ThreadPoolExecutor(2) if on_gpu else None
    depth = 4 if on_gpu else 2 * jobs
    window: collections.deque = collections.deque()
    try:
        for i, t in enumerate(layout.tensors):
            if threads is not None:
                window.append(threads.submit(_compress_one, t, raw(i, t), options))
            elif pool is not None and t.nbytes >= INLINE:
                with held():
                    window.append(pool.submit(_worker, str(source.path), source.identity,
                                              layout.data_start, t, options))
            else:
                window.append(cf.Future())
                window[-1].set_result(_compress_one(t, raw(i, t), options))
            if len(window) >= depth:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
        if pool is not None:
            pool.shutdown()                     # (an interrupt here too must stop the workers)
    except BrokenProcessPool:
        raise ECF8Error(f"{src}: a worker process died (out of memory? try fewer jobs)") from None
    except BaseException:
        if pool is not None:
            _stop(pool)
        raise
    finally:
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)


def daemonic() -> bool:
    """Whether this is a daemonic process (which multiprocessing forbids to start processes)."""
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)
