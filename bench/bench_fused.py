"""The fused decode + product (``ecf8.fused``) on the weight path of Llama-3-8B-shaped layers.

    python bench/bench_fused.py [--layers 8] [--batches 1 2 4 8 16] [--reps 20] [--chunk-size auto]

The linears of --layers layers (q k v o gate up down, real all-MiniLM-L6-v2 E4M3 bytes tiled to
each shape, as in bench_tax.py), every product of one step captured in one CUDA graph, per batch:

- cuBLAS: ``torch._scaled_mm`` on the FP8 weights (per-tensor scales, FP8 activations): the
  uncompressed model's path, the base of every ratio;
- decode + cuBLAS: ecf8's default path (each weight decoded into one shared buffer, then the same
  ``_scaled_mm``);
- fused: ``FusedWeight.matmul`` on the frames (the activations are the same FP8 values, as float32);
- twin: ``PlainWeight.matmul``, the same kernel on the uncompressed bytes.

Before timing, every fused product is compared with its twin bit for bit, and with cuBLAS's
float32 output: the table reports the largest difference relative to each row's largest |y|.  Ratios are cuBLAS ms / path ms (1.0 =
as fast as the uncompressed model).  Times: medians of --reps graph replays (bench_tax.graph_ms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

import minilm  # noqa: E402
from bench_tax import SHAPES, Layers, gemm_fp8, graph_ms  # noqa: E402
from ecf8 import fused  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chunk-size", type=lambda v: None if v == "auto" else int(v), default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    e4m3 = np.concatenate([w.reshape(-1) for w in minilm.weights("e4m3").values()])
    layers = Layers(e4m3, args.layers, args.chunk_size, torch.float8_e4m3fn)
    layers.check()
    count = len(layers.frames)
    fw = [fused.FusedWeight(t) for t in layers.frames]
    twins = [fused.PlainWeight(cp.from_dlpack(r.view(torch.uint8).reshape(-1)), r.shape, f.chunk_size)
             for r, f in zip(layers.raw, fw)]
    one = torch.ones((), device="cuda")
    rows = []
    for batch in args.batches:
        x8 = {k: torch.randn(batch, k, device="cuda").to(torch.float8_e4m3fn) for k in {k for _, k in SHAPES.values()}}
        x32 = {k: v.float().contiguous() for k, v in x8.items()}
        xc = {k: cp.from_dlpack(v) for k, v in x32.items()}
        ys = [torch.empty(batch, n, device="cuda") for n, _ in layers.shape_of]
        yc = [cp.from_dlpack(y) for y in ys]
        work = cp.empty(max(f.workspace_floats(batch) for f in fw), cp.float32)
        worst_rel = 0.0
        for i in range(count):                  # fused == twin, and the distance to cuBLAS
            n, k = layers.shape_of[i]
            a = fw[i].matmul(xc[k], workspace=work).get()
            b = twins[i].matmul(xc[k], workspace=work).get()
            if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                raise AssertionError(f"weight {i}: fused product differs from its twin")
            ref = torch._scaled_mm(x8[k], layers.raw[i].t(), scale_a=one, scale_b=one,
                                   out_dtype=torch.float32).cpu().numpy()
            worst_rel = max(worst_rel, float((np.abs(a - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()))
        stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
        base = graph_ms(lambda: [gemm_fp8(x8[w.shape[1]], w, (one, one)) for w in layers.raw], args.reps)
        default = graph_ms(lambda: [gemm_fp8(x8[layers.shape_of[i][1]], layers.decoded(i), (one, one))
                                    for i in range(count)], args.reps)
        fused_ms = graph_ms(lambda: [fw[i].matmul(xc[layers.shape_of[i][1]], out=yc[i], workspace=work,
                                                  stream=stream()) for i in range(count)], args.reps)
        twin_ms = graph_ms(lambda: [twins[i].matmul(xc[layers.shape_of[i][1]], out=yc[i], workspace=work,
                                                    stream=stream()) for i in range(count)], args.reps)
        rows.append((batch, base, default, fused_ms, twin_ms, worst_rel))
    weights = layers.weights
    print(f"\nGPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.layers} layers x 7 "
          f"linears (Llama-3-8B shapes, {weights / 1e9:.2f} G E4M3 weights, {layers.bits_per_weight:.3f} "
          f"bits/w, chunk {args.chunk_size or 'auto'}); CUDA-graph replay medians of {args.reps}")
    print("| batch | cuBLAS ms | decode+cuBLAS ms (ratio) | fused ms (ratio) | twin ms (ratio) | "
          "fused G weights/s | fused vs cuBLAS: max rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, base, default, f, t, rel in rows:
        print(f"| {batch} | {base:.3f} | {default:.3f} ({base / default:.2f}) | {f:.3f} ({base / f:.2f}) | "
              f"{t:.3f} ({base / t:.2f}) | {weights / f / 1e6:.0f} | {rel:.1e} |")


if __name__ == "__main__":
    main()
