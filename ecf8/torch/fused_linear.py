"""The opt-in fused path of compressed ``torch.nn.Linear`` modules (``compress_module(fused=True)``).

A BF16 ``nn.Linear`` held compressed on a GPU can multiply its frame directly with ``ecf8.fused``
(the weight decoded inside the product, never written to memory) instead of decoding it and
calling ``F.linear``.  Which is faster depends on the GPU, the weight's shape and the number of
input rows, so the first forward of each (GPU, shape, chunk size, rows bucket) times both paths
and keeps the faster: in memory, and in a JSON file (``choices_path``) that later processes read.

What the fused path computes: ``x`` (BF16) converted exactly to float32, ``x @ W.T`` summed in
float32 in the kernel's fixed order (``cuda/ecf8_fused.cu``), the bias added in float32, one
rounding to BF16.  cuBLAS sums in another order, so outputs may differ from the uncompressed
module's in the last bit (``bench/bench_fused.py`` counts how often); they equal, bit for bit,
the same kernel run on the uncompressed weight (``ecf8.fused.PlainWeight``).  The default path
(decode, then ``F.linear``) stays bit-identical to the uncompressed module, and is what runs:

- for inputs of more than ``MAX_ROWS`` rows (tokens), where the fused kernel is slower;
- when autograd needs a graph (grad enabled and anything requiring grad), under
  ``torch.compile`` or autocast to another dtype, for anything but one positional input of the
  weight's dtype on its GPU, and for a bias of another dtype (which ``F.linear`` refuses);
- for a weight re-encoded as a stored (incompressible) frame, which has nothing to decode;
- inside a CUDA-graph capture for a (shape, rows) not yet timed, or a weight re-encoded since the
  last forward outside a capture (neither can be set up without a host synchronization).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import format as fmt
from ..errors import UnsupportedError
from .tensors import cupy_view, torch_memory

__all__ = ["FusedLinear", "Choices", "choices", "choices_path", "fused_skip_reason", "MAX_ROWS"]

MAX_ROWS = 16            # more input rows: the default path (the fused kernel re-reads W per 8 rows)
BUCKETS = (1, 2, 4, 8, 16)
TIMING_REPS = 5          # timed calls of each path, after two untimed ones: the median decides


def choices_path() -> Path | None:
    """Where the timed choices are kept: ``$ECF8_FUSED_CHOICES`` (empty: nowhere, memory only),
    else ``$XDG_CACHE_HOME/ecf8/fused-choices.json`` (``~/.cache`` by default)."""
    value = os.environ.get("ECF8_FUSED_CHOICES")
    if value is not None:
        return Path(value) if value else None
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ecf8" / "fused-choices.json"


class Choices:
    """Timed path choices, ``key -> {"path": "fused" | "default", "fused_ms", "default_ms"}``,
    shared by threads, read from and merged into a JSON file (written whole to a temporary file,
    then renamed; a file that cannot be read or written leaves the choices in memory only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None:
                try:
                    data = json.loads(self.path.read_text())
                    self._entries = {k: v for k, v in data.items()
                                     if isinstance(v, dict) and v.get("path") in ("fused", "default")}
                except (OSError, ValueError, AttributeError):
                    pass
        return self._entries

    def entries(self) -> dict[str, dict]:
        """A copy of every choice known here: key -> {"path", "fused_ms", "default_ms"}."""
        with self._lock:
            return {k: dict(v) for k, v in self._load().items()}

    def get(self, key: str) -> str | None:
        with self._lock:
            entry = self._load().get(key)
        return None if entry is None else entry["path"]

    def put(self, key: str, fused_ms: float, default_ms: float) -> str:
        path = "fused" if fused_ms < default_ms else "default"
        with self._lock:
            self._load()[key] = {"path": path, "fused_ms": round(fused_ms, 5), "default_ms": round(default_ms, 5)}
            if self.path is not None:
                self._save()
        return path

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                merged = json.loads(self.path.read_text())       # what other processes added
                merged = merged if isinstance(merged, dict) else {}
            except (OSError, ValueError):
                merged = {}
            merged.update(self._entries)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fused-choices-")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass


_choices: Choices | None = None
_choices_lock = threading.Lock()


def choices() -> Choices:
    """The process's choices, on the file ``choices_path()`` named when first asked for."""
    global _choices
    with _choices_lock:
        if _choices is None:
            _choices = Choices(choices_path())
        return _choices


def fused_skip_reason(base: type, w: Any) -> str | None:
    """None when the fused path can serve weight w held by modules of class `base` (it then runs
    whenever the weight is on a CUDA GPU), else why not."""
    from .. import fused

    if base is not torch.nn.Linear:
        return f"{base.__name__} is not torch.nn.Linear"
    if w.layout is not None:
        return "a tensor-parallel shard"
    if w.dtype != torch.bfloat16:
        return f"{str(w.dtype).replace('torch.', '')} weights: the fused path multiplies bfloat16 nn.Linear weights"
    why = fused.supports(w.shape, "bfloat16")
    if why is None:
        frame = w.blob.frame if w.device.type == "cuda" else fmt.parse(memoryview(w.blob), verify=False)
        if frame.mode != fmt.MODE_CODED:
            why = "stored raw (incompressible): nothing to decode"
    return why


_device_names: dict[torch.device, str] = {}
_tag: list[str] = []


def _kernels_tag() -> str:
    """'kernels XXXXXXXX': a CRC-32 of the decoder and fused-kernel sources, so that choices timed
    with other kernels (another ecf8) are timed again rather than reused."""
    if not _tag:
        from .. import gpu

        text = gpu.kernel_source("ecf8_decode.cu") + gpu.kernel_source("ecf8_fused.cu")
        _tag.append(f"kernels {zlib.crc32(text.encode()):08x}")
    return _tag[0]


def _bucket(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


class FusedLinear:
    """The fused path of one compressed weight (shared by the modules that hold it)."""

    def __init__(self, w: Any):
        self.weight = w
        self._product: Any = None          # ecf8.fused.FusedWeight of _blob (None: _blob not fusable)
        self._blob: Any = None
        self._keys: dict[int, tuple[Any, str]] = {}     # rows bucket -> (the frame it is for, key)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"weight": self.weight}     # the device state is rebuilt where it is unpickled

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["weight"])

    def forget(self) -> None:
        """Drop the product of a frame the weight no longer holds (re-encoded or moved)."""
        with self._lock:
            self._product = self._blob = None
            self._keys = {}

    def key(self, rows: int) -> str:
        """The choice's key: the kernels' version, GPU name, weight shape and dtype, chunk size,
        rows bucket (made once per frame and bucket: every forward asks)."""
        w, bucket = self.weight, _bucket(rows)
        blob = w.blob
        known = self._keys.get(bucket)
        if known is not None and known[0] is blob:
            return known[1]
        name = _device_names.get(w.device)
        if name is None:
            name = _device_names[w.device] = torch.cuda.get_device_name(w.device)
        key = (f"{_kernels_tag()}|{name}|{w.shape[0]}x{w.shape[1]}|bfloat16|chunk {1 << blob.frame.chunk_log2}"
               f"|rows {bucket}")
        self._keys[bucket] = (blob, key)
        return key

    def product(self, capturing: bool):
        """The FusedWeight of the weight's current frame; None where the frame has none (re-encoded
        as a stored frame) or, inside a capture, where it needs building (the build uploads)."""
        from .. import fused

        with self._lock:
            blob = self.weight.blob
            if self._blob is not blob:
                if capturing:
                    return None
                try:
                    with torch_memory():
                        product = fused.FusedWeight(blob)
                except UnsupportedError:         # a stored frame: the default path copies it
                    product = None
                self._product, self._blob = product, blob
            return self._product

    def _fused(self, x2: torch.Tensor, bias: torch.Tensor | None, product: Any) -> torch.Tensor:
        """x2 [rows, K] BF16 -> [rows, N] BF16 through the fused kernel (no host synchronization)."""
        rows = x2.shape[0]
        x32 = x2.float().contiguous()
        y = torch.empty(rows, self.weight.shape[0], dtype=torch.float32, device=x2.device)
        work = torch.empty(product.workspace_floats(rows), dtype=torch.float32, device=x2.device)
        product.matmul(cupy_view(x32), out=cupy_view(y), workspace=cupy_view(work),
                       stream=torch.cuda.current_stream(x2.device).cuda_stream)
        if bias is not None:
            y += bias.float()
        return y.to(torch.bfloat16)

    def forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """module(*args, **kwargs) through the fused kernel, or None where the default path runs."""
        w = self.weight
        if kwargs or len(args) != 1:
            return None
        x, bias = args[0], module.bias
        if (w.device.type != "cuda" or not isinstance(x, torch.Tensor) or x.device != w.device
                or x.dtype != torch.bfloat16 or x.dim() < 1 or x.shape[-1] != w.shape[1]
                or (bias is not None and (bias.device != w.device or bias.dtype != torch.bfloat16))):
            return None
        if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") != torch.bfloat16:
            return None
        rows = x.numel() // w.shape[1]
        if rows == 0 or rows > MAX_ROWS:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return None
        capturing = torch.cuda.is_current_stream_capturing()
        key = self.key(rows)
        table = choices()
        path = table.get(key)
        if path is None:
            if capturing:
                return None
            product = self.product(False)
            if product is None:
                return None
            path = table.put(key, *self._time(x.reshape(rows, -1), bias, product))
        if path != "fused":
            return None
        product = self.product(capturing)
        if product is None:
            return None
        y = self._fused(x.reshape(rows, -1), bias, product)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def _time(self, x2: torch.Tensor, bias: torch.Tensor | None, product: Any) -> tuple[float, float]:
        """(fused ms, default ms): medians of TIMING_REPS calls of each path after two untimed
        ones, on the current stream (this synchronizes the host once)."""
        def default() -> None:
            with self.weight.decoded() as view:
                F.linear(x2, view, bias)

        times = {}
        stream = torch.cuda.current_stream(x2.device)       # the events on the weight's GPU
        for name, fn in (("fused", lambda: self._fused(x2, bias, product)), ("default", default)):
            fn()
            fn()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(TIMING_REPS)]
            for start, stop in events:
                start.record(stream)
                fn()
                stop.record(stream)
            events[-1][1].synchronize()
            times[name] = sorted(a.elapsed_time(b) for a, b in events)[TIMING_REPS // 2]
        return times["fused"], times["default"]
