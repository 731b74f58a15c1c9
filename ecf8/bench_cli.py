"""``ecf8 bench``: size and speed of ecf8 next to zstd, on a bundled real sample or the user's file.

Without a path it measures the sample shipped in ``ecf8/data`` (all-MiniLM-L6-v2 layer 0: FP8 E4M3
and BF16, see its README.md).  Every codec's output is checked bit-exact before it is timed.  CPU
times are medians of ``runs`` timed calls per tensor after one untimed call (the warm-up, whose
output is the one checked), summed over the tensors of a dtype.  With CuPy and a CUDA device, GPU
decode (one batched launch per dtype) is timed with CUDA events next to a device-to-device copy
of the same decoded bytes.
"""

from __future__ import annotations

import importlib.resources
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zstandard

from . import api, encoder
from . import format as fmt
from .errors import ECF8Error

__all__ = ["SAMPLE_FILES", "sample_paths", "Result", "bench_tensors", "run_bench"]

SAMPLE_FILES = ("minilm-layer0-e4m3.safetensors", "minilm-layer0-bf16.safetensors")
SAMPLE_NOTE = "bundled sample: all-MiniLM-L6-v2 encoder.layer.0 weights (Apache-2.0, see ecf8/data/README.md)"


def sample_paths() -> list[Path]:
    """The bundled sample files (ECF8Error if the installation lacks them)."""
    base = importlib.resources.files("ecf8") / "data"
    paths = [Path(str(base / name)) for name in SAMPLE_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ECF8Error(f"the bundled sample is missing from this installation ({', '.join(missing)}); "
                        "reinstall ecf8 or give a file: ecf8 bench model.safetensors")
    return paths


@dataclass
class Result:
    """One codec on one dtype's tensors; times in seconds (sums of per-tensor medians)."""

    codec: str
    original_bytes: int
    numel: int
    compressed_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    exact: bool = True

    @property
    def bits_per_weight(self) -> float:
        return self.compressed_bytes * 8 / self.numel

    @property
    def saving(self) -> float:
        return 1 - self.compressed_bytes / self.original_bytes


@dataclass
class Group:
    """The tensors of one coded dtype."""

    dtype: str
    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.arrays)

    @property
    def numel(self) -> int:
        return sum(x.size for x in self.arrays)


def _median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def bench_tensors(arrays: list[np.ndarray], runs: int = 5, zstd_level: int = 3,
                  options: dict | None = None) -> tuple[Result, Result, list[bytes]]:
    """(ecf8, zstd, ecf8 frames) for arrays of one coded dtype, measured on the CPU."""
    options = options or {}
    n, nbytes = sum(x.size for x in arrays), sum(x.nbytes for x in arrays)
    ours, theirs = Result("ecf8", nbytes, n), Result(f"zstd -{zstd_level}", nbytes, n)
    frames = []
    cctx = zstandard.ZstdCompressor(level=zstd_level)
    dctx = zstandard.ZstdDecompressor()
    for x in arrays:
        x = np.ascontiguousarray(x)
        raw = x.reshape(-1).view(np.uint8)
        blob = encoder.encode(x, **options)                      # warm-up, and the frame checked
        ours.exact &= _same_bits(api.decode(blob), x)
        ours.compressed_bytes += len(blob)
        ours.encode_s += _median_time(lambda: encoder.encode(x, **options), runs)
        ours.decode_s += _median_time(lambda: api.decode(blob), runs)
        frames.append(blob)
        packed = cctx.compress(raw.data)
        theirs.exact &= dctx.decompress(packed) == bytes(raw.data)
        theirs.compressed_bytes += len(packed)
        theirs.encode_s += _median_time(lambda: cctx.compress(raw.data), runs)
        theirs.decode_s += _median_time(lambda: dctx.decompress(packed), runs)
    return ours, theirs, frames


