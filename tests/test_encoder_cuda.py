"""CUDA encoder: its frames equal the CPU encoder's byte for byte (the oracle), and decode.

Both places the table choice can run are exercised: the host, over the copied histograms (any
``encoder.assign_tables`` other than ``table_choice.assign_tables`` takes that path), and the GPU
(``table_choice.assign_tables``, the CPU encoder's rule: its products run on the device).  The host-side pieces (histogram padding, CRC
constants, decode tables, header parsing, exactness of the table choice) are checked without a
GPU; everything else is marked ``gpu`` (skipped without CuPy and a CUDA device).
"""

import struct
import zlib

import ml_dtypes
import numpy as np
import pytest
from helpers import DTYPES, assert_bit_exact, bits, from_bits, uint_of, weights_like
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ecf8
import ecf8.encoder
from ecf8 import crc32
from ecf8 import encoder_cuda as ec
from ecf8 import format as fmt
from ecf8 import table_choice
from ecf8 import tables as code_tables
from ecf8.encoder import symbols

gpu = pytest.mark.gpu
EDGE_LENGTHS = [1, 2, 3, 15, 16, 17, 31, 511, 512, 513, 1023, 4095, 4096, 4097, 32767, 32769, 100_003]


# --- host pieces (no GPU) ------------------------------------------------------------------------

