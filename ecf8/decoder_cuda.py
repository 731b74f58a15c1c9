"""CUDA decoder: CuPy RawModule kernels from ``cuda/ecf8_decode.cu``, compiled lazily per device.

    dt = ecf8.to_device(blob, device="cuda")    # upload + validate once
    w = ecf8.decode(dt, device="cuda")          # launch only: no copy, no sync
    ecf8.decode(dt, device="cuda", out=buf, stream=s)   # and no allocation: CUDA-graph safe

Decoded results are ``CudaArray``: element bits in a CuPy uint8/uint16 array plus the logical
dtype and shape.  DLPack and ``__cuda_array_interface__`` export the bits (CuPy has no
float8/bfloat16); ``CudaArray.logical()`` exports the element type's own DLPack code instead, and
the framework adapters hand out typed arrays.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any, Sequence

import numpy as np

from . import format as fmt
from . import gpu
from .errors import UnsupportedError
from .tables import decode_luts

__all__ = ["to_device", "decode", "decode_batch", "DeviceTensor", "CudaArray", "BatchDecoder", "GroupDecoder"]

WARPS = 8                  # warps per block (ECF8_WARPS in the kernel)
CHUNKS_PER_WARP = 1
LUT_BYTES = 2 << fmt.MAX_CODE_LEN
KERNEL_NAMES = {code: f"ecf8_decode<{spec.kernel_args}>" for code, spec in fmt.DTYPES.items()}
DESC_FIELDS = ["words", "raw", "chunk_words", "chunk_tables", "luts", "out", "n", "nchunks",
               "ntables", "chunk_log2"]
DESC_DTYPE = np.dtype([(f, "<u8") for f in DESC_FIELDS])

_ONE, _CPW = np.int32(1), np.uint32(CHUNKS_PER_WARP)


def compile_module(device_id: int, defines: Sequence[str] = ()):
    """Compile the decoder for a device (NVRTC, the device's own architecture); defines: extra
    ``-D`` macros (bench/bench_gpu.py builds variants this way, see ``KERNELS.replace``)."""
    cupy = gpu.cupy()
    with cupy.cuda.Device(device_id):
        options = ("-std=c++17", f"-DECF8_WARPS={WARPS}") + tuple(f"-D{d}" for d in defines)
        module = cupy.RawModule(code=gpu.kernel_source("ecf8_decode.cu"), options=options,
                                name_expressions=list(KERNEL_NAMES.values()))
        module.compile()
    return module


def _launch_setup(kernel: Any) -> None:
    kernel.max_dynamic_shared_size_bytes = fmt.MAX_TABLES * LUT_BYTES
    kernel.preferred_shared_memory_carveout = 100    # decode tables want smem, not L1


KERNELS = gpu.KernelCache(compile_module, _launch_setup)     # the decoder's, per device


def _kernel(device_id: int, dtype_code: int):
    """The compiled kernel for a dtype on a device (compiled once per device, on first use)."""
    return KERNELS.function(device_id, KERNEL_NAMES[dtype_code])


# DLPack DLDataTypeCode of each element type (format.DTYPES); the bit width is unchanged, so only
# the dtype code of the tensor changes.
DLPACK_CODES = {spec.dtype.name: spec.dlpack for spec in fmt.DTYPES.values()}


def _retype_capsule(capsule, code: int) -> None:
    """Set the dtype code of the DLTensor inside a fresh (unconsumed) DLPack capsule.

    Layouts (dlpack.h): DLManagedTensor starts with its DLTensor; DLManagedTensorVersioned has
    version (8 bytes), manager_ctx, deleter and flags (8 each) first.  In a DLTensor the dtype
    (code u8, bits u8, lanes u16) follows data (8), device (8) and ndim (4): byte offset 20.
    """
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    name = get_name(capsule)
    if name not in (b"dltensor", b"dltensor_versioned"):
        raise UnsupportedError(f"unexpected DLPack capsule {name!r}")
    base = get_pointer(capsule, name)
    tensor = base + (32 if name == b"dltensor_versioned" else 0)
    ctypes.c_uint8.from_address(tensor + 20).value = code


class CudaArray:
    """Decoded elements on a GPU: ``bits`` (CuPy uint8/uint16) viewed as ``dtype`` with ``shape``.

    ``stream`` is the CuPy stream the decode was enqueued on: DLPack consumers that pass their own
    stream are made to wait for it (an event recorded on it), as the DLPack protocol specifies.
    """

    def __init__(self, bits: Any, dtype: np.dtype, shape: tuple[int, ...], source: Any = None,
                 stream: Any = None, typed: bool = False):
        self.bits = bits
        self.stream = stream
        self.typed = typed        # export the logical DLPack dtype instead of the bits
        self._source = source     # keeps the compressed tensor alive while a decode may run
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict:
        """The element bits (typestr |u1 or <u2), shaped; consumers reinterpret them."""
        return self.bits.reshape(self.shape).__cuda_array_interface__

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: Any = None, copy: bool | None = None):
        """Export the element bits (uint8/uint16; adapters reinterpret them).

        stream: the consumer's stream (DLPack convention: None/1 legacy default, 2 per-thread
        default, -1 no synchronization, else a handle).  Versioned capsules when max_version asks.
        """
        bits = self.held_bits()
        kwargs = {"stream": stream}
        if max_version is not None:
            kwargs.update(max_version=max_version, dl_device=dl_device, copy=copy)
        if self.stream is None:
            capsule = bits.__dlpack__(**kwargs)
        else:
            with self.stream:                 # CuPy synchronizes from the current stream
                capsule = bits.__dlpack__(**kwargs)
        if self.typed:
            _retype_capsule(capsule, DLPACK_CODES[self.dtype.name])
        return capsule

    def held_bits(self) -> Any:
        """The element bits, shaped, as a CuPy array whose memory also keeps the compressed tensor
        alive (while a decode queued on any stream may still read it), for consumers that may
        outlive this CudaArray."""
        bits = self.bits.reshape(self.shape)
        return _kept_with(bits, self._source) if self._source is not None and bits.size else bits

    def __dlpack_device__(self):
        return self.bits.__dlpack_device__()

    def logical(self) -> "CudaArray":
        """The same array, exporting its own DLPack dtype (bfloat16, float16, or the DLPack 1.1
        codes float8_e4m3fn / float8_e5m2) instead of the bits, for consumers that import them."""
        return CudaArray(self.bits, self.dtype, self.shape, self._source, self.stream, typed=True)

    def get(self) -> np.ndarray:
        """A host copy with the logical dtype and shape."""
        return self.bits.get().view(self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"CudaArray(shape={self.shape}, dtype={self.dtype.name}, device={self.bits.device.id})"


def _kept_with(a: Any, source: Any) -> Any:
    """A view of CuPy array a whose memory keeps `source` alive too: an export of decoded bits
    (whose consumer may outlive the CudaArray) keeps the compressed tensor the decode reads until
    the consumer lets go, whatever stream the decode is still queued on."""
    cupy = gpu.cupy()
    mem = cupy.cuda.UnownedMemory(a.data.ptr, a.nbytes, (a, source), a.device.id)
    return cupy.ndarray(a.shape, a.dtype, cupy.cuda.MemoryPointer(mem, 0))


@dataclasses.dataclass
class DeviceTensor:
    """A validated ECF8 frame resident on one GPU, ready for launch-only decoding."""

    frame: fmt.Frame
    device_id: int
    payload: Any          # CuPy uint8: the whole frame
    aux: Any              # CuPy uint8: chunk word offsets (u32) | table ids | decode tables (u16)
    desc: Any             # CuPy: one TensorDesc without `out`
    block_starts: Any     # CuPy uint32 [0, blocks]
    blocks: int
    _args: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.frame.shape

    @property
    def dtype(self) -> np.dtype:
        return self.frame.spec.dtype

    @property
    def nbytes(self) -> int:
        """Device bytes held: the frame plus decode tables and index."""
        return int(self.payload.nbytes + self.aux.nbytes + self.desc.nbytes)

    def tobytes(self) -> bytes:
        """The frame's bytes on the host."""
        return self.payload.get().tobytes()

    def launch(self, out_ptr: int, stream: Any = None) -> None:
        """Enqueue this tensor's decode into device memory at out_ptr (n elements, 16-byte
        aligned, on this tensor's device: the caller's responsibility).  Launch only."""
        cupy = gpu.cupy()
        st = gpu.stream(stream)
        f = self.frame
        if f.n == 0:
            return
        switch = cupy.cuda.runtime.getDevice() != self.device_id
        if switch:
            previous = cupy.cuda.runtime.getDevice()
            cupy.cuda.runtime.setDevice(self.device_id)
        try:
            if f.mode == fmt.MODE_STORED:
                cupy.cuda.runtime.memcpyAsync(out_ptr, self.payload.data.ptr + f.raw_offset, f.raw_bytes,
                                              cupy.cuda.runtime.memcpyDeviceToDevice, st.ptr)
            else:
                args = self._args.get(out_ptr)
                if args is None:                      # launch arguments, built once per output
                    if len(self._args) > 8:
                        self._args.clear()
                    args = self._args[out_ptr] = (self.desc, self.block_starts, _ONE, _CPW,
                                                  np.uint64(out_ptr))
                with st:
                    _kernel(self.device_id, f.spec.code)((self.blocks,), (WARPS * 32,), args,
                                                         shared_mem=f.ntables * LUT_BYTES)
        finally:
            if switch:
                cupy.cuda.runtime.setDevice(previous)

    def descriptor(self, out_ptr: int = 0) -> np.ndarray:
        f = self.frame
        if f.mode == fmt.MODE_STORED:
            raise UnsupportedError("stored frames are copied, not decoded")
        tables_at, luts_at = _aux_offsets(f)
        base, aux = self.payload.data.ptr, self.aux.data.ptr
        d = np.zeros((), DESC_DTYPE)
        d["words"], d["raw"] = base + f.exp_offset, base + f.raw_offset
        d["chunk_words"], d["chunk_tables"], d["luts"] = aux, aux + tables_at, aux + luts_at
        d["out"], d["n"], d["nchunks"] = out_ptr, f.n, f.nchunks
        d["ntables"], d["chunk_log2"] = f.ntables, f.chunk_log2
        return d


