"""compress_module wall time on a CUDA model: the GPU encoder against the CPU path.

    python bench/bench_compress_module.py [--layers 9] [--cpu-layers 1]

Model: --layers Llama-3-8B-shaped layers of bias-free Linear modules (q k v o gate up down) with
FP8 E4M3 weights on the GPU, filled with the real MiniLM layer-0 E4M3 bytes tiled
(``$ECF8_SHARED_DATA``), so the exponent statistics are a trained model's.  Timed: one
``ecf8.torch.compress_module`` call (torch.cuda.synchronize before and after), which encodes each
weight on its GPU.  The CPU path it replaces (copy each weight to the host, NumPy encoder, upload)
is timed on --cpu-layers layers with ``ecf8.torch.encode`` pointed at it, and scaled per weight.
Every compressed weight is decoded and compared with the original afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ecf8.torch as et  # noqa: E402
from ecf8 import encoder  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
          (4096, 14336)]


def model(layers: int, sample: torch.Tensor) -> torch.nn.Module:
    mods = torch.nn.ModuleList()
    offset = 0
    for _ in range(layers):
        for n, k in SHAPES:
            lin = torch.nn.Linear(k, n, bias=False, device="meta")
            idx = (torch.arange(n * k, device="cuda") + offset) % sample.numel()
            offset += n * k
            lin.weight = torch.nn.Parameter(sample[idx].view(torch.float8_e4m3fn).view(n, k),
                                            requires_grad=False)
            mods.append(lin)
    return mods


def timed(m: torch.nn.Module) -> tuple[float, list[torch.Tensor]]:
    originals = [lin.weight.detach().clone() for lin in m]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = et.compress_module(m)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert stats.weights == len(originals), stats
    for lin, w in zip(m, originals):          # every weight decodes to its original bits
        assert torch.equal(lin.weight.view(torch.uint8), w.view(torch.uint8))
    return seconds, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--cpu-layers", type=int, default=1)
    args = ap.parse_args()
    root = Path(os.environ.get("ECF8_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with np.load(root / "minilm-layer0-fp8-e4m3fn-block128.npz") as z:
        sample = torch.from_numpy(np.concatenate([z[k].reshape(-1) for k in z.files])).cuda()
    et.compress_module(model(1, sample)[:1])                     # compile the kernels once
    m = model(args.layers, sample)
    weights = sum(lin.weight.numel() for lin in m)
    gpu_s, stats = timed(m)
    del m
    gpu_encode = et.encode

    def cpu_path(t, **options):                                  # the path compress_module took before
        from ecf8 import decoder_cuda
        return decoder_cuda.to_device(encoder.encode(et.to_numpy(t), **options), f"cuda:{t.device.index}")

    et.encode = cpu_path
    try:
        cpu_m = model(args.cpu_layers, sample)
        cpu_weights = sum(lin.weight.numel() for lin in cpu_m)
        cpu_s, _ = timed(cpu_m)
    finally:
        et.encode = gpu_encode
    print(f"GPU: {torch.cuda.get_device_name()}; {args.layers} Llama-3-8B-shaped layers x 7 linears, "
          f"E4M3, {weights / 1e9:.2f} G weights ({weights / 2**30:.2f} GiB); compress_module defaults")
    print("| path | weights | wall s | M weights/s | bits/w |\n|---|---:|---:|---:|---:|")
    print(f"| GPU encoder | {weights / 1e9:.2f} G | {gpu_s:.2f} | {weights / gpu_s / 1e6:,.0f} | "
          f"{stats.compressed_bytes * 8 / weights:.3f} |")
    print(f"| CPU encoder (before), {args.cpu_layers} layer(s) | {cpu_weights / 1e9:.2f} G | {cpu_s:.2f} | "
          f"{cpu_weights / cpu_s / 1e6:,.0f} | |")
    print(f"| CPU encoder scaled to {args.layers} layers | | {cpu_s * weights / cpu_weights:.1f} | | |")


if __name__ == "__main__":
    main()
