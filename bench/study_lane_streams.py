"""What a per-lane-stream layout with two-symbol table entries would cost and save, measured on
real E4M3 weights without a GPU (a study for a frame format v3; nothing here decodes).

    python bench/study_lane_streams.py [NPZ] [--chunks 8192 16384] [--windows 11 12]

NPZ: FP8 E4M3 weights (default: the bundled MiniLM block-128 sample, ``ecf8/data``; the full model
is ``.bench-cache/minilm/minilm-e4m3.npz`` where bench_gpu.py cached it).  Each tensor is encoded
with today's encoder (v2: one warp-wide refill schedule, every lane's stream starting on a word),
and its own tables and lane layout (lane l of a chunk owns elements 16l..16l+15 of every
512-element group; a symbol is a pair of exponents) give, per chunk size:

- size: v2 bits/weight as encoded, against a v3 layout with each lane's codes bit-contiguous after
  the previous lane's, the chunk padded to 4 bytes, and 32 u16 lane offsets a chunk (64 bytes);
- lookups: v2 looks up one symbol per table access.  A W-bit table whose entry holds two symbols
  whenever both codes fit in the W bits decodes k symbols per access (greedy, per lane).  Lanes of
  a warp run in lockstep, so a warp needs as many accesses as its slowest lane: "warp" divides a
  chunk's symbols per lane by that maximum, over the whole chunk (lanes run ahead freely: their
  symbols go to a buffer) or over each run of 16 or 8 symbols (lanes wait for each other there:
  symbols kept in registers, 8 a group).  Codes longer than W (W < 12) need a second access,
  counted as one more.

The prediction to test on a GPU: integer instructions per weight scale with table accesses per
symbol (each access is ~3 instructions of lookup and ~4 of bit-buffer bookkeeping, bench/NOTES.md),
so "warp" symbols per access bounds what two-symbol entries can save.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecf8  # noqa: E402
from ecf8 import format as fmt  # noqa: E402
from ecf8.encoder import symbols  # noqa: E402
from ecf8.safetensors_io import iter_tensors  # noqa: E402

RUNS = (None, 16, 8)        # warp lockstep: over the chunk, every 16 symbols, every 8 (one group)
DEFAULT = Path(__file__).resolve().parents[1] / "ecf8" / "data" / "minilm-layer0-e4m3.safetensors"


def load(path: Path) -> dict[str, np.ndarray]:
    """name -> E4M3 array (at least 2**16 weights) of an .npz (uint8 bits) or a safetensors file."""
    if path.suffix == ".npz":
        d = np.load(path)
        tensors = {k: d[k].view(ml_dtypes.float8_e4m3fn) for k in d.files}
    else:
        tensors = {e.name: e.array for e in iter_tensors(path, raw=True) if e.dtype == "F8_E4M3"}
        tensors = {k: v.view(ml_dtypes.float8_e4m3fn) for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if v.size >= 1 << 16}


def lane_symbols(x: np.ndarray, chunk: int) -> np.ndarray:
    """(nchunks, 32, chunk/64) pair symbols of whole chunks in lane order (a partial last chunk
    is dropped: the study needs equal lanes)."""
    u = x.reshape(-1).view(np.uint8)
    whole = u.size // chunk * chunk
    sym = symbols(u[:whole], fmt.spec_for_dtype(x.dtype))
    groups = chunk // fmt.GROUP
    lanes = sym.reshape(-1, groups, fmt.LANES, fmt.LANE_RUN // 2)
    return lanes.transpose(0, 2, 1, 3).reshape(-1, fmt.LANES, groups * fmt.LANE_RUN // 2)


def accesses(lens: np.ndarray, window: int) -> np.ndarray:
    """Table accesses per row of lens (code lengths of a lane's symbols in order, or of one run of
    them), decoding two symbols per access when both codes fit in `window` bits (never past the
    row's end), and a long code (> window) in two."""
    rows, n = lens.shape
    count = np.zeros(rows, np.int64)
    i = np.zeros(rows, np.int64)
    ar = np.arange(rows)
    while True:
        live = i < n
        if not live.any():
            return count
        r, k = ar[live], i[live]
        l1 = lens[r, k]
        l2 = np.where(k + 1 < n, lens[r, np.minimum(k + 1, n - 1)], 99)
        pair = (l1 + l2 <= window)
        count[r] += 1 + (l1 > window)
        i[r] = k + 1 + pair


def warp_accesses(lens: np.ndarray, window: int, run: int | None) -> int:
    """Lockstep accesses of the warps over lens (nchunks, 32, S): each warp as many as its slowest
    lane, over the whole chunk (run None: lanes run ahead freely) or over each run of `run`
    symbols (lanes wait for each other at every run), times 32 lanes."""
    nch, lanes, s = lens.shape
    step = s if run is None else run
    a = accesses(lens.reshape(-1, step), window).reshape(nch, lanes, s // step)
    return int(a.max(axis=1).sum()) * lanes


def study(tensors: dict[str, np.ndarray], chunk: int, windows: list[int]) -> dict:
    n_weights = v2_bits = v3_bits = 0
    syms = 0
    per = {w: [0] * (1 + len(RUNS)) for w in windows}   # window -> [lane accesses, warp accesses a run]
    for name, x in tensors.items():
        blob = ecf8.encode(x, chunk_size=chunk)
        f = fmt.parse(memoryview(blob))
        if f.mode != fmt.MODE_CODED or x.size < chunk:
            continue
        lanes = lane_symbols(x, chunk)
        nch = lanes.shape[0]
        tid = f.chunk_tables[:nch].astype(np.int64)
        lens = f.lengths.astype(np.int64)[tid[:, None, None], lanes]          # (nch, 32, S)
        whole = nch * chunk
        # v2 as encoded, prorated to the whole chunks studied
        v2_bits += len(blob) * 8 * whole / x.size
        stream_v2 = 32 * (f.chunk_words[nch] - f.chunk_words[0])
        lane_bits = lens.sum(axis=2)                                          # (nch, 32)
        stream_v3 = 32 * ((lane_bits.sum(axis=1) + 31) // 32).sum() + nch * 64 * 8
        v3_bits += len(blob) * 8 * whole / x.size - stream_v2 + stream_v3
        n_weights += whole
        syms += lens.size
        for w in windows:
            per[w][0] += int(accesses(lens.reshape(-1, lens.shape[2]), w).sum())
            for j, run in enumerate(RUNS):
                per[w][1 + j] += warp_accesses(lens, w, run)
    return {"weights": n_weights, "v2": v2_bits / n_weights, "v3": v3_bits / n_weights,
            "symbols": syms, **{w: [syms / a for a in per[w]] for w in windows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", nargs="?", type=Path)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--windows", type=int, nargs="+", default=[11, 12])
    args = ap.parse_args()
    path = args.npz or DEFAULT
    tensors = load(path)
    source = str(path)
    total = sum(x.size for x in tensors.values())
    print(f"{source}: {len(tensors)} E4M3 tensors, {total / 1e6:.1f} M weights\n")
    head = "| chunk | weights studied | v2 bits/w | v3 lane streams bits/w | " + " | ".join(
        f"W={w}: symbols per access: lane / warp, chunk / 16 / 8" for w in args.windows) + " |"
    print(head)
    print("|" + "---:|" * (4 + len(args.windows)))
    for c in args.chunks:
        r = study(tensors, c, args.windows)
        cells = " | ".join(" / ".join(f"{v:.2f}" for v in r[w]) for w in args.windows)
        print(f"| {c} | {r['weights'] / 1e6:.2f} M | {r['v2']:.4f} | {r['v3']:.4f} | {cells} |")


if __name__ == "__main__":
    main()
