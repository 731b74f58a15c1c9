"""PyTorch adapter: tensors in and out, checkpoints, and just-in-time decoding of a module's weights.

    blob = ecf8.torch.encode(w)                       # w: float8_e4m3fn / float8_e5m2 / bfloat16 / float16
    w2 = ecf8.torch.decode(blob, device="cuda")       # on torch's current stream
    ecf8.torch.save_file({"w": w}, "x.safetensors")   # like safetensors.torch, compressed
    stats = ecf8.torch.compress_module(model)          # weights stay compressed, decoded per forward
    ecf8.torch.decompress_module(model)
    ecf8.torch.load_model(meta_model, "ckpt/", device="cuda")   # file -> compressed GPU storage

GPU decoding writes into memory from torch's caching allocator on torch's current stream (or the
``stream`` given: a ``torch.cuda.Stream``, an int handle or an object with ``__cuda_stream__``).

A compressed module (after ``compress_module`` or ``load_model``) behaves like the original module
for inference: ``module.weight`` decodes on demand (inside ``forward``: the just-in-time copy),
``state_dict()`` holds the decoded weights under their usual keys and ``load_state_dict`` re-encodes
what it is given; ``torch.save``/``pickle``/``copy.deepcopy`` give a compressed module again.  ``.to(device)``
moves the compressed frames; a dtype conversion makes the weight an ordinary Parameter again.  Its
compressed weights are not ``parameters()`` (they have no gradient); tied weights stay tied.

Tensor parallelism: a weight that is a DTensor (``torch.distributed.tensor``, e.g. after
``parallelize_module`` with ColwiseParallel / RowwiseParallel, or Transformers' ``tp_plan``) is held
as this rank's local shard only, compressed; ``module.weight``, ``state_dict()`` and
``decompress_module`` give back a DTensor with the same device mesh, placements, global shape and
stride, so the module's TP collectives are exactly those of the uncompressed model.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import api, encoder
from . import format as fmt
from .errors import ECF8Error, UnsupportedError

__all__ = ["encode", "decode", "save_file", "load_file", "compress_module", "decompress_module",
           "load_model", "from_pretrained", "CompressionStats", "is_compressed", "is_dtensor"]

TORCH_DTYPES = {1: torch.float8_e4m3fn, 2: torch.float8_e5m2, 3: torch.bfloat16, 4: torch.float16}
_FROM_TORCH = {v: fmt.DTYPES[k] for k, v in TORCH_DTYPES.items()}
_BITS = {1: torch.uint8, 2: torch.int16}       # torch views used to move element bits
_UINTS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def _spec(t: torch.Tensor) -> fmt.DtypeSpec:
    try:
        return _FROM_TORCH[t.dtype]
    except KeyError:
        names = ", ".join(str(d) for d in TORCH_DTYPES.values())
        raise UnsupportedError(f"ecf8 cannot code {t.dtype}; supported: {names}") from None


def _no_dtensor(t: torch.Tensor) -> None:
    if is_dtensor(t):
        raise UnsupportedError("a DTensor's data is spread over ranks: give its local shard "
                               "(t.to_local()) or the whole tensor (t.full_tensor())")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host NumPy (ml_dtypes) array with t's elements and shape (copies from a GPU).
    Raises UnsupportedError for a DTensor (its data is spread over ranks)."""
    _no_dtensor(t)
    spec = _spec(t)
    bits = t.detach().contiguous().view(_BITS[spec.dtype.itemsize]).cpu().numpy()
    return bits.view(spec.dtype)


