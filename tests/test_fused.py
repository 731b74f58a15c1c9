"""The fused decode + matrix product (``ecf8.fused``, E4M3 and BF16): bit-identical to its
uncompressed twin (the same kernel reading the weight's bytes), close to a float64 reference, on
real and arbitrary weights; what it does not cover is refused.

The GPU tests are marked ``gpu`` (run ``pytest -m gpu`` on a GPU machine).
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ecf8
from ecf8 import fused
from helpers import weights_like

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)


def test_supports_names_what_it_does_not_cover():
    assert fused.supports((4096, 14336), "float8_e4m3fn") is None
    assert "512" in fused.supports((384, 384), "float8_e4m3fn")
    assert fused.supports((512, 512), "bfloat16") is None
    assert "float16" in fused.supports((512, 512), "float16")
    assert "2-D" in fused.supports((512,), "float8_e4m3fn")


def instantiated(source: str) -> set[str]:
    """The ecf8_fused<...> instantiations that ecf8_fused.cu's ECF8_FUSED_INSTANCES(B) lines make."""
    import re

    body = re.search(r"#define ECF8_FUSED_INSTANCES\(B\)(.*?)\n(?!\s)", source, re.S).group(1)
    templates = re.findall(r"ecf8_fused<B, (\w+), (\w+), (\d)>", body)
    batches = re.findall(r"^ECF8_FUSED_INSTANCES\((\d+)\)", source, re.M)
    return {f"ecf8_fused<{b}, {d}, {s}, {e}>" for b in batches for d, s, e in templates}


def test_kernel_names_match_the_instantiations():
    """Every name matmul launches is a name compile_module asks NVRTC for, and the CUDA source
    instantiates exactly those (a mismatch fails only at run time on a GPU)."""
    source = (fused._cuda_dir() / "ecf8_fused.cu").read_text()
    assert instantiated(source) == set(fused.SLAB_NAMES)
    launched = {f"ecf8_fused<{b}, {str(d).lower()}, {str(s).lower()}, {e}>" for b in fused.SLABS
                for d in (True, False) for name, e in fused.ELEM_BYTES.items()
                for s in ((False, True) if name == "float8_e4m3fn" else (False,))}    # block scales: E4M3
    assert launched == set(fused.SLAB_NAMES)


