"""GPU decode benchmark: ecf8 against a device-to-device copy and nvCOMP, same bytes, same run.

    python bench/bench_gpu.py [--elements 268435456] [--reps 30] [--json out.json]

Data: real all-MiniLM-L6-v2 linear weights (bench/minilm.py), E4M3 with 128x128 block scales,
tiled to --elements; BF16 from the same model (or the layer-0 sample when only that is at hand).
Every decoded byte is compared with the original before anything is timed.  Times are CUDA-event
medians over --reps runs after warm-up, each behind a spin kernel (no host launch latency); "out
GB/s" = decoded bytes / median time (for the copy: bytes copied / time), so both count output
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8  # noqa: E402
import minilm  # noqa: E402
from ecf8.decoder_cuda import BatchDecoder  # noqa: E402


# Spins one thread until %globaltimer has advanced by `ns` nanoseconds.
_SPIN = cp.RawKernel(r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}""", "spin")
SPIN_NS = 500_000


def median_ms(fn, stream, reps: int, warmup_s: float = 0.3) -> float:
    """Median CUDA-event time of fn on stream, after running it for warmup_s (GPU clocks ramp).

    Each timing starts behind a 0.5 ms spin kernel, so that the host has enqueued fn's work before
    the start event fires: the time is the GPU's alone, without the host's launch latency (which a
    start event on an idle stream would count, ~10-30 us a Python-level launch).
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        for _ in range(5):
            fn()
        stream.synchronize()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        _SPIN((1,), (1,), (np.uint64(SPIN_NS),), stream=stream)
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def nvcomp_ans(src: cp.ndarray, elements: int, stream, reps: int):
    """(bits/weight, decode ms) of nvCOMP ANS on src's bytes, or None without nvCOMP."""
    try:
        from nvidia import nvcomp
    except ImportError:
        return None
    codec = nvcomp.Codec(algorithm="ANS", cuda_stream=stream.ptr)
    comp = codec.encode(nvcomp.as_array(src))
    stream.synchronize()
    nbytes = comp.buffer_size
    dec = cp.asarray(codec.decode(comp)).view(cp.uint8).reshape(-1)
    stream.synchronize()
    if not bool((dec == src.reshape(-1)).all()):
        raise AssertionError("nvCOMP ANS round trip is not exact")
    ms = median_ms(lambda: codec.decode(comp), stream, reps)
    return nbytes * 8 / elements, ms


def decode_case(name: str, x: np.ndarray, stream, reps: int, rows: list, nvcomp: bool = True,
                **options):
    t0 = time.perf_counter()
    blob = ecf8.encode(x, **options)
    enc_s = time.perf_counter() - t0
    meta = ecf8.info(blob)
    dt = ecf8.to_device(blob)
    src = cp.asarray(x.reshape(-1).view(np.uint8 if x.itemsize == 1 else np.uint16))
    out = cp.empty_like(src)
    with stream:
        out.fill(0xFF)
    ecf8.decode(dt, device="cuda", out=out, stream=stream)
    stream.synchronize()
    if not bool((out == src).all()):
        raise AssertionError(f"{name}: GPU decode is not bit-exact")
    dst = cp.empty_like(src)
    nbytes = src.nbytes

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                    cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

    copy_ms = median_ms(copy, stream, reps)
    ecf8_ms = median_ms(lambda: ecf8.decode(dt, device="cuda", out=out, stream=stream), stream, reps)
    row = dict(case=name, elements=int(x.size), bits_per_weight=meta.bits_per_weight,
               encode_s=enc_s, copy_gbps=nbytes / copy_ms / 1e6, ecf8_ms=ecf8_ms,
               ecf8_gbps=nbytes / ecf8_ms / 1e6)
    row["ratio_to_copy"] = row["ecf8_gbps"] / row["copy_gbps"]
    if nvcomp:
        ans = nvcomp_ans(src.view(cp.uint8), x.size, stream, reps)
        if ans:
            row["nvcomp_ans_bits"], row["nvcomp_ans_gbps"] = ans[0], nbytes / ans[1] / 1e6
    rows.append(row)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 28)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--variants", nargs="*", default=[],
                    help="kernel -D defines to compare on the first case, e.g. ECF8_WINDOW=8")
    ap.add_argument("--quick", action="store_true", help="only the first case (with --variants)")
    args = ap.parse_args()
    stream = cp.cuda.Stream(non_blocking=True)
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    rows: list[dict] = []

    e4m3 = minilm.weights("e4m3")
    flat = minilm.tiled(e4m3, args.elements)
    dt = decode_case(f"E4M3 MiniLM x{args.elements / 2**20:.0f}M", flat, stream, args.reps, rows)
    if args.variants:
        compare_variants(dt, flat, args.variants, stream, args.reps)
    if args.quick:
        return print_rows(dev, args, rows)
    for side in (4096, 1024):
        for chunk in (32768, 4096):       # the default, and small chunks for latency
            decode_case(f"E4M3 {side}x{side} chunk {chunk}", flat[: side * side].reshape(side, side),
                        stream, args.reps, rows, nvcomp=False, chunk_size=chunk)
    if (minilm.cache_dir() / "minilm-bf16.npz").exists() or "ECF8_SHARED_DATA" not in os.environ:
        bf16 = minilm.weights("bf16")
        source = "MiniLM"
    else:                                                 # GPU box without the export: layer 0
        import ml_dtypes
        data = Path(os.environ["ECF8_SHARED_DATA"])
        with np.load(data / "minilm-layer0-bf16.npz") as z:
            bf16 = {k: z[k].view(ml_dtypes.bfloat16) for k in z.files}
        source = "MiniLM layer0"
    decode_case(f"BF16 {source} x{args.elements / 2**20:.0f}M", minilm.tiled(bf16, args.elements),
                stream, args.reps, rows)

    # One launch over a transformer block (7B-like shapes, real E4M3 bytes) vs one launch each.
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 3
    tensors, outs, offset = [], [], 0
    for shape in shapes:
        n = shape[0] * shape[1]
        part = minilm.tiled(e4m3, offset + n)[offset:].reshape(shape)
        offset += n
        tensors.append(ecf8.to_device(ecf8.encode(part)))
        outs.append(cp.empty(n, cp.uint8))
    batch = BatchDecoder(tensors, outs)
    total = sum(o.nbytes for o in outs)
    batch_ms = median_ms(lambda: batch.run(stream), stream, args.reps)
    each_ms = median_ms(lambda: [ecf8.decode(t, device="cuda", out=o, stream=stream)
                                 for t, o in zip(tensors, outs)], stream, args.reps)
    rows.append(dict(case=f"E4M3 block 7x ({total / 2**20:.0f}M) batched", elements=total,
                     ecf8_ms=batch_ms, ecf8_gbps=total / batch_ms / 1e6,
                     each_ms=each_ms, each_gbps=total / each_ms / 1e6))

    print_rows(dev, args, rows)


