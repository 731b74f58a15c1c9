"""ecf8: lossless compression of neural-network weights by entropy-coding their exponents.

    blob = ecf8.encode(weights)            # NumPy array: float8_e4m3fn, float8_e5m2, bfloat16, float16
    w = ecf8.decode(blob)                  # bit-exact NumPy array; device="cuda" decodes on the GPU
"""

from .api import Info, decode, info
from .decoder_cuda import BatchDecoder, CudaArray, DeviceTensor, decode_batch, to_device
from .encoder import encode
from .errors import CorruptDataError, ECF8Error, UnsupportedError
from .store import load_file, safe_open, save_file

__all__ = ["encode", "decode", "info", "Info", "to_device", "decode_batch", "BatchDecoder",
           "DeviceTensor", "CudaArray", "save_file", "load_file", "safe_open", "ECF8Error", "CorruptDataError",
           "UnsupportedError"]
__version__ = "0.1.0"
