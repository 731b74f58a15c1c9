"""The public entry points: decode and info (encode lives in encoder.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import format as fmt
from .decoder_cpu import decode_frame
from .errors import UnsupportedError

__all__ = ["decode", "info", "Info"]


def decode(blob: Any, device: str = "cpu", *, out: Any = None, stream: Any = None,
           verify: bool = True) -> Any:
    """Decode one ECF8 frame bit-exactly.

    blob: bytes, bytearray, memoryview or uint8 NumPy array (or, for CUDA, a DeviceTensor from
    ``to_device``).  device: "cpu" returns a NumPy array of the original dtype and shape;
    "cuda" / "cuda:N" decodes on that GPU (see ``ecf8.decoder_cuda``).  verify: check the payload
    checksum (the header's is always checked).
    """
    if device == "cpu":
        if out is not None or stream is not None:
            raise UnsupportedError("out= and stream= apply to CUDA decoding only")
        view = fmt.as_buffer(blob)
        return decode_frame(view, fmt.parse(view, verify=verify))
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        from . import decoder_cuda

        return decoder_cuda.decode(blob, device, out=out, stream=stream, verify=verify)
    raise UnsupportedError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")


@dataclasses.dataclass(frozen=True)
class Info:
    """What a frame header says, without decoding."""

    dtype: str                 # safetensors-style name: F8_E4M3, F8_E5M2, BF16, F16
    shape: tuple[int, ...]
    numel: int
    stored: bool               # True when kept raw (not entropy coded)
    original_bytes: int
    compressed_bytes: int
    bits_per_weight: float     # compressed_bytes * 8 / numel, every byte counted
    chunk_size: int
    chunks: int
    tables: int
    code_lengths: np.ndarray   # (tables, alphabet) uint8


def info(blob: Any) -> Info:
    """The header of a frame (validated, payload checksum not checked)."""
    view = fmt.as_buffer(blob)
    f = fmt.parse(view, verify=False)
    return Info(f.spec.name, f.shape, f.n, f.mode == fmt.MODE_STORED, f.n * f.spec.dtype.itemsize,
                f.size, f.size * 8 / f.n if f.n else float("nan"),
                (1 << f.chunk_log2) if f.mode == fmt.MODE_CODED else 0, f.nchunks, f.ntables,
                f.lengths)
