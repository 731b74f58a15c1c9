"""GPU-encode awkward tensors for compute-sanitizer (every kernel of cuda/ecf8_encode.cu runs):

    compute-sanitizer --tool memcheck python bench/sanitize_encode.py

Every dtype, lengths around group/chunk boundaries, empty, 0-d, stored and coded frames, several
table counts; each frame is compared with the CPU encoder's and decoded on the GPU.  Prints a count.
"""

import sys
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import exact_memory  # noqa: E402,F401  (before anything allocates)
import ecf8  # noqa: E402
from ecf8 import encoder_cuda  # noqa: E402

rng = np.random.default_rng(0)
checked = 0
for dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16, np.float16):
    uint = np.uint8 if np.dtype(dtype).itemsize == 1 else np.uint16
    for n in (0, 1, 31, 511, 512, 513, 4095, 4097, 70001):
        for tables in (1, 8):
            w = (rng.standard_normal(n).astype(np.float32) * (16 if uint is np.uint8 else 0.02)).astype(dtype)
            want = ecf8.encode(w, chunk_size=512, max_tables=tables)
            t = encoder_cuda.encode(cp.asarray(w.view(uint)), dtype=np.dtype(dtype), chunk_size=512,
                                    max_tables=tables)
            assert t.tobytes() == want, (np.dtype(dtype).name, n, tables)
            y = ecf8.decode(t, device="cuda").get()
            assert np.array_equal(y.view(uint), w.view(uint))
            checked += 1
    noise = rng.integers(0, 1 << (8 * np.dtype(dtype).itemsize), 3000).astype(uint)   # stored frame
    assert encoder_cuda.encode(cp.asarray(noise), dtype=np.dtype(dtype)).tobytes() == \
        ecf8.encode(noise.view(dtype))
    checked += 1
cp.cuda.Device().synchronize()
print(f"sanitize_encode: {checked} GPU frames equal the CPU encoder's and decode bit-exactly")
