"""NumPy adapter: ``ml_dtypes``/NumPy arrays in, bit-exact arrays of the same dtype out (CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .api import decode as _decode
from .encoder import encode as _encode
from .errors import UnsupportedError
from .names import device_name

__all__ = ["encode", "decode", "copy_into"]


def encode(x: np.ndarray, **options) -> bytes:
    """Compress an array of dtype float8_e4m3fn, float8_e5m2, bfloat16 or float16."""
    return _encode(np.asarray(x), **options)


def decode(blob: Any, device: Any = "cpu", out: np.ndarray | None = None, stream: Any = None) -> np.ndarray:
    """Decode to a NumPy array on the CPU (device: 'cpu' or torch.device('cpu') ...).

    out: a C-contiguous, writeable array of the same number of bytes (any dtype); the result is a
    view of it with the frame's dtype and shape, as in ``ecf8.torch.decode``.
    """
    if device_name(device) != "cpu" or stream is not None:
        raise UnsupportedError("ecf8.numpy decodes on the CPU; use ecf8.cupy/torch/jax for GPUs")
    y = _decode(blob)
    return y if out is None else copy_into(y, out)


def copy_into(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy y's bytes into out (C-contiguous, writeable, same bytes, any dtype); returns out viewed
    with y's dtype and shape.  UnsupportedError names what is wrong."""
    if not isinstance(out, np.ndarray):
        raise UnsupportedError(f"out must be a NumPy array on the CPU, not {type(out).__name__}")
    if out.nbytes != y.nbytes or not out.flags.c_contiguous or not out.flags.writeable:
        raise UnsupportedError(f"out must be a C-contiguous, writeable array of {y.nbytes} bytes "
                               f"(got {out.nbytes} bytes{'' if out.flags.c_contiguous else ', not contiguous'}"
                               f"{'' if out.flags.writeable else ', read-only'})")
    view = out.reshape(-1).view(np.uint8).view(y.dtype)
    view[...] = y.reshape(-1)
    return view.reshape(y.shape)