def gpu_status() -> tuple[Any, str]:
    """(cupy module or None, a line describing the GPU or why none is measured)."""
    try:
        import cupy
    except ImportError:
        return None, ("GPU: not measured (CuPy is not installed: pip install 'ecf8[cuda13]' or 'ecf8[cuda12]'; "
                      "from a clone: pip install '.[cuda13]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return None, "GPU: not measured (no CUDA device)"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as e:          # no driver, no device, ...
        return None, f"GPU: not measured (CUDA unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return cupy, f"GPU: {name}, CuPy {cupy.__version__}"


GPU_BYTES = 256 << 20       # decoded bytes per timed launch: enough to keep a GPU busy for ~0.1 ms+


@dataclass
class GpuResult:
    """GPU decode of one dtype's tensors (one batched launch) next to a device copy; seconds per
    launch of `nbytes` decoded bytes (`copies` copies of the tensors)."""

    decode_s: float
    copy_s: float
    exact: bool
    nbytes: int
    copies: int


def bench_gpu(cupy: Any, frames: list[bytes], arrays: list[np.ndarray], runs: int = 20,
              inner: int = 5, min_bytes: int | None = None) -> GpuResult:
    """Decode `frames` on the current GPU in one batched launch and time it next to a device copy.

    A small sample would time the launch, not the decoder, so the batch holds as many separately
    uploaded copies of the frames as make `min_bytes` of output (distinct buffers: nothing is
    served from cache).  Every output is checked against `arrays` first.  Then `inner` launches
    between two CUDA events, `runs` times after 3 warm-up launches, for the decode and for a
    device-to-device copy of the same number of bytes; medians per launch.
    """
    from . import decoder_cuda

    nbytes = sum(x.nbytes for x in arrays)
    copies = max(1, -(-(GPU_BYTES if min_bytes is None else min_bytes) // max(nbytes, 1)))
    device = f"cuda:{cupy.cuda.Device().id}"
    tensors = [decoder_cuda.to_device(b, device) for _ in range(copies) for b in frames]
    batch = decoder_cuda.BatchDecoder(tensors)
    stream = cupy.cuda.Stream(non_blocking=True)
    outs = batch.run(stream)
    stream.synchronize()
    hosts = [np.ascontiguousarray(x) for x in arrays]
    exact = all(_same_bits(o.get(), hosts[i % len(hosts)]) for i, o in enumerate(outs))
    total = nbytes * copies
    sample = cupy.asarray(np.concatenate([x.reshape(-1).view(np.uint8) for x in hosts]))
    src = cupy.empty(total, np.uint8)
    for i in range(copies):
        src[i * nbytes : (i + 1) * nbytes] = sample
    dst = cupy.empty_like(src)

    def copy(st):
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, total,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, st.ptr)

    copy(stream)
    stream.synchronize()
    exact &= bool((dst == src).all())

    def timed(launch) -> float:
        for _ in range(3):
            launch(stream)
        times = []
        for _ in range(runs):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(inner):
                launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / inner)
        return statistics.median(times)

    return GpuResult(timed(batch.run), timed(copy), exact, total, copies)


def _groups(paths: list[Path], dtype: str | None, tensor: str | None) -> tuple[list[Group], dict[str, int]]:
    """Coded tensors grouped by dtype, and the count of other tensors skipped, by dtype."""
    from .analyze_cli import tensors_of

    groups: dict[str, Group] = {}
    skipped: dict[str, int] = {}
    found = False
    for path in paths:
        for name, dtype_name, x in tensors_of(path, dtype):
            if tensor is not None and name != tensor:
                continue
            found = True
            if not x.size:
                continue
            if dtype_name not in {s.name for s in fmt.DTYPES.values()}:
                skipped[dtype_name] = skipped.get(dtype_name, 0) + 1
                continue
            g = groups.setdefault(dtype_name, Group(dtype_name))
            g.names.append(name)
            g.arrays.append(x)
    if tensor is not None and not found:
        raise ECF8Error(f"{', '.join(map(str, paths))}: no tensor named {tensor!r}")
    order = [s.name for s in fmt.DTYPES.values()]
    return sorted(groups.values(), key=lambda g: order.index(g.dtype)), skipped


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(path: Path | None, *, dtype: str | None = None, tensor: str | None = None, runs: int = 5,
              zstd_level: int = 3, gpu: bool = True, options: dict | None = None) -> Iterator[str]:
    """The lines of the bench report, yielded as soon as each is measured."""
    paths = sample_paths() if path is None else [Path(path)]
    groups, skipped = _groups(paths, dtype, tensor)
    what = SAMPLE_NOTE if path is None else str(path)
    if not groups:
        raise ECF8Error(f"{what}: no FP8/BF16/FP16 tensors to measure"
                        + (f" (found {', '.join(f'{n} {d}' for d, n in skipped.items())})" if skipped else ""))
    yield f"ecf8 bench: {what}"
    yield (f"CPU: {_cpu_name()} ({os.cpu_count()} cores; ecf8's NumPy codec and zstd use one); "
           f"median of {runs} runs after a warm-up; MB/s of original bytes (1 MB = 10^6 B)")
    for d, n in skipped.items():
        yield f"skipped: {n} tensor{'s' * (n != 1)} of {d} (ecf8 codes FP8, BF16 and FP16)"
    yield ""
    yield (f"{'dtype':8} {'tensors':>7} {'weights':>11}  {'codec':9} {'bits/w':>7} {'saving':>7} "
           f"{'encode MB/s':>11} {'decode MB/s':>11}  bit-exact")
    measured = []
    for g in groups:
        ours, theirs, frames = bench_tensors(g.arrays, runs, zstd_level, options)
        measured.append((g, frames))
        for i, r in enumerate((ours, theirs)):
            head = f"{g.dtype:8} {len(g.arrays):7} {g.numel:11,}" if i == 0 else " " * 28
            yield (f"{head}  {r.codec:9} {r.bits_per_weight:7.3f} {r.saving:7.1%} "
                   f"{r.original_bytes / r.encode_s / 1e6:11.1f} {r.original_bytes / r.decode_s / 1e6:11.1f}"
                   f"  {'yes' if r.exact else 'NO'}")
        if not (ours.exact and theirs.exact):
            raise ECF8Error(f"{what}: {g.dtype} tensors did not round-trip bit-exactly")
    if not gpu:
        return
    cupy, line = gpu_status()
    yield ""
    yield line
    if cupy is None:
        return
    yield (f"{'dtype':8} {'MB/launch':>9}  {'ecf8 decode GB/s':>16} {'device copy GB/s':>16}  bit-exact   "
           "(one batched launch per dtype; CUDA events, median of 20 after 3 warm-ups)")
    for g, frames in measured:
        r = bench_gpu(cupy, frames, g.arrays)
        yield (f"{g.dtype:8} {r.nbytes / 1e6:9.1f}  {r.nbytes / r.decode_s / 1e9:16.1f} "
               f"{r.nbytes / r.copy_s / 1e9:16.1f}  {'yes' if r.exact else 'NO'}"
               + (f"   ({r.copies} separately uploaded copies of the tensors)" if r.copies > 1 else ""))
        if not r.exact:
            raise ECF8Error(f"{what}: {g.dtype} tensors decoded on the GPU differ from the original")