def kernel_histogram(u: np.ndarray, spec, chunk_log2: int) -> np.ndarray:
    """What ecf8_hist returns: counts of symbols made of real elements only, then the last bits."""
    a = spec.alphabet
    nchunks = -(-u.size // (1 << chunk_log2))
    whole = u[: u.size // spec.per_symbol * spec.per_symbol]
    sym = symbols(whole, spec).astype(np.int64)
    chunk = (np.arange(sym.size) * spec.per_symbol) >> chunk_log2
    out = np.bincount(chunk * a + sym, minlength=nchunks * a).astype(np.uint32)
    return np.append(out, np.uint32(u[-1]))


def cpu_histogram(u: np.ndarray, spec, chunk_log2: int) -> np.ndarray:
    """The CPU encoder's histograms, padding included (encoder.py, written out directly)."""
    chunk, n = 1 << chunk_log2, u.size
    nchunks = -(-n // chunk)
    tail = (u[(nchunks - 1) * chunk :] >> spec.man_bits) & ((1 << spec.exp_bits) - 1)
    pad = np.argmax(np.bincount(tail)) << spec.man_bits
    padded = np.concatenate([u, np.full(-(-n // 512) * 512 - n, pad, u.dtype)])
    sym = symbols(padded, spec)
    per_chunk = chunk // spec.per_symbol
    return np.stack([np.bincount(sym[c * per_chunk : (c + 1) * per_chunk], minlength=spec.alphabet)
                     for c in range(nchunks)]), int(pad)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_padding_of_histograms_matches_cpu_encoder(dtype, data):
    spec = fmt.spec_for_dtype(dtype)
    n = data.draw(st.integers(1, 3000))
    chunk_log2 = data.draw(st.integers(9, 12))
    mask = (1 << (8 * dtype.itemsize)) - 1
    u = data.draw(hnp.arrays(uint_of(dtype), n, elements=st.sampled_from(
        sorted({v & mask for v in [0, 1, 0x38, 0x7F, 0x80, 0xFF, 0x3C00, 0x7C00, 0xFFFF, 0x4000]}))))
    hist, pad = ec.finish_histogram(kernel_histogram(u, spec, chunk_log2), spec, n, chunk_log2)
    want, want_pad = cpu_histogram(u, spec, chunk_log2)
    np.testing.assert_array_equal(hist, want)
    assert pad == want_pad


def test_crc_constants_combine_like_zlib():
    """The kernel's CRC algebra, in Python: piece registers shifted and XORed give zlib's CRC,
    seeded (format v2) or not."""
    consts = ec.crc_constants()
    t = consts[:1024].reshape(4, 256)
    assert list(t[0][:4]) == [0, 0x77073096, 0xEE0E612C, 0x990951BA]
    assert [int(v) for v in consts[1024:1056]] == crc32.X2N
    assert [int(v) for v in consts[1056:]] == [crc32.zeros(256 << k) for k in range(5)]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()

    def raw_register(b: bytes) -> int:           # G: init 0, no final xor (slicing by 4)
        c = 0
        for i in range(0, len(b), 4):
            c ^= int.from_bytes(b[i : i + 4], "little")
            c = int(t[3][c & 255] ^ t[2][(c >> 8) & 255] ^ t[1][(c >> 16) & 255] ^ t[0][c >> 24])
        return c

    for seed in (0, 0xDEADBEEF):
        acc = 0
        for start in range(0, 3000, 600):
            piece = raw_register(data[start : start + 600])
            acc ^= crc32.multiply(crc32.zeros(3000 - start - 600), piece)
        crc = ~(crc32.multiply(crc32.zeros(3000), ~seed & 0xFFFFFFFF) ^ acc) & 0xFFFFFFFF
        assert crc == zlib.crc32(data, seed)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1000,), (7, 300)])
def test_parse_header_without_payload(shape):
    x = weights_like(int(np.prod(shape)), DTYPES[0]).reshape(shape)
    blob = ecf8.encode(x, chunk_size=512, allow_stored=x.size == 0)
    frame = fmt.parse(memoryview(blob))
    head = blob[: frame.payload_offset]
    got = ec.parse_header(head, len(blob))
    for field in ("mode", "shape", "n", "chunk_log2", "exp_offset", "exp_words", "raw_offset",
                  "raw_bytes", "payload_offset", "size"):
        assert getattr(got, field) == getattr(frame, field), field
    np.testing.assert_array_equal(got.chunk_words, frame.chunk_words)
    np.testing.assert_array_equal(got.lengths, frame.lengths)


def test_a_header_alone_is_checked_against_the_frame_length():
    blob = ecf8.encode(weights_like(3000, DTYPES[0]), chunk_size=512, allow_stored=False)
    head = memoryview(blob)[: fmt.parse(memoryview(blob)).payload_offset]
    with pytest.raises(ecf8.UnsupportedError, match="verified"):
        fmt.parse(head, verify=True, size=len(blob))
    with pytest.raises(ecf8.CorruptDataError, match="header describes"):
        fmt.parse(head, verify=False, size=len(blob) + 1)
    with pytest.raises(ecf8.CorruptDataError, match="truncated"):
        fmt.parse(head[:-1], verify=False, size=len(blob))


@settings(max_examples=60, deadline=None)
@given(counts=hnp.arrays(np.int64, st.sampled_from([32, 256]), elements=st.integers(0, 1 << 20)))
def test_decode_luts_match_tables(counts):
    from ecf8.tables import code_lengths, decode_lut

    counts[0] += 1
    lengths = code_lengths(counts, fmt.MAX_CODE_LEN)
    incomplete = lengths.copy()
    incomplete[np.argmax(lengths)] = 0                 # a code with unused windows
    rows = np.stack([lengths, incomplete if incomplete.any() else lengths])
    np.testing.assert_array_equal(code_tables.decode_luts(rows, fmt.MAX_CODE_LEN),
                                  np.stack([decode_lut(l, fmt.MAX_CODE_LEN) for l in rows]))


def test_payload_seed_follows_the_cpu_encoder():
    blob = ecf8.encode(weights_like(5000, DTYPES[0]), allow_stored=False)
    frame = fmt.parse(memoryview(blob))
    head = blob[: frame.payload_offset]
    (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    assert zlib.crc32(blob[frame.payload_offset : -4], fmt.header_crc(head)) == crc


class IntProducts(table_choice.HostProducts):
    """The same products in int64 arithmetic, columns in reverse order: a different summation
    order, and no floating point at all."""

    def __init__(self, hist):
        super().__init__(hist)
        self.ints = np.asarray(hist, np.int64)[:, ::-1]

    def costs(self, per_symbol):
        return (self.ints @ per_symbol[:, ::-1].astype(np.int64).T).astype(np.float64)

    def sums(self, assign, k):
        out = np.zeros((k, self.alphabet), np.int64)
        np.add.at(out, assign, self.ints[:, ::-1])
        return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_table_choice_is_exact(data):
    """The exact rule chooses the same tables whatever computes its products, and agrees with the
    CPU encoder's rule on these histograms."""
    alphabet = data.draw(st.sampled_from([32, 256]))
    nchunks = data.draw(st.integers(1, 60))
    scale = data.draw(st.sampled_from([3, 1000, 1 << 16]))
    hist = data.draw(hnp.arrays(np.int64, (nchunks, alphabet), elements=st.integers(0, scale)))
    hist[:, data.draw(st.integers(0, alphabet - 1))] += 1          # no empty chunk
    mask = 15 if alphabet == 256 else 31
    tables = data.draw(st.integers(1, 8))
    k = data.draw(st.integers(1, 8))
    assign = np.arange(nchunks) % k
    host, ints = table_choice.HostProducts(hist), IntProducts(hist)
    np.testing.assert_array_equal(host.sums(assign, k), ints.sums(assign, k))
    ideal = table_choice.ideal_lengths(host.sums(assign, k))
    assert np.array_equal(ideal, np.rint(ideal)) and ideal.max() < 2 ** 23
    np.testing.assert_array_equal(host.costs(ideal), ints.costs(ideal))
    want = table_choice.assign_tables(hist, tables, mask)
    got = table_choice.assign_tables(None, tables, mask, backend=IntProducts(hist))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert want[1].max() < want[0].shape[0] <= tables


# --- GPU ------------------------------------------------------------------------------------------

def device_bits(x: np.ndarray):
    import cupy

    return cupy.asarray(bits(x)).reshape(x.shape)


def on_host(*args, **kwargs):
    """The CPU encoder's table choice, unrecognised by the GPU encoder: it runs on the host."""
    return table_choice.assign_tables(*args, **kwargs)


@pytest.fixture(params=["host", "exact"])
def rule(request, monkeypatch):
    """Where the table choice runs: on the host from the copied histograms, or with its products
    computed on the GPU (the default)."""
    monkeypatch.setattr(ecf8.encoder, "assign_tables",
                        on_host if request.param == "host" else table_choice.assign_tables)
    return request.param


def gpu_encode(x: np.ndarray, **options) -> bytes:
    """Encode on the GPU; the frame must equal the CPU encoder's and decode on both devices."""
    t = ec.encode(device_bits(x), dtype=x.dtype, **options)
    blob = t.tobytes()
    want = ecf8.encode(x, **options)
    assert len(blob) == len(want)
    if blob != want:
        diff = np.flatnonzero(np.frombuffer(blob, np.uint8) != np.frombuffer(want, np.uint8))
        raise AssertionError(f"{x.dtype} {x.shape} {options}: {diff.size} bytes differ, first at "
                             f"{diff[0]} of {len(want)} (header ends at "
                             f"{fmt.parse(memoryview(want)).payload_offset})")
    assert t.frame.size == len(blob) and t.frame.shape == x.shape
    assert ec.encode_to_bytes(device_bits(x), dtype=x.dtype, **options) == want   # no decode tables
    y = ecf8.decode(t, device="cuda")                # the device frame decodes in place
    assert_bit_exact(y.get(), x)
    assert_bit_exact(ecf8.decode(blob), x)           # GPU encode -> CPU decode
    return blob


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_lengths(dtype, n, rule):
    gpu_encode(weights_like(n, dtype, seed=n), chunk_size=4096, allow_stored=False)
    u = np.random.default_rng(n).integers(0, 1 << (8 * dtype.itemsize), n).astype(uint_of(dtype))
    gpu_encode(from_bits(u, dtype), chunk_size=512, max_tables=8, allow_stored=False)
    gpu_encode(from_bits(u, dtype))                  # random bits: stored


@gpu
def test_chunk_size_none_is_the_cpu_encoders_choice():
    for n in (1, 70_000, 8192 * 4096 + 3):
        blob = gpu_encode(weights_like(n, DTYPES[0], seed=n), chunk_size=None, allow_stored=False)
        assert 1 << fmt.parse(memoryview(blob)).chunk_log2 == ecf8.encoder.decode_chunk_size(n)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(), (0,), (5, 0), (1, 1, 1), (3, 7, 11), (1000, 384), (2, 3, 4, 5, 6, 7, 2, 2)])
def test_shapes_and_stored(dtype, shape):
    x = weights_like(int(np.prod(shape)), dtype).reshape(shape)
    gpu_encode(x)
    if x.size:
        gpu_encode(x, allow_stored=False)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_bit_patterns(dtype, data):
    rule = data.draw(st.sampled_from(["host", "exact"]))
    choose = table_choice.assign_tables if rule == "exact" else on_host
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ecf8.encoder, "assign_tables", choose)
        check_bit_patterns(dtype, data)


def check_bit_patterns(dtype, data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=90))
    special = [0, 0x80, 0x7F, 0xFF, 0x78, 0x7C] if dtype.itemsize == 1 else \
        [0, 0x8000, 0x7FC0, 0x7F80, 0xFF80, 0x7C00, 0xFC00, 0x7E00, 0xFFFF, 0x3C00]
    elements = st.one_of(st.sampled_from(special), st.integers(0, (1 << (8 * dtype.itemsize)) - 1))
    x = data.draw(hnp.arrays(uint_of(dtype), shape, elements=elements)).view(dtype)
    gpu_encode(x, chunk_size=data.draw(st.sampled_from([512, 1024, 2048, 32768, 1 << 20])),
               max_tables=data.draw(st.integers(1, 8)), allow_stored=data.draw(st.booleans()))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_special_values(dtype):
    u8 = dtype.itemsize == 1
    for pattern in ([0], [0x80] if u8 else [0x8000], [0x7F, 0xFF] if u8 else [0x7FC0, 0xFFC0],
                    [0x78, 0xF8, 0, 0x80] if u8 else [0x7C00, 0xFC00, 0x7F80, 0]):
        u = np.resize(np.array(pattern, uint_of(dtype)), 70_001)
        gpu_encode(from_bits(u, dtype), chunk_size=1024, allow_stored=False)
    everything = np.arange(256, dtype=np.uint8).repeat(129) if u8 else np.arange(1 << 16, dtype=np.uint16)
    gpu_encode(everything.view(dtype), chunk_size=2048, max_tables=8, allow_stored=False)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_chunk_sizes_and_table_counts(dtype, rule):
    x = weights_like(300_001, dtype, seed=3)
    for log2 in range(9, 21):
        gpu_encode(x, chunk_size=1 << log2, allow_stored=False)
    for tables in range(1, 9):
        gpu_encode(x, chunk_size=1024, max_tables=tables, allow_stored=False)


@gpu
def test_real_weights(real_weights, rule):
    for tensors in real_weights.values():
        for x in tensors.values():
            gpu_encode(x)
            gpu_encode(x, chunk_size=4096, max_tables=8)
            gpu_encode(x.reshape(-1)[:123_457], chunk_size=512, max_tables=3)


@gpu
def test_exact_rule_products_run_on_the_gpu(monkeypatch):
    import cupy

    monkeypatch.setattr(ecf8.encoder, "assign_tables", table_choice.assign_tables)
    seen = []
    monkeypatch.setattr(ec.DeviceProducts, "costs", lambda self, m, f=ec.DeviceProducts.costs:
                        seen.append(type(self.hist)) or f(self, m))
    x = weights_like(200_000, DTYPES[0])
    gpu_encode(x, chunk_size=1024, max_tables=8, allow_stored=False)
    assert seen and all(t is cupy.ndarray for t in seen)


@gpu
def test_cpu_encode_gpu_decode_and_back():
    x = weights_like(250_000, DTYPES[2]).reshape(500, 500)
    blob = ecf8.encode(x, chunk_size=2048)
    y = ecf8.decode(ecf8.to_device(blob), device="cuda")
    assert_bit_exact(y.get(), x)
    again = ec.encode(y, chunk_size=2048)            # a decoded CudaArray encodes as it is
    assert again.tobytes() == blob


@gpu
def test_input_kinds_and_streams():
    import cupy

    x = weights_like(64 * 96, DTYPES[0]).reshape(64, 96)
    want = ecf8.encode(np.ascontiguousarray(x.T), allow_stored=False)
    d = device_bits(x)
    assert ec.encode(d.T, dtype="e4m3", allow_stored=False).tobytes() == want     # strided
    shifted = cupy.zeros(x.size + 1, cupy.uint8)
    shifted[1:] = d.T.reshape(-1)
    view = shifted[1:].reshape(96, 64)                                             # unaligned
    assert ec.encode(view, dtype=ml_dtypes.float8_e4m3fn, allow_stored=False).tobytes() == want
    h = weights_like(5000, DTYPES[3])
    assert ec.encode(cupy.asarray(h)).tobytes() == ecf8.encode(h)                  # float16
    assert ec.encode(cupy.asarray(bits(h)).view(cupy.int16), dtype="F16").tobytes() == ecf8.encode(h)
    stream = cupy.cuda.Stream(non_blocking=True)
    for s in (stream, stream.ptr):
        t = ec.encode(d, dtype="e4m3", stream=s, allow_stored=False)
        assert t.tobytes() == ecf8.encode(x, allow_stored=False)
    try:
        import torch
    except ImportError:
        return
    w = torch.from_numpy(bits(x)).cuda().view(torch.float8_e4m3fn)
    t = ec.encode(w.view(torch.uint8), dtype="e4m3", allow_stored=False)           # DLPack / CAI
    assert t.tobytes() == ecf8.encode(x, allow_stored=False)


@gpu
def test_bad_input_rejected():
    import cupy

    d = cupy.zeros(1000, cupy.uint8)
    for call in (lambda: ec.encode(np.zeros(10, np.float16)),
                 lambda: ec.encode(d),                                       # bits need a dtype
                 lambda: ec.encode(d, dtype="bf16"),                         # wrong width
                 lambda: ec.encode(cupy.zeros(10, cupy.float32), dtype="fp16"),
                 lambda: ec.encode(d, dtype="e4m3", chunk_size=1000),
                 lambda: ec.encode(d, dtype="e4m3", max_tables=9),
                 lambda: ec.encode(d, dtype="int8"),
                 lambda: ec.encode(cupy.zeros((1,) * 9, cupy.uint8), dtype="e4m3")):
        with pytest.raises(ecf8.UnsupportedError):
            call()
