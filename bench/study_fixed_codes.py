"""What a position-independent exponent code would cost against ecf8's Huffman frames, measured on
real weights without a GPU (a study of the issue's size cap; nothing here decodes).

    python bench/study_fixed_codes.py [--npz-dir .bench-cache/minilm] [--chunks 8192 32768]

Why: a Huffman code is decoded bit-serially (each code's length is known only once it is
decoded), which is what costs ecf8's decoders 6-10 integer instructions a weight
(bench/NOTES.md).  A fixed-length code with an escape, "rank-k", has every exponent's k bits at a
known position, so a lane can decode its run with shifts and a register-held table, no chain:
per chunk the 2^k - 1 most frequent exponent values get codes 0 .. 2^k - 2, every other exponent
is code 2^k - 1 followed (in a separate escape stream) by its raw exponent bits.  Counted per
chunk: k bits per exponent, the raw bits of each escape, the chunk's table ((2^k - 1) raw
exponents) and a 32-bit escape-stream offset.  Tiered variants ("tiers 2+2": rank-2 whose escapes
are coded rank-2 among the next 3 values, and so on; see tiers_bits) keep every stream
fixed-length.  Sign and mantissa bits stay raw, as in ecf8; a frame header (~100 bytes a tensor)
is not counted for these codes.

For scale: the order-0 entropy of the exponents per chunk (what no per-chunk code beats), and ecf8's
own frames (``ecf8.encode`` at that chunk size: header, tables and every side field included).
Weights: MiniLM's linears (all-MiniLM-L6-v2, 36 tensors, 10.6 M weights) as E4M3 with 128 x 128
block scales and as BF16 (``minilm-e4m3.npz`` / ``minilm-bf16.npz`` as bench/minilm.py caches
them).  Tensors of fewer elements than a chunk form one short chunk.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecf8  # noqa: E402

KINDS = {"e4m3": (np.uint8, ml_dtypes.float8_e4m3fn, 3, 4), "bf16": (np.uint16, ml_dtypes.bfloat16, 7, 8)}


def exponents(u: np.ndarray, man: int, exp: int) -> np.ndarray:
    return ((u.astype(np.int64) >> man) & ((1 << exp) - 1)).astype(np.int64)


def per_chunk_counts(e: np.ndarray, chunk: int, values: int) -> np.ndarray:
    """(chunks, values) histogram of each chunk's exponents."""
    ids = np.arange(e.size) // chunk
    return np.bincount(ids * values + e, minlength=(ids[-1] + 1) * values).reshape(-1, values)


def rank_k_bits(counts: np.ndarray, k: int, exp_bits: int) -> int:
    """Exponent bits of all chunks under rank-k with escapes (see the module docstring)."""
    top = np.sort(counts, axis=1)[:, ::-1][:, : (1 << k) - 1].sum(axis=1)
    n = counts.sum(axis=1)
    escapes = n - top
    return int((n * k + escapes * exp_bits + ((1 << k) - 1) * exp_bits + 32).sum())


def tiers_bits(counts: np.ndarray, widths: tuple[int, ...], exp_bits: int) -> int:
    """Tiers of fixed-length codes: tier i codes the next 2^w_i - 1 most frequent values in w_i
    bits, its last code escaping to tier i + 1 (a stream of its own, fixed-length again), the last
    tier's escape to the raw bits.  Per chunk and tier: a table and a 32-bit stream offset."""
    ranked = np.sort(counts, axis=1)[:, ::-1]
    remaining = counts.sum(axis=1)
    total, start = 0, 0
    for w in widths:
        total = total + remaining * w + ((1 << w) - 1) * exp_bits + 32
        remaining = remaining - ranked[:, start : start + (1 << w) - 1].sum(axis=1)
        start += (1 << w) - 1
    return int((total + remaining * exp_bits).sum())