def _aux_offsets(frame: fmt.Frame) -> tuple[int, int]:
    """Byte offsets of the table ids and the decode tables in a tensor's aux buffer, which
    starts with the nchunks + 1 chunk word offsets (u32)."""
    tables_at = 4 * (frame.nchunks + 1)
    return tables_at, fmt.align16(tables_at + frame.nchunks)


def to_device(blob: Any, device: str = "cuda", *, verify: bool = True) -> DeviceTensor:
    """Validate a frame on the host, upload it and its decode tables to a GPU once (on the current
    stream, the copies done when it returns, so any stream may decode it: see ``gpu.upload``; the
    host bytes are not kept, nor copied into CuPy's pinned memory pool, which would keep a block
    of each frame's size)."""
    cupy = gpu.cupy()
    view = fmt.as_buffer(blob)
    frame = fmt.parse(view, verify=verify)
    dev = gpu.device_id(device)
    with cupy.cuda.Device(dev):
        return resident(frame, dev, gpu.upload(view))


def resident(frame: fmt.Frame, dev: int, payload: Any, cls: type | None = None, **extra) -> DeviceTensor:
    """The decoder's device state (index, decode tables, descriptor) of a validated frame whose
    bytes `payload` (CuPy uint8) already lie on GPU `dev`, the current device; cls: a DeviceTensor
    subclass taking the keyword arguments `extra` (the GPU encoder's EncodedTensor)."""
    cupy = gpu.cupy()
    if frame.mode == fmt.MODE_CODED:
        tables_at, luts_at = _aux_offsets(frame)
        aux = np.zeros(luts_at + frame.ntables * LUT_BYTES, np.uint8)
        aux[:tables_at] = frame.chunk_words.astype("<u4").view(np.uint8)
        aux[tables_at : tables_at + frame.nchunks] = frame.chunk_tables
        aux[luts_at:] = decode_luts(frame.lengths, fmt.MAX_CODE_LEN).astype("<u2").view(np.uint8).reshape(-1)
        aux_d, blocks = gpu.upload(aux), -(-frame.nchunks // (WARPS * CHUNKS_PER_WARP))
    else:
        aux_d, blocks = cupy.zeros(0, np.uint8), 0
    dt = (cls or DeviceTensor)(frame, dev, payload, aux_d, None,
                               gpu.upload(np.array([0, blocks], np.uint32)), blocks, **extra)
    dt.desc = (gpu.upload(dt.descriptor().reshape(1).view(np.uint8)) if frame.mode == fmt.MODE_CODED
               else cupy.zeros(0, np.uint8))
    return dt


def _out_buffer(out: Any, dt_shape_n: int, spec: fmt.DtypeSpec, device_id: int):
    """(CuPy uint view, pointer) of a caller's output, checked for size, device and alignment."""
    cupy = gpu.cupy()
    itemsize = spec.dtype.itemsize
    if isinstance(out, CudaArray):
        out = out.bits
    if not hasattr(out, "__cuda_array_interface__") and hasattr(out, "__dlpack__"):
        try:
            out = cupy.from_dlpack(out)          # zero-copy view of any DLPack CUDA array
        except Exception as e:
            raise UnsupportedError(f"out cannot be used as a CUDA buffer: {e}") from None
    cai = getattr(out, "__cuda_array_interface__", None)
    if cai is None:
        raise UnsupportedError("out must be a CUDA array (__cuda_array_interface__ or DLPack)")
    ptr = int(cai["data"][0])
    nbytes = int(np.prod(cai["shape"], dtype=np.int64)) * np.dtype(cai["typestr"]).itemsize
    if cai.get("strides") not in (None, ()) and not _contiguous(cai):
        raise UnsupportedError("out must be C-contiguous")
    if nbytes != dt_shape_n * itemsize:
        raise UnsupportedError(f"out holds {nbytes} bytes; the tensor needs {dt_shape_n * itemsize}")
    if ptr % 16:
        raise UnsupportedError("out must be 16-byte aligned")
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, out, device_id)
    bits = cupy.ndarray((dt_shape_n,), spec.uint, cupy.cuda.MemoryPointer(mem, 0))
    return bits, ptr


