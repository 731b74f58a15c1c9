"""Array builders used across test modules."""

import functools
import os
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = [np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2),
          np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)]

ROOT = Path(__file__).resolve().parents[1]      # the checkout


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process: this checkout first on PYTHONPATH, the rest of
    PYTHONPATH (packages installed beside it, say) kept, plus `extra`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def uint_of(dtype) -> np.dtype:
    return np.dtype(np.uint8) if np.dtype(dtype).itemsize == 1 else np.dtype(np.uint16)


def bits(x: np.ndarray) -> np.ndarray:
    """The elements' bit patterns, to compare arrays bit-exactly (NaNs included)."""
    return np.ascontiguousarray(x).view(uint_of(x.dtype))


def from_bits(u: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(u, dtype=uint_of(dtype)).view(dtype)


def weights_like(n: int, dtype, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """Gaussian 'weights' of a dtype: concentrated exponents like trained weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(np.float32) * scale
    if np.dtype(dtype).itemsize == 1:
        w = w / scale * 16  # FP8 weights live near the middle of their range after scaling
    return w.astype(dtype)


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(bits(actual), bits(expected))


def garbage_payload(blob: bytes, seed: int = 0) -> bytes:
    """The frame with every payload byte (after the header checksum) replaced by random bytes;
    the payload checksum is left stale, so only verify=False decodes it."""
    from ecf8 import format as fmt

    frame = fmt.parse(memoryview(blob))
    out = bytearray(blob)
    end = len(out) - 4
    out[frame.payload_offset : end] = np.random.default_rng(seed).integers(
        0, 256, end - frame.payload_offset, dtype=np.uint8).tobytes()
    return bytes(out)


@functools.cache
def spin_kernel():
    """A CuPy kernel ``spin(long long cycles)`` that busy-waits that many clock cycles (one thread),
    to keep a decode queued behind it on a stream."""
    import cupy

    return cupy.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) {} }''', "spin")