def escape_stats(exps: list[np.ndarray], chunk: int, values: int) -> str:
    """What decoding the escapes would cost, at one chunk size: the share of exponents per tier of
    2-bit codes, and the escapes of a 16-exponent lane run (ecf8's lane runs: lane l of a group
    owns its exponents 16l..16l+15) beyond tier 1 (rank >= 3) and beyond rank-3's 7 values
    (rank >= 7): their mean, and the mean of each warp's largest (a SIMT loop runs that often)."""
    ranks = []
    for e in exps:
        e = e[: e.size - e.size % 512]
        ids = np.arange(e.size) // chunk
        order = np.argsort(-per_chunk_counts(e, chunk, values), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(values), order.shape).copy(), axis=1)
        ranks.append(rank[ids, e])
    r = np.concatenate(ranks)
    shares = np.bincount(np.minimum(r // 3, 3), minlength=4) / r.size

    def runs(first: int) -> str:
        per_run = (r >= first).reshape(-1, 32, 16).sum(axis=2)
        return f"mean {per_run.mean():.2f}, the warp's largest (32 runs) mean {per_run.max(axis=1).mean():.2f}"

    return (f"# chunk {chunk}: exponents in 2-bit tier 1 / 2 / 3 / beyond " + " / ".join(f"{x:.3f}" for x in shares)
            + f"; escapes per lane run beyond tier 1: {runs(3)}; beyond rank-3's 7 values "
            f"({(r >= 7).mean():.2%} of exponents): {runs(7)}")


def entropy_bits(counts: np.ndarray) -> float:
    n = counts.sum(axis=1, keepdims=True)
    p = np.where(counts > 0, counts / np.maximum(n, 1), 1)
    return float(-(counts * np.log2(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("ECF8_BENCH_CACHE", Path(__file__).resolve().parents[1] / ".bench-cache" / "minilm"))
    ap.add_argument("--npz-dir", type=Path, default=default)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 32768])
    args = ap.parse_args()
    for kind, (uint, dtype, man, exp) in KINDS.items():
        data = np.load(args.npz_dir / f"minilm-{kind}.npz")
        tensors = [data[k].reshape(-1).view(uint) for k in data.files]
        n = sum(t.size for t in tensors)
        raw = 1 + man                                       # sign + mantissa bits, kept raw
        ks = (2, 3) if exp == 4 else (2, 3, 4)
        tiers = [(2, 2), (2, 2, 2), (2, 3)] if exp == 4 else [(2, 3), (2, 2, 2), (2, 2, 2, 2), (3, 3)]
        print(f"\n{kind}: {len(tensors)} tensors, {n:,} weights; bits per weight, the {raw} raw sign+mantissa "
              f"bits included")
        print("| chunk | entropy bound | ecf8 v2 frames | " + " | ".join(f"rank-{k} + escape" for k in ks)
              + " | " + " | ".join("tiers " + "+".join(map(str, t)) for t in tiers) + " | best - v2 |")
        print("|---:|---:|---:|" + "---:|" * (len(ks) + len(tiers)) + "---:|")
        exps = [exponents(t, man, exp) for t in tensors]
        for chunk in args.chunks:
            ent = v2 = 0.0
            rank = dict.fromkeys(ks, 0)
            tier = dict.fromkeys(tiers, 0)
            for t, e in zip(tensors, exps):
                counts = per_chunk_counts(e, chunk, 1 << exp)
                ent += entropy_bits(counts)
                for k in ks:
                    rank[k] += rank_k_bits(counts, k, exp)
                for widths in tiers:
                    tier[widths] += tiers_bits(counts, widths, exp)
                v2 += len(ecf8.encode(t.view(dtype), chunk_size=chunk)) * 8
            best = min(min(rank.values()), min(tier.values()))
            print(f"| {chunk} | {(ent / n + raw):.3f} | {v2 / n:.3f} | "
                  + " | ".join(f"{rank[k] / n + raw:.3f}" for k in ks) + " | "
                  + " | ".join(f"{tier[w] / n + raw:.3f}" for w in tiers) + f" | {(best - (v2 - raw * n)) / n:+.3f} |")
        print(escape_stats(exps, args.chunks[0], 1 << exp))

if __name__ == "__main__":
    main()
