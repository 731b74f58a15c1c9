"""torch tensors in and out of ECF8 frames and checkpoint files, on the CPU or a GPU (GPU memory
from torch's caching allocator, on torch's current stream unless a ``stream`` is given)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import api, encoder, gpu
from .. import format as fmt
from ..errors import ECF8Error, UnsupportedError
from .parallel import is_dtensor

__all__ = ["encode", "decode", "save_file", "load_file", "to_numpy", "from_numpy", "torch_memory",
           "TORCH_DTYPES"]

TORCH_DTYPES = {code: getattr(torch, spec.dtype.name) for code, spec in fmt.DTYPES.items()}
FROM_TORCH = {v: fmt.DTYPES[k] for k, v in TORCH_DTYPES.items()}
_BITS = {1: torch.uint8, 2: torch.int16}       # torch views used to move element bits
_UINTS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}
_NP_CODED = {s.dtype for s in fmt.DTYPES.values()}


def _spec(t: torch.Tensor) -> fmt.DtypeSpec:
    try:
        return FROM_TORCH[t.dtype]
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
        from .. import encoder_cuda

        bits = t.detach().view(_BITS[spec.dtype.itemsize])
        with torch_memory():
            return encoder_cuda.encode(bits, dtype=spec.dtype, stream=_torch_stream(stream, t.device).cuda_stream,
                                       **options)
    if stream is not None:
        raise UnsupportedError("stream= applies to CUDA tensors only")
    return encoder.encode(to_numpy(t), **options)


def _torch_stream(stream: Any, device: torch.device) -> torch.cuda.Stream:
    """stream (None: torch's current; a torch stream; or a raw CUDA stream handle) as a torch stream."""
    if stream is None:
        return torch.cuda.current_stream(device)
    if isinstance(stream, torch.cuda.Stream):
        return stream
    return torch.cuda.ExternalStream(gpu.stream(stream).ptr, device=device)


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
    from .. import decoder_cuda

    resident = isinstance(blob, decoder_cuda.DeviceTensor)
    dev = torch.device("cuda", blob.device_id if resident else cuda_index(device))
    on = _torch_stream(stream, dev)
    if resident:
        dt = blob
    else:       # allocated on the decode's stream: freed, it is reused only after the decode ran
        with torch.cuda.stream(on):
            dt = upload(blob, dev.index)
    code, n = dt.frame.spec.code, dt.frame.n
    width = dt.frame.spec.dtype.itemsize
    if out is None:
        out = torch.empty(n, dtype=_BITS[width], device=dev)
    _check_out(out, n, width, dev)
    if out.data_ptr() % 16:
        raise UnsupportedError("out must be 16-byte aligned")
    dt.launch(out.data_ptr(), on.cuda_stream)
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
    with gpu.cupy().cuda.using_allocator(_torch_allocator):
        yield


def cuda_index(device: torch.device) -> int:
    """The index of CUDA `device` (the current device if it names none); UnsupportedError where
    PyTorch has no CUDA or sees no GPU (torch itself would raise a bare AssertionError)."""
    if not torch.cuda.is_available():
        raise UnsupportedError("device='cuda' needs a CUDA build of PyTorch and a GPU")
    return device.index if device.index is not None else torch.cuda.current_device()


def cupy_view(t: torch.Tensor):
    """A CuPy array over the memory of a contiguous CUDA tensor (same shape and dtype; the tensor
    kept alive by it), made without a stream synchronization, which DLPack and
    ``__cuda_array_interface__`` imports may do and a CUDA-graph capture refuses."""
    cupy = gpu.cupy()
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel() * t.element_size(), t, t.device.index)
    return cupy.ndarray(tuple(t.shape), cupy.dtype(str(t.dtype).replace("torch.", "")),
                        cupy.cuda.MemoryPointer(mem, 0))


def upload(blob: Any, index: int):
    """A frame uploaded to cuda:index as a DeviceTensor, in torch-allocated memory."""
    from .. import decoder_cuda

    with torch_memory():
        return decoder_cuda.to_device(blob, f"cuda:{index}")


def to_torch(x: Any) -> torch.Tensor:
    """A torch tensor from a NumPy array (CPU) or a decoded CudaArray (zero-copy on the GPU)."""
    if isinstance(x, np.ndarray):
        return from_numpy(x if x.flags.writeable else np.array(x))     # not a view of a file map
    dtype = TORCH_DTYPES[fmt.spec_for_dtype(x.dtype).code] if x.dtype in _NP_CODED else \
        torch.from_numpy(np.empty(0, x.dtype)).dtype
    if not x.size:
        return torch.empty(x.shape, dtype=dtype, device=f"cuda:{x.bits.device.id}")
    bits = torch.from_dlpack(x.bits)
    return bits.view(_UINTS[x.dtype.itemsize]).view(dtype).view(x.shape)


# --- checkpoints ---------------------------------------------------------------------------------

def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
              **options) -> None:
    """Write torch tensors (CPU or CUDA, any dtype safetensors has) as an ecf8 checkpoint.

    Like ``safetensors.torch.save_file``; FP8/BF16/FP16 tensors are stored as ECF8 frames, others
    zstd-packed or raw (see ``ecf8.save_file``).  options go to ``ecf8.encode``.
    Raises UnsupportedError for a non-tensor value or a dtype safetensors has no name for.
    """
    from .. import compressed

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
            arrays[name] = to_numpy(t) if t.dtype in FROM_TORCH else t.cpu().contiguous().numpy()
        except TypeError:
            raise UnsupportedError(f"tensor {name!r}: {t.dtype} has no safetensors name") from None
    compressed.save_file(arrays, Path(path), metadata, **options)


def load_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of an ecf8 checkpoint file as a torch tensor of its own dtype on `device`.

    Like ``safetensors.torch.load_file``; on a GPU the frames are decoded there.  Raises
    CorruptDataError / UnsupportedError for a damaged or non-ecf8 file.
    """
    from .. import compressed

    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device must be cpu or cuda, not {dev}")
    target = "cpu" if dev.type == "cpu" else f"cuda:{cuda_index(dev)}"
    with torch_memory() if dev.type == "cuda" else contextlib.nullcontext():
        return {name: to_torch(x) for name, _, x in compressed.iter_decoded(Path(path), target)}


def check_device(device: torch.device, what: str) -> None:
    """UnsupportedError unless a weight can be held on `device` (cpu, or cuda with CuPy)."""
    if device.type == "meta":
        raise UnsupportedError(f"{what} is on the meta device (no data): load the weights first, "
                               "e.g. with ecf8.torch.load_model")
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"{what} is on {device}: ecf8 holds weights on cpu or cuda only")
    if device.type == "cuda":
        gpu.cupy()

