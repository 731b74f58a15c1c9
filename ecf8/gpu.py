"""The GPU runtime shared by ecf8's CUDA code (package-internal): CuPy imported on demand, device
and stream arguments resolved, kernel sources found, and each source's NVRTC module compiled once
per device.  Nothing here imports CuPy before a GPU path asks for it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UnsupportedError

__all__ = ["cupy", "device_id", "stream", "kernel_source", "KernelCache", "upload", "pinned_buffers"]


def cupy() -> Any:
    """The cupy module; UnsupportedError (how to install it) when it is missing."""
    try:
        import cupy as module
    except ImportError:
        raise UnsupportedError("GPU encoding and decoding need CuPy: pip install 'ecf8[cuda13]' "
                               "(or cuda12; from a clone: pip install '.[cuda13]')") from None
    return module


def device_id(device: str) -> int:
    """The CUDA device index of 'cuda' (the current device) or 'cuda:N'; UnsupportedError otherwise."""
    if device == "cuda":
        return cupy().cuda.runtime.getDevice()
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise UnsupportedError(f"device must be 'cuda' or 'cuda:N', not {device!r}")


def stream(value: Any) -> Any:
    """A CuPy stream for None (the current stream), a CuPy stream, an int handle or an object with
    ``__cuda_stream__``; UnsupportedError otherwise."""
    cp = cupy()
    if value is None:
        return cp.cuda.get_current_stream()
    if isinstance(value, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        return value
    if hasattr(value, "__cuda_stream__"):
        handle = value.__cuda_stream__()
        handle = handle[1] if isinstance(handle, tuple) else handle
        return _external(int(handle))
    if isinstance(value, int):
        return _external(value)
    raise UnsupportedError(f"stream must be None, an int handle or have __cuda_stream__, not {type(value).__name__}")


_external_streams: dict[int, Any] = {}


def _external(handle: int) -> Any:
    """A CuPy stream object for a raw handle (cached: creating one per launch costs microseconds)."""
    st = _external_streams.get(handle)
    if st is None:
        if len(_external_streams) > 64:
            _external_streams.clear()
        st = _external_streams[handle] = _new_external(handle)
    return st


def _new_external(handle: int) -> Any:
    cp = cupy()
    if hasattr(cp.cuda.Stream, "from_external"):
        class _Handle:
            def __cuda_stream__(self):
                return (0, handle)
        return cp.cuda.Stream.from_external(_Handle())
    return cp.cuda.ExternalStream(handle)


def kernel_source(name: str = "ecf8_decode.cu") -> str:
    """A CUDA source of ecf8 (the decoder's by default), from the installed package (ecf8/cuda) or
    the source tree (cuda/); UnsupportedError when missing."""
    here = Path(__file__).resolve().parent
    for path in (here / "cuda" / name, here.parent / "cuda" / name):
        if path.exists():
            return path.read_text()
    raise UnsupportedError(f"ecf8's CUDA sources ({name}) are missing from the installation")


class KernelCache:
    """The kernels of one CUDA source: ``compile(device_id)`` (a compiled CuPy RawModule) runs once
    per device on first use, each function is looked up once per device and passed to ``setup``
    (launch attributes).  Thread safe."""

    def __init__(self, compile: Callable[[int], Any], setup: Callable[[Any], None] | None = None):
        self._compile, self._setup = compile, setup
        self._modules: dict[int, Any] = {}
        self._functions: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()

    def module(self, device: int) -> Any:
        """The compiled module for a device (compiled now if it is not yet)."""
        module = self._modules.get(device)
        if module is None:
            with self._lock:
                module = self._modules.get(device)
                if module is None:
                    module = self._modules[device] = self._compile(device)
        return module

    def function(self, device: int, name: str) -> Any:
        """The kernel `name` (a name expression of the module) on a device."""
        key = (device, name)
        kernel = self._functions.get(key)
        if kernel is None:
            module = self.module(device)
            with self._lock:
                kernel = self._functions.get(key)
                if kernel is None:
                    kernel = module.get_function(name)
                    if self._setup is not None:
                        self._setup(kernel)
                    self._functions[key] = kernel
        return kernel

    def replace(self, device: int, module: Any) -> Any:
        """Use `module` (another build of the source, or None: compile again on next use) on a
        device from now on; returns the module used until now, or None."""
        with self._lock:
            old = self._modules.pop(device, None)
            if module is not None:
                self._modules[device] = module
            for key in [k for k in self._functions if k[0] == device]:
                del self._functions[key]
        return old


def upload(host: Any, stream_: Any = None) -> Any:
    """A host NumPy array (any numeric dtype and shape) or bytes-like (uint8), in ordinary
    (pageable, not pinned) memory, copied into a new CuPy array on the current device on stream_
    (default: the current stream), and done when this returns: a kernel on any stream may read
    it then (a copy left in flight on one stream would race a decode queued on another).  The
    host so waits for stream_'s earlier work too.  Not through CuPy's pinned memory pool, which
    keeps a block of every size it served: one per tensor uploaded, host memory that grew with
    the model."""
    cp = cupy()
    src = np.ascontiguousarray(host) if isinstance(host, np.ndarray) else np.frombuffer(host, np.uint8)
    out = cp.empty(src.shape, src.dtype)
    if src.nbytes:
        st = stream(stream_)
        cp.cuda.runtime.memcpyAsync(out.data.ptr, src.ctypes.data, src.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, st.ptr)
        st.synchronize()
    return out


def pinned_buffers(count: int, size: int) -> tuple[list[np.ndarray], list[int]]:
    """count uint8 arrays of `size` bytes in pinned (page-locked) host memory, which GPU copies
    read directly, and their addresses.  Allocated for the caller alone, not from CuPy's pinned
    memory pool: freed when the arrays are (after the last copy from them has finished: the
    caller's to ensure)."""
    cp = cupy()
    arrays, addresses = [], []
    for _ in range(count):
        mem = cp.cuda.pinned_memory.PinnedMemoryPointer(cp.cuda.pinned_memory.PinnedMemory(size), 0)
        arrays.append(np.frombuffer(mem, np.uint8, size))      # (the array keeps mem alive)
        addresses.append(mem.ptr)
    return arrays, addresses
