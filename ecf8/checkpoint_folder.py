"""Compressed checkpoint folders, framework-neutral: the index of every tensor of a file or shard
folder from the headers alone, each file's tensors read one at a time, several files at once.
The framework adapters (``ecf8.torch.loading``) build on these."""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import CorruptDataError
from .safetensors_io import load_json, tensor_files

__all__ = ["index", "model_weight_files", "read_file", "read_files", "window_per_file"]

T = TypeVar("T")


def index(path: str | Path) -> tuple[list[Path], dict[str, tuple[str, tuple[int, ...], Path]]]:
    """(files, {name: (dtype name, shape, file)}) of an ecf8 checkpoint file or shard folder (the
    files ``model_weight_files`` picks), from the headers alone.  Raises CorruptDataError for a
    damaged file or a tensor in two files, UnsupportedError for a path that is no checkpoint."""
    from .compressed import inspect_file

    files = model_weight_files(Path(path))
    found: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for f in files:
        for r in inspect_file(f):
            if r.name in found:
                raise CorruptDataError(f"{path}: tensor {r.name!r} appears in two files")
            found[r.name] = (r.dtype, tuple(r.shape), f)
    return files, found


def model_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding a model's tensors: a file itself; in a folder with a
    ``*.safetensors.index.json`` at its top, the files that index names (as Transformers loads a
    sharded folder: other safetensors files, such as a consolidated copy beside the shards, are not
    read), else every safetensors file of the folder.  Raises UnsupportedError for an index naming
    a missing file or one outside the folder, CorruptDataError for an index that is no JSON."""
    path = Path(path)
    files = tensor_files(path)               # (checks that every index names existing shards)
    indexes = sorted(path.glob("*.safetensors.index.json")) if path.is_dir() else []
    if not indexes:
        return files
    named: dict[Path, None] = {}
    for f in indexes:
        for shard in load_json(f.read_bytes(), str(f))["weight_map"].values():
            named[path / shard] = None
    return list(named)


def read_file(path: Path, device: str, *, frames: bool = False, window: int | None = None
              ) -> Iterator[tuple[str, Any]]:
    """(name, value) of each tensor of one ecf8 checkpoint file, in data order, read ahead by
    worker threads (at most `window` bytes ahead, default ``compressed_stream.WINDOW``; each
    tensor checked before it is yielded).  device "cpu": every value a decoded NumPy array, or
    with frames=True each ECF8 frame as its checked bytes (not decoded); "cuda:N": ECF8 frames
    uploaded as stored and kept compressed there (a ``DeviceTensor``), other tensors decoded
    there (a ``CudaArray``)."""
    from .compressed_reader import iter_decoded
    from .compressed_stream import WINDOW

    items = iter_decoded(path, device, compressed=device != "cpu", frames=frames and device == "cpu",
                         window=window or WINDOW)
    try:
        for name, _, x in items:
            yield name, x
    finally:
        items.close()               # (its reads end here, not whenever it is collected)


def window_per_file(threads: int, files: int) -> int:
    """Bytes each file may read ahead when `threads` of `files` files are read at once: the one
    ``compressed_stream.WINDOW`` shared, so host memory stays bounded however many shards."""
    from .compressed_stream import WINDOW

    return WINDOW // max(1, min(threads, files))


def read_files(files: list[Path], read: Callable[[Path], Iterator[T]], threads: int) -> Iterator[T]:
    """What read(f) yields for every file f, up to `threads` files at once (each in its own thread:
    checksums and host-to-device copies overlap), at most 2 * threads items waiting; in any order.
    An exception of a reader is raised here."""
    threads = max(1, min(threads, len(files)))
    if threads == 1:
        for f in files:
            yield from read(f)
        return
    ready: queue.Queue = queue.Queue(2 * threads)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(f: Path) -> None:
        try:
            for item in read(f):
                if not put(item):
                    return
        except BaseException as e:              # handed to the consumer, raised there
            put(e)
        put(done)

    with cf.ThreadPoolExecutor(threads) as pool:
        for f in files:
            pool.submit(work, f)
        try:
            remaining = len(files)
            while remaining:
                item = ready.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
