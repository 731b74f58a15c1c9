"""A numcodecs codec, so zarr arrays of FP8/BF16/FP16 weights can be stored with ecf8.

Registered under the entry point group ``numcodecs.codecs`` as ``ecf8``:
``numcodecs.get_codec({"id": "ecf8"})``.  Needs numcodecs (not a dependency of ecf8 itself).
"""

from __future__ import annotations

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray_like, ndarray_copy

from . import api, encoder
from . import format as fmt

__all__ = ["ECF8"]


class ECF8(Codec):
    """Lossless ECF8 coding of a chunk.

    dtype: 'e4m3', 'e5m2', 'bf16' or 'fp16' to read uint8/uint16 chunks as that type (None: the
    chunk's own dtype must be one ecf8 codes).  chunk_size, max_tables: as for ``ecf8.encode``.
    """

    codec_id = "ecf8"

    def __init__(self, dtype: str | None = None, chunk_size: int = 32768, max_tables: int = 4):
        if dtype is not None and dtype not in fmt.SHORT_NAMES:
            raise ValueError(f"dtype must be one of {sorted(fmt.SHORT_NAMES)} or None, not {dtype!r}")
        self.dtype, self.chunk_size, self.max_tables = dtype, chunk_size, max_tables

    def encode(self, buf):
        x = np.asarray(buf)
        if self.dtype is not None:
            x = np.ascontiguousarray(x).view(fmt.SHORT_NAMES[self.dtype].dtype)
        return encoder.encode(x, chunk_size=self.chunk_size, max_tables=self.max_tables)

    def decode(self, buf, out=None):
        x = api.decode(ensure_contiguous_ndarray_like(buf).view(np.uint8).reshape(-1))
        if self.dtype is not None:
            x = x.view(np.uint8 if x.itemsize == 1 else np.uint16)
        return ndarray_copy(x, out) if out is not None else x

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "chunk_size": self.chunk_size,
                "max_tables": self.max_tables}

    def __repr__(self):
        return f"ECF8(dtype={self.dtype!r}, chunk_size={self.chunk_size}, max_tables={self.max_tables})"