def _contiguous(cai: dict) -> bool:
    itemsize = np.dtype(cai["typestr"]).itemsize
    expected = itemsize
    for dim, stride in zip(reversed(cai["shape"]), reversed(cai["strides"])):
        if dim > 1 and stride != expected:
            return False
        expected *= dim
    return True


def decode(blob: Any, device: str = "cuda", *, out: Any = None, stream: Any = None,
           verify: bool = True) -> CudaArray:
    """Decode a frame (bytes-like or DeviceTensor) on a GPU; see ecf8.decode.

    For a DeviceTensor with ``out`` given, this only enqueues the kernel on ``stream``: no
    allocation, no host-device copy, no synchronization.  Bytes are first copied up on ``stream``
    from ordinary (pageable) host memory, and the host waits for that copy and the stream's
    earlier work; to enqueue without waiting, upload once with ``to_device`` and decode the
    DeviceTensor.
    """
    cupy = gpu.cupy()
    dt = blob if isinstance(blob, DeviceTensor) else None
    if dt is not None and device != "cuda" and gpu.device_id(device) != dt.device_id:
        raise UnsupportedError(f"tensor lives on cuda:{dt.device_id}, not {device}")
    with cupy.cuda.Device(dt.device_id if dt is not None else gpu.device_id(device)):
        st = gpu.stream(stream)
        with st:
            if dt is None:      # uploaded on st: ordered before the decode, and its memory goes
                dt = to_device(blob, device, verify=verify)    # back to st's pool, reused after it
            spec, f = dt.frame.spec, dt.frame
            if out is None:
                bits = cupy.empty(f.n, spec.uint)
                ptr = bits.data.ptr
            else:
                bits, ptr = _out_buffer(out, f.n, spec, dt.device_id)
            dt.launch(ptr, st)
    return CudaArray(bits, spec.dtype, f.shape, dt, st)


