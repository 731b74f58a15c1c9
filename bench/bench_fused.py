"""The fused decode + product (``ecf8.fused``) on the weight path of Llama-3-8B-shaped layers.

    python bench/bench_fused.py [--layers 8] [--batches 1 2 4 8 16] [--reps 20] [--chunk-size auto]
                                [--formats e4m3 bf16]

The linears of --layers layers (q k v o gate up down, real all-MiniLM-L6-v2 E4M3 or BF16 bytes
tiled to each shape, as in bench_tax.py), every product of one step captured in one CUDA graph,
per format and batch:

- cuBLAS: the uncompressed model's path, the base of every ratio: ``torch._scaled_mm`` on the FP8
  weights (per-tensor scales, FP8 activations, BF16 out), or ``F.linear`` on the BF16 weights;
- decode + cuBLAS: ecf8's default path (each weight decoded into one shared buffer, then the same
  product);
- fused: ``FusedWeight.matmul`` on the frames (the same activations, as float32; CUDA cores);
- twin: ``PlainWeight.matmul``, the same kernel on the uncompressed bytes;
- fused TC / twin TC: the tensor-core prototype (``bench/fused_mma``, ``mma.matmul``: the same
  FP8 or BF16 activations as cuBLAS's), on the frames and on the uncompressed bytes.

Before timing, every fused product is compared with its twin bit for bit, and with cuBLAS: the
largest difference relative to each row's largest |y| (against cuBLAS's float32 output for E4M3,
its BF16 output for BF16), and the share of outputs that, rounded to BF16, differ from cuBLAS's
BF16 output (what a BF16 model would see); "CC" columns are the CUDA-core kernel's, "TC" the
prototype's.  Ratios are cuBLAS ms / path ms (1.0 = as fast as the uncompressed model).
Times: medians of --reps graph replays (bench_tax.graph_ms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

import minilm  # noqa: E402
from fused_mma import mma  # noqa: E402
from bench_tax import SHAPES, Layers, graph_ms  # noqa: E402
from ecf8 import fused  # noqa: E402

TORCH = {"e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def table(fmt: str, args) -> list[tuple]:
    """Rows (batch, cuBLAS ms, default ms, fused ms, twin ms, fused TC ms, twin TC ms, max rel.
    diffs, BF16 outputs differing, outputs)."""
    torch.manual_seed(0)
    source = np.concatenate([w.reshape(-1) for w in minilm.weights(fmt).values()])
    layers = Layers(source, args.layers, args.chunk_size, TORCH[fmt])
    layers.check()
    count = len(layers.frames)
    fw = [fused.FusedWeight(t) for t in layers.frames]
    bits = torch.uint8 if fmt == "e4m3" else torch.int16
    twins = [fused.PlainWeight(cp.from_dlpack(r.view(bits).reshape(-1)), r.shape, f.chunk_size,
                               dtype=f.dtype_name) for r, f in zip(layers.raw, fw)]
    one = torch.ones((), device="cuda")

    def product(x, w, out_dtype=torch.bfloat16):
        if fmt == "e4m3":
            return torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=out_dtype)
        return F.linear(x, w)

    rows = []
    for batch in args.batches:
        xs = {k: torch.randn(batch, k, device="cuda").to(TORCH[fmt]) for k in {k for _, k in SHAPES.values()}}
        x32 = {k: v.float().contiguous() for k, v in xs.items()}
        xc = {k: cp.from_dlpack(v) for k, v in x32.items()}
        ys = [torch.empty(batch, n, device="cuda") for n, _ in layers.shape_of]
        yc = [cp.from_dlpack(y) for y in ys]
        work = cp.empty(max(f.workspace_floats(batch) for f in fw), cp.float32)
        xb = {k: cp.from_dlpack(v.view(bits)) for k, v in xs.items()}
        worst = {"cc": 0.0, "tc": 0.0}
        differing = {"cc": 0, "tc": 0}
        outputs = 0
        for i in range(count):                  # fused == twin, and the distance to cuBLAS
            n, k = layers.shape_of[i]
            ref = product(xs[k], layers.raw[i], torch.float32 if fmt == "e4m3" else None).float().cpu().numpy()
            theirs = product(xs[k], layers.raw[i]).cpu().view(torch.int16)
            outputs += theirs.numel()
            for path, (mine, twin) in {"cc": (lambda: fw[i].matmul(xc[k], workspace=work),
                                              lambda: twins[i].matmul(xc[k], workspace=work)),
                                       "tc": (lambda: mma.matmul(fw[i], xb[k]),
                                              lambda: mma.matmul(twins[i], xb[k]))}.items():
                a, b = mine().get(), twin().get()
                if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                    raise AssertionError(f"{fmt} weight {i}: {path} fused product differs from its twin")
                worst[path] = max(worst[path], float((np.abs(a - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()))
                ours = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16)
                differing[path] += int((ours != theirs).sum())
        stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
        base = graph_ms(lambda: [product(xs[w.shape[1]], w) for w in layers.raw], args.reps)
        default = graph_ms(lambda: [product(xs[layers.shape_of[i][1]], layers.decoded(i)) for i in range(count)],
                           args.reps)
        fused_ms = graph_ms(lambda: [fw[i].matmul(xc[layers.shape_of[i][1]], out=yc[i], workspace=work,
                                                  stream=stream()) for i in range(count)], args.reps)
        twin_ms = graph_ms(lambda: [twins[i].matmul(xc[layers.shape_of[i][1]], out=yc[i], workspace=work,
                                                    stream=stream()) for i in range(count)], args.reps)
        tc_ms = graph_ms(lambda: [mma.matmul(fw[i], xb[layers.shape_of[i][1]], out=yc[i], stream=stream())
                                  for i in range(count)], args.reps)
        tc_twin_ms = graph_ms(lambda: [mma.matmul(twins[i], xb[layers.shape_of[i][1]], out=yc[i], stream=stream())
                                       for i in range(count)], args.reps)
        rows.append((batch, base, default, fused_ms, twin_ms, tc_ms, tc_twin_ms, worst, differing, outputs))
    print(f"\n{fmt}: {args.layers} layers x 7 linears (Llama-3-8B shapes, {layers.weights / 1e9:.2f} G "
          f"weights, {layers.bits_per_weight:.3f} bits/w, chunk {args.chunk_size or 'auto'})")
    print("| batch | cuBLAS ms | decode+cuBLAS ms (ratio) | fused CC ms (ratio) | twin CC ms (ratio) | "
          "fused TC ms (ratio) | twin TC ms (ratio) | max rel. diff to cuBLAS, CC / TC | "
          "BF16 outputs differing, CC / TC |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, base, default, f, t, f_tc, t_tc, worst, differing, outputs in rows:
        cells = " | ".join(f"{ms:.3f} ({base / ms:.2f})" for ms in (default, f, t, f_tc, t_tc))
        print(f"| {batch} | {base:.3f} | {cells} | {worst['cc']:.1e} / {worst['tc']:.1e} | "
              f"{differing['cc'] / outputs:.2%} / {differing['tc'] / outputs:.2%} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chunk-size", type=lambda v: None if v == "auto" else int(v), default=None)
    ap.add_argument("--formats", nargs="+", default=["e4m3", "bf16"], choices=sorted(TORCH))
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA-graph replay medians of "
          f"{args.reps}; ratio = cuBLAS ms / path ms")
    for fmt in args.formats:
        table(fmt, args)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
