"""GPU encoder speed: 256 M real E4M3 weights, GPU vs the CPU encoder, one run.

    python bench/bench_encode.py [--weights 268435456] [--reps 10] [--cpu-slice 16777216] [--layers 9]

Data: the real all-MiniLM-L6-v2 layer-0 E4M3 sample (block-128 scales) from the shared data
(``$ECF8_SHARED_DATA``, default ../shared/data), tiled to --weights elements on the GPU, so the
exponent statistics are a trained model's.  The GPU frame is checked byte for byte against the CPU
encoder's frame of the same bytes before anything is timed.

- GPU: ``ecf8.encoder_cuda.encode`` end to end (histograms, the host's table choice, two host
  round trips, coding, checksum, the returned DeviceTensor), CUDA events, median of --reps after
  a warm-up; then one traced run split into phases (GPU kernels vs host time).
- CPU: ``ecf8.encode`` on the full tensor (the byte-for-byte reference, default BLAS threads), and
  on a --cpu-slice prefix with BLAS limited to one thread (the one-core rate).
- nvCOMP ANS: timed when ``nvidia.nvcomp`` imports, else skipped with a note.
The table choice (``table_choice.assign_tables``, exact arithmetic, the CPU encoder's rule) is timed
two ways: its products on the GPU (``exact``, the default path) and the same rule run on the host
over the histograms copied back (``host``); each frame is checked against the CPU encoder's.

- Llama-shaped set: --layers x the 7 linears of a Llama-3-8B layer (q k v o gate up down, the
  shapes bench_tax.py uses), E4M3, chunk 4096 and max_tables as compress_module picks them,
  encoded one after another on the GPU (wall time to the last frame) -- the encode work of
  compress_module on such a model, without the module plumbing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8
import ecf8.encoder as enc
from ecf8 import encoder_cuda as ec
from ecf8 import table_choice

# Where the table choice (ecf8.table_choice, the CPU encoder's rule) runs: "exact" = its large
# products on the GPU (the default path); "host" = the same rule on the host over the histograms
# copied back (a wrapper the encoder does not recognise); the bench swaps encoder.assign_tables.
RULES = {"host": lambda *a, **k: table_choice.assign_tables(*a, **k),
         "exact": table_choice.assign_tables}

LLAMA = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
         "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}


def sample() -> np.ndarray:
    """The E4M3 sample's bits (uint8), all six tensors concatenated."""
    root = Path(os.environ.get("ECF8_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with np.load(root / "minilm-layer0-fp8-e4m3fn-block128.npz") as z:
        return np.concatenate([z[k].reshape(-1) for k in z.files])


def gpu_ms(fn, reps: int) -> list[float]:
    import cupy

    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return times


def traced_encode(dev, opts: dict) -> list:
    """(phase, CUDA event) marks of one GPU encode, taken from outside the encoder: an event before
    it, before and after each kernel it launches (the kernels are looked up through
    ``encoder_cuda.KERNELS``, wrapped here for this one call) and after it returns; the spans
    between kernels are the host's part (table choice, header, allocation, the frame object)."""
    import cupy

    marks = []

    def mark(name: str) -> None:
        event = cupy.cuda.Event()
        event.record()                      # on the current stream: the encode's own inside it
        marks.append((name, event))

    real = ec.KERNELS.function

    def function(device, name):
        kernel = real(device, name)

        def launch(*args, **kwargs):
            mark(f"host: before {name}")
            kernel(*args, **kwargs)
            mark(name)
        return launch

    ec.KERNELS.function = function
    try:
        mark("start")
        ec.encode(dev, dtype="e4m3", **opts)
        mark("host: frame object")
    finally:
        del ec.KERNELS.function             # (the instance attribute: the class's method again)
    cupy.cuda.Device().synchronize()
    return marks


def main() -> None:
    import cupy
    import ml_dtypes

    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=int, default=1 << 28)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=32768)
    ap.add_argument("--cpu-slice", type=int, default=1 << 24)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--llama-div", type=int, default=1, help="divide the Llama row counts (smoke tests)")
    ap.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    args = ap.parse_args()
    n = args.weights
    host = np.resize(sample(), n)
    x = host.view(ml_dtypes.float8_e4m3fn)
    dev = cupy.asarray(host)
    opts = {"chunk_size": args.chunk_size}
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"{n / 1e6:.0f} M E4M3 weights (MiniLM layer 0 tiled), chunk {args.chunk_size}", flush=True)

    t0 = time.perf_counter()
    want = ecf8.encode(x, **opts)
    cpu_full_s = time.perf_counter() - t0
    rows, traces = [], {}
    for rule in args.rules:
        enc.assign_tables = RULES[rule]
        t = ec.encode(dev, dtype="e4m3", **opts)          # warm-up (the first compiles)
        got = t.tobytes()
        ref = want
        if got != want and rule == "exact":               # the rules may choose differently
            ref = ecf8.encode(x, **opts)
            print(f"[{rule}] the exact rule's CPU frame differs from the encoder rule's: {ref != want}")
        same = got == ref
        print(f"[{rule}] GPU frame == CPU frame ({len(ref)} bytes, {len(ref) * 8 / n:.3f} bits/weight): {same}",
              flush=True)
        if not same:
            diff = np.flatnonzero(np.frombuffer(got, np.uint8)[: len(ref)] != np.frombuffer(ref, np.uint8)[: len(got)])
            print(f"  lengths {len(got)} / {len(ref)}; first differing byte {diff[:1]}; {diff.size} differ")
        y = ecf8.decode(t, device="cuda")
        print(f"[{rule}] GPU frame decodes bit-exactly on the GPU: {bool((y.bits == dev).all())}", flush=True)
        del y, got, t
        times = gpu_ms(lambda: ec.encode(dev, dtype="e4m3", **opts), args.reps)
        marks = traced_encode(dev, opts)
        phases = [(b[0], cupy.cuda.get_elapsed_time(a[1], b[1])) for a, b in itertools.pairwise(marks)]
        traces[rule] = phases
        kernels = sum(ms for name, ms in phases if not name.startswith("host"))
        med = statistics.median(times)
        rows.append(f"| GPU ecf8, {rule} rule, end to end (median of {args.reps}, runs {min(times):.2f}.."
                    f"{max(times):.2f} ms) | {n / 1e6:.0f} M | {med:.2f} ms | {n / max(med, 1e-9) / 1e6:.1f} |")
        rows.append(f"| GPU ecf8, {rule} rule, GPU phases only (one traced run) | {n / 1e6:.0f} M | "
                    f"{kernels:.2f} ms | {n / max(kernels, 1e-9) / 1e6:.1f} |")
    enc.assign_tables = RULES["exact"]

    slice_n = min(args.cpu_slice, n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    xs = x[:slice_n]
    t0 = time.perf_counter()
    if threadpool_limits:
        with threadpool_limits(limits=1):
            ecf8.encode(xs, **opts)
    else:
        ecf8.encode(xs, **opts)
    cpu_one_s = time.perf_counter() - t0

    try:
        import nvidia.nvcomp  # noqa: F401
        nvcomp_note = "nvidia.nvcomp imports, but this bench does not drive it yet"
    except ImportError:
        nvcomp_note = "not installed on the machine (nvidia.nvcomp does not import): skipped"

    print("\n| encoder | weights | time | G weights/s |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    print(f"| CPU ecf8 (NumPy, encoder rule, default BLAS threads) | {n / 1e6:.0f} M | {cpu_full_s * 1e3:.0f} ms "
          f"| {n / cpu_full_s / 1e9:.3f} |")
    print(f"| CPU ecf8 (NumPy, encoder rule, BLAS 1 thread{'' if threadpool_limits else ' NOT enforced'}) | "
          f"{slice_n / 1e6:.0f} M slice | {cpu_one_s * 1e3:.0f} ms | {slice_n / cpu_one_s / 1e9:.3f} |")
    print(f"| nvCOMP ANS | - | - | {nvcomp_note} |")
    for rule, phases in traces.items():
        print(f"\n| traced phase, {rule} rule | ms |\n|---|---:|")
        for name, ms in phases:
            print(f"| {name} | {ms:.3f} |")

    # Llama-shaped set
    dev = None                                         # free the 256 M weights
    cupy.get_default_memory_pool().free_all_blocks()
    shapes = {name: (r // args.llama_div, c) for name, (r, c) in LLAMA.items()}
    weights = {name: cupy.asarray(np.resize(host, r * c)).reshape(r, c) for name, (r, c) in shapes.items()}
    per_layer = sum(w.size for w in weights.values())
    total = per_layer * args.layers

    def encode_model(layers=args.layers):
        out = []
        for _ in range(layers):
            for w in weights.values():
                tables = max(1, min(4, w.size >> 19))
                out.append(ec.encode(w, dtype="e4m3", chunk_size=4096, max_tables=tables))
        return out

    print("\n| Llama-shaped set | tensors | weights | GiB | encode wall (median of 2) | G weights/s | bits/w |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rule in args.rules:
        enc.assign_tables = RULES[rule]
        encode_model(1)                                # warm-up
        cupy.cuda.Device().synchronize()
        walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            frames = encode_model()
            cupy.cuda.Device().synchronize()
            walls.append(time.perf_counter() - t0)
            comp = sum(f.frame.size for f in frames)
            del frames
        wall = statistics.median(walls)
        for name in ("k", "gate"):                     # spot check: the CPU encoder's frames
            r, c = shapes[name]
            cpu = ecf8.encode(np.resize(host, r * c).view(ml_dtypes.float8_e4m3fn).reshape(r, c),
                              chunk_size=4096, max_tables=max(1, min(4, (r * c) >> 19)))
            gpu = ec.encode(weights[name], dtype="e4m3", chunk_size=4096,
                            max_tables=max(1, min(4, (r * c) >> 19))).tobytes()
            print(f"[{rule}] Llama {name} {r}x{c}: GPU frame == CPU frame: {gpu == cpu}", flush=True)
        print(f"| {rule} rule: {args.layers} layers x 7 linears, E4M3, chunk 4096 | {7 * args.layers} | "
              f"{total / 1e9:.2f} G | {total / 2**30:.2f} | {wall:.2f} s | {total / wall / 1e9:.2f} | "
              f"{comp * 8 / total:.3f} |", flush=True)
    enc.assign_tables = RULES["exact"]


if __name__ == "__main__":
    main()
