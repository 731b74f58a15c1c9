"""The numcodecs codec (zarr format 2): any memory order, every dtype, bit-exact.

zarr 2 calls a compressor with the chunk as an array in the array's memory order and reads the
decoded buffer back in that order (``reshape(-1, order="A")`` then ``reshape(chunks, order)``), or
decodes straight into an ``out`` of that order.  ``zarr2_roundtrip`` does exactly that, so the
zarr-2 path is checked whichever zarr is installed; ``test_real_zarr_format2_array`` then uses the
installed zarr (2.x: a plain array; 3.x: a ``zarr_format=2`` array, which calls the codec the same
way).  Run this file in an environment with ``zarr<3`` to check zarr 2 itself.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ecf8
from ecf8.errors import ECF8Error
from helpers import DTYPES, assert_bit_exact, bits, from_bits, uint_of, weights_like

numcodecs = pytest.importorskip("numcodecs")
from numcodecs.compat import ensure_ndarray_like  # noqa: E402

from ecf8.numcodecs_codec import ECF8  # noqa: E402

SHORT = {np.dtype(ml_dtypes.float8_e4m3fn): "e4m3", np.dtype(ml_dtypes.float8_e5m2): "e5m2",
         np.dtype(ml_dtypes.bfloat16): "bf16", np.dtype(np.float16): "fp16"}


def zarr2_roundtrip(codec, chunk: np.ndarray, order: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Encode ``chunk`` and decode it both ways zarr 2 does: (frame, without out, into out)."""
    dtype, shape = chunk.dtype, chunk.shape
    cdata = codec.encode(chunk.astype(dtype, order=order))
    plain = ensure_ndarray_like(codec.decode(cdata)).view(dtype)
    plain = plain.reshape(-1, order="A").reshape(shape, order=order)
    dest = np.empty(shape, dtype, order=order)
    codec.decode(cdata, dest)
    return cdata, plain, dest


def case(dtype, shape, seed=0):
    return weights_like(int(np.prod(shape)), dtype, seed=seed).reshape(shape)


@pytest.mark.parametrize("order", "CF")
@pytest.mark.parametrize("shape", [(64, 48), (7, 5, 33), (1, 1000), (0, 5), (0,), (1,)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_dtype_and_order(dtype, shape, order):
    x = case(dtype, shape)
    for codec, chunk in [(ECF8(), x), (ECF8(dtype=SHORT[dtype]), bits(x).reshape(shape))]:
        cdata, plain, dest = zarr2_roundtrip(codec, chunk, order)
        assert_bit_exact(plain, chunk)
        assert_bit_exact(dest, chunk)
        # the stored frame holds the chunk in the array's memory order (the zarr v2 "order")
        assert_bit_exact(ecf8.decode(cdata), np.ravel(x, order=order))


@given(st.sampled_from(DTYPES), st.sampled_from("CF"), st.data())
def test_any_bit_pattern(dtype, order, data):
    u = data.draw(hnp.arrays(uint_of(dtype), hnp.array_shapes(min_dims=1, max_dims=3, max_side=40)))
    x = from_bits(u, dtype)
    for codec, chunk in [(ECF8(chunk_size=512), x), (ECF8(dtype=SHORT[dtype], max_tables=1), u)]:
        _, plain, dest = zarr2_roundtrip(codec, chunk, order)
        assert_bit_exact(plain, chunk)
        assert_bit_exact(dest, chunk)


def test_frames_of_ecf8_0_1_into_out_of_any_order():
    x = case(np.dtype(ml_dtypes.bfloat16), (30, 20))
    legacy = ecf8.encode(x)  # what ecf8 <= 0.1.0 stored: the chunk's shape, C order
    codec = ECF8()
    assert_bit_exact(codec.decode(legacy), x.reshape(-1))
    for order in "CF":
        out = np.empty(x.shape, x.dtype, order=order)
        codec.decode(legacy, out)
        assert_bit_exact(out, x)
    out = np.empty(x.shape, np.uint16, order="F")
    ECF8(dtype="bf16").decode(legacy, out)
    np.testing.assert_array_equal(out, bits(x))


def test_refusals():
    with pytest.raises(ECF8Error, match="dtype must be one of"):
        ECF8(dtype="fp32")
    with pytest.raises(ECF8Error, match="chunk_size"):
        ECF8(chunk_size=1000)
    with pytest.raises(ECF8Error, match="max_tables"):
        ECF8(max_tables=0)
    with pytest.raises(ECF8Error, match="integers"):
        ECF8(chunk_size=4096.0)
    with pytest.raises(ECF8Error, match="cannot code dtype uint8"):
        ECF8().encode(np.zeros(8, np.uint8))
    with pytest.raises(ECF8Error, match="whole number of bf16"):
        ECF8(dtype="bf16").encode(np.zeros(7, np.uint8))
    with pytest.raises(ECF8Error, match="cannot read the chunk"):
        ECF8(dtype="bf16").encode(np.zeros((8, 8), np.uint16)[:, ::2])
    frame = ECF8(dtype="bf16").encode(np.zeros(8, np.uint16))
    with pytest.raises(ECF8Error, match="holds 16 bytes, out has 32"):
        ECF8(dtype="bf16").decode(frame, np.empty(16, np.uint16))


def test_config_round_trip():
    codec = numcodecs.get_codec({"id": "ecf8", "dtype": "e4m3", "chunk_size": 4096})
    assert isinstance(codec, ECF8)
    assert numcodecs.get_codec(codec.get_config()).get_config() == codec.get_config()


def zarr_format2_array(zarr, shape, chunks, dtype, order, codec):
    if int(zarr.__version__.split(".")[0]) < 3:
        return zarr.zeros(shape, chunks=chunks, dtype=dtype, order=order, compressor=codec,
                          store=zarr.MemoryStore())
    return zarr.create_array(store={}, shape=shape, chunks=chunks, dtype=dtype, order=order,
                             zarr_format=2, compressors=codec, filters=None, fill_value=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("order", "CF")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_real_zarr_format2_array(dtype, order):
    zarr = pytest.importorskip("zarr")
    x = bits(case(dtype, (70, 45), seed=3)).reshape(70, 45)  # zarr has no float8/bfloat16 type
    a = zarr_format2_array(zarr, x.shape, (32, 16), x.dtype, order, ECF8(dtype=SHORT[dtype]))
    a[:] = x
    np.testing.assert_array_equal(a[:], x)  # full chunks (decoded into out) and edge chunks
    np.testing.assert_array_equal(a[5:67, 3:40], x[5:67, 3:40])
    a[10:20, 10:20] = 0
    x[10:20, 10:20] = 0
    np.testing.assert_array_equal(a[:], x)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_weights_in_a_zarr_format2_array(real_weights):
    zarr = pytest.importorskip("zarr")
    w = next(iter(real_weights["e4m3"].values())).view(np.uint8)
    for order in "CF":
        a = zarr_format2_array(zarr, w.shape, (100, 256), w.dtype, order, ECF8(dtype="e4m3"))
        a[:] = w
        np.testing.assert_array_equal(a[:], w)
