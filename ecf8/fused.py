"""Fused decode + matrix product on a GPU for FP8 E4M3 and BF16 weights (``cuda/ecf8_fused.cu``).

    fw = ecf8.fused.FusedWeight(blob, device="cuda")        # an N x K E4M3/BF16 frame, K % 512 == 0
    y = fw.matmul(x)                                          # x: B x K float32 -> B x N float32
    twin = fw.twin()                                          # the same kernel, uncompressed bytes
    assert (twin.matmul(x) == y).all()                         # bit for bit

The weights are decoded into registers inside the product and never written to memory, so the
compressed bytes cross device memory once.  The arithmetic is float32 in an order fixed by
(N, K, chunk size) alone (the kernel's header says which), so a ``FusedWeight`` and the
``PlainWeight`` of the same bytes and chunk size give identical bits; neither is claimed equal to
cuBLAS (``bench/bench_fused.py`` measures the difference: for E4M3 1.4e-4 to 2.1e-4 of each row's
largest |y|, for BF16 up to 3.4e-3 of cuBLAS's BF16 output).  It is an opt-in path: on Llama-3-8B
shapes at batch 1 on an H100 it ran at 0.41-0.42 of cuBLAS for E4M3 and 0.49 for BF16 (the default
path: 0.30-0.31), and below the default path above batch 1 (bench/NOTES.md), so ``ecf8.decode``
followed by the framework's own matmul stays the default;
``ecf8.torch`` uses this module only where asked (``compress_module(fused=True)``: BF16
``nn.Linear`` weights, where a timed first forward finds it faster).

Scales: ``scale`` (a float, per tensor) multiplies each output; ``block_scales`` (float32,
``ceil(N/128) x ceil(K/128)``, DeepSeek's 128 x 128 recipe; E4M3 only) weighs each block's partial
sums.
Batches of any size run as slabs of 8, 4, 2 and 1 rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import decoder_cuda as dc
from . import format as fmt
from . import gpu
from .errors import UnsupportedError

__all__ = ["FusedWeight", "PlainWeight", "supports"]

WARPS = 8                      # warps per block (ECF8_FUSED_WARPS in the kernel)
SLABS = (8, 4, 2, 1)           # batch sizes the kernel is instantiated for
GROUP = 512                    # elements per group (FORMAT.md §3): K must be a multiple
FUSED_DESC_DTYPE = np.dtype([(f, "<u8") for f in dc.DESC_FIELDS] +
                            [(f, "<u8") for f in ("weights", "scales", "rows", "cols", "rows_per_chunk",
                                                  "scale_cols")])

_workspaces: dict[tuple[int, int], Any] = {}
ELEM_BYTES = {"float8_e4m3fn": 1, "bfloat16": 2}   # the weight dtypes the kernel multiplies
SLAB_NAMES = [f"ecf8_fused<{b}, {d}, {s}, {e}>" for b in SLABS for d in ("true", "false")
              for s, e in (("false", 1), ("true", 1), ("false", 2))]


def supports(shape: tuple[int, ...], dtype_name: str) -> str | None:
    """None if the fused kernel covers an N x K weight of this dtype, else the reason it does not."""
    if dtype_name not in ELEM_BYTES:
        return f"the fused kernel multiplies {' or '.join(ELEM_BYTES)} weights, not {dtype_name}"
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        return f"the fused kernel needs a 2-D N x K weight, not shape {shape}"
    if shape[1] % GROUP:
        return f"the fused kernel needs K (columns) a multiple of {GROUP}, not {shape[1]}"
    return None


def _cuda_dir() -> Path:
    """The folder of ecf8's CUDA sources (installed package or source tree)."""
    here = Path(__file__).resolve().parent
    for path in (here / "cuda", here.parent / "cuda"):
        if (path / "ecf8_fused.cu").exists():
            return path
    raise UnsupportedError("ecf8's CUDA sources (ecf8_fused.cu) are missing from the installation")


def compile_module(device_id: int):
    """The fused kernels for a device (NVRTC, the device's own architecture)."""
    cupy = gpu.cupy()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=gpu.kernel_source("ecf8_fused.cu"),
                                options=("-std=c++17", f"-I{_cuda_dir()}", f"-DECF8_FUSED_WARPS={WARPS}"),
                                name_expressions=SLAB_NAMES + ["ecf8_fused_reduce", "ecf8_fused_permute_x"])
        module.compile()
    return module


def _launch_setup(kernel: Any) -> None:
    kernel.max_dynamic_shared_size_bytes = fmt.MAX_TABLES * dc.LUT_BYTES   # decode tables
    kernel.preferred_shared_memory_carveout = 100


KERNELS = gpu.KernelCache(compile_module, _launch_setup)     # the fused kernels, per device


def _kernel(device_id: int, batch: int, decode: bool, block: bool, elem_bytes: int):
    return KERNELS.function(device_id, f"ecf8_fused<{batch}, {str(decode).lower()}, {str(block).lower()}, "
                                       f"{elem_bytes}>")


