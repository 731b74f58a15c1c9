"""safetensors files: a memory-mapped streaming reader and an atomic writer (no framework needed).

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets} (plus an optional "__metadata__" of strings), then the data.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from .errors import CorruptDataError, UnsupportedError

__all__ = ["DTYPE_NAMES", "Entry", "nbytes_of", "atomic_file", "read_header", "read_header_text", "iter_tensors",
           "tensor_files",
           "write_safetensors"]

DTYPE_NAMES = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "BOOL": np.dtype(np.bool_),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
}
MAX_HEADER = 100 << 20


def nbytes_of(dtype_name: str, shape) -> int:
    """Bytes of a tensor of a safetensors dtype and shape."""
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_NAMES[dtype_name].itemsize


class Entry(tuple):
    """(name, dtype name, shape, array, file offset) of one tensor; the array is a read-only
    memory-map view starting at that byte offset of the file."""

    __slots__ = ()

    def __new__(cls, name: str, dtype: str, shape: tuple[int, ...], array: np.ndarray, offset: int):
        return super().__new__(cls, (name, dtype, shape, array, offset))

    name = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    shape = property(lambda self: self[2])
    array = property(lambda self: self[3])
    offset = property(lambda self: self[4])


@contextlib.contextmanager
def atomic_file(path: Path):
    """A binary file object that replaces `path` only if the block completes; nothing otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section); CorruptDataError if it is not safetensors."""
    header, raw = read_header_text(path)
    return header, 8 + len(raw)


def read_header_text(path: Path) -> tuple[dict, bytes]:
    """(header dict, the header's exact bytes, padding included)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptDataError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n + 8 > path.stat().st_size:
            raise CorruptDataError(f"{path}: not a safetensors file (header length {n})")
        raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptDataError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, raw


def iter_tensors(path: Path) -> Iterator[Entry]:
    """Each tensor of a safetensors file in data order, as a zero-copy view of a memory map."""
    path = Path(path)
    header, base = read_header(path)
    size = path.stat().st_size
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                   key=lambda kv: kv[1].get("data_offsets", [0])[0])
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    for name, meta in items:
        try:
            dtype_name, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptDataError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype_name not in DTYPE_NAMES:
            raise UnsupportedError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = DTYPE_NAMES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= a <= b and base + b <= size and b - a == nbytes_of(dtype_name, shape)):
            raise CorruptDataError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
        array = np.frombuffer(mm, dtype, count, base + a) if count else np.empty(0, dtype)
        yield Entry(name, dtype_name, shape, array.reshape(shape), base + a)


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a path: the file itself, or a directory's shards (index order)."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = json.loads(index.read_text())["weight_map"].values()
            return [path / s for s in dict.fromkeys(shards)]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UnsupportedError(f"{path}: no .safetensors files")
        return files
    if not path.exists():
        raise UnsupportedError(f"{path}: no such file")
    return [path]


def write_safetensors(tensors: dict[str, np.ndarray], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write arrays (any DTYPE_NAMES dtype) as a safetensors file, atomically (temp file + rename)."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, x in tensors.items():
        x = np.asarray(x)
        x = x if x.flags.c_contiguous else x.copy()       # (ascontiguousarray makes 0-d 1-d)
        if x.dtype not in names:
            raise UnsupportedError(f"tensor {name!r}: dtype {x.dtype} has no safetensors name")
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
        arrays.append(x)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in arrays:
            f.write(x.reshape(-1).view(np.uint8).data)
