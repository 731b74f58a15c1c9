"""The tensor-core prototype inside a model: bench_generate's BF16 Llama-3-8B-shaped decoder, its
layers' linears held by ``compress_module(fused=True)``, every forward forced through
``mma.matmul`` (``FusedLinear``'s product replaced, no timed choice), 4 greedy tokens eager and,
with ``graph``, replayed from a CUDA graph.

    CUDA_LAUNCH_BLOCKING=1 python bench/fused_mma/generate_check.py LAYERS BATCH eager|graph

Prints how many weights took the prototype, whether the tokens equal the uncompressed model's
(the prototype sums in its own order: a difference is reported, not failed) and the graph's the
eager ones, the first calls' (weight shape, chunk, x shape, x strides, x address mod 256); an error's
traceback instead of the token lines.  A check, not a benchmark.
"""
import copy
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
import torch  # noqa: E402

import bench_generate as bg  # noqa: E402
import ecf8.torch  # noqa: E402
import mma  # noqa: E402
from ecf8.torch import fused_linear  # noqa: E402
from ecf8.torch.tensors import cupy_view  # noqa: E402

layers, batch, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls = []


def tensor_core_product(self, x2, bias, product):
    """FusedLinear._fused through the prototype: x2 [rows, K] BF16 -> [rows, N] BF16."""
    rows = x2.shape[0]
    y = torch.empty(rows, self.weight.shape[0], dtype=torch.float32, device=x2.device)
    xb = x2.contiguous()
    if xb.data_ptr() % 16:                          # mma.matmul takes 16-byte-aligned X
        xb = xb.clone()
    if len(calls) < 8:
        calls.append((tuple(self.weight.shape), 1 << self.weight.blob.frame.chunk_log2, tuple(x2.shape),
                      x2.stride(), x2.data_ptr() % 256))
    mma.matmul(product, cupy_view(xb.view(torch.int16)), out=cupy_view(y),
               stream=torch.cuda.current_stream(x2.device).cuda_stream)
    if bias is not None:
        y += bias.float()
    return y.to(torch.bfloat16)


fused_linear.FusedLinear._fused = tensor_core_product
fused_linear.MAX_ROWS = 64
fused_linear.BUCKETS = (1, 2, 4, 8, 16, 32, 64)
fused_linear._choices = fused_linear.Choices(None)
fused_linear._choices.get = lambda key: "fused"      # forced: nothing timed
torch.set_grad_enabled(False)                         # as bench_generate (the fused path needs it)
torch.cuda.set_stream(torch.cuda.Stream())            # bench_generate runs on a side stream too
torch.manual_seed(0)
model = bg.Decoder(bg.LLAMA3_8B, layers, False, "cuda")
base = copy.deepcopy(model)
stats = ecf8.torch.compress_module(model.layers, fused=True)
print("fused weights:", stats.fused, "of", stats.weights, flush=True)
st = bg.State(bg.LLAMA3_8B, layers, batch, 64, "cuda")
try:
    want = bg.tokens(base, st, 4)
    got = bg.tokens(model, st, 4)
    torch.cuda.synchronize()
    print(batch, "eager ok; tokens equal to the uncompressed model's:", torch.equal(want, got), flush=True)
    if how == "graph":
        g = bg.capture(model, st)
        st.reset()
        for _ in range(4):
            g.replay()
        torch.cuda.synchronize()
        print(batch, "graph ok; equal to eager:", torch.equal(st.history[:, :4], got), flush=True)
except Exception:
    traceback.print_exc(limit=15)
print("calls", calls)
