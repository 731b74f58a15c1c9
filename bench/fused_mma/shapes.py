"""Per-shape times of the tensor-core prototype on Llama-3-8B weight shapes (real MiniLM bytes tiled).

    python bench/fused_mma/shapes.py

For E4M3 and BF16 and each shape (some at two or three chunk sizes), microseconds, medians of 15
CUDA-graph replays (bench_tax.graph_ms): the v2 decoder alone (every byte checked), then at batch
1 and 16: cuBLAS (``torch._scaled_mm`` with FP8 activations, or ``F.linear``), ecf8.fused's
CUDA-core kernel (CC, float32 activations), this prototype (TC) and its twin (TC twin, checked
equal to TC bit for bit).  Default path = decode + cuBLAS.
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path[:0] = [str(here), str(here.parent), str(here.parents[1])]
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ecf8  # noqa: E402
import minilm  # noqa: E402
import mma  # noqa: E402
from bench_tax import graph_ms  # noqa: E402
from ecf8 import fused  # noqa: E402
from ecf8.encoder import decode_chunk_size  # noqa: E402

REPS = 15
print("GPU", torch.cuda.get_device_name(), "; us, medians of", REPS, "graph replays")
for fmt, tdt, bits in (("e4m3", torch.float8_e4m3fn, torch.uint8), ("bf16", torch.bfloat16, torch.int16)):
    src = np.concatenate([w.reshape(-1) for w in minilm.weights(fmt).values()])
    one = torch.ones((), device="cuda")
    for (n, k), chunks in (((4096, 4096), (None,)), ((1024, 4096), (None,)), ((14336, 4096), (None, 4096)),
                           ((4096, 14336), (None, 2048, 1024))):
        part = minilm.tiled({"w": src}, n * k)[: n * k].reshape(n, k)
        raw = torch.from_numpy(part.view(np.uint8 if part.itemsize == 1 else np.int16).copy()).cuda().view(tdt)
        for chunk in chunks:
            c = chunk or decode_chunk_size(n * k)
            blob = ecf8.encode(part, chunk_size=c)
            dt = ecf8.to_device(blob)
            fw = fused.FusedWeight(dt)
            tw = fused.PlainWeight(cp.from_dlpack(raw.view(bits).reshape(-1)), (n, k), c, dtype=fw.dtype_name)
            buf = torch.empty(n * k * part.itemsize, dtype=torch.uint8, device="cuda")
            st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
            dec = graph_ms(lambda: dt.launch(buf.data_ptr(), st()), REPS) * 1e3
            assert torch.equal(buf.view(tdt).view(n, k).view(bits), raw.view(bits))
            line = f"{fmt} {n}x{k} chunk {c} ({len(blob)*8/(n*k):.3f} b/w): decode {dec:.1f}"
            for b in (1, 16):
                x = torch.randn(b, k, device="cuda").to(tdt)
                xb = cp.from_dlpack(x.view(bits))
                x32 = cp.from_dlpack(x.float().contiguous())
                y = cp.empty((b, n), cp.float32)
                work = cp.empty(fw.workspace_floats(b), cp.float32)
                tc_y, twin_y = mma.matmul(fw, xb).get(), mma.matmul(tw, xb).get()
                assert np.array_equal(tc_y.view(np.uint32), twin_y.view(np.uint32))
                if fmt == "e4m3":
                    base = graph_ms(lambda: torch._scaled_mm(x, raw.t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16), REPS)
                else:
                    base = graph_ms(lambda: F.linear(x, raw), REPS)
                cc = graph_ms(lambda: fw.matmul(x32, out=y, workspace=work, stream=st()), REPS)
                tc = graph_ms(lambda: mma.matmul(fw, xb, out=y, stream=st()), REPS)
                tct = graph_ms(lambda: mma.matmul(tw, xb, out=y, stream=st()), REPS)
                line += f" | b{b}: cuBLAS {base*1e3:.1f} CC {cc*1e3:.1f} TC {tc*1e3:.1f} TCtwin {tct*1e3:.1f}"
            print(line, flush=True)
