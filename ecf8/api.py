"""The public entry points: encode, decode and info (each dispatching to the host or GPU codec)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import format as fmt
from . import encoder
from .decoder_cpu import decode_frame
from .errors import UnsupportedError
from .names import device_name

__all__ = ["encode", "decode", "info", "Info", "copy_into"]


def encode(x: Any, *, chunk_size: int | None = 32768, max_tables: int = 4, allow_stored: bool = True,
           dtype: Any = None, stream: Any = None) -> Any:
    """Compress an array losslessly into one ECF8 frame.

    x: any shape (0-d and empty too), contiguous or not, of dtype float8_e4m3fn, float8_e5m2,
    bfloat16 or float16.  chunk_size: elements per independently decodable chunk, a power of two
    from 512 to 2**20, or None for ``ecf8.encoder.decode_chunk_size(x.size)`` (GPU decoding speed
    over size).  max_tables: code tables the chunks may choose among, 1 to 8.
    allow_stored: store the elements raw (mode 1) when coding would not make them smaller; with
    False every non-empty tensor is entropy coded.

    A CUDA array (CuPy, ecf8.CudaArray, or any __cuda_array_interface__ / DLPack CUDA array) is
    encoded on its GPU by ``ecf8.encoder_cuda`` into the same frame, returned as a device-resident
    ``EncodedTensor`` (decode it directly; ``.tobytes()`` gives the bytes); dtype then names the
    element type of uint8/uint16 bit views, stream the CUDA stream.  Host arrays return bytes.
    Raises UnsupportedError for another dtype, a torch/JAX tensor (use its adapter) or a bad option.
    """
    if encoder.on_cuda(x):
        from . import encoder_cuda

        return encoder_cuda.encode(x, dtype=dtype, chunk_size=chunk_size, max_tables=max_tables,
                                   allow_stored=allow_stored, stream=stream)
    return encoder.encode(x, chunk_size=chunk_size, max_tables=max_tables, allow_stored=allow_stored,
                          dtype=dtype, stream=stream)


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
        return y if out is None else copy_into(y, out)
    from . import decoder_cuda

    return decoder_cuda.decode(blob, device, out=out, stream=stream, verify=verify)


def copy_into(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy y's bytes into out (C-contiguous, writeable, same bytes, any dtype in native byte
    order); returns out viewed with y's dtype and shape.  UnsupportedError names what is wrong."""
    if not isinstance(out, np.ndarray):
        raise UnsupportedError(f"out must be a NumPy array on the CPU, not {type(out).__name__}")
    if not out.dtype.isnative:
        raise UnsupportedError(f"out must be in this machine's byte order, not {out.dtype.str!r} "
                               "(its elements would read byte-swapped)")
    if out.nbytes != y.nbytes or not out.flags.c_contiguous or not out.flags.writeable:
        raise UnsupportedError(f"out must be a C-contiguous, writeable array of {y.nbytes} bytes "
                               f"(got {out.nbytes} bytes{'' if out.flags.c_contiguous else ', not contiguous'}"
                               f"{'' if out.flags.writeable else ', read-only'})")
    view = out.reshape(-1).view(np.uint8).view(y.dtype)
    view[...] = y.reshape(-1)
    return view.reshape(y.shape)


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
        tables = f"{self.tables} table{'s' * (self.tables != 1)}"
        chunks = f"{self.chunks} chunk{'s' * (self.chunks != 1)}"
        how = "stored" if self.stored else f"{chunks} of {self.chunk_size}, {tables}"
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