def _workspace(device_id: int, stream_ptr: int, floats: int):
    """The row-partials scratch of one device and stream (float32, grown on demand)."""
    cupy = gpu.cupy()
    key = (device_id, stream_ptr)
    buf = _workspaces.get(key)
    if buf is None or buf.size < floats:
        if len(_workspaces) > 64:
            _workspaces.clear()
        buf = _workspaces[key] = cupy.empty(max(floats, 1 << 16), np.float32)
    return buf


class _Product:
    """What FusedWeight and PlainWeight share: the shape, the chunking and the launches."""

    decode = False

    def _setup(self, shape: tuple[int, int], dtype_name: str, chunk_log2: int, device_id: int,
               weights_ptr: int, base_desc: np.ndarray | None, block_scales: Any) -> None:
        cupy = gpu.cupy()
        self.shape, self.device_id = (int(shape[0]), int(shape[1])), device_id
        self.dtype_name = dtype_name
        n, k = self.shape
        self.chunk_size = 1 << chunk_log2
        self.nchunks = -(-(n * k) // self.chunk_size)
        self.rows_per_chunk = -(-self.chunk_size // k) + 1
        self._direct = self.chunk_size % k == 0      # whole rows per chunk: no reduction launch
        d = np.zeros((), FUSED_DESC_DTYPE)
        if base_desc is not None:
            for f in dc.DESC_FIELDS:
                d[f] = base_desc[f]
        d["n"], d["nchunks"], d["chunk_log2"] = n * k, self.nchunks, chunk_log2
        d["weights"], d["rows"], d["cols"] = weights_ptr, n, k
        d["rows_per_chunk"], d["scale_cols"] = self.rows_per_chunk, -(-k // 128)
        self.block = block_scales is not None
        if self.block and dtype_name != "float8_e4m3fn":
            raise UnsupportedError(f"block_scales apply to float8_e4m3fn weights, not {dtype_name}")
        if self.block:
            scales = cupy.asarray(block_scales, dtype=np.float32)
            want = (-(-n // 128), -(-k // 128))
            if scales.shape != want:
                raise UnsupportedError(f"block_scales must have shape {want}, not {tuple(scales.shape)}")
            self._scales = cupy.ascontiguousarray(scales)
            d["scales"] = self._scales.data.ptr
        # Fixed: uploaded once, done when gpu.upload returns (as the scales' copy on the same
        # stream): a copy left in flight would race a product enqueued on another stream.
        self._desc = gpu.upload(d.reshape(1).view(np.uint8))

    def _partial_floats(self, batch: int) -> int:
        """Row partials of the largest slab of `batch` rows; 0 where the chunk size is a multiple
        of K (every row is summed inside one chunk and written directly)."""
        if self._direct:
            return 0
        return next(s for s in SLABS if s <= max(batch, 1)) * self.nchunks * self.rows_per_chunk

    def workspace_floats(self, batch: int) -> int:
        """float32 elements of the scratch a ``matmul`` of `batch` rows needs: the permuted copy
        of x (B x K) and, where chunks end inside rows, the row partials of the largest slab."""
        return max(batch, 1) * self.shape[1] + self._partial_floats(batch)

    def matmul(self, x: Any, *, scale: float = 1.0, out: Any = None, workspace: Any = None,
               stream: Any = None):
        """``scale * x @ W.T``, W weighted per 128 x 128 block by ``block_scales`` where given; float32.

        x: B x K float32 on this GPU (CuPy, DLPack or ``__cuda_array_interface__``), C-contiguous,
        16-byte aligned.  Returns B x N float32 (CuPy; ``out`` if given).  Launch only: enqueued
        on ``stream`` (default: CuPy's current), no synchronization.  ``workspace``: float32
        scratch of at least ``workspace_floats(B)`` elements, by default one kept per device and
        stream; give one (and ``out``) to capture the call in a CUDA graph, which then allocates
        and uploads nothing.  Raises UnsupportedError for a wrong shape, dtype, layout or workspace.
        """
        cupy = gpu.cupy()
        n, k = self.shape
        with cupy.cuda.Device(self.device_id):
            st = gpu.stream(stream)
            x = _as_cupy(x)
            if x.ndim != 2 or x.shape[1] != k or x.dtype != np.float32 or not x.flags.c_contiguous:
                raise UnsupportedError(f"x must be a C-contiguous B x {k} float32 array, not "
                                       f"{x.dtype} {tuple(x.shape)}")
            if x.data.ptr % 16:
                raise UnsupportedError("x must be 16-byte aligned")
            rows = x.shape[0]
            y = cupy.empty((rows, n), np.float32) if out is None else _as_cupy(out)
            if y.shape != (rows, n) or y.dtype != np.float32 or not y.flags.c_contiguous:
                raise UnsupportedError(f"out must be a C-contiguous {rows} x {n} float32 array")
            if rows == 0:
                return y
            need = self.workspace_floats(rows)
            work = _workspace(self.device_id, st.ptr, need) if workspace is None else _as_cupy(workspace)
            if work.dtype != np.float32 or work.size < need or not work.flags.c_contiguous or work.data.ptr % 16:
                raise UnsupportedError(f"workspace must be a contiguous, 16-byte aligned float32 array of "
                                       f"at least {need} elements")
            xp = work.data.ptr                                  # permuted x: rows x k floats
            partials = np.uint64(xp + rows * k * 4)
            y_scale = np.float32(scale)
            permute = KERNELS.function(self.device_id, "ecf8_fused_permute_x")
            reduce = KERNELS.function(self.device_id, "ecf8_fused_reduce")
            blocks = -(-self.nchunks // WARPS)
            done = 0
            with st:
                n4 = rows * k // 4
                permute((-(-n4 // 256),), (256,), (x, np.uint64(xp), np.uint64(n4)))
                while done < rows:
                    slab = next(s for s in SLABS if s <= rows - done)
                    y_ptr = np.uint64(y.data.ptr + done * n * 4)
                    _kernel(self.device_id, slab, self.decode, self.block, ELEM_BYTES[self.dtype_name])(
                        (blocks,), (WARPS * 32,), (self._desc, np.uint64(xp + done * k * 4), partials,
                                                   y_ptr if self._direct else np.uint64(0), y_scale),
                        shared_mem=self._shared)
                    if not self._direct:
                        reduce((-(-(slab * n) // 256),), (256,), (self._desc, partials, np.int32(slab), y_scale, y_ptr))
                    done += slab
        return y


def _as_cupy(x: Any):
    cupy = gpu.cupy()
    if isinstance(x, cupy.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cupy.asarray(x)
    if hasattr(x, "__dlpack__"):
        return cupy.from_dlpack(x)
    raise UnsupportedError("x must be a CUDA array (CuPy, DLPack or __cuda_array_interface__)")


class FusedWeight(_Product):
    """An N x K FP8 E4M3 or BF16 weight held on a GPU as an ECF8 frame, multiplied without decoding
    it to memory.  ``blob``: frame bytes (validated on the host, then uploaded) or an
    ``ecf8.to_device`` DeviceTensor.  Raises UnsupportedError for frames the kernel does not cover
    (see ``supports``; stored frames too) and CorruptDataError for invalid frames."""

    decode = True

    def __init__(self, blob: Any, device: str = "cuda", *, block_scales: Any = None):
        dt = blob if isinstance(blob, dc.DeviceTensor) else dc.to_device(blob, device)
        f = dt.frame
        why = supports(f.shape, f.spec.dtype.name)
        if why is None and f.mode != fmt.MODE_CODED:
            why = "a stored (uncoded) frame has nothing to decode: multiply it with PlainWeight"
        if why:
            raise UnsupportedError(why)
        self.tensor = dt
        with gpu.cupy().cuda.Device(dt.device_id):
            self._setup(f.shape, f.spec.dtype.name, f.chunk_log2, dt.device_id, 0, dt.descriptor(0),
                        block_scales)
        self._shared = f.ntables * dc.LUT_BYTES

    def twin(self) -> "PlainWeight":
        """The uncompressed twin: this weight decoded once and multiplied by the same kernel."""
        return PlainWeight(dc.decode(self.tensor).bits, self.shape, self.chunk_size,
                           block_scales=self._scales if self.block else None, dtype=self.dtype_name)


class PlainWeight(_Product):
    """The fused kernel's twin: an N x K weight's bytes (a CUDA array of N*K elements of `dtype`,
    or of its bits: uint8 for float8_e4m3fn, uint16 for bfloat16; C order, on the current device)
    multiplied exactly as a FusedWeight with the same chunk_size multiplies its frame."""

    def __init__(self, weights: Any, shape: tuple[int, int], chunk_size: int, *, block_scales: Any = None,
                 dtype: str = "float8_e4m3fn"):
        cupy = gpu.cupy()
        why = supports(tuple(shape), dtype)
        if why:
            raise UnsupportedError(why)
        if chunk_size < GROUP or chunk_size & (chunk_size - 1):
            raise UnsupportedError(f"chunk_size must be a power of two >= {GROUP}, not {chunk_size}")
        w, width = _as_cupy(weights), ELEM_BYTES[dtype]
        if w.size != shape[0] * shape[1] or w.dtype.itemsize != width or not w.flags.c_contiguous:
            raise UnsupportedError(f"weights must be {shape[0] * shape[1]} contiguous {width}-byte elements")
        self._weights = w.reshape(-1).view(np.uint8)
        if self._weights.data.ptr % 16:
            raise UnsupportedError("weights must be 16-byte aligned")
        with cupy.cuda.Device(w.device.id):
            self._setup(tuple(shape), dtype, chunk_size.bit_length() - 1, w.device.id,
                        self._weights.data.ptr, None, block_scales)
        self._shared = 0
