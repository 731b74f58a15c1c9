"""JAX adapter: ``jax.Array`` of float8_e4m3fn, float8_e5m2, bfloat16 or float16 in and out."""

from __future__ import annotations

from typing import Any

import numpy as np

from .api import decode as _decode
from .encoder import encode as _encode
from .errors import UnsupportedError
from .names import device_name

__all__ = ["encode", "decode"]


def encode(x: Any, **options):
    """Compress a JAX array: bytes for host arrays; an array on a GPU is encoded there into the
    same frame, returned as a device-resident ``EncodedTensor`` (``.tobytes()`` for the bytes)."""
    if any(d.platform == "gpu" for d in getattr(x, "devices", lambda: ())()):
        import jax
        import jax.numpy as jnp

        from . import encoder_cuda

        dtype = np.dtype(x.dtype)
        bits = x if dtype == np.float16 else jax.lax.bitcast_convert_type(
            x, jnp.uint8 if dtype.itemsize == 1 else jnp.uint16)
        return encoder_cuda.encode(bits, dtype=dtype, **options)
    return _encode(np.asarray(x), **options)


def decode(blob: Any, device: Any = "cpu", out: Any = None, stream: Any = None):
    """Decode to a JAX array on the CPU or a GPU ('cuda', 'cuda:N', or a JAX/torch device).

    JAX arrays are immutable, so ``out`` is not supported; on a GPU the result is handed over
    through DLPack (JAX's stream waits for the decode) and reinterpreted with bitcast_convert_type.
    """
    import jax
    import jax.numpy as jnp

    device = device_name(device)
    if out is not None:
        raise UnsupportedError("JAX arrays are immutable: ecf8.jax.decode takes no out=")
    if device == "cpu":
        if stream is not None:
            raise UnsupportedError("stream= applies to GPU decoding only")
        return jnp.asarray(_decode(blob))
    from . import decoder_cuda

    y = decoder_cuda.decode(blob, device, stream=stream)
    bits = jax.dlpack.from_dlpack(y)
    return jax.lax.bitcast_convert_type(bits, jnp.dtype(y.dtype)) if bits.dtype != y.dtype else bits
