"""One warm E4M3 decode of 64M real elements, for Nsight Compute:

    ncu --clock-control none -k regex:ecf8_decode --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python bench/profile_decode.py
"""

import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecf8  # noqa: E402
import minilm  # noqa: E402

x = minilm.tiled(minilm.weights("e4m3"), 1 << 26)
dt = ecf8.to_device(ecf8.encode(x))
out = cp.empty(x.size, cp.uint8)
for _ in range(2):
    ecf8.decode(dt, device="cuda", out=out)
cp.cuda.Device().synchronize()
assert bool((out == cp.asarray(x.view("uint8"))).all())
print("decoded", x.size, "elements twice, bit-exact")
