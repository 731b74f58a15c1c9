"""Builders of safetensors files byte by byte, and of compressed ones, for the checkpoint tests."""

import json
import struct
from pathlib import Path

import numpy as np

from ecf8 import store


def raw_file(path: Path, header: bytes | dict, data: bytes) -> Path:
    """A safetensors file exactly as given: 8-byte length, header bytes (or dict as JSON), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Path(path)


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def header_of(path: Path) -> tuple[dict, int]:
    """(header dict, start of the data section)."""
    blob = Path(path).read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), 8 + n


def round_trip(src: Path, tmp: Path, **kwargs) -> bytes:
    """compress, verify, decompress; the restored bytes."""
    packed, restored = tmp / "packed.safetensors", tmp / "restored.safetensors"
    store.compress_file(src, packed, jobs=1, **kwargs)
    store.verify_file(packed)
    store.decompress_file(packed, restored)
    return restored.read_bytes()


def patch(path: Path, at: int, new: bytes) -> None:
    """Overwrite bytes of a file in place."""
    blob = bytearray(Path(path).read_bytes())
    blob[at:at + len(new)] = new
    Path(path).write_bytes(bytes(blob))


def weights(n: int, dtype, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return (w * (16 if np.dtype(dtype).itemsize == 1 else 0.02)).astype(dtype)