def from_numpy(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing x's memory, of the matching torch dtype (ml_dtypes FP8/BF16 too)."""
    try:
        spec = fmt.spec_for_dtype(x.dtype)
    except ECF8Error:
        return torch.from_numpy(np.ascontiguousarray(x)) if x.ndim else torch.from_numpy(np.array(x))
    bits = np.ascontiguousarray(x).view(np.uint8 if x.itemsize == 1 else np.int16)
    return torch.from_numpy(bits).view(TORCH_DTYPES[spec.code])


def encode(t: torch.Tensor, *, stream: Any = None, **options):
    """Compress a tensor: bytes for a CPU tensor; a CUDA tensor is encoded on its GPU into the
    same frame (torch-allocated memory), returned as a device-resident ``EncodedTensor`` (a
    DeviceTensor: decode it directly, ``.tobytes()`` for the bytes), on torch's current stream
    unless ``stream`` is given.  options: as for ``ecf8.encode``.  A DTensor raises UnsupportedError
    (encode its ``to_local()`` shard)."""
    _no_dtensor(t)
    spec = _spec(t)
    if t.is_cuda:
        from . import encoder_cuda

        bits = t.detach().view(_BITS[spec.dtype.itemsize])
        with torch_memory():
            return encoder_cuda.encode(bits, dtype=spec.dtype, stream=_stream_handle(stream, t.device),
                                       **options)
    if stream is not None:
        raise UnsupportedError("stream= applies to CUDA tensors only")
    return encoder.encode(to_numpy(t), **options)


def _stream_handle(stream: Any, device: torch.device) -> int:
    if stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    if isinstance(stream, torch.cuda.Stream):
        return stream.cuda_stream
    return stream


def decode(blob: Any, device: str | torch.device = "cpu", out: torch.Tensor | None = None,
           stream: Any = None) -> torch.Tensor:
    """Decode a frame (bytes-like, or a DeviceTensor for GPUs) to a tensor of its dtype and shape.

    out: a contiguous tensor of the same number of bytes on the target device (any dtype); the
    result is a view of it.
    """
    device = torch.device(device)
    if device.type == "cpu":
        if stream is not None:
            raise UnsupportedError("stream= applies to GPU decoding only")
        t = from_numpy(api.decode(blob))
        if out is None:
            return t
        _check_out(out, t.numel(), t.element_size(), device)
        out.view(-1).view(t.dtype).copy_(t.reshape(-1))
        return out.view(t.dtype).view(t.shape)
    if device.type != "cuda":
        raise UnsupportedError(f"device must be cpu or cuda, not {device}")
    from . import decoder_cuda

    dt = blob if isinstance(blob, decoder_cuda.DeviceTensor) else _upload(
        blob, _cuda_index(device))
    dev = torch.device("cuda", dt.device_id)
    code, n = dt.frame.spec.code, dt.frame.n
    width = dt.frame.spec.dtype.itemsize
    if out is None:
        out = torch.empty(n, dtype=_BITS[width], device=dev)
    _check_out(out, n, width, dev)
    if out.data_ptr() % 16:
        raise UnsupportedError("out must be 16-byte aligned")
    dt.launch(out.data_ptr(), _stream_handle(stream, dev))
    return out.view(-1).view(TORCH_DTYPES[code]).view(dt.frame.shape)


def _check_out(out: torch.Tensor, n: int, width: int, device: torch.device) -> None:
    if out.device != device or not out.is_contiguous() or out.numel() * out.element_size() != n * width:
        raise UnsupportedError(f"out must be a contiguous {device} tensor of {n * width} bytes")


# --- GPU memory through torch's allocator --------------------------------------------------------

def _torch_allocator(size: int):
    """A CuPy allocation served by torch's caching allocator (counted by torch.cuda memory stats,
    bounded by set_per_process_memory_fraction, reusable by the model)."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    t = torch.empty(max(size, 1), dtype=torch.uint8, device=f"cuda:{dev}")
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(t.data_ptr(), size, t, dev), 0)


@contextlib.contextmanager
def torch_memory():
    """Within this block (this thread), CuPy allocations made by ecf8 come from torch's allocator."""
    from . import gpu

    with gpu.cupy().cuda.using_allocator(_torch_allocator):
        yield


def _cuda_index(device: torch.device) -> int:
    """The index of CUDA `device` (the current device if it names none); UnsupportedError where
    PyTorch has no CUDA or sees no GPU (torch itself would raise a bare AssertionError)."""
    if not torch.cuda.is_available():
        raise UnsupportedError("device='cuda' needs a CUDA build of PyTorch and a GPU")
    return device.index if device.index is not None else torch.cuda.current_device()


def _upload(blob: Any, index: int):
    """A frame uploaded to cuda:index as a DeviceTensor, in torch-allocated memory."""
    from . import decoder_cuda

    with torch_memory():
        return decoder_cuda.to_device(blob, f"cuda:{index}")


def _to_torch(x: Any) -> torch.Tensor:
    """A torch tensor from a NumPy array (CPU) or a decoded CudaArray (zero-copy on the GPU)."""
    if isinstance(x, np.ndarray):
        return from_numpy(x if x.flags.writeable else np.array(x))     # not a view of a file map
    dtype = TORCH_DTYPES[fmt.spec_for_dtype(x.dtype).code] if x.dtype in _NP_CODED else \
        torch.from_numpy(np.empty(0, x.dtype)).dtype
    if not x.size:
        return torch.empty(x.shape, dtype=dtype, device=f"cuda:{x.bits.device.id}")
    bits = torch.from_dlpack(x.bits)
    return bits.view(_UINTS[x.dtype.itemsize]).view(dtype).view(x.shape)


_NP_CODED = {s.dtype for s in fmt.DTYPES.values()}


# --- checkpoints ---------------------------------------------------------------------------------

def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
              **options) -> None:
    """Write torch tensors (CPU or CUDA, any dtype safetensors has) as an ecf8 checkpoint.

    Like ``safetensors.torch.save_file``; FP8/BF16/FP16 tensors are stored as ECF8 frames, others
    zstd-packed or raw (see ``ecf8.save_file``).  options go to ``ecf8.encode``.
    Raises UnsupportedError for a non-tensor value or a dtype safetensors has no name for.
    """
    from . import store

    arrays = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UnsupportedError(f"tensor {name!r}: expected a torch.Tensor, not {type(t).__name__}")
        if t.device.type == "meta":
            raise UnsupportedError(f"tensor {name!r} is on the meta device: it has no data to save")
        if is_dtensor(t):
            raise UnsupportedError(f"tensor {name!r} is a DTensor spread over ranks: save its "
                                   ".full_tensor() (or each rank's .to_local() under its own name)")
        t = t.detach()
        try:
            arrays[name] = to_numpy(t) if t.dtype in _FROM_TORCH else t.cpu().contiguous().numpy()
        except TypeError:
            raise UnsupportedError(f"tensor {name!r}: {t.dtype} has no safetensors name") from None
    store.save_file(arrays, Path(path), metadata, **options)


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of an ecf8 checkpoint file as a torch tensor of its own dtype on `device`.

    Like ``safetensors.torch.load_file``; on a GPU the frames are decoded there.  Raises
    CorruptDataError / UnsupportedError for a damaged or non-ecf8 file.
    """
    from . import store

    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device must be cpu or cuda, not {dev}")
    target = "cpu" if dev.type == "cpu" else f"cuda:{_cuda_index(dev)}"
    with torch_memory() if dev.type == "cuda" else contextlib.nullcontext():
        return {name: _to_torch(x) for name, _, x in store.iter_decoded(Path(path), target)}


# --- tensor parallelism: DTensor shards ---------------------------------------------------------

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")   # the latter: torch < 2.4


def _dtensor_api() -> Any:
    """The module defining DTensor, once imported by anyone (no DTensor can exist before), or None."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module
    return None