def _batch_state(tensors: Sequence[DeviceTensor], out_ptrs: Sequence[int]) -> tuple:
    """(descriptors, block starts, blocks, shared bytes, coded count, stored copies) of tensors of
    one dtype on the current device, tensor i written at out_ptrs[i] (an address or an offset)."""
    coded = [(t, p) for t, p in zip(tensors, out_ptrs) if t.frame.mode == fmt.MODE_CODED]
    copies = [(p, t) for t, p in zip(tensors, out_ptrs) if t.frame.mode == fmt.MODE_STORED and t.frame.n]
    descs = starts = None
    if coded:
        descs = gpu.upload(np.concatenate([t.descriptor(p).reshape(1) for t, p in coded]).view(np.uint8))
        starts = gpu.upload(np.cumsum([0] + [t.blocks for t, _ in coded]).astype(np.uint32))
    smem = max([t.frame.ntables * LUT_BYTES for t, _ in coded], default=0)
    return descs, starts, sum(t.blocks for t, _ in coded), smem, len(coded), copies


def _check_batch(tensors: Sequence[DeviceTensor]) -> int:
    """The device of a non-empty batch of tensors of one dtype on one device."""
    if not tensors:
        raise UnsupportedError("a batch needs at least one tensor")
    dev = tensors[0].device_id
    codes = {t.frame.spec.code for t in tensors}
    if len(codes) != 1 or any(t.device_id != dev for t in tensors):
        raise UnsupportedError("a batch holds tensors of one dtype on one device")
    return dev


