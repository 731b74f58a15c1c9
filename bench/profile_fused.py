"""One warm fused E4M3 product (ecf8.fused) of a real-weight N x K matrix, for Nsight Compute:

    python bench/profile_fused.py [N K [CHUNK_SIZE [BATCH]]]    (default: 14336 4096 8192 1)

    M=sm__inst_executed.sum,sm__inst_executed_pipe_alu.sum,sm__inst_executed_pipe_fma.sum
    M=$M,smsp__sass_thread_inst_executed_op_integer_pred_on.sum
    ncu --clock-control none --kernel-name-base demangled -k 'regex:ecf8_fused<' --launch-skip 2 \\
        --launch-count 2 --metrics $M python bench/profile_fused.py

The name matches the product kernel alone (not the permutation of x or the reduction); the skip
passes the two warm-up products, so the two profiled launches are the twin's, then the fused one.  Integer instructions per weight =
``smsp__sass_thread_inst_executed_op_integer_pred_on.sum`` / (N K): the count the decoder's
notes use (bench/NOTES.md), so the two compare directly.
"""

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecf8  # noqa: E402
import minilm  # noqa: E402
from ecf8 import fused  # noqa: E402

n, k = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (14336, 4096)
chunk = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
w = minilm.tiled(minilm.weights("e4m3"), n * k).reshape(n, k)
fw = fused.FusedWeight(ecf8.encode(w, chunk_size=chunk))
x = cp.asarray(np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32))
for _ in range(2):
    y = fw.matmul(x)
twin = fw.twin()
cp.cuda.Device().synchronize()
assert bool((y.view(cp.uint32) == twin.matmul(x).view(cp.uint32)).all())
assert bool((y.view(cp.uint32) == fw.matmul(x).view(cp.uint32)).all())
print(f"fused product {n}x{k}, chunk {chunk}, batch {batch}: twin, then fused, equal")
