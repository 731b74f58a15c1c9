"""What ecf8.torch costs on a CPU: forward time of Linear layers whose weights compress_module holds
compressed (decoded by the NumPy codec at every forward) against the same layers uncompressed.

    python bench/bench_torch_cpu.py [--size 2048] [--layers 4] [--batch 8] [--runs 5]

Weights: Gaussian with std 0.02, like trained linear weights (their exponents concentrate the same
way), in BF16 and FP16; the same input for both models; outputs compared bit for bit before any
timing; median of --runs forwards after a warm-up.  Prints the CPU's name: CPU figures depend on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ecf8.torch  # noqa: E402
from ecf8.bench_cli import _cpu_name  # noqa: E402


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="in and out features of each Linear")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows of the input")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"CPU: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.layers} Linear {args.size}x{args.size}, batch {args.batch}")
    print(f"{'dtype':9} {'plain ms':>9} {'ecf8 ms':>9} {'x slower':>9} {'decode M weights/s':>19} {'bits/w':>7}")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        model = torch.nn.Sequential(*[torch.nn.Linear(args.size, args.size, bias=False) for _ in range(args.layers)])
        with torch.no_grad():
            for layer in model:
                layer.weight.normal_(0, 0.02)
        model = model.to(dtype).eval()
        x = torch.randn(args.batch, args.size, dtype=dtype)
        with torch.no_grad():
            expected = model(x)
            plain = median_time(lambda: model(x), args.runs)
            stats = ecf8.torch.compress_module(model)
            got = model(x)
            if not torch.equal(got.view(torch.uint16), expected.view(torch.uint16)):
                raise SystemExit(f"{dtype}: the compressed model's output differs")
            packed = median_time(lambda: model(x), args.runs)
        weights = args.layers * args.size * args.size
        print(f"{str(dtype).split('.')[-1]:9} {plain * 1e3:9.2f} {packed * 1e3:9.1f} {packed / plain:9.1f} "
              f"{weights / max(packed - plain, 1e-9) / 1e6:19.1f} {stats.compressed_bytes * 8 / weights:7.3f}")


if __name__ == "__main__":
    main()
