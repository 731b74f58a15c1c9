"""Time the lane-stream prototype decoder against ecf8's v2 decoder on the same weights (GPU).

    python bench/v3_lanes/run.py [--n 58720256] [--chunks 4096 8192] [--warps 8] [--reps 30]
    ncu --kernel-name regex:"lanes_decode|ecf8_decode" --metrics smsp__inst_executed.sum,\
        smsp__sass_thread_inst_executed_op_integer_pred_on.sum python bench/v3_lanes/run.py --once

Weights: MiniLM's E4M3 linears (`$ECF8_BENCH_CACHE/minilm-e4m3.npz`, as bench_gpu.py caches
them) tiled to --n elements (default: one 14336 x 4096 weight).  Every decoded byte of both
decoders is compared with the original before anything is timed.  Each time: one launch behind a
0.5 ms spin kernel between two CUDA events (the launch is queued before the clock starts), median
of --reps; a device-to-device copy of the decoded bytes in the same run for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import ecf8  # noqa: E402
from ecf8 import decoder_cuda  # noqa: E402

import lanes  # noqa: E402

SPIN = cp.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64(); while (clock64() - t0 < cycles) {} }''', "spin")


def weights(n: int) -> np.ndarray:
    path = Path(os.environ.get("ECF8_BENCH_CACHE", HERE.parents[1] / ".bench-cache" / "minilm")) / "minilm-e4m3.npz"
    d = np.load(path)
    u = np.concatenate([d[k].reshape(-1) for k in d.files])
    return np.resize(u, n).view(ml_dtypes.float8_e4m3fn)


def timed(launch, reps: int) -> float:
    """Median microseconds of one launch, each queued behind a spin so the host's launch cost is
    not timed."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        SPIN((1,), (1,), (np.int64(1_000_000),))
        start.record()
        launch()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=14336 * 4096)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--warps", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--registers", action="store_true",
                    help="stage the next chunk's words through registers (one shared buffer a warp)")
    ap.add_argument("--once", action="store_true", help="one launch of each (for ncu), no timing")
    args = ap.parse_args()
    x = weights(args.n)
    expected = cp.asarray(x.view(np.uint8))
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"# {props['name'].decode()}, {args.n:,} E4M3 weights (MiniLM tiled)")
    src = (HERE / "lanes_decode.cu").read_text()
    out = cp.empty(args.n, cp.uint8)
    copy_us = timed(lambda: cp.cuda.runtime.memcpyAsync(out.data.ptr, expected.data.ptr, args.n,
                                                        cp.cuda.runtime.memcpyDeviceToDevice, 0), args.reps)
    print(f"# device copy of {args.n:,} bytes: {copy_us:.1f} us\n")
    print("| chunk | warps | v2 bits/w | lanes bits/w | v2 us | lanes us | lanes / v2 time | v2 x copy | lanes x copy | blocks/SM x regs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for chunk in args.chunks:
        blob = ecf8.encode(x, chunk_size=chunk)
        dt = decoder_cuda.to_device(blob)
        t = time.perf_counter()
        lf = lanes.encode(x, chunk)
        enc_s = time.perf_counter() - t
        out.fill(0)
        dt.launch(out.data.ptr)
        cp.cuda.Device().synchronize()
        assert bool((out == expected).all()), "v2 decode differs"
        d = {k: cp.asarray(getattr(lf, k)) for k in ("words", "chunk_words", "lane_bits", "chunk_tables", "luts", "raw")}
        nchunks = lf.chunk_tables.size
        max_words = int(np.diff(lf.chunk_words).max())
        wbuf = max_words + 4
        for warps in args.warps:
            maxq = -(-max_words // 128) if args.registers else 0
            mod = cp.RawModule(code=src, options=("-std=c++17", f"-DWARPS={warps}", f"-DMAXQ={maxq}"))
            kern = mod.get_function("lanes_decode")
            srow = chunk // 64 + 4
            smem = 4 * (lf.luts.shape[0] * 4096 + warps * ((1 if maxq else 2) * wbuf + 8 * srow))
            if smem > props["sharedMemPerBlockOptin"]:
                print(f"| {chunk} | {warps} | needs {smem:,} bytes of shared memory a block |")
                continue
            kern.max_dynamic_shared_size_bytes = smem
            per_sm = min(props["sharedMemPerMultiprocessor"] // (smem + 1024), 2048 // (32 * warps),
                         65536 // (max(kern.num_regs, 1) * 32 * warps))
            grid = min(-(-nchunks // warps), per_sm * props["multiProcessorCount"])
            argv = (d["words"], d["chunk_words"], d["lane_bits"], d["chunk_tables"], d["luts"],
                    np.uint32(lf.luts.shape[0]), d["raw"], out, np.uint32(nchunks),
                    np.uint32(chunk.bit_length() - 1), np.uint32(args.n), np.uint32(wbuf))

            def launch():
                kern((grid,), (warps * 32,), argv, shared_mem=smem)

            out.fill(0)
            launch()
            cp.cuda.Device().synchronize()
            same = bool((out == expected).all())
            if not same:
                bad = int(cp.flatnonzero(out != expected)[0])
                print(f"| {chunk} | {warps} | lanes decode differs from the original (first at {bad}) |")
                continue
            if args.once:
                dt.launch(out.data.ptr)
                cp.cuda.Device().synchronize()
                print(f"| {chunk} | {warps} | ran once each (bit-exact) |")
                continue
            v2_us = timed(lambda: dt.launch(out.data.ptr), args.reps)
            lanes_us = timed(launch, args.reps)
            v2_again = timed(lambda: dt.launch(out.data.ptr), args.reps)    # drift check
            print(f"| {chunk} | {warps} | {len(blob) * 8 / args.n:.4f} | {lf.nbytes * 8 / args.n:.4f} | "
                  f"{v2_us:.1f} / {v2_again:.1f} | {lanes_us:.1f} | {lanes_us / v2_us:.3f} | "
                  f"{copy_us / v2_us:.2f} | {copy_us / lanes_us:.2f} | {per_sm} x {kern.num_regs} |")
        print(f"# chunk {chunk}: {nchunks} chunks, max {max_words} words a chunk, prototype encoder {enc_s:.1f} s")


if __name__ == "__main__":
    main()
