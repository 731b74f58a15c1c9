"""Compressed offloading: a model's compressed weights streamed from pinned host memory.

    ecf8.torch.compress_module(model)                    # weights held compressed, any device
    stats = ecf8.torch.offload_module(model, "cuda", max_gpu_memory=20 * 2**30)
    ecf8.torch.load_model(model, "ckpt/", "cuda", offload="cpu", max_gpu_memory=20 * 2**30)  # or from a file
    model(inputs)                                        # blocks stream in as the forward reaches them

When even the compressed model does not fit the GPU, the ECF8 frames of some of its blocks (by
default: the children of its ``nn.ModuleList``s, a Transformer's layers) stay in host memory: one
pinned arena, each block's frames side by side.  When the forward reaches the first compressed
module of such a block, that block's *compressed* bytes are on their way to the GPU already: a copy
stream copies them into one of two device staging buffers (each the size of the largest block's
frames) while the previous block computes; the compute stream waits for the copy (an event), decodes
the whole block in one launch per dtype into the decode buffer (the size of the largest decoded
block), records that the staging buffer is free again, and the copy of the next block begins.  The
bytes crossing PCIe are the compressed ones: about 0.85 of FP8 weights, 0.67 of BF16.

The first blocks (module order) stay resident on the GPU, compressed, while they fit
``max_gpu_memory`` together with everything else the model keeps there (as accelerate's
``max_memory`` places layers); the rest are streamed.  Outputs are bit-identical to the resident
compressed model (the same decoder, the same frames).

On the CPU (device="cpu") the same schedule runs with ordinary host buffers in place of the GPU's
(copy, then decode from the copy): a stand-in that checks the bookkeeping without a GPU.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Sequence

import numpy as np
import torch

from .. import format as fmt
from .. import gpu
from ..errors import UnsupportedError
from .modules import group_weights, is_compressed
from .runtime import Pool, Weight
from .tensors import check_device, cuda_index, cupy_view, decode, torch_memory

__all__ = ["offload_module", "OffloadStats", "is_offloaded"]

_ALIGN = 256                       # frame starts in the arena, the staging and the decode buffers


@dataclasses.dataclass
class OffloadStats:
    """What ``offload_module`` placed where (bytes)."""

    offloaded_blocks: int          # blocks whose frames stream from host memory
    resident_blocks: int           # blocks held compressed on the device
    host_bytes: int                # the arena: frames of the offloaded blocks (pinned on a GPU host)
    staging_bytes: int             # two staging buffers on the device, each the largest block's frames
    buffer_bytes: int              # the decode buffer: the largest offloaded block decoded
    device_bytes: int              # estimate of every weight byte kept on the device, buffers included


def is_offloaded(module: torch.nn.Module) -> bool:
    """True when `module` holds its weight compressed in host memory, streamed by ``offload_module``."""
    return is_compressed(module) and isinstance(module.__dict__["_ecf8"], _HostWeight)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _frame_of(w: Weight) -> tuple[fmt.Frame, Any]:
    """(parsed frame, its bytes: a host buffer, or a CuPy array on the GPU) of a compressed weight.
    Not re-verified: ecf8 checked the frame when it entered (decoded from a file, or encoded)."""
    if w.device.type == "cuda":
        return w.blob.frame, w.blob.payload
    view = fmt.as_buffer(w.blob)
    return fmt.parse(view, verify=False), view


def _device_bytes(frame: fmt.Frame, length: int) -> int:
    """GPU bytes of a resident frame: the frame, chunk index and decode tables (see decoder_cuda)."""
    if frame.mode != fmt.MODE_CODED:
        return _aligned(length)
    return _aligned(length) + _aligned(5 * frame.nchunks + 20 + frame.ntables * (2 << fmt.MAX_CODE_LEN))


def _default_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of every outermost nn.ModuleList of `model` that hold compressed weights."""
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, torch.nn.ModuleList):
            for child in m:
                inside.update(id(x) for x in child.modules())
                if any(is_compressed(x) for x in child.modules()):
                    blocks.append(child)
    return blocks