def reference(w: np.ndarray, x: np.ndarray, scale: float, block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 product, float64 bound on float32 rounding: |W| |x| summed, times 2^-20, and where
    no float32 partial sum can overflow: that sum, unscaled, below 2^127)."""
    wf = w.astype(np.float64)
    if block is not None:
        wf = wf * np.repeat(np.repeat(block.astype(np.float64), 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
    xf = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        magnitude = np.abs(xf) @ np.abs(wf).T
        return xf @ wf.T * scale, magnitude * abs(scale) * 2.0 ** -20, magnitude < 2.0 ** 127


def check(w: np.ndarray, x: np.ndarray, chunk_size: int, scale: float = 1.0, block=None,
          max_tables: int = 8) -> None:
    """Fused == twin bit for bit; both within float32 rounding of the float64 reference where finite."""
    import cupy as cp

    blob = ecf8.encode(w, chunk_size=chunk_size, max_tables=max_tables, allow_stored=False)
    fw = fused.FusedWeight(blob, block_scales=None if block is None else cp.asarray(block))
    twin = fw.twin()
    assert fw.chunk_size == twin.chunk_size == chunk_size
    xd = cp.asarray(x)
    out = cp.full((x.shape[0], w.shape[0]), np.nan, cp.float32)    # poisoned: every output written
    y = fw.matmul(xd, scale=scale, out=out).get()
    y_twin = twin.matmul(xd, scale=scale).get()
    np.testing.assert_array_equal(y.view(np.uint32), y_twin.view(np.uint32))
    ref, tol, representable = reference(w, x, scale, block)
    finite = np.isfinite(ref) & representable
    np.testing.assert_array_less(np.abs(y[finite] - ref[finite]), tol[finite] + 1e-30)
    assert not np.isfinite(y[~np.isfinite(ref)]).any()


def real_e4m3(real_weights) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in real_weights["e4m3"].values()])


def real_bf16(real_weights) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in real_weights["bf16"].values()])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("shape,chunk", [((384, 1536), 4096), ((1024, 4096), 8192), ((512, 3584), 4096),
                                         ((256, 14336), 8192), ((96, 2560), 32768)])
def test_real_weights_equal_twin_and_reference(real_weights, batch, shape, chunk):
    """Real MiniLM E4M3 bytes (tiled) in Llama-like shapes: chunks holding several rows, chunks
    inside one row, and chunks that end mid-row (14336 = 3.5 x 4096)."""
    src = real_e4m3(real_weights)
    n = shape[0] * shape[1]
    w = np.resize(src, n).reshape(shape)
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    check(w, x, chunk, scale=0.0123)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
@pytest.mark.parametrize("shape,chunk", [((384, 1536), 4096), ((256, 14336), 8192), ((96, 2560), 32768)])
def test_real_bf16_weights_equal_twin_and_reference(real_weights, batch, shape, chunk):
    """Real MiniLM BF16 bytes (tiled): whole-row chunks, chunks inside a row, chunks ending mid-row."""
    w = np.resize(real_bf16(real_weights), shape[0] * shape[1]).reshape(shape)
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    check(w, x, chunk, scale=0.37)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5])
def test_whole_row_chunks_write_what_the_reduction_writes(real_weights, batch):
    """Where every row lies in one chunk the product kernel writes Y itself; the two-kernel route
    (row partials, then their reduction) must give the same bits."""
    import cupy as cp

    w = np.resize(real_e4m3(real_weights), 256 * 2048).reshape(256, 2048)
    x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, 2048)).astype(np.float32))
    for block in (None, cp.asarray(np.random.default_rng(3).uniform(1e-3, 1e-2, (2, 16)).astype(np.float32))):
        fw = fused.FusedWeight(ecf8.encode(w, chunk_size=4096, allow_stored=False), block_scales=block)
        assert fw._partial_floats(batch) == 0                    # two rows a chunk: written directly
        direct = fw.matmul(x, scale=0.37).get()
        fw._direct = False                                       # the same product through partials
        assert fw._partial_floats(batch) > 0
        np.testing.assert_array_equal(fw.matmul(x, scale=0.37).get().view(np.uint32), direct.view(np.uint32))


@pytest.mark.gpu
def test_bundled_real_linear_unchanged(real_weights):
    """The one bundled weight whose K is a multiple of 512 (384 x 1536), as it is, block-scaled, and
    with a per-tensor scale on top (both apply)."""
    (w,) = [w for w in real_weights["e4m3"].values() if w.shape[1] % 512 == 0]
    block = np.random.default_rng(1).uniform(1e-3, 1e-2, (-(-w.shape[0] // 128), w.shape[1] // 128))
    x = np.random.default_rng(2).standard_normal((4, w.shape[1])).astype(np.float32)
    check(w, x, 4096, block=block.astype(np.float32))
    check(w, x, 4096, scale=0.37, block=block.astype(np.float32))


@pytest.mark.gpu
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_bit_patterns(data):
    """Every byte pattern (NaN, subnormals, zeros of both signs), shapes, chunk sizes, batches, scales."""
    rows = data.draw(st.integers(1, 300))
    cols = 512 * data.draw(st.integers(1, 6))
    chunk = data.draw(st.sampled_from([512, 1024, 4096, 16384]))
    batch = data.draw(st.integers(1, 17))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    dtype = data.draw(st.sampled_from([E4M3, BF16]))
    bits = rng.integers(0, 1 << (8 * dtype.itemsize), (rows, cols), dtype=f"u{dtype.itemsize}")
    if dtype == BF16 and data.draw(st.booleans()):
        # |w| < 2 (exponent's top bit clear: zeros, subnormals, no Inf/NaN): products and sums stay
        # finite and below 2^127, so every output is checked against the reference, whereas with
        # all 256 exponents nearly every row holds an Inf/NaN or a product too large to check.
        bits &= np.uint16(0xBFFF)
    w = bits.view(dtype)
    x = rng.standard_normal((batch, cols)).astype(np.float32) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    block = None
    if dtype == E4M3 and data.draw(st.booleans()):
        block = rng.uniform(-2, 2, (-(-rows // 128), cols // 128)).astype(np.float32)
    check(w, x, chunk, scale=data.draw(st.sampled_from([1.0, 0.5, 3e-4])), block=block,
          max_tables=data.draw(st.integers(1, 8)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4M3, BF16], ids=lambda d: d.name)
def test_gaussian_weights_many_tables(dtype):
    w = weights_like(2048 * 4096, dtype, seed=5).reshape(2048, 4096)
    x = np.random.default_rng(6).standard_normal((5, 4096)).astype(np.float32)
    check(w, x, 2048, max_tables=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4M3, BF16], ids=lambda d: d.name)
def test_garbage_payload_runs_in_bounds(dtype):
    """A frame whose payload is random bytes (checksums off) multiplies without an error or an
    out-of-bounds access (compute-sanitizer: bench/garbage_decode.py); its result is the twin's
    on the same garbage's CPU decode."""
    import cupy as cp
    from helpers import garbage_payload

    w = weights_like(512 * 2048, dtype, seed=7).reshape(512, 2048)
    bad = garbage_payload(ecf8.encode(w, chunk_size=4096, max_tables=4, allow_stored=False), seed=3)
    fw = fused.FusedWeight(ecf8.to_device(bad, verify=False))
    x = cp.asarray(np.random.default_rng(8).standard_normal((3, 2048)).astype(np.float32))
    y = fw.matmul(x).get()
    plain = cp.asarray(ecf8.decode(bad, verify=False).view(f"u{dtype.itemsize}").reshape(-1))
    y_twin = fused.PlainWeight(plain, (512, 2048), 4096, dtype=dtype.name).matmul(x).get()
    np.testing.assert_array_equal(y.view(np.uint32), y_twin.view(np.uint32))


