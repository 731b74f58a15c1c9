"""A zarr 3 array-to-bytes codec: each chunk of FP8/BF16/FP16 weights is stored as one ECF8 frame.

In the codec chain it takes the place of ``bytes`` (``serializer=`` of ``zarr.create_array``, with
``compressors=None``: the frame is already compressed).  Array metadata names it
``{"name": "ecf8", "configuration": {...}}``; zarr finds the class through the ``zarr.codecs``
entry point, or by importing this module.  Needs zarr >= 3.1 (not a dependency of ecf8 itself).

Data types: zarr 3 knows float16 but no float8 or bfloat16 type, so store FP8/BF16 weights as
their bit patterns in a uint8/uint16 (or int8/int16) array and tell the codec the element type
(``ECF8Codec(dtype="e4m3")``); reading gives the same integers back, ``.view(ml_dtypes...)``
makes them floats again.  A float16 array needs no ``dtype``.  The frame holds the chunk in C
order whatever the array's memory order, as zarr 3 expects of an array-to-bytes codec.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

from . import api, encoder
from . import format as fmt
from .errors import CorruptDataError, UnsupportedError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["ECF8Codec"]

CODEC_NAME = "ecf8"


def element_spec(dtype: str | None, array_dtype: np.dtype) -> fmt.DtypeSpec:
    """The ECF8 element type of a chunk of ``array_dtype`` for codec option ``dtype``.

    None: the array's own dtype must be one ecf8 codes (float16, or an extension float8/bfloat16
    type backed by ml_dtypes).  A short name: the array holds that type's bit patterns as
    integers of the same width (or is that very type).  UnsupportedError otherwise.
    """
    native = np.dtype(array_dtype).newbyteorder("=")
    if dtype is None:
        try:
            return fmt.spec_for_dtype(native)
        except UnsupportedError:
            raise UnsupportedError(
                f"ecf8 codec: cannot code zarr dtype {native}; it codes float16, and FP8/BF16 bit "
                "patterns in uint8/uint16 arrays with dtype='e4m3', 'e5m2' or 'bf16'") from None
    spec = fmt.SHORT_NAMES[dtype]
    if native == spec.dtype or (native.kind in "iu" and native.itemsize == spec.dtype.itemsize):
        return spec
    raise UnsupportedError(f"ecf8 codec: dtype {dtype!r} needs an array of {spec.dtype.itemsize}-byte "
                           f"integers (or {spec.dtype}), not {native}")


@dataclass(frozen=True)
class ECF8Codec(ArrayBytesCodec):
    """Lossless ECF8 coding of zarr 3 chunks.

    dtype: 'e4m3', 'e5m2', 'bf16', 'fp16' or None (see ``element_spec``).  chunk_size, max_tables:
    as for ``ecf8.encode``.  Bad options raise UnsupportedError, a frame that does not match its
    chunk's shape or type raises CorruptDataError (both ECF8Error, a ValueError).
    """

    is_fixed_size = False

    dtype: str | None
    chunk_size: int
    max_tables: int

    def __init__(self, *, dtype: str | None = None, chunk_size: int = 32768,
                 max_tables: int = 4) -> None:
        if dtype is not None and dtype not in fmt.SHORT_NAMES:
            raise UnsupportedError(f"ecf8 codec: dtype must be one of {sorted(fmt.SHORT_NAMES)} "
                                   f"or None, not {dtype!r}")
        if type(chunk_size) is not int or type(max_tables) is not int:
            raise UnsupportedError("ecf8 codec: chunk_size and max_tables must be integers")
        encoder.encode(np.empty(0, np.float16), chunk_size=chunk_size, max_tables=max_tables)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "chunk_size", chunk_size)
        object.__setattr__(self, "max_tables", max_tables)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        config = config or {}
        unknown = set(config) - {"dtype", "chunk_size", "max_tables"}
        if unknown:
            raise UnsupportedError(f"ecf8 codec: unknown configuration keys {sorted(unknown)}")
        return cls(**config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        config: dict[str, JSON] = {"chunk_size": self.chunk_size, "max_tables": self.max_tables}
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return {"name": CODEC_NAME, "configuration": config}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        element_spec(self.dtype, dtype.to_native_dtype())

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable-size output

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        a = np.ascontiguousarray(chunk_array.as_numpy_array())  # C order, whatever the memory order
        spec = element_spec(self.dtype, a.dtype)
        a = a.astype(a.dtype.newbyteorder("="), copy=False)
        frame = encoder.encode(a.view(spec.dtype), chunk_size=self.chunk_size,
                               max_tables=self.max_tables)
        return chunk_spec.prototype.buffer.from_bytes(frame)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        target = chunk_spec.dtype.to_native_dtype()
        spec = element_spec(self.dtype, target)
        x = api.decode(chunk_bytes.as_numpy_array())
        if x.dtype != spec.dtype or x.shape != tuple(chunk_spec.shape):
            raise CorruptDataError(f"ecf8 codec: the frame holds {fmt.spec_for_dtype(x.dtype).name} "
                                   f"{x.shape}, the chunk is {spec.name} {tuple(chunk_spec.shape)}")
        y = x.view(target.newbyteorder("=")).astype(target, copy=False)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(y)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


register_codec(CODEC_NAME, ECF8Codec)