def _run_batch(state: tuple, device_id: int, code: int, st: Any, base: int) -> None:
    """Enqueue a batch (see _batch_state) on CuPy stream st, outputs offset by base."""
    cupy = gpu.cupy()
    descs, starts, blocks, smem, ncoded, copies = state
    with st:
        if ncoded:
            _kernel(device_id, code)((blocks,), (WARPS * 32,),
                                     (descs, starts, np.int32(ncoded), _CPW, np.uint64(base)),
                                     shared_mem=smem)
        for ptr, t in copies:
            f = t.frame
            cupy.cuda.runtime.memcpyAsync(int(base + ptr), t.payload.data.ptr + f.raw_offset, f.raw_bytes,
                                          cupy.cuda.runtime.memcpyDeviceToDevice, st.ptr)


class GroupDecoder:
    """Device-resident tensors of one dtype decoded by one launch into one buffer, tensor i at byte
    offset offsets[i] (16-byte aligned).  The descriptors hold offsets, so ``launch`` uploads
    nothing for any buffer: it is CUDA-graph safe whatever buffer a capture uses (ecf8.torch
    decodes consecutive weights of a model this way)."""

    def __init__(self, tensors: Sequence[DeviceTensor], offsets: Sequence[int]):
        cupy = gpu.cupy()
        self.device_id = _check_batch(tensors)
        if len(offsets) != len(tensors) or any(o % 16 for o in offsets):
            raise UnsupportedError("one 16-byte aligned offset per tensor")
        self.code = tensors[0].frame.spec.code
        self._tensors = tensors   # keep payloads alive
        with cupy.cuda.Device(self.device_id):
            self._state = _batch_state(tensors, [int(o) for o in offsets])

    def launch(self, base_ptr: int, stream: Any = None) -> None:
        """Enqueue the decode into the buffer at base_ptr (16-byte aligned, large enough, on this
        device: the caller's responsibility) on stream.  Launch only."""
        cupy = gpu.cupy()
        with cupy.cuda.Device(self.device_id):
            _run_batch(self._state, self.device_id, self.code, gpu.stream(stream), base_ptr)


class BatchDecoder:
    """Many device-resident tensors of one dtype decoded by a single launch into fixed outputs.

    The descriptors are uploaded once here; ``run`` only enqueues the kernel (CUDA-graph safe).
    Stored (uncompressed) frames in the batch are copied with cudaMemcpyAsync on the same stream.
    """

    def __init__(self, tensors: Sequence[DeviceTensor], outs: Sequence[Any] | None = None):
        cupy = gpu.cupy()
        dev = _check_batch(tensors)
        self.device_id, self.spec = dev, tensors[0].frame.spec
        with cupy.cuda.Device(dev):
            if outs is None:
                outs = [cupy.empty(t.frame.n, self.spec.uint) for t in tensors]
            if len(outs) != len(tensors):
                raise UnsupportedError("one output per tensor")
            views = [_out_buffer(o, t.frame.n, self.spec, dev) for o, t in zip(outs, tensors)]
            self.outputs = [CudaArray(v[0], self.spec.dtype, t.shape) for v, t in zip(views, tensors)]
            self._tensors = tensors   # keep payloads alive
            self._state = _batch_state(tensors, [p for _, p in views])
            self.ntensors = self._state[4]          # coded tensors: the kernel's share

    def run(self, stream: Any = None) -> list[CudaArray]:
        """Enqueue the batch on stream; returns the outputs (valid once the stream reaches them)."""
        cupy = gpu.cupy()
        with cupy.cuda.Device(self.device_id):
            st = gpu.stream(stream)
            for out in self.outputs:
                out.stream = st
            _run_batch(self._state, self.device_id, self.spec.code, st, 0)
        return self.outputs


def decode_batch(tensors: Sequence[DeviceTensor], outs: Sequence[Any] | None = None,
                 stream: Any = None) -> list[CudaArray]:
    """Decode device-resident tensors of one dtype in one launch (builds a BatchDecoder)."""
    return BatchDecoder(tensors, outs).run(stream)
