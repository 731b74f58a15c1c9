"""Whole-checkpoint report: the fine-grained FP8 MiniLM checkpoint, compressed with ecf8 and zstd-19.

    python bench/bench_checkpoint.py [--workdir DIR]

Builds all-MiniLM-L6-v2 as Transformers' fine-grained FP8 layout (E4M3 encoder linears with F32
128x128 `weight_scale_inv`, every other tensor BF16), then: `ecf8 compress` / `decompress` (timed,
restored file compared byte for byte), zstd level 19 on the same file (timed), and `ecf8 analyze
--json` checked against an independent exponent-entropy computation (frexp on the values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minilm  # noqa: E402
from ecf8 import compressed  # noqa: E402
from ecf8.safetensors_io import write_safetensors  # noqa: E402


def frexp_entropy(x: np.ndarray, bias: int, min_normal_exp: int) -> float:
    """Exponent-field entropy recomputed from the values (not the bits): frexp, then counts."""
    v = np.abs(x.astype(np.float64).reshape(-1))
    _, e2 = np.frexp(v)
    field = np.where(v >= 2.0**min_normal_exp, e2 - 1 + bias, 0)
    _, counts = np.unique(field, return_counts=True)
    p = counts / v.size
    return float(-sum(q * math.log2(q) for q in p))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ecf8-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    src, packed, restored = work / "minilm-fp8.safetensors", work / "c.safetensors", work / "r.safetensors"
    tensors = minilm.fp8_checkpoint()
    write_safetensors(tensors, src)
    size = src.stat().st_size

    t0 = time.perf_counter()
    compressed.compress_file(src, packed, progress=False)
    t_comp = time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed.decompress_file(packed, restored, progress=False)
    t_dec = time.perf_counter() - t0
    assert restored.read_bytes() == src.read_bytes(), "restored checkpoint differs"
    raw = src.read_bytes()
    t0 = time.perf_counter()
    z = zstandard.ZstdCompressor(level=19).compress(raw)
    t_z = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert zstandard.ZstdDecompressor().decompress(z) == raw
    t_zd = time.perf_counter() - t0
    fp8 = sum(x.nbytes for x in tensors.values() if x.dtype.name == "float8_e4m3fn")
    print(f"MiniLM fine-grained FP8 checkpoint: {len(tensors)} tensors, {size:,} bytes "
          f"({fp8:,} of E4M3 weights, the rest BF16 and F32 scales); {os.cpu_count()} cores")
    print(f"{'method':30} {'bytes':>12} {'saving':>7} {'compress s':>11} {'decompress s':>13}")
    print(f"{'ecf8 compress (all cores)':30} {packed.stat().st_size:12,} "
          f"{1 - packed.stat().st_size / size:7.1%} {t_comp:11.2f} {t_dec:13.2f}")
    print(f"{'zstd level 19 (one thread)':30} {len(z):12,} {1 - len(z) / size:7.1%} {t_z:11.2f} {t_zd:13.2f}")

    out = subprocess.run([sys.executable, "-m", "ecf8.cli", "analyze", str(src), "--json"],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    rows = {r["name"]: r for r in json.loads(out.stdout)["tensors"]}
    worst = 0.0
    for name, x in tensors.items():
        if x.dtype.name == "float8_e4m3fn":
            ref = frexp_entropy(x, bias=7, min_normal_exp=-6)
        elif x.dtype.name == "bfloat16":
            ref = frexp_entropy(x, bias=127, min_normal_exp=-126)
        else:
            continue
        worst = max(worst, abs(rows[name]["exponent_entropy_bits"] - ref))
    print(f"analyze --json vs frexp-based exponent entropy, all FP8/BF16 tensors: max |diff| = {worst:.2e} bits")
    assert worst <= 0.005


if __name__ == "__main__":
    main()
