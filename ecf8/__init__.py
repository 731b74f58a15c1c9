"""ecf8: lossless compression of neural-network weights by entropy-coding their exponents.

    blob = ecf8.encode(weights)            # NumPy array: float8_e4m3fn, float8_e5m2, bfloat16, float16
    w = ecf8.decode(blob)                  # bit-exact NumPy array; device="cuda" decodes on the GPU

The public names (and the submodules) are imported on first use, so that ``import ecf8`` is cheap
and the ``ecf8`` command can take Ctrl-C cleanly from its first instant (ecf8/__main__.py).
"""

import importlib

from .errors import CorruptDataError, ECF8Error, UnsupportedError

_HOME = {"encode": "api", "decode": "api", "info": "api", "Info": "api",
         "to_device": "decoder_cuda", "decode_batch": "decoder_cuda", "BatchDecoder": "decoder_cuda",
         "DeviceTensor": "decoder_cuda", "CudaArray": "decoder_cuda",
         "save_file": "compressed", "load_file": "compressed_reader", "safe_open": "compressed_reader"}

__all__ = ["encode", "decode", "info", "Info", "to_device", "decode_batch", "BatchDecoder",
           "DeviceTensor", "CudaArray", "save_file", "load_file", "safe_open", "ECF8Error", "CorruptDataError",
           "UnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name from its module, or a submodule (``ecf8.format``), imported on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'ecf8' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'ecf8' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
