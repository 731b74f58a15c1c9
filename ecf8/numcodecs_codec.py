"""A numcodecs codec, so zarr (format 2) arrays of FP8/BF16/FP16 weights can be stored with ecf8.

Registered as ``ecf8`` (entry point group ``numcodecs.codecs``, and on import):
``numcodecs.get_codec({"id": "ecf8"})``.  Needs numcodecs (not a dependency of ecf8 itself).
For zarr format 3 arrays use the array-to-bytes codec in ``ecf8.zarr3_codec`` instead.

Like every numcodecs compressor it codes the chunk's *bytes in memory order*: zarr 2 hands an
``order='F'`` array's chunks over in Fortran order and reads the decoded buffer back in that order
(or passes an F-ordered ``out``), so the codec never reorders elements.  Frames written by
ecf8 <= 0.1.0 carry the chunk's N-d shape in C order; ``decode`` returns them flattened in C order
(right for ``order='C'`` arrays, the default) and copies them element by element into an ``out``
of the same shape (right for any order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numcodecs import register_codec
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray_like, ensure_ndarray_like, ndarray_copy

from . import api, encoder
from . import format as fmt
from .errors import CorruptDataError, UnsupportedError

__all__ = ["ECF8"]


def check_options(dtype: str | None, chunk_size: int, max_tables: int) -> None:
    """UnsupportedError unless dtype is None or a short name (e4m3, e5m2, bf16, fp16) and
    chunk_size / max_tables are integers ``ecf8.encode`` accepts (shared with the zarr 3 codec)."""
    if dtype is not None and dtype not in fmt.SHORT_NAMES:
        raise UnsupportedError(f"ecf8 codec: dtype must be one of {sorted(fmt.SHORT_NAMES)} "
                               f"or None, not {dtype!r}")
    if type(chunk_size) is not int or type(max_tables) is not int:
        raise UnsupportedError("ecf8 codec: chunk_size and max_tables must be integers")
    encoder.check_args((0,), chunk_size, max_tables)


class ECF8(Codec):
    """Lossless ECF8 coding of a chunk's buffer.

    dtype: 'e4m3', 'e5m2', 'bf16' or 'fp16': read the buffer's bytes as elements of that type
    (native byte order), e.g. a zarr array of dtype uint8/uint16 holding FP8/BF16 bit patterns;
    decode then returns uint8/uint16 elements.  None: the buffer's own dtype must be one ecf8
    codes (float16, or an ml_dtypes float8_e4m3fn/float8_e5m2/bfloat16 array).
    chunk_size, max_tables: as for ``ecf8.encode``.  Bad options, buffers of a dtype ecf8 does
    not code, and frames that do not fit ``out`` raise ECF8Error (a ValueError).
    """

    codec_id = "ecf8"

    def __init__(self, dtype: str | None = None, chunk_size: int = 32768, max_tables: int = 4):
        check_options(dtype, chunk_size, max_tables)
        self.dtype, self.chunk_size, self.max_tables = dtype, chunk_size, max_tables

    def _elements(self, buf: Any) -> np.ndarray:
        """The buffer as a 1-d array of a coded dtype, in memory order, without copying."""
        try:
            x = ensure_contiguous_ndarray_like(buf)  # flattens C- or F-contiguous in memory order
        except (TypeError, ValueError) as e:
            raise UnsupportedError(f"ecf8 codec: cannot read the chunk as one buffer ({e})") from None
        if self.dtype is None:
            fmt.spec_for_dtype(x.dtype)
            return x
        spec = fmt.SHORT_NAMES[self.dtype]
        b = x.view(np.uint8)
        if b.size % spec.dtype.itemsize:
            raise UnsupportedError(f"ecf8 codec: a {b.size}-byte chunk is not a whole number of "
                                   f"{self.dtype} elements")
        return b.view(spec.dtype)

    def encode(self, buf: Any) -> bytes:
        """One ECF8 frame of the buffer's elements, 1-d, in memory order."""
        return encoder.encode(self._elements(buf), chunk_size=self.chunk_size,
                              max_tables=self.max_tables)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        """The elements (1-d; uint8/uint16 when ``dtype`` is set), or ``out`` filled with them."""
        x = api.decode(ensure_contiguous_ndarray_like(buf).view(np.uint8).reshape(-1))
        if self.dtype is not None:
            x = x.view(fmt.SHORT_NAMES[self.dtype].uint)
        if out is None:
            return x.reshape(-1)
        dst = ensure_ndarray_like(out)
        if dst.nbytes != x.nbytes:
            raise CorruptDataError(f"ecf8 codec: the frame holds {x.nbytes} bytes, out has {dst.nbytes}")
        if x.ndim > 1 and x.shape == dst.shape and dst.dtype.itemsize == x.itemsize:
            np.copyto(dst, x.view(dst.dtype))  # a frame of ecf8 <= 0.1.0: copy by element index
            return out
        return ndarray_copy(x.reshape(-1), out)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "dtype": self.dtype, "chunk_size": self.chunk_size,
                "max_tables": self.max_tables}

    def __repr__(self) -> str:
        return f"ECF8(dtype={self.dtype!r}, chunk_size={self.chunk_size}, max_tables={self.max_tables})"


register_codec(ECF8)  # also found through the entry point, without importing this module