def is_dtensor(t: Any) -> bool:
    """True when t is a ``torch.distributed.tensor.DTensor`` (a Parameter wrapping one included)."""
    api = _dtensor_api()
    return api is not None and isinstance(t, api.DTensor)


class _Layout:
    """How a DTensor is laid out over ranks: device mesh, placements, global shape and stride.
    A weight held compressed keeps only its local shard; wrap() makes the DTensor again."""

    def __init__(self, t: torch.Tensor):
        self.mesh, self.placements = t.device_mesh, tuple(t.placements)
        self.shape, self.stride = tuple(t.shape), tuple(t.stride())

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """The DTensor whose local shard on this rank is `local` (no communication)."""
        return _dtensor_api().DTensor.from_local(local, self.mesh, self.placements, run_check=False,
                                                 shape=torch.Size(self.shape), stride=self.stride)

    def box(self, what: str) -> tuple[slice, ...]:
        """This rank's slice of the global tensor (Shard / Replicate placements only)."""
        return _shard_box(self.shape, self.mesh, self.placements, what)

    def local(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's shard of `value`: a DTensor laid out as this one, or the whole tensor."""
        if is_dtensor(value):
            if value.device_mesh != self.mesh or tuple(value.placements) != self.placements:
                raise UnsupportedError(f"{what}: a DTensor placed {tuple(value.placements)} cannot replace "
                                       f"a weight placed {self.placements} on another mesh or layout")
            return value.to_local()
        return value[self.box(what)]


def _shard_box(shape: tuple, mesh: Any, placements: tuple, what: str) -> tuple[slice, ...]:
    """The slice of a tensor of global `shape` that this rank holds under `placements` on `mesh`
    (as ``distribute_tensor`` cuts it).  Raises UnsupportedError for placements other than
    Shard / Replicate (Partial, strided shards), whose local part is not one box."""
    import importlib

    api = _dtensor_api()
    utils = importlib.import_module(api.__name__ + "._utils")
    for pl in placements:
        if type(pl) not in (api.Shard, api.Replicate):
            raise UnsupportedError(f"{what}: ecf8 loads Shard and Replicate placements, "
                                   f"not {type(pl).__name__} ({pl})")
    local, offset = utils.compute_local_shape_and_global_offset(torch.Size(shape), mesh, list(placements))
    return tuple(slice(o, o + n) for o, n in zip(offset, local))


# --- just-in-time decoding of a module's weights ------------------------------------------------

@dataclasses.dataclass
class CompressionStats:
    """Bytes of the weights that compress_module replaced, and what holds them now (under tensor
    parallelism: this rank's local shards)."""

    modules: int                # modules whose weight is held compressed
    original_bytes: int         # the weights freed (a tied matrix counted once)
    compressed_bytes: int       # frames (host bytes on CPU; on a GPU with decode tables and index)
    buffer_bytes: int           # one decode buffer per device (per thread and stream in use)
    weights: int = 0            # distinct compressed weights (< modules when weights are tied)

    @property
    def resident_bytes(self) -> int:
        return self.compressed_bytes + self.buffer_bytes


_CAPTURE_INFO: Any = None


def _capture_id(stream: int) -> int | None:
    """0 when no CUDA graph capture is under way on `stream` (a handle), else the capture's id
    (cuStreamGetCaptureInfo), or None when the driver does not say which capture it is."""
    global _CAPTURE_INFO
    if not stream or not torch.cuda.is_current_stream_capturing():
        return 0
    if _CAPTURE_INFO is None:
        try:
            info = ctypes.CDLL("libcuda.so.1").cuStreamGetCaptureInfo
            info.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64)]
            info.restype = ctypes.c_int
            _CAPTURE_INFO = info
        except (OSError, AttributeError):
            _CAPTURE_INFO = False
    if not _CAPTURE_INFO:
        return None
    status, ident = ctypes.c_int(), ctypes.c_uint64()
    if _CAPTURE_INFO(ctypes.c_void_p(stream), ctypes.byref(status), ctypes.byref(ident)) or status.value != 1:
        return None                                 # (1: CU_STREAM_CAPTURE_STATUS_ACTIVE)
    return int(ident.value) or None


