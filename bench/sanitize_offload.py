"""Compressed offloading under compute-sanitizer (the copy stream, events, staging buffers, the
group decoder reading frames out of a staging buffer):

    compute-sanitizer --tool memcheck python bench/sanitize_offload.py
    compute-sanitizer --tool racecheck python bench/sanitize_offload.py    # (slow; optional)

Small models of every dtype, each block a different size, stored (raw) and coded frames mixed,
streamed for several forwards in an order that misses, hits and wraps around, on the default and a
side stream; every output compared with the same model resident on the GPU.  Prints a count.
"""

import copy
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import exact_memory  # noqa: E402,F401  (before torch: its allocations exact too)
import torch  # noqa: E402

import ecf8.torch  # noqa: E402
from ecf8.torch import offload_module  # noqa: E402


def model(dtype: torch.dtype, layers: int) -> torch.nn.Module:
    torch.manual_seed(layers)
    m = torch.nn.Module()
    m.blocks = torch.nn.ModuleList()
    for k in range(layers):
        lin = torch.nn.Linear(64, 64 + 32 * k, bias=False)
        w = torch.randn(lin.out_features, 64)
        if k == 1:                                   # incompressible bits: a stored frame
            bits = torch.randint(0, 256, (w.numel() * dtype.itemsize,), dtype=torch.uint8)
            w = bits.view(dtype).view(w.shape)
        lin.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
        m.blocks.append(torch.nn.Sequential(lin))
    return m.cuda()


checked = 0
for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
    for layers in (1, 2, 4):
        resident = model(dtype, layers)
        ecf8.torch.compress_module(resident, min_numel=1, chunk_size=512)
        streamed = copy.deepcopy(resident)
        offload_module(streamed, "cuda")
        order = [0, 1, 2, 3, 3, 1, 0, 2][: 2 * layers] if layers > 1 else [0, 0]
        for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
            with torch.cuda.stream(stream):
                for k in order:
                    k %= layers
                    with streamed.blocks[k][0].__dict__["_ecf8"].decoded() as got, \
                            resident.blocks[k][0].__dict__["_ecf8"].decoded() as want:
                        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (dtype, layers, k)
                    checked += 1
            stream.synchronize()
torch.cuda.synchronize()
print(f"sanitize_offload: {checked} streamed weights equal the resident ones, bit for bit")
