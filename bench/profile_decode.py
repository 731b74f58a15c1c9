"""One warm E4M3 decode of real elements, for Nsight Compute:

    python bench/profile_decode.py [ELEMENTS [CHUNK_SIZE]]    (default: 2**26, ecf8's default chunk)

    ncu --clock-control none -k regex:ecf8_decode --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python bench/profile_decode.py

The default decode fills half a wave.  A decode that fills the GPU is bound by its integer
instructions (bench/NOTES.md, fourth session): on a 14336x4096 weight at chunk 8192 the busy
fractions of the ALU pipe and of the FMA-heavy pipe (where IMAD runs) add up to 91% (free clocks)
to 100% (ncu's locked clocks), and moving ALU work to IMAD made the decoder no faster:

    M=sm__inst_executed.sum,sm__inst_executed_pipe_alu.sum,sm__inst_executed_pipe_fma.sum
    M=$M,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_issued.avg.per_cycle_active
    M=$M,sm__pipe_fmaheavy_cycles_active.avg.pct_of_peak_sustained_active
    ncu --clock-control none -k regex:ecf8_decode --launch-skip 1 --launch-count 1 --metrics $M \\
        python bench/profile_decode.py 58720256 8192
"""

import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecf8  # noqa: E402
import minilm  # noqa: E402

elements = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 26
options = {"chunk_size": int(sys.argv[2])} if len(sys.argv) > 2 else {}
x = minilm.tiled(minilm.weights("e4m3"), elements)
dt = ecf8.to_device(ecf8.encode(x, **options))
out = cp.empty(x.size, cp.uint8)
for _ in range(2):
    ecf8.decode(dt, device="cuda", out=out)
cp.cuda.Device().synchronize()
assert bool((out == cp.asarray(x.view("uint8"))).all())
print("decoded", x.size, "elements twice at chunk size", 1 << dt.frame.chunk_log2, "bit-exact")