class _Pool:
    """Decode buffers shared by the weights of one compress_module / load_model call.

    One buffer per device, thread, CUDA stream and nesting depth, sized for the largest weight (or
    group of weights, see _Group) on that device: threads and streams never share one, so
    concurrent forwards stay exact.  Each buffer remembers which group it holds decoded, per CUDA
    graph capture (a capture only records the decode): outside captures only while no capture has
    used the buffer, since a graph replay rewrites it unseen.
    """

    def __init__(self) -> None:
        self.sizes: dict[torch.device, int] = {}
        self.weights: weakref.WeakSet = weakref.WeakSet()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"sizes": dict(self.sizes)}

    def __setstate__(self, state: dict) -> None:
        self.sizes = state["sizes"]
        self.weights = weakref.WeakSet()         # the weights add themselves back
        self._local = threading.local()

    def add(self, w: "_Weight") -> None:
        self.weights.add(w)
        self.sizes[w.device] = max(self.sizes.get(w.device, 0), w.nbytes)

    def release(self, device: torch.device) -> None:
        """Forget a device no weight is on any more (this thread's buffers there are freed)."""
        if not any(w.device == device for w in self.weights):
            self.sizes.pop(device, None)
            local = self.state()
            for key in [k for k in local.buffers if k[0] == device]:
                del local.buffers[key]
                local.resident.pop(key, None)
                local.captured.discard(key)
            local.views.clear()

    def state(self) -> Any:
        local = self._local
        if not hasattr(local, "buffers"):
            local.buffers, local.depth, local.active, local.resident = {}, {}, {}, {}
            local.views = weakref.WeakKeyDictionary()   # weight -> {buffer key: view}: no cycle
            local.captured = set()
        return local

    def decode(self, w: "_Weight", stream: int) -> torch.Tensor:
        """w decoded into this thread's buffer for its device, `stream` (w.stream_id()) and nesting
        depth (launch only on a GPU).  A weight of a group decodes the whole group there, unless
        the buffer holds it already."""
        local = self.state()
        key = (w.device, stream, local.depth.get(w.device, 0))
        buf = self._buffer(local, key)
        views = local.views.get(w)
        if views is None:
            views = local.views[w] = {}
        view = views.get(key)
        if view is None:
            view = views[key] = buf[w.offset : w.offset + w.nbytes].view(w.dtype).view(w.shape)
        group = w.group
        capture = _capture_id(stream) if group is not None else 0
        if capture:
            local.captured.add(key)
        if group is None or capture is None or (not capture and key in local.captured):
            local.resident.pop(key, None)
            w._launch(view, stream)                 # this weight alone, into its place
        elif local.resident.get(key) != (capture, group.stamp):
            group.launch(buf, stream)
            local.resident[key] = (capture, group.stamp)
        return view

    def _buffer(self, local: Any, key: tuple) -> torch.Tensor:
        """This thread's buffer for key (device, stream, depth), (re)made when missing or smaller
        than the device's size (a larger weight or group came)."""
        device = key[0]
        buf = local.buffers.get(key)
        if buf is None or buf.numel() < self.sizes[device]:
            buf = local.buffers[key] = torch.empty(self.sizes[device], dtype=torch.uint8, device=device)
            local.views.clear()
            local.resident.pop(key, None)
        return buf

    def warm(self, weights: list) -> None:
        """Allocate this thread's buffers now (e.g. before a CUDA graph capture)."""
        local = self.state()
        for w in {w.device: w for w in weights}.values():   # one weight per device: its stream
            self._buffer(local, (w.device, w.stream_id(), 0))

    def buffer_bytes(self) -> int:
        return sum(self.sizes.values())


