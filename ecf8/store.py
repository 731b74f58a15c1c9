"""Compressed checkpoints: safetensors files whose float tensors are ECF8 frames.

A compressed file is itself valid safetensors.  FP8/BF16/FP16 tensors are stored as ``U8`` entries
holding one ECF8 frame; other tensors are zstandard frames (``U8``) where that saves at least 1/16
of their bytes, else kept unchanged.  ``__metadata__["ecf8"]`` is a JSON object
``{"format": "ecf8.safetensors", "version": 1, "tensors": {name: [codec, dtype, shape]}}`` with
codec ``ecf8``, ``zstd`` or ``none``; the original ``__metadata__`` keys are kept beside it.

Writing streams tensor by tensor from a memory map through a bounded pool of worker processes, into
a temporary file renamed only on success.  The header is reserved at its largest possible size and
filled in last, padded with spaces as the safetensors format allows.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zstandard

from . import api, encoder
from .checkpoint import (DTYPE_NAMES, atomic_file, iter_tensors, nbytes_of, read_header,
                         read_header_text, tensor_files)
from .errors import CorruptDataError, ECF8Error, UnsupportedError
from .progress import _Progress

__all__ = ["save_file", "load_file", "compress_file", "decompress_file", "inspect_file",
           "verify_file", "compress_path", "decompress_path", "TensorInfo"]

CODED = {"F8_E4M3", "F8_E5M2", "BF16", "F16"}
META_KEY = "ecf8"
ZSTD_LEVEL = 19
BIG = 10**20          # larger than any data offset: reserves the widest header


def choose_codec(dtype_name: str, shape: tuple, raw: np.ndarray, options: dict
                 ) -> tuple[str, bytes | None]:
    """(codec, payload) that compress stores a tensor as, from its dtype name, shape and bytes
    (uint8, C order); payload None means 'store unchanged'.  options: ``ecf8.encode``'s, plus
    ``zstd_level`` (default ZSTD_LEVEL).  ``ecf8 analyze`` calls this too, so its verdicts are
    what compress does."""
    options = dict(options)
    level = options.pop("zstd_level", ZSTD_LEVEL)
    raw = raw.reshape(-1)
    if dtype_name in CODED and raw.size:
        blob = encoder.encode(raw.view(DTYPE_NAMES[dtype_name]).reshape(shape), **options)
        if len(blob) < raw.size:
            return "ecf8", blob
    if raw.size >= 64:
        packed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw.data)
        if len(packed) <= raw.size - raw.size // 16:
            return "zstd", packed
    return "none", None


def _compress_one(dtype_name: str, x: np.ndarray, options: dict) -> tuple[str, bytes | None]:
    """(codec, payload) for one tensor; payload None means 'store unchanged'."""
    return choose_codec(dtype_name, x.shape, x.reshape(-1).view(np.uint8), options)


def _worker(path: str, dtype_name: str, shape: tuple, offset: int, options: dict
            ) -> tuple[str, bytes | None]:
    """_compress_one in a worker process, on a memory map of just this (validated) tensor."""
    if not nbytes_of(dtype_name, shape):
        return _compress_one(dtype_name, np.empty(shape, DTYPE_NAMES[dtype_name]), options)
    x = np.memmap(path, DTYPE_NAMES[dtype_name], "r", offset, shape)
    return _compress_one(dtype_name, x, options)


def _write_checkpoint(path: Path, entries: list[tuple[str, str, tuple, int]],
                      payloads: Iterator[tuple[str, str, tuple, Any]],
                      metadata: Callable[[], dict[str, str]]) -> None:
    """Write a safetensors file whose tensors arrive in order from `payloads`.

    entries: (name, dtype, shape, upper bound on stored bytes) of every tensor, in order: the header
    is reserved at the longest these allow and written last, with metadata() as __metadata__ (its
    length must not depend on what the payloads turn out to be).
    """
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    worst: dict[str, Any] = {"__metadata__": metadata()}
    for name, dtype, shape, bound in entries:
        kept = {"dtype": dtype, "shape": list(shape), "data_offsets": [BIG, BIG]}
        packed = {"dtype": "U8", "shape": [bound], "data_offsets": [BIG, BIG]}
        worst[name] = max(kept, packed, key=lambda v: len(dumps(v)))
    reserved = len(dumps(worst))
    reserved += -reserved % 8
    with atomic_file(path) as f:
        f.write(bytes(8 + reserved))
        head: dict[str, Any] = {}
        offset = 0
        for name, dtype, shape, data in payloads:
            view = data.reshape(-1).view(np.uint8).data if isinstance(data, np.ndarray) else memoryview(data)
            f.write(view)
            head[name] = {"dtype": dtype, "shape": list(shape),
                          "data_offsets": [offset, offset + view.nbytes]}
            offset += view.nbytes
        meta = metadata()
        text = dumps({"__metadata__": meta, **head} if meta else head)
        if len(text) > reserved:
            raise ECF8Error("internal error: safetensors header outgrew its reservation")
        f.seek(0)
        f.write(reserved.to_bytes(8, "little") + text + b" " * (reserved - len(text)))


def compress_file(src: Path, dst: Path, *, jobs: int | None = None, progress: bool | None = None,
                  **options) -> None:
    """Compress one safetensors file into a compressed (still safetensors) file.

    options go to ``ecf8.encode`` (chunk_size, max_tables).  jobs: worker processes (default:
    the machine's cores; 1 compresses in this process).  At most 2 * jobs tensors are in flight.
    """
    src, dst = Path(src), Path(dst)
    header, header_text = read_header_text(src)
    user_meta = dict(header.get("__metadata__") or {})
    if META_KEY in user_meta:
        raise UnsupportedError(f"{src} is already an ecf8-compressed checkpoint")
    entries = list(iter_tensors(src))       # validates every entry before any work
    jobs = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    # Codec names are all 4 characters, so the table's length is known before compressing.
    table = {e.name: ["none", e.dtype, list(e.shape)] for e in entries}
    bar = _Progress(sum(e.array.nbytes for e in entries), f"compress {src.name}", progress)

    def done() -> Iterator[tuple[Any, tuple[str, bytes | None]]]:
        if jobs == 1:
            for e in entries:
                yield e, _compress_one(e.dtype, e.array, options)
            return
        with cf.ProcessPoolExecutor(jobs) as pool:
            window: list = []
            for e in entries:
                window.append((e, pool.submit(_worker, str(src), e.dtype, e.shape, e.offset, options)))
                if len(window) >= 2 * jobs:
                    e0, fut = window.pop(0)
                    yield e0, fut.result()
            for e0, fut in window:
                yield e0, fut.result()

    def payloads():
        for e, (codec, payload) in done():
            table[e.name][0] = codec
            bar.advance(e.array.nbytes, e.name)
            if payload is None:
                yield e.name, e.dtype, e.shape, e.array
            else:
                yield e.name, "U8", (len(payload),), payload

    def metadata() -> dict[str, str]:
        info = {"format": "ecf8.safetensors", "version": 1, "tensors": table,
                "header": header_text.decode()}
        return dict(user_meta, **{META_KEY: json.dumps(info, separators=(",", ":"))})

    try:
        _write_checkpoint(dst, [(e.name, e.dtype, e.shape, _bound(e)) for e in entries], payloads(),
                          metadata)
    finally:
        bar.close()


def _bound(entry) -> int:
    """Largest bytes a tensor can take once stored (an ECF8 frame is never much above raw)."""
    return entry.array.nbytes + 4096 + 8 * len(entry.shape)


def _codec_table(path: Path, header: dict) -> dict[str, list]:
    meta = (header.get("__metadata__") or {}).get(META_KEY)
    if meta is None:
        raise UnsupportedError(f"{path}: not an ecf8-compressed checkpoint (no __metadata__['{META_KEY}'])")
    try:
        info = json.loads(meta)
        table = info["tensors"]
        assert info["format"] == "ecf8.safetensors" and info["version"] == 1 and isinstance(table, dict)
        assert isinstance(info.get("header", ""), str)
    except Exception:
        raise CorruptDataError(f"{path}: malformed __metadata__['{META_KEY}']") from None
    return table


def iter_decoded(path: Path, device: str = "cpu", compressed: bool = False
                 ) -> Iterator[tuple[str, str, Any]]:
    """(name, dtype name, tensor) of a compressed file, in data order, decoded one at a time.

    compressed=True yields ecf8 tensors as device-resident compressed tensors (``to_device``)
    instead, for just-in-time decoding (device must then be CUDA).
    """
    if compressed and device == "cpu":
        raise UnsupportedError("compressed=True keeps tensors compressed on a GPU: give device='cuda'")
    path = Path(path)
    header, _ = read_header(path)
    table = _codec_table(path, header)
    for entry in iter_tensors(path):
        codec, dtype, shape = table.get(entry.name, ["none", entry.dtype, list(entry.shape)])
        shape = tuple(shape)
        if codec == "ecf8":
            if compressed:
                from .decoder_cuda import to_device

                yield entry.name, dtype, to_device(entry.array, device)
                continue
            x = api.decode(entry.array, device=device)
            if x.dtype != DTYPE_NAMES[dtype] or x.shape != shape:
                raise CorruptDataError(f"{path}: tensor {entry.name!r} decodes to {x.dtype} {x.shape}, "
                                       f"the index says {dtype} {shape}")
        elif codec == "zstd":
            try:
                raw = zstandard.ZstdDecompressor().decompress(entry.array.data)
            except zstandard.ZstdError as e:
                raise CorruptDataError(f"{path}: tensor {entry.name!r}: {e}") from None
            want = nbytes_of(dtype, shape)
            if len(raw) != want:
                raise CorruptDataError(f"{path}: tensor {entry.name!r} has {len(raw)} bytes, needs {want}")
            x = _to_device(np.frombuffer(raw, DTYPE_NAMES[dtype]).reshape(shape), device)
        elif codec == "none":
            x = _to_device(entry.array, device)
        else:
            raise CorruptDataError(f"{path}: tensor {entry.name!r} has unknown codec {codec!r}")
        yield entry.name, dtype, x


def _to_device(x: np.ndarray, device: str):
    if device == "cpu":
        return x
    from .decoder_cuda import CudaArray, _cupy, _device_id

    cupy = _cupy()
    with cupy.cuda.Device(_device_id(device)):
        bits = cupy.asarray(x.reshape(-1).view(np.uint8)).view(f"u{x.dtype.itemsize}") if x.size else \
            cupy.empty(0, np.uint8)
    return CudaArray(bits, x.dtype, x.shape)


def decompress_file(src: Path, dst: Path, *, progress: bool | None = None) -> None:
    """Restore the original safetensors file: same names, dtypes, shapes and bytes."""
    src = Path(src)
    header, _ = read_header(src)
    table = _codec_table(src, header)
    user_meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != META_KEY}
    entries = []
    for e in iter_tensors(src):
        _, dtype, shape = table.get(e.name, ["none", e.dtype, list(e.shape)])
        entries.append((e.name, dtype, tuple(shape),
                        nbytes_of(dtype, shape)))
    bar = _Progress(sum(e[3] for e in entries), f"decompress {src.name}", progress)

    def payloads():
        for name, dtype, x in iter_decoded(src):
            bar.advance(x.nbytes, name)
            yield name, dtype, x.shape, x
    original = json.loads(header["__metadata__"][META_KEY]).get("header")
    try:
        if original is None:
            _write_checkpoint(Path(dst), entries, payloads(), lambda: user_meta)
        else:
            _write_original(Path(dst), original.encode(), entries, payloads())
    finally:
        bar.close()


def _write_original(path: Path, header_text: bytes, entries, payloads) -> None:
    """The source file byte for byte: its own header, then the tensors in data order."""
    expected = json.loads(header_text)
    with atomic_file(path) as f:
        f.write(len(header_text).to_bytes(8, "little") + header_text)
        offset = 0
        for name, dtype, shape, x in payloads:
            meta = expected.get(name)
            data = x.reshape(-1).view(np.uint8)
            if (meta is None or meta["data_offsets"] != [offset, offset + data.nbytes]
                    or meta["dtype"] != dtype or tuple(meta["shape"]) != tuple(shape)):
                raise CorruptDataError(f"{path}: tensor {name!r} does not match the recorded header")
            f.write(data.data)
            offset += data.nbytes


class TensorInfo(tuple):
    """(name, dtype, shape, codec, original bytes, stored bytes) of one tensor."""

    __slots__ = ()
    name = property(lambda s: s[0])
    dtype = property(lambda s: s[1])
    shape = property(lambda s: s[2])
    codec = property(lambda s: s[3])
    original_bytes = property(lambda s: s[4])
    stored_bytes = property(lambda s: s[5])


def inspect_file(path: Path) -> list[TensorInfo]:
    """Per-tensor sizes of a compressed file, from its header alone."""
    path = Path(path)
    header, _ = read_header(path)
    table = _codec_table(path, header)
    rows = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        codec, dtype, shape = table.get(name, ["none", meta["dtype"], meta["shape"]])
        original = nbytes_of(dtype, shape)
        a, b = meta["data_offsets"]
        rows.append(TensorInfo((name, dtype, tuple(shape), codec, original, b - a)))
    return rows


def verify_file(path: Path, progress: bool | None = None) -> int:
    """Check every checksum and decode every tensor; returns the number of tensors checked."""
    count = 0
    rows = inspect_file(path)
    bar = _Progress(sum(r.original_bytes for r in rows), f"verify {Path(path).name}", progress)
    try:
        for name, _, x in iter_decoded(path):
            count += 1
            bar.advance(x.nbytes, name)
    finally:
        bar.close()
    if count != len(rows):
        raise CorruptDataError(f"{path}: {len(rows)} tensors in the header, {count} decoded")
    return count


def _map_path(src: Path, dst: Path, one_file: Callable[..., None], **kwargs) -> list[Path]:
    """Apply one_file(src_file, dst_file, **kwargs) to a file, or to each shard of a directory
    (dst becomes a directory; the shard index is copied unchanged)."""
    src, dst = Path(src), Path(dst)
    files = tensor_files(src)
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        pairs = [(f, dst / f.name) for f in files]
    else:
        pairs = [(src, dst)]
    for a, b in pairs:
        one_file(a, b, **kwargs)
    _copy_index(src, dst)
    return [b for _, b in pairs]


def compress_path(src: Path, dst: Path, **kwargs) -> list[Path]:
    """A safetensors file, or a directory of shards, compressed to dst (see compress_file)."""
    return _map_path(src, dst, compress_file, **kwargs)


def decompress_path(src: Path, dst: Path, **kwargs) -> list[Path]:
    """The original file or shard directory restored from a compressed one."""
    return _map_path(src, dst, decompress_file, **kwargs)


def _copy_index(src: Path, dst: Path) -> None:
    index = src / "model.safetensors.index.json"
    if src.is_dir() and index.exists():
        with atomic_file(dst / index.name) as f:
            f.write(index.read_bytes())


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None,
              **options) -> None:
    """Write NumPy arrays as a compressed checkpoint (FP8/BF16/FP16 as ECF8, others zstd or raw)."""
    from .checkpoint import write_safetensors

    path = Path(path)
    tmp = path.with_name(f".{path.name}.plain.tmp")
    try:
        write_safetensors(tensors, tmp, metadata)
        compress_file(tmp, path, jobs=1, progress=False, **options)
    finally:
        tmp.unlink(missing_ok=True)


def load_file(path: Path, device: str = "cpu", *, compressed: bool = False) -> dict[str, Any]:
    """All tensors of a compressed checkpoint: NumPy arrays (cpu), CudaArrays (cuda), or with
    compressed=True device-resident compressed tensors for ecf8 entries (decode them later)."""
    return {name: x for name, _, x in iter_decoded(path, device, compressed)}
