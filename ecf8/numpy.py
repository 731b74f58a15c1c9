"""NumPy adapter: ``ml_dtypes``/NumPy arrays in, bit-exact arrays of the same dtype out (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .api import copy_into
from .api import decode as _decode
from .encoder import encode as _encode
from .encoder import native_order
from .errors import ECF8Error, UnsupportedError
from .names import device_name, dtype_spec

__all__ = ["encode", "decode", "copy_into", "load_npy"]


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


def load_npy(path: Path, dtype: str | None) -> np.ndarray:
    """An array from a .npy file in native byte order (a big-endian file's values converted), viewed
    as `dtype` (e4m3, e5m2, bf16, fp16: elements of its size hold that type's bits) when given."""
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError:           # a pickle, a safetensors file, a frame: NumPy's text is misleading
        raise ECF8Error(f"{path}: not a .npy array file") from None
    if not isinstance(x, np.ndarray):
        raise ECF8Error(f"{path}: a .npz archive, not a .npy array file")
    x = native_order(x)         # ('>u2', '>f2': the same values, not their bytes read the other way)
    if dtype:
        spec = dtype_spec(dtype)
        if x.dtype.itemsize != spec.dtype.itemsize or x.dtype.kind not in "uiVf":
            raise ECF8Error(f"{path}: elements of {x.dtype} cannot be viewed as {dtype}")
        return x.view(spec.dtype)
    if x.dtype.kind in "Vu":
        raise ECF8Error(f"{path}: dtype {x.dtype} is a bit view; say which type it holds with --dtype")
    return x