class _Weight:
    """One weight held compressed: a host frame (CPU) or a DeviceTensor (GPU), shared by every
    module that holds it (tied weights).  With a layout (tensor parallelism) the frame is this
    rank's local shard, and the weight is seen as a DTensor."""

    def __init__(self, blob: Any, dtype: torch.dtype, shape: tuple, device: torch.device,
                 requires_grad: bool, pool: _Pool, options: dict, layout: _Layout | None = None):
        self.blob, self.dtype, self.shape, self.device = blob, dtype, tuple(shape), device
        self.requires_grad, self.pool, self.options, self.layout = requires_grad, pool, options, layout
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        self.group: _Group | None = None      # decoded with its neighbours (CUDA), at offset
        self.offset = 0
        pool.add(self)

    @property
    def global_shape(self) -> tuple:
        return self.layout.shape if self.layout is not None else self.shape

    def _wrap(self, local: torch.Tensor) -> torch.Tensor:
        return self.layout.wrap(local) if self.layout is not None else local

    @property
    def stored_bytes(self) -> int:
        return len(self.blob) if self.device.type == "cpu" else self.blob.nbytes

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("plain", None)
        state["blob"] = self.host_frame()               # device pointers do not survive a pickle
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.device.type == "cuda":
            self.blob = _upload(self.blob, self.device.index)
        self.pool.add(self)
        if self.group is not None:
            self.group.restored()

    def stream_id(self) -> int:
        """torch's current stream on this weight's device (0 on the CPU)."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _launch(self, out: torch.Tensor, stream: int) -> torch.Tensor:
        if self.device.type == "cuda":                   # launch only, on torch's current stream
            self.blob.launch(out.data_ptr(), stream)
            return out
        return decode(self.blob, self.device, out=out)

    def fresh(self) -> torch.Tensor:
        """The weight decoded into new memory on its device (a DTensor under tensor parallelism)."""
        if self.device.type == "cuda":
            return self._wrap(self._launch(torch.empty(self.shape, dtype=self.dtype, device=self.device),
                                           self.stream_id()))
        return self._wrap(decode(self.blob, self.device))

    def current(self) -> torch.Tensor:
        """The weight seen by this thread: its decode buffer inside forward, else a fresh copy."""
        active = self.pool.state().active.get(id(self))
        return active if active is not None else self.fresh()

    @contextlib.contextmanager
    def decoded(self) -> Iterator[torch.Tensor]:
        """Decode into this thread's (and stream's) buffer for the span of a forward."""
        local = self.pool.state()
        view = self._wrap(self.pool.decode(self, self.stream_id()))
        depth = local.depth.get(self.device, 0)
        previous = local.active.get(id(self))
        local.depth[self.device], local.active[id(self)] = depth + 1, view
        try:
            yield view
        finally:
            local.depth[self.device] = depth
            if previous is None:
                local.active.pop(id(self), None)
            else:
                local.active[id(self)] = previous

    def host_frame(self) -> bytes:
        return self.blob if self.device.type == "cpu" else self.blob.tobytes()

    def move(self, device: torch.device) -> None:
        """Hold the frame on another device (re-uploaded as it is: nothing is decoded)."""
        _check_device(device, "the target device")
        if self.layout is not None:
            raise UnsupportedError(f"a tensor-parallel weight stays on its device mesh's {self.device}; "
                                   f"it cannot move to {device}")
        frame = self.host_frame()
        if self.group is not None:                  # its neighbours may stay: decode it alone
            self.group.dissolve()
        self.blob = _upload(frame, _cuda_index(device)) if device.type == "cuda" else frame
        old, self.device = self.device, torch.device("cuda", self.blob.device_id) if device.type == "cuda" else device
        self.pool.add(self)
        self.pool.release(old)

    def assign(self, value: torch.Tensor, what: str = "weight") -> None:
        """Replace the held weight by value (cast to this weight's dtype), re-encoded; under tensor
        parallelism value is a DTensor laid out alike, or the whole tensor (this rank's shard kept)."""
        value = value.detach()
        if self.layout is not None:
            value = self.layout.local(value, what)
        self.blob = encode(value.to(device=self.device, dtype=self.dtype), **self.options)
        if self.group is not None:
            self.group.build()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 256) * 256


class _Group:
    """Consecutive compressed weights (in module order) of one GPU and dtype, decoded by one
    launch (``decoder_cuda.GroupDecoder``) into one buffer, each at its own 256-byte aligned
    offset: fewer, larger launches decode faster (bench/NOTES.md: q, k, v and o of each of 8
    Llama-3-8B layers in one launch took the weight path from 0.29-0.31 to 0.30-0.33 of the
    uncompressed speed at batch 1-64; a whole layer a launch to 0.34-0.37).  The decoder is built
    when the frames are known (here, after unpickling, after load_state_dict), never at first use,
    so that a forward inside a CUDA-graph capture uploads nothing.  It holds the weights weakly:
    a model dropped frees its frames at once."""

    def __init__(self, weights: list[_Weight]):
        self.refs, at = [weakref.ref(w) for w in weights], 0
        for w in weights:
            w.offset = at
            at += _aligned(w.nbytes)
        self.nbytes = at
        self.decoder, self.stamp = None, object()
        self.build()
        for w in weights:
            w.group = self

    @property
    def weights(self) -> list[_Weight]:
        return [w for w in (r() for r in self.refs) if w is not None]

    def build(self) -> None:
        """(Re)make the decoder for the weights' current frames (in torch's memory); buffers that
        hold the old decode no longer count as holding this group."""
        from .decoder_cuda import GroupDecoder

        weights = self.weights
        with torch_memory():
            decoder = GroupDecoder([w.blob for w in weights], [w.offset for w in weights])
        self.decoder, self.stamp = decoder, object()

    def launch(self, buf: torch.Tensor, stream: int) -> None:
        self.decoder.launch(buf.data_ptr(), stream)

    def dissolve(self) -> None:
        """Every weight decodes on its own again (before one of them moves device or stops being
        compressed)."""
        for w in self.weights:
            w.group, w.offset = None, 0
        self.refs, self.decoder, self.stamp = [], None, object()

    def __getstate__(self) -> dict:
        return {"weights": self.weights, "nbytes": self.nbytes}

    def __setstate__(self, state: dict) -> None:
        self.refs, self.nbytes = [weakref.ref(w) for w in state["weights"]], state["nbytes"]
        self.decoder, self.stamp = None, object()
        self._pending = list(state["weights"])     # strong until every weight is back on its GPU
        self.restored()                             # (they may all be back already)

    def restored(self) -> None:
        """A weight of this unpickled group is back on its GPU: build once all are."""
        pending = self.__dict__.get("_pending")
        if pending is not None and all("blob" in w.__dict__ and not isinstance(w.blob, (bytes, bytearray))
                                       for w in pending):
            del self._pending
            self.build()


def _group(model: torch.nn.Module, weights: list[_Weight], limit: int | None) -> None:
    """Join consecutive GPU weights of `model` (module order) of one device and dtype into _Groups
    of at most `limit` bytes; limit None: the largest weight on that device (the decode buffer
    does not grow); 0: no groups."""
    if limit == 0:
        return
    order: dict[int, int] = {}
    for i, m in enumerate(model.modules()):
        if is_compressed(m):
            order.setdefault(id(m.__dict__["_ecf8"]), i)
    largest: dict[torch.device, int] = {}
    for w in weights:
        largest[w.device] = max(largest.get(w.device, 0), w.nbytes)
    run: list[_Weight] = []
    size = 0

    def close() -> None:
        if len(run) > 1:
            group = _Group(list(run))
            pool = run[0].pool
            pool.sizes[run[0].device] = max(pool.sizes[run[0].device], group.nbytes)
        run.clear()

    for w in sorted(weights, key=lambda w: order.get(id(w), len(order))):
        if run and (w.device != run[0].device or w.dtype != run[0].dtype
                    or size + _aligned(w.nbytes) > (limit or largest[w.device])):
            close()
        if w.device.type != "cuda" or w.group is not None:
            close()
            continue
        if not run:
            size = 0
        run.append(w)
        size += _aligned(w.nbytes)
    close()


class _CompressedModule:
    """Mixed into a compressed module's class: ``weight`` is decoded, not a Parameter."""

    _ecf8_base: type

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_ecf8"].current()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise UnsupportedError(f"{type(self).__name__}.weight is held compressed by ecf8: call "
                                   "ecf8.torch.decompress_module first, or load_state_dict to replace it")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            raise UnsupportedError(f"{type(self).__name__}.weight is held compressed by ecf8: call "
                                   "ecf8.torch.decompress_module first")
        super().__delattr__(name)

    def forward(self, *args, **kwargs):
        with self.__dict__["_ecf8"].decoded():
            return self._ecf8_base.forward(self, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.__dict__["_ecf8"].fresh()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        value = state_dict.pop(key, None)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            if value is not None:
                state_dict[key] = value
        w = self.__dict__["_ecf8"]
        if value is None:
            if strict:
                missing_keys.append(key)
        elif not isinstance(value, torch.Tensor) or tuple(value.shape) != w.global_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(getattr(value, 'shape', ()))} from checkpoint, the shape in "
                              f"current model is {torch.Size(w.global_shape)}.")
        else:
            w.assign(value, key)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .cpu() move the frames (nothing decoded); a dtype conversion
        (.float(), .half(), ...) turns the weight back into a Parameter, then converts it."""
        w = self.__dict__["_ecf8"]
        probe = fn(torch.empty(0, dtype=w.dtype, device=w.device))
        if probe.dtype != w.dtype:
            plain = w.__dict__.get("plain")             # one Parameter for all holders of a tie
            if plain is None:
                plain = w.plain = torch.nn.Parameter(w.fresh(), requires_grad=w.requires_grad)
            _detach(self, plain)
            return self._apply(fn, recurse)
        if probe.device != w.device:
            w.move(probe.device)
        return super()._apply(fn, recurse)

    def __reduce_ex__(self, protocol):
        return _rebuild, (self._ecf8_base,), self.__dict__


_CLASSES: dict[type, type] = {}


def _compressed_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(base.__name__, (_CompressedModule, base),
                                    {"_ecf8_base": base, "__module__": __name__,
                                     "__qualname__": f"_CLASSES[{base.__qualname__}]"})
    return cls


def _rebuild(base: type) -> torch.nn.Module:
    """Unpickling: an empty instance of the compressed class of `base` (its state follows)."""
    cls = _compressed_class(base)
    return cls.__new__(cls)


def is_compressed(module: torch.nn.Module) -> bool:
    """True when `module` itself holds its weight compressed."""
    return isinstance(module, _CompressedModule)


def _attach(module: torch.nn.Module, w: _Weight) -> None:
    """Make `module` hold `w` in place of its ``weight`` parameter."""
    params = module._parameters
    order = list(params)
    params.pop("weight", None)
    module.__dict__["_ecf8_order"] = order
    object.__setattr__(module, "__class__", _compressed_class(type(module)))
    module.__dict__["_ecf8"] = w


def _detach(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Undo _attach: `param` becomes the module's weight again, in its original place."""
    w = module.__dict__.get("_ecf8")
    if w is not None and w.group is not None:       # its neighbours decode on their own from now
        w.group.dissolve()
    order = module.__dict__.pop("_ecf8_order", ["weight"])
    module.__dict__.pop("_ecf8", None)
    object.__setattr__(module, "__class__", module._ecf8_base)
    params = dict(module._parameters, weight=param)
    module._parameters.clear()
    for name in [n for n in order if n in params] + [n for n in params if n not in order]:
        module._parameters[name] = params[name]


