"""CPU benchmark: compressed size for all four dtypes, reference encoder/decoder speed vs zstd.

    python bench/bench_cpu.py [--elements 268435456] [--reps 3]

Sizes: the 36 linear weights of all-MiniLM-L6-v2 (bench/minilm.py), one frame per tensor, every
byte of every frame counted.  Speed: one core (NumPy is single-threaded here), the E4M3 weights
tiled to --elements, median of --reps runs after a warm-up run, next to zstandard level 3 on the
same bytes in the same run.  Every frame is decoded and compared before anything is timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8  # noqa: E402
import minilm  # noqa: E402


def timed(fn, reps: int) -> tuple[float, object]:
    result = fn()                                   # warm-up (and first-touch of memory)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def sizes() -> None:
    print("Size: all-MiniLM-L6-v2 linear weights (36 tensors, 10,616,832 weights), one frame each")
    print(f"{'dtype':6} {'ecf8 bits/w':>12} {'saving':>7} {'zstd-3 bits/w':>14} {'zstd-19 bits/w':>15}")
    for dtype in ("e4m3", "e5m2", "bf16", "fp16"):
        tensors = minilm.weights(dtype)
        n = sum(x.size for x in tensors.values())
        raw_bits = 8 * next(iter(tensors.values())).itemsize
        total = z3 = z19 = 0
        for x in tensors.values():
            blob = ecf8.encode(x)
            y = ecf8.decode(blob)
            assert y.dtype == x.dtype and np.array_equal(y.view(np.uint8), x.view(np.uint8))
            total += len(blob)
            z3 += len(zstandard.ZstdCompressor(level=3).compress(x.tobytes()))
            z19 += len(zstandard.ZstdCompressor(level=19).compress(x.tobytes()))
        bpw = total * 8 / n
        print(f"{dtype:6} {bpw:12.3f} {1 - bpw / raw_bits:7.1%} {z3 * 8 / n:14.3f} {z19 * 8 / n:15.3f}")


def speed(elements: int, reps: int) -> None:
    x = minilm.tiled(minilm.weights("e4m3"), elements)
    raw = x.view(np.uint8)
    blob = ecf8.encode(x)
    assert np.array_equal(ecf8.decode(blob).view(np.uint8), raw)
    zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    zblob = zc.compress(raw.data)
    assert zd.decompress(zblob) == raw.tobytes()
    enc_s, _ = timed(lambda: ecf8.encode(x), reps)
    dec_s, _ = timed(lambda: ecf8.decode(blob), reps)
    zenc_s, _ = timed(lambda: zc.compress(raw.data), reps)
    zdec_s, _ = timed(lambda: zd.decompress(zblob), reps)
    m = x.size / 1e6
    print(f"\nSpeed: E4M3 MiniLM tiled to {x.size:,} weights, one core, median of {reps}")
    print(f"{'codec':22} {'bits/w':>7} {'encode M w/s':>13} {'decode M w/s':>13}")
    print(f"{'ecf8 (NumPy reference)':22} {len(blob) * 8 / x.size:7.3f} {m / enc_s:13.1f} {m / dec_s:13.1f}")
    print(f"{'zstd level 3':22} {len(zblob) * 8 / x.size:7.3f} {m / zenc_s:13.1f} {m / zdec_s:13.1f}")
    print("(one E4M3 weight is one byte: M weights/s = MB/s of input)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 28)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sizes()
    speed(args.elements, args.reps)


if __name__ == "__main__":
    main()
