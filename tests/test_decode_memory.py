"""The CPU decoder's working memory is bounded: beside the result it holds the exponent stream
widened to 64-bit words (at most twice the frame) and passes of a fixed number of elements, not
several full-size temporaries (which took 4.6-6.1x the result's size on 64 M elements).  Measured
in a fresh process, as the peak resident set (VmHWM) over the resident set before the decode."""

import subprocess
import sys

import pytest

from helpers import child_env

PASSES = 48 << 20          # the fixed-size passes' temporaries (BATCH_CHUNK_ELEMENTS, ASSEMBLE_ELEMENTS)

_MEASURE = r'''
import sys
import ml_dtypes
import numpy as np
import ecf8

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

dtype = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}[sys.argv[1]]
x = (np.random.default_rng(0).standard_normal(1 << 25, np.float32) * 0.02).astype(dtype)
blob = ecf8.encode(x)
expected = x.view(np.uint8 if x.itemsize == 1 else np.uint16).copy()
del x
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # the high-water mark starts again here
before = status("VmRSS")
y = ecf8.decode(blob)
grown = status("VmHWM") - before
assert np.array_equal(y.view(expected.dtype), expected)
print(grown, y.nbytes, len(blob))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_cpu_decode_memory_is_the_result_and_bounded_passes(dtype):
    run = subprocess.run([sys.executable, "-c", _MEASURE, dtype], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    grown, result, frame = map(int, run.stdout.split())
    assert grown <= result + 2 * frame + PASSES, (grown, result, frame)
