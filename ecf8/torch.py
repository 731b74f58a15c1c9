"""PyTorch adapter: tensors in and out, and just-in-time decoding of a module's weights.

    blob = ecf8.torch.encode(w)                       # w: float8_e4m3fn / float8_e5m2 / bfloat16 / float16
    w2 = ecf8.torch.decode(blob, device="cuda")       # on torch's current stream
    stats = ecf8.torch.compress_module(model)          # weights stay compressed, decoded per forward
    ecf8.torch.decompress_module(model)

GPU decoding writes into memory from torch's caching allocator on torch's current stream (or the
``stream`` given: a ``torch.cuda.Stream``, an int handle or an object with ``__cuda_stream__``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from . import api, encoder
from . import format as fmt
from .errors import UnsupportedError

__all__ = ["encode", "decode", "compress_module", "decompress_module", "CompressionStats"]

TORCH_DTYPES = {1: torch.float8_e4m3fn, 2: torch.float8_e5m2, 3: torch.bfloat16, 4: torch.float16}
_FROM_TORCH = {v: fmt.DTYPES[k] for k, v in TORCH_DTYPES.items()}
_BITS = {1: torch.uint8, 2: torch.int16}       # torch views used to move element bits


def _spec(t: torch.Tensor) -> fmt.DtypeSpec:
    try:
        return _FROM_TORCH[t.dtype]
    except KeyError:
        names = ", ".join(str(d) for d in TORCH_DTYPES.values())
        raise UnsupportedError(f"ecf8 cannot code {t.dtype}; supported: {names}") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host NumPy (ml_dtypes) array with t's elements and shape (copies from a GPU)."""
    spec = _spec(t)
    bits = t.detach().contiguous().view(_BITS[spec.dtype.itemsize]).cpu().numpy()
    return bits.view(spec.dtype)


def encode(t: torch.Tensor, **options) -> bytes:
    """Compress a tensor (CPU or GPU; a GPU tensor is copied to the host by this call)."""
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
        y = api.decode(blob)
        code = fmt.spec_for_dtype(y.dtype).code
        t = torch.from_numpy(y.view(np.uint8 if y.itemsize == 1 else np.int16)).view(TORCH_DTYPES[code])
        if out is None:
            return t
        _check_out(out, t.numel(), t.element_size(), device)
        out.view(-1).view(t.dtype).copy_(t.reshape(-1))
        return out.view(t.dtype).view(t.shape)
    if device.type != "cuda":
        raise UnsupportedError(f"device must be cpu or cuda, not {device}")
    from . import decoder_cuda

    dt = blob if isinstance(blob, decoder_cuda.DeviceTensor) else decoder_cuda.to_device(
        blob, f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}")
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


# --- just-in-time decoding of a module's weights ------------------------------------------------

@dataclasses.dataclass
class CompressionStats:
    """Bytes of the weights that compress_module replaced, and what holds them now."""

    modules: int
    original_bytes: int
    compressed_bytes: int       # frames (host bytes on CPU; on a GPU with decode tables and index)
    buffer_bytes: int           # the shared decode buffer(s)

    @property
    def resident_bytes(self) -> int:
        return self.compressed_bytes + self.buffer_bytes


class _Compressed:
    """A module's weight held compressed, decoded into a shared buffer before each forward."""

    def __init__(self, module: torch.nn.Module, weight: torch.nn.Parameter, blob: Any,
                 buffers: dict):
        self.dtype, self.shape, self.requires_grad = weight.dtype, tuple(weight.shape), weight.requires_grad
        self.device = weight.device
        self.nbytes = weight.numel() * weight.element_size()
        self.blob = blob
        self.buffers = buffers
        self.view: torch.Tensor | None = None      # the buffer seen as this weight, made once
        self.hooks = [module.register_forward_pre_hook(self.before),
                      module.register_forward_hook(self.after)]

    def materialize(self) -> torch.Tensor:
        if self.view is None:
            buf = self.buffers[self.device][: self.nbytes]
            self.view = buf.view(self.dtype).view(self.shape)
        if self.device.type == "cuda":                 # launch only, on torch's current stream
            self.blob.launch(self.view.data_ptr(), torch.cuda.current_stream(self.device).cuda_stream)
            return self.view
        return decode(self.blob, self.device, out=self.view)

    def before(self, module, args):
        module.__dict__["weight"] = self.materialize()

    def after(self, module, args, output):
        module.__dict__.pop("weight", None)


def _eligible(module: torch.nn.Module, min_numel: int, embeddings: bool) -> bool:
    w = module._parameters.get("weight")
    return (w is not None and w.dtype in _FROM_TORCH and w.dim() == 2 and w.numel() >= min_numel
            and not hasattr(module, "_ecf8")
            and (embeddings or not isinstance(module, torch.nn.Embedding)))


def compress_module(module: torch.nn.Module, *, min_numel: int = 4096, embeddings: bool = False,
                    chunk_size: int = 4096, **options) -> CompressionStats:
    """Hold the 2-D FP8/BF16/FP16 weights of `module`'s submodules compressed, on their device.

    Linear-like modules qualify, Transformers' fine-grained FP8 linears included (their
    ``weight_scale_inv`` stays as it is); Embedding tables only with embeddings=True, since the
    whole table is decoded at every forward and it is usually the largest weight, which sets the
    size of the shared buffer.  Each weight is decoded just before its module's forward into one
    buffer per device, shared by all compressed modules and sized for the largest weight, and
    dropped after it.  chunk_size defaults to 4096 (decode latency over +0.1 bits/weight) and
    max_tables to one per 512 K weights (each costs an 8 KB decode table on the GPU); options go to
    ``ecf8.encode``.  Inference only: compressed weights have no gradient.
    """
    options = dict(options, chunk_size=chunk_size)
    targets = [m for m in module.modules() if _eligible(m, min_numel, embeddings)]
    buffers: dict = {}
    sizes: dict = {}
    original = compressed = 0
    for m in targets:
        w = m._parameters["weight"]
        nbytes = w.numel() * w.element_size()
        sizes[w.device] = max(sizes.get(w.device, 0), nbytes)
        # A GPU holds an 8 KB decode table per code table: one table per 512 K weights at most.
        tables = options.get("max_tables", max(1, min(4, w.numel() >> 19)))
        blob = encode(w, **dict(options, max_tables=tables))
        original += nbytes
        if w.device.type == "cuda":
            from . import decoder_cuda

            blob = decoder_cuda.to_device(blob, f"cuda:{w.device.index}")
            compressed += blob.nbytes          # frame + decode tables + index on the device
        else:
            compressed += len(blob)
        del m._parameters["weight"]
        m._ecf8 = _Compressed(m, w, blob, buffers)
        del w
    for device, nbytes in sizes.items():
        buffers[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return CompressionStats(len(targets), original, compressed, sum(sizes.values()))


def decompress_module(module: torch.nn.Module) -> int:
    """Undo compress_module: every compressed weight becomes a Parameter again; returns how many."""
    count = 0
    for m in module.modules():
        state = m.__dict__.pop("_ecf8", None)
        if state is None:
            continue
        for hook in state.hooks:
            hook.remove()
        m.__dict__.pop("weight", None)
        weight = state.materialize().clone()
        state.view = None
        m._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=state.requires_grad)
        count += 1
    return count
