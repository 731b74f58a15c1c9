"""The public entry points: decode and info (encode lives in encoder.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import format as fmt
from .decoder_cpu import decode_frame
from .errors import UnsupportedError
from .names import device_name

__all__ = ["decode", "info", "Info"]


def decode(blob: Any, device: Any = "cpu", *, out: Any = None, stream: Any = None,
           verify: bool = True) -> Any:
    """Decode one ECF8 frame bit-exactly.

    blob: bytes, bytearray, memoryview or uint8 NumPy array (or, for CUDA, a DeviceTensor from
    ``to_device``).  device: "cpu" returns a NumPy array of the original dtype and shape;
    "cuda" / "cuda:N" decodes on that GPU (see ``ecf8.decoder_cuda``); a torch, CuPy or JAX device
    object names the same (``ecf8.names.device_name``).  out: an array on that device holding the
    frame's number of bytes (any dtype, C-contiguous, writeable); the result is a view of it with
    the frame's dtype and shape, as in every adapter.  stream: CUDA only.  verify: check the
    payload checksum (the header's is always checked).  Raises CorruptDataError for a damaged
    frame, UnsupportedError for a bad argument.
    """
    device = device_name(device)
    if device == "cpu":
        if stream is not None:
            raise UnsupportedError("stream= applies to CUDA decoding only")
        if hasattr(blob, "frame") and hasattr(blob, "tobytes"):     # a DeviceTensor: fetch it
            blob = blob.tobytes()
        view = fmt.as_buffer(blob)
        y = decode_frame(view, fmt.parse(view, verify=verify))
        if out is None:
            return y
        from .numpy import copy_into

        return copy_into(y, out)
    from . import decoder_cuda

    return decoder_cuda.decode(blob, device, out=out, stream=stream, verify=verify)


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
    code_lengths: np.ndarray = dataclasses.field(repr=False)   # (tables, alphabet) uint8

    def __repr__(self) -> str:
        how = "stored" if self.stored else f"{self.chunks} chunks of {self.chunk_size}, {self.tables} tables"
        return (f"Info({self.dtype} {self.shape}, {self.original_bytes:,} -> {self.compressed_bytes:,} "
                f"bytes, {self.bits_per_weight:.3f} bits/weight, {how})")


def info(blob: Any) -> Info:
    """The header of a frame (validated, payload checksum not checked)."""
    view = fmt.as_buffer(blob)
    f = fmt.parse(view, verify=False)
    return Info(f.spec.name, f.shape, f.n, f.mode == fmt.MODE_STORED, f.n * f.spec.dtype.itemsize,
                f.size, f.size * 8 / f.n if f.n else float("nan"),
                (1 << f.chunk_log2) if f.mode == fmt.MODE_CODED else 0, f.nchunks, f.ntables,
                f.lengths)
