"""The one place that maps every spelling ecf8 accepts for an element type or a device.

Element types: ecf8 *reports* safetensors names (``Info.dtype``, checkpoint tables, ``ecf8 info``/
``analyze``): F8_E4M3, F8_E5M2, BF16, F16.  Everywhere a type is *given* (the command line's --dtype,
the CuPy adapter's and the numcodecs codec's ``dtype=``), any of these spellings is accepted:

    ========== ========= ================= ====================
    short      safetens. NumPy / ml_dtypes torch
    ========== ========= ================= ====================
    e4m3       F8_E4M3   float8_e4m3fn     torch.float8_e4m3fn
    e5m2       F8_E5M2   float8_e5m2       torch.float8_e5m2
    bf16       BF16      bfloat16          torch.bfloat16
    fp16       F16       float16           torch.float16
    ========== ========= ================= ====================

Devices: 'cpu', 'cuda', 'cuda:N', an int N (= 'cuda:N'), a ``torch.device``, a ``cupy.cuda.Device``
or a JAX device all name the same thing; ``device_name`` turns each into 'cpu' / 'cuda' / 'cuda:N'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import format as fmt
from .errors import UnsupportedError

__all__ = ["dtype_spec", "short_name", "device_name", "SHORT_NAMES"]

SHORT_NAMES: dict[str, fmt.DtypeSpec] = dict(fmt.SHORT_NAMES)        # e4m3 e5m2 bf16 fp16
_SHORT_OF = {spec.code: short for short, spec in SHORT_NAMES.items()}
_ALIASES: dict[str, fmt.DtypeSpec] = {}
for _short, _spec in SHORT_NAMES.items():
    for _alias in (_short, _spec.name, _spec.dtype.name, f"torch.{_spec.dtype.name}", *_spec.aliases):
        _ALIASES[_alias.lower()] = _spec


def dtype_spec(dtype: Any) -> fmt.DtypeSpec:
    """The DtypeSpec of any spelling of FP8 E4M3/E5M2, BF16 or FP16 (table above): a name (any
    case), a NumPy/ml_dtypes dtype, a torch dtype or a DtypeSpec.  UnsupportedError otherwise."""
    if isinstance(dtype, fmt.DtypeSpec):
        return dtype
    if isinstance(dtype, str):
        spec = _ALIASES.get(dtype.strip().lower())
        if spec is None:
            raise UnsupportedError(f"unknown element type {dtype!r}; use one of "
                                   f"{', '.join(SHORT_NAMES)} (or F8_E4M3, bfloat16, ...)")
        return spec
    if type(dtype).__module__.startswith("torch"):
        return dtype_spec(str(dtype))
    return fmt.spec_for_dtype(np.dtype(dtype))


def short_name(dtype: Any) -> str:
    """The short spelling (e4m3, e5m2, bf16, fp16) of any spelling."""
    return _SHORT_OF[dtype_spec(dtype).code]


def device_name(device: Any) -> str:
    """'cpu', 'cuda' or 'cuda:N' for any accepted device spelling; UnsupportedError otherwise."""
    if isinstance(device, str):
        d = device.strip().lower()
        if d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
            return d
    elif isinstance(device, (int, np.integer)) and not isinstance(device, bool) and device >= 0:
        return f"cuda:{int(device)}"
    elif hasattr(device, "type") and hasattr(device, "index"):            # torch.device
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return "cuda" if device.index is None else f"cuda:{device.index}"
    elif hasattr(device, "platform") and hasattr(device, "id"):           # a JAX device
        if device.platform == "cpu":
            return "cpu"
        if device.platform in ("gpu", "cuda"):
            local = getattr(device, "local_hardware_id", None)
            return f"cuda:{device.id if local is None else local}"
    elif type(device).__module__.startswith("cupy") and hasattr(device, "id"):   # cupy.cuda.Device
        return f"cuda:{device.id}"
    raise UnsupportedError(f"device must be 'cpu', 'cuda', 'cuda:N' (or a torch/CuPy/JAX device), "
                           f"not {device!r}")