@pytest.mark.gpu
def test_refusals():
    import cupy as cp

    with pytest.raises(ecf8.UnsupportedError, match="multiple of 512"):
        fused.FusedWeight(ecf8.encode(weights_like(384 * 384, E4M3).reshape(384, 384)))
    with pytest.raises(ecf8.UnsupportedError, match="float8_e4m3fn or bfloat16"):
        fused.FusedWeight(ecf8.encode(weights_like(512 * 512, np.dtype(np.float16)).reshape(512, 512)))
    bf16 = ecf8.encode(weights_like(256 * 1024, BF16).reshape(256, 1024), allow_stored=False)
    with pytest.raises(ecf8.UnsupportedError, match="block_scales apply to float8_e4m3fn"):
        fused.FusedWeight(bf16, block_scales=cp.ones((2, 8), cp.float32))
    with pytest.raises(ecf8.UnsupportedError, match="2-byte elements"):
        fused.PlainWeight(cp.zeros(256 * 1024, cp.uint8), (256, 1024), 4096, dtype="bfloat16")
    fw = fused.FusedWeight(ecf8.encode(weights_like(64 * 1024, E4M3).reshape(64, 1024), allow_stored=False))
    with pytest.raises(ecf8.UnsupportedError, match="float32"):
        fw.matmul(cp.zeros((2, 1024), cp.float16))
    with pytest.raises(ecf8.UnsupportedError, match="1024"):
        fw.matmul(cp.zeros((2, 512), cp.float32))
    with pytest.raises(ecf8.UnsupportedError, match="block_scales"):
        fused.FusedWeight(ecf8.encode(weights_like(64 * 1024, E4M3).reshape(64, 1024), allow_stored=False),
                          block_scales=cp.ones((2, 2), cp.float32))
