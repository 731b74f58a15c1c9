"""The tensor-core prototype (``mma.matmul``, E4M3 x E4M3 and BF16 x BF16): bit-identical to its
uncompressed twin on real and arbitrary weights, exactly the float64 product where every sum is
exact, close to it elsewhere; what it does not cover is refused.

    pytest -p no:cacheprovider bench/fused_mma/test_fused_mma.py     # GPU tests skip without a GPU
"""

import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ecf8
from ecf8 import fused

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests")]
import mma  # noqa: E402
from conftest import cuda_available, real_weights  # noqa: E402,F401  (the test suite's fixture)
from helpers import garbage_payload, weights_like  # noqa: E402


def gpu(test):
    """Marked ``gpu``, and skipped without CuPy and a GPU (the test suite's conftest does that for
    tests/, which this folder is not part of)."""
    return pytest.mark.gpu(pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")(test))

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
# Bound on |y - float64 product| / (|x| @ |W|.T): BF16 products are exact and summed in f32
# accumulators (one rounding an mma, K / 16 + 8 of them: < 2^-12 for K <= 28672); Hopper's FP8
# mma sums with fewer bits (about 14, DeepSeek-V3's report), so E4M3 gets 2^-8.
TOLERANCE = {E4M3: 2.0 ** -8, BF16: 2.0 ** -12}


def test_kernel_names_match_the_instantiations():
    """Every name mma.matmul launches is compiled, and the source instantiates exactly those."""
    source = (HERE / "ecf8_fused_mma.cu").read_text()
    body = re.search(r"#define ECF8_MMA_INSTANCES\(MT\)(.*?)\n(?!\s)", source, re.S).group(1)
    templates = re.findall(r"ecf8_fused_mma<MT, (\w+), (\d)>", body)
    tiles = re.findall(r"^ECF8_MMA_INSTANCES\((\d+)\)", source, re.M)
    assert {f"ecf8_fused_mma<{m}, {d}, {e}>" for m in tiles for d, e in templates} == set(mma.MMA_NAMES)
    launched = {f"ecf8_fused_mma<{m}, {str(d).lower()}, {e}>" for m in mma.MMA_TILES for d in (True, False)
                for e in fused.ELEM_BYTES.values()}
    assert launched == set(mma.MMA_NAMES)


def bits_of(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def run(w: np.ndarray, x: np.ndarray, chunk_size: int, scale: float = 1.0, max_tables: int = 8,
        blob: bytes | None = None):
    """(fused y, twin y) for weight w (or its frame `blob`) and activations x of w's dtype."""
    import cupy as cp

    blob = blob or ecf8.encode(w, chunk_size=chunk_size, max_tables=max_tables, allow_stored=False)
    fw = fused.FusedWeight(blob)
    twin = fw.twin()
    xd = cp.asarray(bits_of(x))
    out = cp.full((x.shape[0], w.shape[0]), np.nan, cp.float32)      # poisoned: every output written
    y = mma.matmul(fw, xd, scale=scale, out=out).get()
    return y, mma.matmul(twin, xd, scale=scale).get()


def check(w: np.ndarray, x: np.ndarray, chunk_size: int, scale: float = 1.0, max_tables: int = 8) -> None:
    """Fused == twin bit for bit; within TOLERANCE of the float64 product where that is finite."""
    y, y_twin = run(w, x, chunk_size, scale, max_tables)
    np.testing.assert_array_equal(y.view(np.uint32), y_twin.view(np.uint32))
    wf, xf = w.astype(np.float64), x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = xf @ wf.T * scale
        magnitude = np.abs(xf) @ np.abs(wf).T * abs(scale)
    finite = np.isfinite(ref) & (magnitude < 2.0 ** 120)
    np.testing.assert_array_less(np.abs(y[finite] - ref[finite]), TOLERANCE[w.dtype] * magnitude[finite] + 1e-30)
    assert not np.isfinite(y[~np.isfinite(ref)]).any()


def small_values(rng, shape, dtype) -> np.ndarray:
    """Values in {0, +-0.5, +-1, +-2}: every product and partial sum of K <= 16384 of them is a
    multiple of 0.25 below 2^16, exact in any accumulator of 18 or more bits."""
    return rng.choice(np.array([0, 0.5, -0.5, 1, -1, 2, -2, 1, -1], np.float32), shape).astype(dtype)


@gpu
@pytest.mark.parametrize("dtype", [E4M3, BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,chunk", [((64, 1024), 4096), ((40, 2048), 2048), ((24, 3584), 512),
                                         ((101, 2048), 8192), ((9, 512), 32768), ((35, 1536), 4096)])
@pytest.mark.parametrize("batch", [1, 7, 16, 17, 64, 70])
def test_exact_sums_equal_the_float64_product(dtype, shape, chunk, batch):
    """Where every sum is exact, y is the float64 product itself: every weight lands in the right
    row and column, for several rows a chunk (with a short last chunk), whole chunks a row,
    chunks ending inside rows (a warp's span then lcm(chunk, K)), N not a multiple of 8, and
    batches of 1-4 tiles and slabs of 64."""
    rng = np.random.default_rng(batch * 1000 + shape[0])
    w = small_values(rng, shape, dtype)
    x = small_values(rng, (batch, shape[1]), dtype)
    y, y_twin = run(w, x, chunk, scale=0.25)
    expected = (x.astype(np.float64) @ w.astype(np.float64).T * 0.25).astype(np.float32)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y_twin, expected)


def real(real_weights, kind: str) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in real_weights[kind].values()])


