"""Prototype: ECF8 frames multiplied on tensor cores (``ecf8_fused_mma.cu``), beside ecf8.

    fw = ecf8.fused.FusedWeight(blob)                  # N x K E4M3/BF16 frame, K % 512 == 0
    y = mma.matmul(fw, x_bits)                         # x: B x K of the weight's type, as bits
    assert (mma.matmul(fw.twin(), x_bits) == y).all()  # bit for bit

Not part of the library: on Llama-3-8B shapes it ran slower than ecf8's default path (decode,
then cuBLAS) at batch 16 and slower than ``ecf8.fused``'s CUDA-core kernel at batch 1 (H100,
bench/NOTES.md "Tensor cores").  Its tests:
``pytest -p no:cacheprovider bench/fused_mma/test_fused_mma.py`` (GPU tests skip without a GPU);
per-shape times: ``python bench/fused_mma/shapes.py``; inside a model, every forward forced through
it: ``python bench/fused_mma/generate_check.py 1 1 graph``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ecf8 import fused, gpu
from ecf8.errors import UnsupportedError

MMA_WARPS = 8                  # weight rows per block (ECF8_MMA_WARPS)
MMA_TILES = (1, 2, 4)          # 16-row batch tiles a launch: up to 16, 32, 64 rows
MMA_NAMES = [f"ecf8_fused_mma<{m}, {d}, {e}>" for m in MMA_TILES for d in ("true", "false") for e in (1, 2)]
HERE = Path(__file__).resolve().parent


def compile_module(device_id: int):
    """The kernels for a device (NVRTC; FP8 ``mma.sync`` needs compute capability 8.9 or later)."""
    cupy = gpu.cupy()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=(HERE / "ecf8_fused_mma.cu").read_text(),
                                options=("-std=c++17", f"-I{fused._cuda_dir()}"), name_expressions=MMA_NAMES)
        module.compile()
    return module


KERNELS = gpu.KernelCache(compile_module, fused._launch_setup)


def matmul(product: Any, x: Any, *, scale: float = 1.0, out: Any = None, stream: Any = None):
    """``scale * x @ W.T`` on tensor cores for a ``fused.FusedWeight`` or ``fused.PlainWeight``.

    x: B x K elements of the weight's type as their bits (uint16 for bfloat16, uint8 for
    float8_e4m3fn), C-contiguous, 16-byte aligned, on the weight's GPU.  Returns B x N float32
    (``out`` if given); launch only.  Products are exact and summed by ``mma.sync`` in f32
    accumulators in an order fixed by (N, K, chunk size, B): a FusedWeight equals its twin bit for
    bit.  Raises UnsupportedError for block scales, a GPU below compute capability 8.9, or a wrong
    x or out.
    """
    cupy = gpu.cupy()
    n, k = product.shape
    if product.block:
        raise UnsupportedError("the tensor-core kernel applies a per-tensor scale, not block_scales")
    width = fused.ELEM_BYTES[product.dtype_name]
    with cupy.cuda.Device(product.device_id):
        if int(cupy.cuda.Device(product.device_id).compute_capability) < 89:
            raise UnsupportedError("the tensor-core kernel needs a GPU of compute capability 8.9 or later")
        st = gpu.stream(stream)
        x = fused._as_cupy(x)
        if (x.ndim != 2 or x.shape[1] != k or x.dtype.itemsize != width or x.dtype.kind not in "ui"
                or not x.flags.c_contiguous):
            raise UnsupportedError(f"x must be a C-contiguous B x {k} array of {product.dtype_name} bits "
                                   f"({width}-byte integers), not {x.dtype} {tuple(x.shape)}")
        if x.data.ptr % 16:
            raise UnsupportedError("x must be 16-byte aligned")
        rows = x.shape[0]
        y = cupy.empty((rows, n), np.float32) if out is None else fused._as_cupy(out)
        if y.shape != (rows, n) or y.dtype != np.float32 or not y.flags.c_contiguous:
            raise UnsupportedError(f"out must be a C-contiguous {rows} x {n} float32 array")
        span = math.lcm(product.chunk_size, k)          # elements a warp: whole chunks, whole rows
        blocks = -(-(n * k) // (MMA_WARPS * span))
        done = 0
        with st:
            while done < rows:
                slab = min(rows - done, 16 * MMA_TILES[-1])
                tiles = next(m for m in MMA_TILES if 16 * m >= slab)
                kernel = KERNELS.function(product.device_id,
                                          f"ecf8_fused_mma<{tiles}, {str(product.decode).lower()}, {width}>")
                kernel((blocks,), (MMA_WARPS * 32,),
                       (product._desc, np.uint64(x.data.ptr + done * k * width), np.int32(slab),
                        np.uint64(y.data.ptr + done * n * 4), np.float32(scale), np.uint64(span)),
                       shared_mem=product._shared)
                done += slab
    return y