def _owners(root: torch.nn.Module) -> tuple[dict, dict]:
    """({id(param): [(module, attribute name, qualified name)]}, {id: param}) over every module,
    tied parameters listed once with all their holders."""
    holders: dict[int, list] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for prefix, m in root.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((m, name, f"{prefix}.{name}" if prefix else name))
                params[id(p)] = p
    for key, hs in holders.items():           # a module reached by two paths is one holder
        seen, unique = set(), []
        for h in hs:
            if (id(h[0]), h[1]) not in seen:
                seen.add((id(h[0]), h[1]))
                unique.append(h)
        holders[key] = unique
    return holders, params


def _holders_ok(holders: list, embeddings: bool) -> bool:
    """Every holder is a module's `weight`, none compressed yet, no Embedding unless embeddings."""
    return all(name == "weight" and not is_compressed(m)
               and (embeddings or not isinstance(m, torch.nn.Embedding)) for m, name, _ in holders)


def _eligible(holders: list, p: torch.Tensor, min_numel: int, embeddings: bool) -> bool:
    """A parameter is compressed only where that frees it: every holder is a module's `weight`,
    and no holder is an Embedding unless embeddings=True (else the raw matrix stays anyway)."""
    return (p.dtype in _FROM_TORCH and p.dim() == 2 and p.numel() >= min_numel
            and _holders_ok(holders, embeddings))


