"""Decode a frame whose payload is random bytes, checksums off, for compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/garbage_decode.py

Also decodes the valid frame, so memcheck sees the normal path too, and both frames by one
``GroupDecoder`` launch into one buffer (the path ``ecf8.torch`` uses for consecutive weights);
then multiplies both by ``ecf8.fused`` and by the tensor-core prototype (``bench/fused_mma``).
Prints what it checked.
"""

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
                str(Path(__file__).resolve().parents[1] / "tests")]
import exact_memory  # noqa: E402,F401  (before anything allocates)
import ecf8  # noqa: E402
from ecf8 import format as fmt  # noqa: E402
from ecf8.decoder_cuda import GroupDecoder  # noqa: E402
from helpers import garbage_payload  # noqa: E402  (tests/helpers.py)

for dtype_name, dtype, chunk in (("E4M3", "float8_e4m3fn", 4096), ("BF16", "bfloat16", 2048)):
    import ml_dtypes

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(300_001).astype(np.float32) * 16).astype(getattr(ml_dtypes, dtype))
    blob = ecf8.encode(x, chunk_size=chunk, max_tables=8)
    good = ecf8.decode(blob, device="cuda").get()
    assert (good.view(np.uint8) == x.view(np.uint8)).all()
    bad = garbage_payload(blob, seed=1)
    frame = fmt.parse(memoryview(blob))
    y = ecf8.decode(bad, device="cuda", verify=False)
    cp.cuda.Device().synchronize()
    same = (y.get().view(np.uint8) == ecf8.decode(bad, verify=False).view(np.uint8)).all()
    print(f"{dtype_name}: valid frame bit-exact; garbage payload decoded ({x.size} elements, "
          f"{frame.nchunks} chunks), equals the CPU reference on the same garbage: {bool(same)}")
    width = x.itemsize
    second = -(-x.size * width // 256) * 256
    buf = cp.full(second + x.size * width + 256, 0x5A, cp.uint8)
    group = GroupDecoder([ecf8.to_device(bad, verify=False), ecf8.to_device(blob)], [0, second])
    group.launch(buf.data.ptr)
    cp.cuda.Device().synchronize()
    host = buf.get()
    grouped = ((host[: x.size * width] == y.get().view(np.uint8)).all()
               and (host[second : second + x.size * width] == x.view(np.uint8)).all()
               and (host[x.size * width : second] == 0x5A).all() and (host[second + x.size * width :] == 0x5A).all())
    print(f"{dtype_name}: garbage and valid frame in one group launch: as decoded alone, "
          f"nothing else written: {bool(grouped)}")

# The fused decode + product (ecf8.fused) on garbage E4M3 and BF16 frames: in bounds, and equal
# to the same kernel on the CPU's decode of the same garbage.
from ecf8 import fused  # noqa: E402
from fused_mma import mma  # noqa: E402  (bench/fused_mma: the tensor-core prototype)

x = cp.asarray(np.random.default_rng(3).standard_normal((3, 2048)).astype(np.float32))
for dtype, scale in ((ml_dtypes.float8_e4m3fn, 16), (ml_dtypes.bfloat16, 0.02)):
    w = (np.random.default_rng(1).standard_normal(512 * 2048).astype(np.float32) * scale).astype(
        dtype).reshape(512, 2048)
    blob = ecf8.encode(w, chunk_size=4096, max_tables=8, allow_stored=False)
    bad = garbage_payload(blob, seed=2)
    xb = cp.asarray(x.get().astype(dtype).view(f"u{w.itemsize}"))       # tensor cores: x of w's type
    for label, data, verify in (("valid", blob, True), ("garbage", bad, False)):
        fw = fused.FusedWeight(ecf8.to_device(data, verify=verify))
        plain = cp.asarray(ecf8.decode(data, verify=verify).view(f"u{w.itemsize}").reshape(-1))
        twin = fused.PlainWeight(plain, (512, 2048), 4096, dtype=np.dtype(dtype).name)
        for kernel, y, y_twin in (("CUDA-core", fw.matmul(x), twin.matmul(x)),
                                  ("tensor-core prototype", mma.matmul(fw, xb), mma.matmul(twin, xb))):
            cp.cuda.Device().synchronize()
            same = bool((y.view(cp.uint32) == y_twin.view(cp.uint32)).all())
            print(f"fused {np.dtype(dtype).name} product ({kernel}), {label} frame: equals the twin on "
                  f"the CPU's decode: {same}")
