"""The just-in-time weight runtime: a weight held compressed (``Weight``), the decode buffers its
forwards share (``Pool``), and consecutive GPU weights decoded by one launch (``Group``)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
import weakref
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UnsupportedError
from .compiled import register
from .edits import copy_of, plain, refresh
from .parallel import Layout
from .tensors import check_device, cuda_index, decode, encode, torch_memory, upload

__all__ = ["CompressionStats", "Pool", "Weight", "Group", "aligned"]

@dataclasses.dataclass
class CompressionStats:
    """Bytes of the weights that compress_module replaced, and what holds them now (under tensor
    parallelism: this rank's local shards)."""

    modules: int                # modules whose weight is held compressed
    original_bytes: int         # the weights freed (a tied matrix counted once)
    compressed_bytes: int       # frames (host bytes on CPU; on a GPU with decode tables and index)
    buffer_bytes: int           # one decode buffer per device (per thread and stream in use)
    weights: int = 0            # distinct compressed weights (< modules when weights are tied)
    fused: int = 0              # compress_module(fused=True): weights with the fused path
    not_fused: dict[str, int] = dataclasses.field(default_factory=dict)   # why not: weights

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


class Pool:
    """Decode buffers shared by the weights of one compress_module / load_model call.

    One buffer per device, thread, CUDA stream and nesting depth, sized for the largest weight (or
    group of weights, see Group) on that device: threads and streams never share one, so
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

    def add(self, w: "Weight") -> None:
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

    def decode(self, w: "Weight", stream: int) -> torch.Tensor:
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


class Weight:
    """One weight held compressed: a host frame (CPU) or a DeviceTensor (GPU), shared by every
    module that holds it (tied weights).  With a layout (tensor parallelism) the frame is this
    rank's local shard, and the weight is seen as a DTensor."""

    fused: Any = None        # its FusedLinear (compress_module(fused=True)); also for older pickles

    def __init__(self, blob: Any, dtype: torch.dtype, shape: tuple, device: torch.device,
                 requires_grad: bool, pool: Pool, options: dict, layout: Layout | None = None):
        self.blob, self.dtype, self.shape, self.device = blob, dtype, tuple(shape), device
        self.requires_grad, self.pool, self.options, self.layout = requires_grad, pool, options, layout
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        self.group: Group | None = None      # decoded with its neighbours (CUDA), at offset
        self.offset = 0
        self.generation = 0                   # re-encodes so far (compiled graphs guard on it)
        self.number = register(self)
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
        """The frame as a uint8 tensor (device pointers do not survive a pickle): torch.save stores
        a tensor's bytes as they are, whereas pickle protocol 2, torch.save's default, writes a
        bytes object as a latin-1 string in UTF-8, 1.5 bytes per byte of a frame."""
        state = dict(self.__dict__)
        state.pop("plain", None)
        state.pop("number", None)
        state.pop("copy", None)
        state["blob"] = torch.frombuffer(bytearray(self.host_frame()), dtype=torch.uint8)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["blob"], torch.Tensor):     # (pickles of earlier versions hold bytes)
            state = dict(state, blob=state["blob"].numpy().tobytes())
        self.__dict__.update(state)
        self.number = register(self)
        self.generation = state.get("generation", 0)
        if self.device.type == "cuda":
            self.blob = upload(self.blob, self.device.index)
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

    def fresh_local(self) -> torch.Tensor:
        """The weight (this rank's shard under tensor parallelism) decoded into new memory."""
        if self.device.type == "cuda":
            return self._launch(torch.empty(self.shape, dtype=self.dtype, device=self.device),
                                self.stream_id())
        return decode(self.blob, self.device)

    def fresh(self) -> torch.Tensor:
        """The weight decoded into new memory on its device (a DTensor under tensor parallelism)."""
        return self._wrap(self.fresh_local())

    def current(self) -> torch.Tensor:
        """The weight seen by this thread: its decode buffer inside forward, else its decoded copy
        (``DecodedWeight``: writes to it re-encode the weight; a DTensor copy under tensor
        parallelism)."""
        active = self.pool.state().active.get(id(self))
        if active is not None:
            return active
        return self.fresh() if self.layout is not None else copy_of(self)

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
        check_device(device, "the target device")
        if self.layout is not None:
            raise UnsupportedError(f"a tensor-parallel weight stays on its device mesh's {self.device}; "
                                   f"it cannot move to {device}")
        frame = self.host_frame()
        if self.group is not None:                  # its neighbours may stay: decode it alone
            self.group.dissolve()
        self.blob = upload(frame, cuda_index(device)) if device.type == "cuda" else frame
        if self.fused is not None:
            self.fused.forget()
        old, self.device = self.device, torch.device("cuda", self.blob.device_id) if device.type == "cuda" else device
        self.pool.add(self)
        self.pool.release(old)

    def assign(self, value: torch.Tensor, what: str = "weight", *, edit: bool = False) -> None:
        """Replace the held weight by value (cast to this weight's dtype), re-encoded; under tensor
        parallelism value is a DTensor laid out alike, or the whole tensor (this rank's shard kept).
        edit: value is the weight's own decoded copy, written to."""
        value = plain(value).detach()
        if self.layout is not None:
            value = self.layout.local(value, what)
        value = value.to(device=self.device, dtype=self.dtype)
        self.blob = encode(value, **self.options)
        self.generation += 1
        if self.fused is not None:
            self.fused.forget()
        if not edit:
            refresh(self, value)
        if self.group is not None:
            self.group.build()


def aligned(nbytes: int) -> int:
    """nbytes rounded up to a multiple of 256 (where a group places each weight)."""
    return -(-nbytes // 256) * 256


class Group:
    """Consecutive compressed weights (in module order) of one GPU and dtype, decoded by one
    launch (``decoder_cuda.GroupDecoder``) into one buffer, each at its own 256-byte aligned
    offset: fewer, larger launches decode faster (bench/NOTES.md: q, k, v and o of each of 8
    Llama-3-8B layers in one launch took the weight path from 0.29-0.31 to 0.30-0.33 of the
    uncompressed speed at batch 1-64; a whole layer a launch to 0.34-0.37).  The decoder is built
    when the frames are known (here, after unpickling, after load_state_dict), never at first use,
    so that a forward inside a CUDA-graph capture uploads nothing.  It holds the weights weakly:
    a model dropped frees its frames at once."""

    def __init__(self, weights: list[Weight]):
        self.refs, at = [weakref.ref(w) for w in weights], 0
        for w in weights:
            w.offset = at
            at += aligned(w.nbytes)
        self.nbytes = at
        self.decoder, self.stamp = None, object()
        self.build()
        for w in weights:
            w.group = self

    @property
    def weights(self) -> list[Weight]:
        return [w for w in (r() for r in self.refs) if w is not None]

    def build(self) -> None:
        """(Re)make the decoder for the weights' current frames (in torch's memory); buffers that
        hold the old decode no longer count as holding this group."""
        from ..decoder_cuda import GroupDecoder

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