def _check_device(device: torch.device, what: str) -> None:
    if device.type == "meta":
        raise UnsupportedError(f"{what} is on the meta device (no data): load the weights first, "
                               "e.g. with ecf8.torch.load_model")
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"{what} is on {device}: ecf8 holds weights on cpu or cuda only")
    if device.type == "cuda":
        from . import gpu

        gpu.cupy()


def _check_sharded(p: torch.Tensor, holders: list, what: str) -> None:
    """A DTensor weight is held compressed only on modules whose class forward runs: a forward
    replaced per instance (Transformers' own tp_plan layers, which also swap DTensor parameters for
    local tensors inside it) would bypass the just-in-time decode and see a DTensor it does not expect."""
    if is_dtensor(p) and any("forward" in m.__dict__ for m, _, _ in holders):
        raise UnsupportedError(f"{what} is a DTensor on a module whose forward is replaced per instance "
                               "(e.g. Transformers' tp_plan): not supported; shard the model with "
                               "torch.distributed.tensor.parallel.parallelize_module instead")


def _tables(numel: int, options: dict) -> dict:
    """Encoder options for one weight: max_tables one per 512 K weights (a GPU holds an 8 KB decode
    table per code table).  chunk_size None stays None: ``ecf8.encode`` then picks the chunk size
    that decodes fastest."""
    return dict(options, max_tables=options.get("max_tables", max(1, min(4, numel >> 19))))


