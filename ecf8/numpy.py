"""NumPy adapter: ``ml_dtypes``/NumPy arrays in, bit-exact arrays of the same dtype out (CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .api import decode as _decode
from .encoder import encode as _encode
from .errors import UnsupportedError

__all__ = ["encode", "decode"]


def encode(x: np.ndarray, **options) -> bytes:
    """Compress an array of dtype float8_e4m3fn, float8_e5m2, bfloat16 or float16."""
    return _encode(np.asarray(x), **options)


def decode(blob: Any, device: str = "cpu", out: np.ndarray | None = None, stream: Any = None) -> np.ndarray:
    """Decode to a NumPy array; ``out`` (same size and itemsize, C-contiguous) receives the bits."""
    if device != "cpu" or stream is not None:
        raise UnsupportedError("ecf8.numpy decodes on the CPU; use ecf8.cupy/torch/jax for GPUs")
    y = _decode(blob)
    if out is None:
        return y
    if out.nbytes != y.nbytes or out.dtype.itemsize != y.dtype.itemsize or not out.flags.c_contiguous:
        raise UnsupportedError(f"out must be a C-contiguous array of {y.size} {y.dtype.itemsize}-byte elements")
    out.reshape(-1).view(y.dtype)[...] = y.reshape(-1)
    return out