def compare_variants(dt, x, variants, stream, reps):
    """Time kernel builds with extra -D defines (WARPS=N also changes the launch) on one tensor."""
    from ecf8 import decoder_cuda

    dev = cp.cuda.Device().id
    src = cp.asarray(x.reshape(-1).view(np.uint8))
    out = cp.empty_like(src)
    saved = decoder_cuda.KERNELS.replace(dev, None), decoder_cuda.WARPS
    for variant in variants:
        defines = [d for d in variant.split(",") if d]
        warps = [int(d.split("=")[1]) for d in defines if d.startswith("WARPS=")]
        decoder_cuda.WARPS = warps[0] if warps else saved[1]
        defines = [d for d in defines if not d.startswith("WARPS=")]
        decoder_cuda.KERNELS.replace(dev, decoder_cuda.compile_module(dev, defines))
        tensor = ecf8.to_device(dt.payload.get()) if warps else dt
        with stream:
            out.fill(0)
        ecf8.decode(tensor, device="cuda", out=out, stream=stream)
        stream.synchronize()
        ok = bool((out == src).all())
        ms = median_ms(lambda: ecf8.decode(tensor, device="cuda", out=out, stream=stream), stream, reps)
        print(f"variant {variant or 'default':30} exact={ok} {ms:.3f} ms {src.nbytes / ms / 1e6:.0f} GB/s")
    decoder_cuda.KERNELS.replace(dev, saved[0])
    decoder_cuda.WARPS = saved[1]


def print_rows(dev, args, rows):
    print(f"\nGPU: {dev}; CuPy {cp.__version__}; median of {args.reps} CUDA-event timings")
    print(f"{'case':36} {'bits/w':>7} {'copy GB/s':>10} {'ecf8 GB/s':>10} {'x copy':>7} "
          f"{'ANS bits':>8} {'ANS GB/s':>9} {'ecf8 ms':>8}")
    for r in rows:
        print(f"{r['case']:36} {r.get('bits_per_weight', float('nan')):7.3f} "
              f"{r.get('copy_gbps', float('nan')):10.0f} {r['ecf8_gbps']:10.0f} "
              f"{r.get('ratio_to_copy', float('nan')):7.2f} {r.get('nvcomp_ans_bits', float('nan')):8.3f} "
              f"{r.get('nvcomp_ans_gbps', float('nan')):9.0f} {r['ecf8_ms']:8.3f}")
    for r in rows:
        if "each_ms" in r:
            print(f"{r['case']}: one launch {r['ecf8_ms']:.3f} ms ({r['ecf8_gbps']:.0f} GB/s); "
                  f"one launch per tensor {r['each_ms']:.3f} ms ({r['each_gbps']:.0f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, rows=rows), indent=1))


if __name__ == "__main__":
    main()
