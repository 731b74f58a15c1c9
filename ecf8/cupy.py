"""CuPy adapter.  CuPy has float16 but no float8 or bfloat16 dtypes: those decode to the element
bits as uint8/uint16 arrays (view them with ``ecf8.torch``/``ecf8.jax`` or keep them as bits)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import decoder_cuda
from . import format as fmt
from .encoder import encode as _encode
from .errors import UnsupportedError

__all__ = ["encode", "decode"]

def encode(x: Any, *, dtype: str | None = None, **options) -> bytes:
    """Compress a CuPy array (copied to the host by this call).

    dtype: 'e4m3', 'e5m2', 'bf16' or 'fp16' for uint8/uint16 bit arrays; float16 arrays need none.
    """
    host = x.get()
    if dtype is not None:
        host = host.view(fmt.SHORT_NAMES[dtype].dtype)
    elif host.dtype != np.float16:
        raise UnsupportedError("say which type the CuPy bits hold: dtype='e4m3', 'e5m2' or 'bf16'")
    return _encode(host, **options)


def decode(blob: Any, device: str = "cuda", out: Any = None, stream: Any = None):
    """Decode on a GPU to a CuPy array: float16 for FP16, the element bits for the other types."""
    y = decoder_cuda.decode(blob, device, out=out, stream=stream)
    bits = y.bits.reshape(y.shape)
    return bits.view(np.float16) if y.dtype == np.float16 else bits