def _weights(module: torch.nn.Module) -> list[Weight]:
    """The distinct compressed weights held in `module`, in module order."""
    seen: dict[int, Weight] = {}
    for m in module.modules():
        if is_compressed(m):
            w = m.__dict__["_ecf8"]
            seen.setdefault(id(w), w)
    return list(seen.values())


def offload_module(model: torch.nn.Module, device: str | torch.device = "cuda", *,
                   max_gpu_memory: int | None = None, blocks: Sequence[torch.nn.Module] | None = None
                   ) -> OffloadStats:
    """Run `model` on `device` with the compressed weights of some blocks streamed from host memory.

    model: its eligible weights held compressed (``compress_module``, or ``load_model`` with
    ``compress=True``), on any device.  blocks: the units streamed, each decoded whole by one
    launch per dtype (default: the children of the model's outermost ``nn.ModuleList``s that hold
    compressed weights).  max_gpu_memory (bytes): the first blocks stay on the device, compressed,
    as long as everything kept there fits (the rest of the model, resident frames, the decode
    buffers, two staging buffers); None streams every block.  Activations and caches are not
    counted: leave room for them.  Everything outside the streamed frames moves to `device`.

    An offloaded model runs forwards (several threads or streams too: the copies wait on every
    decode that read a staging buffer) and gives its weights to ``state_dict``, ``.weight`` and
    ``decompress_module`` (the way back); it cannot move to another device, be pickled, re-load
    weights by ``load_state_dict``, or run inside a CUDA-graph capture: each raises
    UnsupportedError.

    Raises UnsupportedError for a device other than cpu/cuda, a block without compressed weights
    given explicitly, a weight shared between a block and anything outside it, a tensor-parallel
    (DTensor) weight, a model offloaded already, or a max_gpu_memory that cannot hold the model
    with every block streamed; the model is unchanged then.  An error while moving the rest of the
    model (out of memory) puts the streamed weights back as they were and is raised.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", cuda_index(dev))
        check_device(dev, "the target device")
    elif dev.type != "cpu":
        raise UnsupportedError(f"device must be cpu or cuda, not {dev}")
    if any(is_offloaded(m) for m in model.modules()):
        raise UnsupportedError("the model is offloaded already")
    blocks = list(_default_blocks(model) if blocks is None else blocks)
    per_block = [_weights(b) for b in blocks]
    for b, ws in zip(blocks, per_block):
        if not ws:
            raise UnsupportedError(f"block {type(b).__name__} holds no compressed weight: "
                                   "compress the model first")
    _check_private(model, blocks, per_block)
    frames = [[_frame_of(w) for w in ws] for ws in per_block]
    sizes = [sum(_aligned(len(data)) for _, data in fs) for fs in frames]
    decoded = [sum(_aligned(w.nbytes) for w in ws) for ws in per_block]
    resident = _resident_count(model, dev, per_block, frames, sizes, decoded, max_gpu_memory)
    streamed = list(range(resident, len(blocks)))
    if not streamed:
        model.to(dev)
        return OffloadStats(0, resident, 0, 0, 0, _kept_bytes(model, dev, [], []))
    for ws in per_block:                       # old groups may span blocks: decode alone from now
        for w in ws:
            if w.group is not None:
                w.group.dissolve()
    for d in {w.device for ws in per_block for w in ws if w.device.type == "cuda"}:
        torch.cuda.synchronize(d)               # frames encoded on a GPU are complete
    streamer = _Streamer(dev, [sizes[i] for i in streamed])
    pool = Pool()
    units = []
    for k, i in enumerate(streamed):
        units.append(_Unit(streamer, k, per_block[i], frames[i], pool))
    streamer.finish(units)
    swapped: list[tuple[torch.nn.Module, Weight]] = []
    try:
        for i in streamed:
            swap = {id(w): h for w, h in zip(per_block[i], units[i - resident].weights)}
            for m in blocks[i].modules():
                if is_compressed(m) and id(m.__dict__["_ecf8"]) in swap:
                    swapped.append((m, m.__dict__["_ecf8"]))
                    m.__dict__["_ecf8"] = swap[id(m.__dict__["_ecf8"])]
        model.to(dev)                          # frames held elsewhere upload; others stay put
    except BaseException:                      # e.g. out of memory: the streamed weights go back
        for m, w in swapped:
            m.__dict__["_ecf8"] = w
        group_weights(model, [w for w in _weights(model) if w.device.type == "cuda"], None)
        raise
    rest = [w for w in _weights(model) if not isinstance(w, _HostWeight)]
    group_weights(model, rest, None)
    pool.warm([units[0].weights[0]])
    return OffloadStats(len(streamed), resident, streamer.arena.numel(), 2 * streamer.slot_bytes,
                        pool.buffer_bytes(), _kept_bytes(model, dev, rest, units))


def _check_private(model: torch.nn.Module, blocks: list, per_block: list) -> None:
    """A streamed weight belongs to one block: tied to nothing outside it, no DTensor."""
    owner: dict[int, int] = {}
    for i, ws in enumerate(per_block):
        for w in ws:
            if w.layout is not None:
                raise UnsupportedError("a tensor-parallel (DTensor) weight cannot be offloaded")
            if owner.setdefault(id(w), i) != i:
                raise UnsupportedError("a compressed weight is shared by two blocks: "
                                       "it cannot stream with one")
    ids = {id(x) for b in blocks for x in b.modules()}
    for m in model.modules():
        if is_compressed(m) and id(m) not in ids and id(m.__dict__["_ecf8"]) in owner:
            raise UnsupportedError(f"a compressed weight of a block is tied to {type(m).__name__} outside "
                                   "the blocks: it cannot stream with its block")


def _resident_count(model, dev, per_block, frames, sizes, decoded, budget) -> int:
    """How many leading blocks stay on the device within `budget` bytes (None: none)."""
    if budget is None:
        return 0
    in_blocks = {id(w) for ws in per_block for w in ws}
    outside = [w for w in _weights(model) if id(w) not in in_blocks]
    fixed = _plain_bytes(model) + sum(_device_bytes(*_frame_meta(w)) for w in outside)
    cost = [sum(_device_bytes(f, len(data)) for f, data in fs) for fs in frames]
    n = len(per_block)
    for k in range(n, -1, -1):
        stream = range(k, n)
        buffer = max([w.nbytes for w in outside] + [w.nbytes for ws in per_block[:k] for w in ws], default=0)
        need = fixed + sum(cost[:k]) + buffer            # resident frames, their decode buffer
        if k < n:
            need += 2 * max(sizes[i] for i in stream) + max(decoded[i] for i in stream)
        if need <= budget:
            return k
    raise UnsupportedError(f"max_gpu_memory={budget} bytes cannot hold the model even with every block "
                           f"streamed: it needs {need} bytes on the device")


def _frame_meta(w: Weight) -> tuple[fmt.Frame, int]:
    f, data = _frame_of(w)
    return f, len(data)


def _plain_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's ordinary parameters and buffers (compressed weights are neither)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _kept_bytes(model: torch.nn.Module, dev: torch.device, rest: list, units: list) -> int:
    """Estimate of the weight bytes on the device: parameters, buffers, resident frames, buffers."""
    frames = sum(_device_bytes(*_frame_meta(w)) for w in rest if w.device == dev)
    largest = max([w.nbytes for w in rest], default=0)
    streamed = 0
    if units:
        s = units[0].streamer
        streamed = 2 * s.slot_bytes + max(u.nbytes for u in units)
    return _plain_bytes(model) + frames + largest + streamed


class _Streamer:
    """The pinned arena holding every streamed block's frames, two staging buffers on the device,
    and the copy stream that fills them (see the module docstring)."""

    def __init__(self, dev: torch.device, sizes: list[int]):
        self.device, self.cuda = dev, dev.type == "cuda"
        self.starts = list(np.cumsum([0] + sizes[:-1]).tolist())
        self.slot_bytes = max(sizes)
        self.host, self.arena = _arena(sum(sizes), self.cuda)
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=dev) for _ in range(2)]
        self.holds: list[int | None] = [None, None]   # unit whose copy into slot s was issued
        self.last: int | None = None                   # slot of the latest decode
        self.lock = threading.Lock()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(dev)
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.readers: list[dict] = [{}, {}]        # slot s: {stream: event after its last decode}
        self.units: list[_Unit] = []

    def finish(self, units: list["_Unit"]) -> None:
        self.units = units

    def _issue(self, k: int, s: int) -> None:
        """Copy unit k's frames into slot s (after every decode that read slot s)."""
        unit = self.units[k]
        src = self.arena[unit.start: unit.start + unit.frame_bytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for event in self.readers[s].values():
                    self.copy_stream.wait_event(event)
                self.slots[s][: unit.frame_bytes].copy_(src, non_blocking=True)
                self.copied[s].record(self.copy_stream)
        else:
            self.slots[s][: unit.frame_bytes].copy_(src)
        self.holds[s] = k

    def decode(self, k: int, buf: torch.Tensor, stream: int) -> None:
        """Decode unit k into buf on the compute stream (handle `stream`), then start copying the
        next unit into the other staging buffer."""
        with self.lock:
            if self.cuda and torch.cuda.is_current_stream_capturing():
                raise UnsupportedError("offloaded weights cannot be decoded inside a CUDA-graph capture: "
                                       "their bytes are copied from host memory at each forward")
            held = [s for s in (0, 1) if self.holds[s] == k]
            if held:
                s = held[-1] if self.last not in held else self.last
            else:
                s = 0 if self.last is None else 1 - self.last
                self._issue(k, s)
            unit = self.units[k]
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                if compute.cuda_stream != stream:
                    compute = torch.cuda.ExternalStream(stream, device=self.device)
                compute.wait_event(self.copied[s])
                for decoder in unit.decoders[s]:
                    decoder.launch(buf.data_ptr(), stream)
                done = self.readers[s].get(stream)      # one event per stream: its latest decode
                if done is None:
                    done = self.readers[s][stream] = torch.cuda.Event()
                done.record(compute)
            else:
                unit.decode_host(self.host_view(s), buf)
            self.last = s
            nxt = (k + 1) % len(self.units)
            if nxt not in self.holds:
                self._issue(nxt, 1 - s)

    def host_view(self, s: int) -> np.ndarray:
        return self.slots[s].numpy()


def _arena(nbytes: int, pinned: bool) -> tuple[np.ndarray, torch.Tensor]:
    """(host array, torch view) of `nbytes`; pinned: page-locked (cudaHostRegister), exactly
    `nbytes` (torch's pinned allocator would round a large request up to a power of two), unlocked
    when the array is freed."""
    host = np.empty(max(nbytes, 1), np.uint8)
    if pinned:
        runtime = gpu.cupy().cuda.runtime
        ptr = host.ctypes.data
        try:
            runtime.hostRegister(ptr, host.nbytes, 0)
        except runtime.CUDARuntimeError as e:
            raise UnsupportedError(f"cannot page-lock {nbytes} bytes of host memory for offloading: {e}") from None
        weakref.finalize(host, _unregister, runtime, ptr)
    return host, torch.from_numpy(host)


def _unregister(runtime: Any, ptr: int) -> None:
    try:
        runtime.hostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may be gone already
        pass


class _Unit:
    """One streamed block: its weights (as _HostWeights), where their frames lie in the arena and
    in a staging buffer, and (on a GPU) one GroupDecoder per dtype for each staging buffer."""

    def __init__(self, streamer: _Streamer, k: int, weights: list, frames: list, pool: Pool):
        self.streamer, self.index = streamer, k
        self.start = streamer.starts[k]
        self.stamp = object()
        at = out = 0
        self.entries: list[tuple[int, int]] = []       # (offset in the staging buffer, length)
        self.weights: list[_HostWeight] = []
        for w, (_, data) in zip(weights, frames):
            length = len(data)
            place = streamer.host[self.start + at: self.start + at + length]
            if isinstance(data, memoryview):
                place[:] = np.frombuffer(data, np.uint8)
            else:                                       # a CuPy array: straight into the arena
                data.get(out=place)
            frame = fmt.parse(fmt.as_buffer(place), verify=False)   # its index views the arena, so
            h = _HostWeight(w, frame, self, at, length, streamer.device, pool)   # the source can go
            h.offset = out
            self.entries.append((at, length))
            self.weights.append(h)
            at += _aligned(length)
            out += _aligned(w.nbytes)
        self.frame_bytes, self.nbytes = at, out
        pool.sizes[streamer.device] = max(pool.sizes.get(streamer.device, 0), out)
        for h in self.weights:
            h.group = self
        self.decoders = self._decoders() if streamer.cuda else None

    def _decoders(self) -> list[list]:
        """For each staging buffer: GroupDecoders reading this unit's frames there (decode tables
        and index resident on the device, shared by both)."""
        import dataclasses as dc

        from .. import decoder_cuda as dcu

        cupy = gpu.cupy()
        s = self.streamer
        index = s.device.index
        out: list[list] = [[], []]
        with cupy.cuda.Device(index), torch_memory():
            first = []
            for h, (at, length) in zip(self.weights, self.entries):
                first.append(dcu.resident(h.frame, index, cupy_view(s.slots[0][at : at + length])))
            second = [dc.replace(t, payload=cupy_view(s.slots[1][at : at + length]))
                      for t, (at, length) in zip(first, self.entries)]
            for slot, tensors in enumerate((first, second)):
                for code in sorted({t.frame.spec.code for t in tensors}):
                    pick = [(t, h.offset) for t, h in zip(tensors, self.weights) if t.frame.spec.code == code]
                    out[slot].append(dcu.GroupDecoder([t for t, _ in pick], [o for _, o in pick]))
        return out

    def decode_host(self, slot: np.ndarray, buf: torch.Tensor) -> None:
        """CPU stand-in: decode each frame from the staging buffer into its place in buf."""
        for h, (at, length) in zip(self.weights, self.entries):
            decode(memoryview(slot[at: at + length]), "cpu", out=buf[h.offset: h.offset + h.nbytes])

    def launch(self, buf: torch.Tensor, stream: int) -> None:
        """Called by the decode pool (as for a _Group): the whole block into buf."""
        self.streamer.decode(self.index, buf, stream)

    def dissolve(self) -> None:
        """A weight leaves the stream (decompress_module): the others still decode with the block."""

    def build(self) -> None:
        raise UnsupportedError("an offloaded weight cannot be re-encoded in place")


class _HostWeight(Weight):
    """A compressed weight whose frame lies in a streamer's host arena; decoded with its block."""

    def __init__(self, old: Weight, frame: fmt.Frame, unit: _Unit, at: int, length: int,
                 device: torch.device, pool: Pool):
        super().__init__(None, old.dtype, old.shape, device, old.requires_grad, pool, old.options)
        self.frame, self.unit, self.at, self.length = frame, unit, at, length

    @property
    def stored_bytes(self) -> int:
        return self.length

    def host_frame(self) -> bytes:
        start = self.unit.start + self.at
        return self.unit.streamer.host[start: start + self.length].tobytes()

    def fresh_local(self) -> torch.Tensor:
        """The weight decoded into new memory: its block is decoded through the staging buffers."""
        buf = torch.empty(self.unit.nbytes, dtype=torch.uint8, device=self.device)
        self.unit.launch(buf, self.stream_id())
        return buf[self.offset: self.offset + self.nbytes].view(self.dtype).view(self.shape).clone()

    def _launch(self, out: torch.Tensor, stream: int) -> torch.Tensor:
        return out.copy_(self.fresh_local())

    def move(self, device: torch.device) -> None:
        raise UnsupportedError(f"an offloaded weight streams to {self.device}; it cannot move to {device} "
                               "(ecf8.torch.decompress_module first)")

    def assign(self, value: torch.Tensor, what: str = "weight", **_) -> None:
        raise UnsupportedError(f"{what} is offloaded: its frames cannot change (edit or "
                               "load_state_dict before ecf8.torch.offload_module)")

    def __getstate__(self) -> dict:
        raise UnsupportedError("an offloaded model cannot be pickled or copied: its frames are one "
                               "shared host arena (decompress_module, or offload the copy again)")
