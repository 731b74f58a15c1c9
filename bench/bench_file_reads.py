"""Cost of reading files by copies (positional reads) instead of memory maps: time and peak RSS of
``ecf8.load_file``, ``safe_open`` one tensor, ``safetensors_io.iter_tensors`` (and
``compress_file``) on a synthetic checkpoint of real-looking weights (Gaussian BF16 and scaled
E4M3, which ecf8 codes; F32 that zstd stores; random bytes stored unchanged; and a file of random
bytes alone, which isolates the cost of reading by copies), each step in a fresh process (peak
RSS: its VmHWM, which includes the interpreter and NumPy).  CPU only.

    PYTHONPATH=$PWD python bench/bench_file_reads.py --mb 300 --dir /tmp/reads
    PYTHONPATH=/path/to/other/checkout python bench/bench_file_reads.py --mb 300 --dir /tmp/reads --reuse

Prints one table row per step: seconds (median of --runs) and peak RSS (MB, the largest of the
runs).  --reuse keeps the files of an earlier run (compare two checkouts on the same bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import ecf8
from ecf8 import compressed, safetensors_io
step, plain, packed = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
stored = packed.with_name("stored.safetensors")
t = time.perf_counter()
if step == "load_file":
    x = ecf8.load_file(packed)
    total = sum(int(v.view(np.uint8)[::4096].sum()) for v in x.values())    # touch every array
elif step == "load_file (stored tensors only)":
    x = ecf8.load_file(stored)
    total = sum(int(v.view(np.uint8)[::4096].sum()) for v in x.values())
elif step == "safe_open one tensor":
    with ecf8.safe_open(packed) as f:
        total = int(f.get_tensor("bf16").view(np.uint8)[::4096].sum())
elif step == "iter_tensors (plain file)":
    total = sum(int(e.array.view(np.uint8)[::4096].sum()) for e in safetensors_io.iter_tensors(plain))
elif step == "compress_file -j 2":
    compressed.compress_file(plain, packed.with_suffix(".again"), jobs=2, progress=False)
    total = 0
seconds = time.perf_counter() - t
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rss_mb": peak / 1024, "touch": total}))
"""

STEPS = ["load_file", "load_file (stored tensors only)", "safe_open one tensor", "iter_tensors (plain file)"]


def make(folder: Path, mb: int) -> tuple[Path, Path]:
    import ml_dtypes
    import numpy as np

    from ecf8 import compressed, safetensors_io

    folder.mkdir(parents=True, exist_ok=True)
    plain, packed = folder / "plain.safetensors", folder / "packed.safetensors"
    rng = np.random.default_rng(0)
    quarter = mb * (1 << 20) // 4
    arrays = {
        "bf16": (rng.standard_normal(quarter).astype(np.float32) * 0.02).astype(ml_dtypes.bfloat16),
        "e4m3": (rng.standard_normal(quarter // 2).astype(np.float32) * 16).astype(ml_dtypes.float8_e4m3fn),
        "f32": np.round(rng.standard_normal(quarter // 8).astype(np.float32), 2),
        "bytes": rng.integers(0, 256, quarter // 2, dtype=np.uint8),
    }
    safetensors_io.write_safetensors(arrays, plain)
    compressed.compress_file(plain, packed, jobs=2, progress=False)
    noise = {f"bytes{i}": rng.integers(0, 256, quarter, dtype=np.uint8) for i in range(4)}
    safetensors_io.write_safetensors(noise, folder / "noise.safetensors")     # stored unchanged
    compressed.compress_file(folder / "noise.safetensors", folder / "stored.safetensors", jobs=2,
                        progress=False, zstd_level=1)
    return plain, packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=300, help="size of the plain file, MB (default 300)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/ecf8-bench-reads"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reuse", action="store_true", help="use the files already in --dir")
    p.add_argument("--compress", action="store_true", help="time compress_file -j 2 too (slow)")
    args = p.parse_args()
    plain, packed = args.dir / "plain.safetensors", args.dir / "packed.safetensors"
    if not (args.reuse and plain.exists() and packed.exists() and (args.dir / "stored.safetensors").exists()):
        plain, packed = make(args.dir, args.mb)
    print(f"plain {plain.stat().st_size / 1e6:.0f} MB, compressed {packed.stat().st_size / 1e6:.0f} MB")
    print("| step | seconds (median) | peak RSS MB |\n|---|---:|---:|")
    for step in STEPS + ["compress_file -j 2"] * args.compress:
        rows = [json.loads(subprocess.run([sys.executable, "-c", STEP, step, str(plain), str(packed)],
                                          capture_output=True, text=True, check=True).stdout)
                for _ in range(args.runs)]
        print(f"| {step} | {statistics.median(r['seconds'] for r in rows):.2f} | "
              f"{max(r['rss_mb'] for r in rows):.0f} |", flush=True)


if __name__ == "__main__":
    main()