def compress_module(module: torch.nn.Module, *, min_numel: int = 4096, embeddings: bool = False,
                    chunk_size: int | None = None, group_bytes: int | None = None,
                    **options) -> CompressionStats:
    """Hold the 2-D FP8/BF16/FP16 weights of `module`'s submodules compressed, on their device.

    Linear-like modules qualify, Transformers' fine-grained FP8 linears included (their
    ``weight_scale_inv`` stays as it is); Embedding tables only with embeddings=True, since the
    whole table is decoded at every forward.  A weight tied between modules is compressed once,
    and only when every module holding it qualifies.  Each weight is decoded just before its
    module's forward into a buffer (one per device, thread, CUDA stream and nesting depth) sized
    for the largest weight or group, and dropped after it.  chunk_size defaults to
    ``ecf8.encoder.decode_chunk_size`` of each weight (decode speed over up to +0.15 bits/weight)
    and max_tables to one per 512 K weights; options go to ``ecf8.encode``.

    On a GPU, consecutive weights (module order) of one dtype form a group decoded by one launch
    while their bytes (each rounded up to 256) add up to at most group_bytes; the first of them to
    run decodes the group, the others find it decoded.  Default: the largest compressed weight's
    size on that device, so the buffer does not grow (in a Llama layer with the MLP weights the
    largest: q, k, v and o together; a large compressed head lets groups span layers); 0: one
    launch per weight.  Inside a CUDA-graph capture a group is decoded once per capture; outside
    captures, a buffer a capture has used decodes weight by weight (a replay rewrites it unseen).
    ``.to()`` and ``decompress_module`` turn groups back into single weights.  Writing into
    ``module.weight`` in place during a forward changes what later forwards of its group see.
    Inference only: compressed weights have no gradient.

    Every target is checked before anything changes: a weight on the meta device or on a device
    other than cpu/cuda raises UnsupportedError and leaves the model as it was.

    Tensor parallelism: a DTensor weight (any placements) is eligible by its global shape, so every
    rank makes the same choice; each rank encodes and holds only its local shard
    (``weight.to_local()``), and the statistics count this rank's bytes.  No communication.
    """
    options = dict(options, chunk_size=chunk_size)
    holders, params = _owners(module)
    targets = [(params[k], hs) for k, hs in holders.items()
               if _eligible(hs, params[k], min_numel, embeddings)]
    for p, hs in targets:
        _check_device(p.device, f"weight {hs[0][2]!r}")
        _check_sharded(p, hs, f"weight {hs[0][2]!r}")
    pool = _Pool()
    done: list[tuple[torch.nn.Parameter, list]] = []
    original = compressed = 0
    try:
        for p, hs in targets:
            layout = _Layout(p) if is_dtensor(p) else None
            local = p.to_local() if layout is not None else p
            tables = _tables(local.numel(), options)
            blob = encode(local, **tables)                              # CUDA: encoded on its GPU
            w = _Weight(blob, p.dtype, tuple(local.shape), local.device, p.requires_grad, pool,
                        tables, layout)
            for m, _, _ in hs:
                _attach(m, w)
            done.append((p, hs))
            original += local.numel() * local.element_size()
            compressed += w.stored_bytes
        made = [hs[0][0].__dict__["_ecf8"] for _, hs in done]
        _group(module, made, group_bytes)
    except BaseException:
        for p, hs in done:                      # the originals are still referenced: put them back
            for m, _, _ in hs:
                _detach(m, p)
        raise
    pool.warm(made)
    return CompressionStats(sum(len(hs) for _, hs in done), original, compressed, pool.buffer_bytes(),
                            len(done))


def decompress_module(module: torch.nn.Module) -> int:
    """Undo compress_module / load_model: each compressed weight becomes a Parameter again (tied
    modules share one Parameter again); returns how many modules changed."""
    params: dict[int, torch.nn.Parameter] = {}
    count = 0
    for m in module.modules():
        if not is_compressed(m):
            continue
        w = m.__dict__["_ecf8"]
        p = params.get(id(w))
        if p is None:
            p = params[id(w)] = torch.nn.Parameter(w.fresh(), requires_grad=w.requires_grad)
        _detach(m, p)
        count += 1
    return count


def load_model(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cuda", **kwargs
               ) -> CompressionStats:
    """Load an ecf8 checkpoint into `model`, keeping eligible weights compressed on the GPU.

    See ``ecf8.loading.load_model``.
    """
    from .loading import load_model as load

    return load(model, path, device, **kwargs)


def from_pretrained(folder: str | Path, device: str | torch.device = "cuda", **kwargs) -> torch.nn.Module:
    """A Transformers model from an ecf8 checkpoint folder holding config.json; see
    ``ecf8.loading.from_pretrained``."""
    from .loading import from_pretrained as load

    return load(folder, device, **kwargs)
