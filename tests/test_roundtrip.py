"""Round trip: every bit pattern, dtype, shape and length decodes bit-exactly on the CPU."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ecf8
from helpers import DTYPES, assert_bit_exact, bits, from_bits, uint_of, weights_like

EDGE_LENGTHS = [0, 1, 2, 3, 15, 16, 17, 511, 512, 513, 1023, 1024, 1025,
                32767, 32768, 32769, 65536 + 7]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_lengths_random_bits(dtype, n):
    u = np.random.default_rng(n).integers(0, 1 << (8 * dtype.itemsize), n).astype(uint_of(dtype))
    x = from_bits(u, dtype)
    assert_bit_exact(ecf8.decode(ecf8.encode(x)), x)
    coded = ecf8.encode(x, chunk_size=512, allow_stored=False)
    assert n == 0 or not ecf8.info(coded).stored
    assert_bit_exact(ecf8.decode(coded), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_lengths_weights(dtype, n):
    x = weights_like(n, dtype, seed=n)
    blob = ecf8.encode(x, chunk_size=1024)
    assert_bit_exact(ecf8.decode(blob), x)
    if n >= 4096:
        assert not ecf8.info(blob).stored
        assert len(blob) < x.nbytes


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7, 1, 3), (64, 48), (2, 3, 4, 5, 6, 7, 2, 2)])
def test_shapes(dtype, shape):
    x = weights_like(int(np.prod(shape)), dtype).reshape(shape)
    y = ecf8.decode(ecf8.encode(x))
    assert_bit_exact(y, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_non_contiguous_input(dtype):
    base = weights_like(200 * 300, dtype).reshape(200, 300)
    for view in (base.T, base[::3, 1::2], base[:, ::-1]):
        assert_bit_exact(ecf8.decode(ecf8.encode(view)), np.ascontiguousarray(view))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@given(data=st.data())
def test_arbitrary_bit_patterns(dtype, data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    u = data.draw(hnp.arrays(uint_of(dtype), shape))
    x = u.view(dtype)
    chunk = data.draw(st.sampled_from([512, 1024, 32768]))
    tables = data.draw(st.integers(1, 8))
    blob = ecf8.encode(x, chunk_size=chunk, max_tables=tables, allow_stored=x.size == 0)
    assert x.size == 0 or not ecf8.info(blob).stored
    assert_bit_exact(ecf8.decode(blob), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@given(n=st.integers(0, 5000), alphabet=st.lists(st.integers(0, 65535), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_few_distinct_values(dtype, n, alphabet, seed):
    """Degenerate statistics: tensors built from a handful of bit patterns."""
    pool = np.array(alphabet, dtype=np.uint32) & ((1 << (8 * dtype.itemsize)) - 1)
    u = np.random.default_rng(seed).choice(pool, n).astype(uint_of(dtype))
    x = u.view(dtype)
    assert_bit_exact(ecf8.decode(ecf8.encode(x, chunk_size=512, allow_stored=False)), x)


def test_all_fp8_codes():
    for dtype in DTYPES[:2]:
        x = np.arange(256, dtype=np.uint8).repeat(300).view(dtype)
        np.random.default_rng(0).shuffle(x)
        assert_bit_exact(ecf8.decode(ecf8.encode(x, allow_stored=False)), x)


def test_all_16bit_codes():
    for dtype in DTYPES[2:]:
        x = np.arange(1 << 16, dtype=np.uint16).view(dtype)
        assert_bit_exact(ecf8.decode(ecf8.encode(x, chunk_size=4096, allow_stored=False)), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_special_values(dtype):
    """NaN (all payloads), +-0, +-Inf where the type has it, subnormals, extremes."""
    info = ml_dtypes.finfo(dtype) if dtype.itemsize == 1 or dtype == DTYPES[2] else np.finfo(dtype)
    specials = [0.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal),
                -float(info.smallest_subnormal), float(info.tiny), np.nan]
    if dtype != DTYPES[0]:  # E4M3FN has no infinities
        specials += [np.inf, -np.inf]
    x = np.array(specials * 500, dtype=np.float32).astype(dtype)
    u = bits(x).copy()
    u[::7] |= uint_of(dtype).type(1 << (8 * dtype.itemsize - 1))      # flip signs, NaN payloads stay
    x = u.view(dtype)
    np.random.default_rng(1).shuffle(x)
    assert_bit_exact(ecf8.decode(ecf8.encode(x, chunk_size=512, allow_stored=False)), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_constant_tensor(dtype):
    x = np.full(100_000, 0.5, dtype=np.float32).astype(dtype)
    blob = ecf8.encode(x)
    assert_bit_exact(ecf8.decode(blob), x)
    assert len(blob) < x.nbytes * 0.8


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, np.frombuffer])
def test_blob_types(kind):
    x = weights_like(3000, DTYPES[0])
    blob = ecf8.encode(x)
    wrapped = kind(blob) if kind is not np.frombuffer else np.frombuffer(blob, np.uint8)
    assert_bit_exact(ecf8.decode(wrapped), x)
    assert ecf8.info(wrapped).numel == 3000


def test_incompressible_is_stored_and_never_larger_than_raw_plus_header():
    x = from_bits(np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8), DTYPES[0])
    blob = ecf8.encode(x)
    meta = ecf8.info(blob)
    assert meta.stored and meta.tables == 0
    assert len(blob) <= x.nbytes + 64
    assert_bit_exact(ecf8.decode(blob), x)


def test_info_fields():
    x = weights_like(100_000, DTYPES[0]).reshape(250, 400)
    blob = ecf8.encode(x, chunk_size=8192, max_tables=2)
    meta = ecf8.info(blob)
    assert (meta.dtype, meta.shape, meta.numel) == ("F8_E4M3", (250, 400), 100_000)
    assert meta.chunk_size == 8192 and meta.chunks == 13 and 1 <= meta.tables <= 2
    assert meta.compressed_bytes == len(blob) and meta.original_bytes == 100_000
    assert meta.bits_per_weight == pytest.approx(len(blob) * 8 / 100_000)
    assert meta.code_lengths.shape == (meta.tables, 256)


def test_encode_options_validated():
    x = weights_like(1000, DTYPES[0])
    for bad in (dict(chunk_size=1000), dict(chunk_size=256), dict(chunk_size=1 << 21),
                dict(max_tables=0), dict(max_tables=9)):
        with pytest.raises(ecf8.UnsupportedError):
            ecf8.encode(x, **bad)


def test_chunk_size_none_picks_the_decode_chunk_size():
    from ecf8 import format as fmt
    from ecf8.encoder import decode_chunk_size

    for n in (1, 70_000, 8192 * 4096 + 3):
        x = weights_like(n, DTYPES[0]) if n < 100_000 else np.zeros(n, DTYPES[0])
        frame = fmt.parse(memoryview(ecf8.encode(x, chunk_size=None, allow_stored=False)))
        assert 1 << frame.chunk_log2 == decode_chunk_size(n)
        assert_bit_exact(ecf8.decode(ecf8.encode(x, chunk_size=None)), x)
