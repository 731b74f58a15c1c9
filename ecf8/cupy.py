"""CuPy adapter.  CuPy has float16 but no float8 or bfloat16 dtypes: those decode to the element
bits as uint8/uint16 arrays (view them with ``ecf8.torch``/``ecf8.jax`` or keep them as bits)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import decoder_cuda
from .errors import UnsupportedError
from .names import device_name

__all__ = ["encode", "decode"]

def encode(x: Any, *, dtype: Any = None, stream: Any = None, **options):
    """Compress a CuPy array on its GPU: a device-resident ``EncodedTensor`` (decode it directly;
    ``.tobytes()`` gives the frame, equal to ``ecf8.encode`` of the same elements).

    dtype: the type uint8/uint16 bits hold, any spelling of ``ecf8.names`` ('e4m3', 'F8_E4M3',
    'bfloat16', ...); float16 arrays need none.  stream: the CUDA stream (default: CuPy's current).
    """
    from . import encoder_cuda

    return encoder_cuda.encode(x, dtype=dtype, stream=stream, **options)


def decode(blob: Any, device: Any = "cuda", out: Any = None, stream: Any = None):
    """Decode on a GPU to a CuPy array: float16 for FP16, the element bits for the other types.

    device: 'cuda', 'cuda:N', or a cupy.cuda.Device / torch.device.  out: a C-contiguous CUDA array
    of the same number of bytes (any dtype); the result is a view of it.
    """
    device = device_name(device)
    if device == "cpu":
        raise UnsupportedError("ecf8.cupy decodes on a GPU; use ecf8.decode or ecf8.numpy for the CPU")
    y = decoder_cuda.decode(blob, device, out=out, stream=stream)
    bits = y.held_bits()        # the compressed tensor stays alive while the decode may read it
    return bits.view(np.float16) if y.dtype == np.float16 else bits