@gpu
@pytest.mark.parametrize("batch", [1, 3, 16, 33])
@pytest.mark.parametrize("shape,chunk", [((384, 1536), 4096), ((1024, 4096), 8192), ((256, 14336), 2048),
                                         ((256, 14336), 8192), ((96, 4096), 4096), ((200, 2048), 32768)])
@pytest.mark.parametrize("kind", ["e4m3", "bf16"])
def test_real_weights_equal_twin_and_reference(real_weights, kind, batch, shape, chunk):
    """Real MiniLM bytes (tiled) in Llama-like shapes, activations of the same type."""
    w = np.resize(real(real_weights, kind), shape[0] * shape[1]).reshape(shape)
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(w.dtype)
    check(w, x, chunk, scale=0.0123)


@gpu
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_bit_patterns(data):
    """Every bit pattern of weights and activations (NaN, Inf, subnormals, zeros of both signs)."""
    rows = data.draw(st.integers(1, 100))
    cols = 512 * data.draw(st.integers(1, 4))
    chunk = data.draw(st.sampled_from([512, 1024, 2048, 4096, 16384]))
    batch = data.draw(st.integers(1, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    dtype = data.draw(st.sampled_from([E4M3, BF16]))
    unsigned = f"u{dtype.itemsize}"
    w = rng.integers(0, 1 << (8 * dtype.itemsize), (rows, cols), dtype=unsigned)
    x = rng.integers(0, 1 << (8 * dtype.itemsize), (batch, cols), dtype=unsigned)
    if data.draw(st.booleans()):
        # |w|, |x| < 2 for BF16 (exponent's top bit clear), no NaN for E4M3: every output checkable
        mask = np.uint16(0xBFFF) if dtype == BF16 else np.uint8(0xF7)
        w, x = w & mask, x & mask
    check(w.view(dtype), x.view(dtype), chunk, scale=data.draw(st.sampled_from([1.0, 0.5, 3e-4])),
          max_tables=data.draw(st.integers(1, 8)))


@gpu
@pytest.mark.parametrize("dtype", [E4M3, BF16], ids=lambda d: d.name)
def test_garbage_payload_runs_in_bounds(dtype):
    """A frame whose payload is random bytes (checksums off) multiplies without an error or an
    out-of-bounds access (compute-sanitizer: bench/garbage_decode.py); the result is the twin's on
    the same garbage's CPU decode."""
    import cupy as cp

    w = weights_like(512 * 2048, dtype, seed=7).reshape(512, 2048)
    bad = garbage_payload(ecf8.encode(w, chunk_size=4096, max_tables=4, allow_stored=False), seed=3)
    fw = fused.FusedWeight(ecf8.to_device(bad, verify=False))
    x = cp.asarray(bits_of(weights_like(3 * 2048, dtype, seed=8).reshape(3, 2048)))
    plain = cp.asarray(bits_of(ecf8.decode(bad, verify=False)).reshape(-1))
    twin = fused.PlainWeight(plain, (512, 2048), 4096, dtype=dtype.name)
    np.testing.assert_array_equal(mma.matmul(fw, x).get().view(np.uint32), mma.matmul(twin, x).get().view(np.uint32))


@gpu
def test_refusals():
    import cupy as cp

    fw = fused.FusedWeight(ecf8.encode(weights_like(64 * 1024, BF16).reshape(64, 1024), chunk_size=4096,
                                       allow_stored=False))
    with pytest.raises(ecf8.UnsupportedError, match="bfloat16 bits"):
        mma.matmul(fw, cp.zeros((2, 1024), cp.float32))
    with pytest.raises(ecf8.UnsupportedError, match="1024"):
        mma.matmul(fw, cp.zeros((2, 512), cp.uint16))
    with pytest.raises(ecf8.UnsupportedError, match="float32"):
        mma.matmul(fw, cp.zeros((2, 1024), cp.uint16), out=cp.zeros((2, 64), cp.float16))
    w8 = weights_like(256 * 1024, E4M3).reshape(256, 1024)
    blocked = fused.FusedWeight(ecf8.encode(w8, allow_stored=False), block_scales=cp.ones((2, 8), cp.float32))
    with pytest.raises(ecf8.UnsupportedError, match="block_scales"):
        mma.matmul(blocked, cp.zeros((2, 1024), cp.uint8))
